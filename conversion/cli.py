"""Convert an OPT checkpoint between formats, one tensor at a time.

    optkit convert SRC DST [--to FORMAT] [--dtype float32|float16|bfloat16] [--force] [--quiet]

SRC is a path, or a Hugging Face Hub id (facebook/opt-125m, at --revision) read from the Hugging Face
cache, downloaded first unless HF_HUB_OFFLINE=1; an existing path always wins. SRC's format is detected
(and reported). Formats: hf-safetensors (default output), hf-pytorch,
hf-tf (tf_model.h5), hf-flax (flax_model.msgpack), metaseq (read only: restored.pt or
reshard-model_part-K.pt parts), torch-state-dict (.pt), keras-weights (.weights.h5) and flax-params
(.msgpack); a DST ending in one of those suffixes picks that format as a single file. DST is written
next to itself and renamed into place once its names, count and shapes check out, so a failure or
Ctrl-C leaves no half-written checkpoint (nor the parent folders it made for DST); an existing DST is
only replaced with --force. Formats without a config.json (metaseq, bare .pt/.weights.h5/.msgpack files)
get one inferred from the shapes and the checkpoint's own args; correct it with --set key=value.

Exit status: 0 written; 1 nothing written: SRC was refused (a malformed, inconsistent or hostile
checkpoint: opt_spec.errors.CheckpointError, an unsafe pickle) or the conversion could not be done as
asked (DST exists, unknown format); 2 a command-line usage error. Each error is one
`optkit convert: error: ...` message.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys

from opt_spec.hub import HubUnavailableError, resolve_pretrained
from opt_spec.io import parse_size

from .api import DEFAULT_TARGET, FORMATS, convert
from .base import OUTPUT_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="checkpoint to read (directory or file; its format is detected), or a Hub id")
    parser.add_argument("--revision", metavar="REV", help="with a Hub id: branch, tag or commit (default main)")
    parser.add_argument("--cache-dir", metavar="DIR", help="with a Hub id: the Hugging Face cache "
                                                           "(default $HF_HUB_CACHE, else ~/.cache/huggingface/hub)")
    parser.add_argument("dst", help="where to write (must not exist unless --force)")
    parser.add_argument("--to", metavar="FORMAT", default=None,
                        help=f"output format: {', '.join(n for n, f in FORMATS.items() if f.write)} "
                             f"(default: from DST's suffix .pt/.weights.h5/.msgpack, else {DEFAULT_TARGET})")
    parser.add_argument("--from", dest="src_format", metavar="FORMAT", default=None,
                        help="source format, when detection should be skipped")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default=None,
                        help="cast floating-point tensors (default: keep the source's dtype)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes, only the summary line")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], type=_override,
                        help="override a config field (JSON value), e.g. --set num_attention_heads=12; "
                             "for formats that carry no config.json")
    parser.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                        help="shard Hugging Face outputs above this (default 5GB)")
    return parser


def _override(item: str) -> tuple[str, object]:
    """argparse's type for --set: (key, JSON value, or the text itself); a malformed one is a usage error."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE, e.g. num_attention_heads=12")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _shard_size(text: str) -> str:
    """argparse's type for --max-shard-size: opt_spec.io's size rule, checked while the command line is read."""
    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def run(args: argparse.Namespace) -> int:
    try:
        src = resolve_pretrained(args.src, revision=getattr(args, "revision", None),
                                 cache_dir=getattr(args, "cache_dir", None))
        summary = convert(src, args.dst, to=args.to, dtype=args.dtype, force=args.force,
                          progress=not args.quiet, config_overrides=dict(args.overrides) or None,
                          src_format=args.src_format, max_shard_size=args.max_shard_size,
                          log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    except KeyboardInterrupt:
        print("optkit convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except HubUnavailableError as err:  # a Hub id without huggingface_hub installed
        print(f"optkit convert: error: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # every CheckpointError (ConversionError,
        print(f"optkit convert: error: {err}", file=sys.stderr)   # WeightMismatchError, ...), FileExistsError,
        return 1                                                   # an unsafe pickle, ...
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optkit convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
