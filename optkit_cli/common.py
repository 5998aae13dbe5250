"""Pieces every optkit command shares: the error type, status messages and progress bars on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from opt_spec.inputs import check_seed


class CLIError(Exception):
    """A problem the user can fix (bad argument, missing file): printed as one message, exit code 2."""


def seed_type(text: str) -> int:
    """argparse's type for the --seed options: opt_spec.inputs' seed rule, refused as a usage error."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is an int in [0, 2**32)") from None


class Console:
    """Status lines and progress bars on stderr; `quiet` silences both (errors are always shown)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """Shown even with --quiet: things the user must know (random weights, skipped backends)."""
        print(message, file=sys.stderr, flush=True)

    def progress(self, iterable=None, total=None, desc: str = "", unit: str = "it", **options):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=self.quiet,
                    leave=False, dynamic_ncols=True, **options)

    @contextlib.contextmanager
    def step(self, message: str):
        """'message ...' then 'done in X s' on stderr around a long step."""
        self.info(f"{message} ...")
        start = time.perf_counter()
        yield
        self.info(f"  done in {time.perf_counter() - start:.1f} s")
