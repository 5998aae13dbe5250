import sys

try:  # Ctrl-C while the command starts (imports, parsing) ends with one line, as it does later
    from .cli import main

    code = main()
except KeyboardInterrupt:
    print("optkit convert: interrupted; nothing was written", file=sys.stderr)
    code = 130
sys.exit(code)
