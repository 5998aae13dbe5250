"""The `optkit` command line (placeholder until the CLI issue lands)."""

import sys


def main(argv=None) -> int:
    print("optkit: commands are not implemented yet", file=sys.stderr)
    return 2
