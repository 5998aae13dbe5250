"""The `optkit` command line: parity, generate, convert, train, bench.

    optkit parity   [--model DIR | --preset NAME] [--backends torch,tf,flax] [--dtype D] [--json]
    optkit generate [--model DIR | --preset NAME] [--backend torch|tf|flax] [decoding options] PROMPT ...
    optkit convert  SRC DST [...]      (see `optkit convert --help`)
    optkit train    --model DIR --task T --data FILE --backend B --output DIR [...]  (see `optkit train --help`)
    optkit bench    [NAME ...]         (runs the scripts in bench/)

Exit status: 0 success; 1 parity failed (a difference beyond the tolerance, a backend that failed), a
benchmark failed, or a checkpoint was refused (opt_spec.errors.CheckpointError or an unsafe pickle: a
malformed, inconsistent or hostile file, named in the message); 2 a usage error or a problem to fix
(missing folder, bad backend name, missing framework: the message names the extra to install). Every
error is one `optkit CMD: error: ...` message; OPTKIT_DEBUG=1 shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

from . import generate, parity, train
from .checkpoints import DEFAULT_PRESET, PRESET_NAMES, hub_arguments
from .common import CLIError, Console

EXIT_REFUSED = 1
EXIT_USAGE = 2


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--model", metavar="DIR|ID",
                   help="Hugging Face OPT folder (config.json + weights), or a Hub id such as facebook/opt-125m "
                        "(from the Hugging Face cache; downloaded unless HF_HUB_OFFLINE=1)")
    hub_arguments(g)
    g.add_argument("--preset", metavar="NAME",
                   help=f"without --model: build (once, cached) and use a random checkpoint of this size "
                        f"(default {DEFAULT_PRESET}; one of {', '.join(PRESET_NAMES)})")
    g.add_argument("--weights-seed", type=int, default=0, metavar="N", help="seed of the random checkpoint (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optkit", description="OPT language models in PyTorch, TensorFlow and JAX/Flax from one spec.",
        epilog="Without --model, parity and generate use a random checkpoint cached in $OPTKIT_CACHE "
               "(default ~/.cache/optkit).")
    from opt_spec import __version__

    parser.add_argument("--version", action="version", version=f"optkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("parity", help="run one checkpoint in every installed backend and compare logits",
                       description=parity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(p)
    parity.add_arguments(p)
    p.set_defaults(handler=parity.run)

    p = sub.add_parser("generate", help="continue prompts with one backend",
                       description=generate.__doc__)
    _model_arguments(p)
    generate.add_arguments(p)
    p.set_defaults(handler=generate.run)

    sub.add_parser("convert", add_help=False, help="convert checkpoints between formats (optkit convert --help)")

    p = sub.add_parser("train", help="fine-tune a checkpoint (causal LM, classification, question answering)",
                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(p)
    p.set_defaults(handler=train.run)

    p = sub.add_parser("bench", help="run the benchmarks in bench/ and print their output")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--dir", help="folder holding the benchmark scripts (default: the bench/ of this checkout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no status lines")
    p.set_defaults(handler=run_bench)
    return parser


# ------------------------------------------------------------------------------------------ bench
def _bench_dir(args) -> Path:
    return Path(args.dir) if args.dir else Path(__file__).resolve().parent.parent / "bench"


def run_bench(args, console: Console) -> int:
    directory = _bench_dir(args)
    scripts = sorted(p for p in directory.glob("*.py") if not p.name.startswith("_")) if directory.is_dir() else []
    if not scripts:
        raise CLIError(f"no benchmarks to run: {directory} has no *.py scripts" +
                       ("" if directory.is_dir() else " (the folder does not exist; bench/ ships with the "
                        "source checkout, not with the installed package)"))
    if args.list:
        for s in scripts:
            print(s.stem)
        return 0
    if args.names:
        by_name = {s.stem: s for s in scripts} | {s.name: s for s in scripts}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            raise CLIError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(s.stem for s in scripts)}")
        scripts = [by_name[n] for n in args.names]
    failures = []
    for script in scripts:
        console.info(f"== bench {script.stem} ({script}) ==")
        sys.stdout.flush()
        code = subprocess.call([sys.executable, str(script)], cwd=str(directory.parent))
        if code != 0:
            failures.append(f"{script.stem} (exit {code})")
    if failures:
        print(f"optkit bench: failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------- convert
def run_convert(argv: list[str]) -> int:
    """`optkit convert ...`: the options and the work belong to conversion.cli (add_arguments, run)."""
    try:
        from conversion import cli as conversion_cli
    except ModuleNotFoundError as err:
        if err.name in ("conversion", "conversion.cli"):
            print("optkit convert: not available yet: this optkit has no conversion.cli module",
                  file=sys.stderr)
            return EXIT_USAGE
        return _report(err, "convert")
    except Exception as err:
        print(f"optkit convert: not available: conversion.cli failed to import ({type(err).__name__}: {err})",
              file=sys.stderr)
        return EXIT_USAGE
    if not (hasattr(conversion_cli, "add_arguments") and hasattr(conversion_cli, "run")):
        print("optkit convert: not available yet: conversion.cli lacks add_arguments/run", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog="optkit convert", description=conversion_cli.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    conversion_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(conversion_cli.run(args) or 0)
    except KeyboardInterrupt:
        print("optkit convert: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return _report(err, "convert")


# ------------------------------------------------------------------------------------------- main
def _report(err: BaseException, command: str) -> int:
    """One clear message for the errors a user can act on; a traceback for anything else (a bug).
    A refused checkpoint exits 1 (the input is bad, not the command line), the rest 2."""
    from opt_spec.backend import BackendUnavailableError
    from opt_spec.errors import CheckpointError
    from opt_spec.hub import HubUnavailableError
    from opt_spec.tokenizer import TokenizerUnavailableError

    from .runners import BackendNotReady

    expected = (CLIError, BackendUnavailableError, BackendNotReady, TokenizerUnavailableError, HubUnavailableError,
                FileNotFoundError, FileExistsError, ValueError, OSError, pickle.UnpicklingError)
    if os.environ.get("OPTKIT_DEBUG") or not isinstance(err, expected):
        raise err
    print(f"optkit {command}: error: {err}", file=sys.stderr)
    refused = (CheckpointError, pickle.UnpicklingError)  # the pickle reader's UnsafePickleError included
    return EXIT_REFUSED if isinstance(err, refused) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # TensorFlow's C++ start-up chatter and oneDNN's run-to-run differences are noise for a CLI.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if argv[:1] == ["convert"]:
        return run_convert(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    console = Console(getattr(args, "quiet", False))
    try:
        return args.handler(args, console)
    except KeyboardInterrupt:
        print(f"optkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `optkit parity | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        return _report(err, args.command)


if __name__ == "__main__":
    sys.exit(main())
