"""The `optkit` command line: parity, generate, convert, train, bench.

    optkit parity   [--model DIR | --preset NAME] [--backends torch,tf,flax] [--dtype D] [--json]
    optkit generate [--model DIR | --preset NAME] [--backend torch|tf|flax] [decoding options] PROMPT ...
    optkit convert  SRC DST [...]      (see `optkit convert --help`)
    optkit train    --model DIR --task T --data FILE --backend B --output DIR [...]  (see `optkit train --help`)
    optkit bench    [NAME ...]         (runs the scripts in bench/)

Exit status: 0 success; 1 parity failed (a difference beyond the tolerance, a backend that failed), a
benchmark failed, or the input was refused: a checkpoint (opt_spec.errors.CheckpointError and its
subclasses, an unsafe pickle: a malformed, inconsistent or hostile file, named in the message), a data file
(opt_spec.data.DataError), or a file the system would not read or write; 2 a usage error: argparse's, the
commands' checks of their arguments (CLIError), a missing file or folder named on the command line, a
missing framework or extra (the message names what to install). Each is one `optkit CMD: error: ...` line.
Anything else is a bug in optkit: exit 1 with one line `optkit CMD: internal error: Type: message (run with
--debug for the traceback)`; `optkit --debug CMD ...` (or OPTKIT_DEBUG=1) shows the traceback.
Ctrl-C: one line `optkit CMD: interrupted`, exit 130, whatever the command was doing.
"""

from __future__ import annotations

import _thread
import argparse
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

try:  # NumPy and the spec load here (~0.2 s): Ctrl-C meanwhile ends quietly too, not with a traceback
    from . import generate, parity, train
    from .checkpoints import DEFAULT_PRESET, PRESET_NAMES, hub_arguments
    from .common import CLIError, Console, seed_type
except KeyboardInterrupt:
    print("optkit: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--model", metavar="DIR|ID",
                   help="Hugging Face OPT folder (config.json + weights), or a Hub id such as facebook/opt-125m "
                        "(from the Hugging Face cache; downloaded unless HF_HUB_OFFLINE=1)")
    hub_arguments(g)
    g.add_argument("--preset", metavar="NAME",
                   help=f"without --model: build (once, cached) and use a random checkpoint of this size "
                        f"(default {DEFAULT_PRESET}; one of {', '.join(PRESET_NAMES)})")
    g.add_argument("--weights-seed", type=seed_type, default=0, metavar="N",
                   help="seed of the random checkpoint (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optkit", description="OPT language models in PyTorch, TensorFlow and JAX/Flax from one spec.",
        epilog="Without --model, parity and generate use a random checkpoint cached in $OPTKIT_CACHE "
               "(default ~/.cache/optkit).")
    from opt_spec import __version__

    parser.add_argument("--version", action="version", version=f"optkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
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
def run_convert(argv: list[str], debug: bool) -> int:
    """`optkit convert ...`: the options and the work belong to conversion.cli (add_arguments, run)."""
    from conversion import cli as conversion_cli

    parser = argparse.ArgumentParser(prog="optkit convert", description=conversion_cli.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    conversion_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return _run("convert", lambda: int(conversion_cli.run(args) or 0), debug)


# ------------------------------------------------------------------------------------------- main
def _classify(err: BaseException) -> int | None:
    """The exit status of a known error (1: the input was refused, 2: a usage error), None for a bug."""
    from opt_spec.backend import BackendUnavailableError
    from opt_spec.data import DataError
    from opt_spec.errors import CheckpointError
    from opt_spec.hub import HubUnavailableError
    from opt_spec.tokenizer import TokenizerUnavailableError

    from .runners import BackendNotReady

    if isinstance(err, (CLIError, BackendUnavailableError, BackendNotReady, TokenizerUnavailableError,
                        HubUnavailableError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return EXIT_USAGE
    if isinstance(err, (CheckpointError, pickle.UnpicklingError, DataError, OSError)):
        return EXIT_REFUSED  # UnsafePickleError, ConversionError, WeightMismatchError... are CheckpointErrors
    return None


def _report(err: BaseException, command: str, debug: bool) -> int:
    """One line for a known error; for anything else (a bug) one line saying so, or with --debug the
    traceback."""
    code = _classify(err)
    if code is None and debug:
        raise err
    if code is None:
        message = str(err).splitlines()[0] if str(err) else ""
        print(f"optkit {command}: internal error: {type(err).__name__}: {message} (run with --debug for the "
              f"traceback)", file=sys.stderr)
        return EXIT_REFUSED
    print(f"optkit {command}: error: {err}", file=sys.stderr)
    return code


def _run(command: str, work, debug: bool) -> int:
    try:
        return work()
    except KeyboardInterrupt:
        print(f"optkit {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `optkit parity | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        return _report(err, command, debug)


# A Ctrl-C whose KeyboardInterrupt is raised inside a callback whose exceptions Python only prints ("Exception
# ignored in: <function _xla_gc_callback>": JAX's gc callback, which runs at any allocation; a __del__) was lost,
# and the command carried on: `optkit train --backend flax` ran to its end after 1 in 8 to 30 Ctrl-Cs during its
# first compile on a loaded machine. As the program, optkit raises such an interrupt again a moment later.
_in_hook = False


def _interrupt_again(unraisable) -> None:
    """sys.unraisablehook: a lost KeyboardInterrupt comes again 10 ms later (a SIGINT for the main thread);
    anything else is printed as Python does."""
    global _in_hook
    if unraisable.exc_type is None or not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
        return
    _in_hook = True
    try:
        _interrupt_later()
    finally:
        _in_hook = False


def _ctrl_c(signum, frame) -> None:
    """SIGINT: KeyboardInterrupt, as Python's own handler, except inside _interrupt_again, where it would be
    lost as well: then it comes again later."""
    if _in_hook:
        _interrupt_later()
        return
    raise KeyboardInterrupt


def _interrupt_later() -> None:
    timer = threading.Timer(0.01, _thread.interrupt_main)
    timer.daemon = True  # nothing to wait for when the program ends meanwhile
    timer.start()


def main(argv: list[str] | None = None) -> int:
    """`optkit` with argv (default: the command line). As the program itself (argv None), no Ctrl-C is lost
    (_interrupt_again) and an interrupted command ends the process at once with status 130: a compile that
    Ctrl-C cut short (XLA's, under JAX) leaves native threads that crash the interpreter's shutdown (SIGSEGV
    after the message, exit -11)."""
    if argv is None and threading.current_thread() is threading.main_thread():
        sys.unraisablehook = _interrupt_again
        signal.signal(signal.SIGINT, _ctrl_c)
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # before a command's handler runs: importing conversion, parsing, ...
        print("optkit: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED and argv is None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # TensorFlow's C++ start-up chatter and oneDNN's run-to-run differences are noise for a CLI.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    debug = bool(os.environ.get("OPTKIT_DEBUG"))
    if "--debug" in argv:  # a global flag, taken wherever it stands (convert's own parser never sees it)
        argv, debug = [a for a in argv if a != "--debug"], True
    if argv[:1] == ["convert"]:
        return run_convert(argv[1:], debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    console = Console(getattr(args, "quiet", False))
    return _run(args.command, lambda: args.handler(args, console), debug)


if __name__ == "__main__":
    sys.exit(main())
