"""`optkit generate`: continue prompts with one backend and print the continuations."""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from opt_spec.backend import backend_name
from opt_spec.generation import GenerationConfig
from opt_spec.tokenizer import left_pad

from .checkpoints import load_tokenizer, resolve_model, with_safetensors
from .common import CLIError, Console, seed_type
from .runners import DTYPES, load_runner, mesh_option
from .sampling import generate_loop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="text to continue (needs a tokenizer), or token ids such as '2 100 7' "
                        "(used as given: OPT prompts start with 2)")
    p.add_argument("--backend", default="torch", help="torch (default), tf or flax")
    p.add_argument("--mesh", metavar="fsdp=F,tp=T",
                   help="lay the model out over F x T devices with jax.sharding (flax backend): fsdp splits the "
                        "batch and every weight's other dimension, tp the attention heads and the FFN (a CPU-only "
                        "machine simulates the devices)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="folder with tokenizer.json or vocab.json + merges.txt (default: the model folder)")
    p.add_argument("--ids", action="store_true", help="prompts are token ids even when a tokenizer is present")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=20, metavar="N")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy search")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens holding this mass")
    g.add_argument("--min-p", type=float, metavar="P",
                   help="sampling: keep the tokens at least P times as likely as the most likely one")
    g.add_argument("--typical-p", type=float, metavar="P",
                   help="sampling: keep the tokens of locally typical sampling holding this mass (1: all)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="no eos before N new tokens")
    g.add_argument("--num-beams", type=int, default=1,
                   help="beam search (needs the backend's generate); with --do-sample, beam sampling")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**this")
    g.add_argument("--seed", type=seed_type, default=0, help="sampling seed")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="assisted decoding (one prompt): check up to K tokens a forward pass, taken from the "
                        "text so far where its last tokens occurred before; the same tokens, faster when the output "
                        "copies its prompt")
    g.add_argument("--fallback-loop", action="store_true",
                   help="use optkit's simple re-forward loop even when the backend has generate()")


def _check_options(args) -> None:
    try:
        args.backend = backend_name(args.backend)
    except ValueError:
        raise CLIError(f"--backend {args.backend}: unknown backend; choose torch, tf or flax") from None
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.top_k < 0:
        raise CLIError(f"--top-k {args.top_k}: must be >= 0")
    if not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.repetition_penalty <= 0:
        raise CLIError(f"--repetition-penalty {args.repetition_penalty}: must be > 0")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise CLIError(f"--min-new-tokens {args.min_new_tokens}: must be in [0, --max-new-tokens]")
    if args.num_beams < 1:
        raise CLIError(f"--num-beams {args.num_beams}: must be at least 1")
    if args.prompt_lookup:
        if args.prompt_lookup < 0:
            raise CLIError(f"--prompt-lookup {args.prompt_lookup}: must be at least 1 (0: off)")
        if args.num_beams > 1 or len(args.prompts) > 1 or args.fallback_loop:
            raise CLIError(f"--prompt-lookup {args.prompt_lookup}: assisted decoding takes the backend's generate, "
                           "one prompt and --num-beams 1")
    try:  # the rest of the spec's rule: finite numbers (nan and inf pass the comparisons above); a temperature
        # > 0 when sampling, 0 taken as greedy search otherwise (as generate and Hugging Face take it)
        GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                         do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_beams=args.num_beams, length_penalty=args.length_penalty,
                         repetition_penalty=args.repetition_penalty, seed=args.seed, min_p=args.min_p,
                         typical_p=1.0 if args.typical_p is None else args.typical_p)
    except ValueError as err:  # "temperature=nan: must be a finite number" -> "--temperature nan: ..."
        name, _, rest = str(err).partition("=")
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None


_IDS = re.compile(r"\s*-?\d+(\s*[,\s]\s*-?\d+)*\s*")


def parse_ids(prompt: str, index: int, vocab_size: int, why: str) -> list[int]:
    if not _IDS.fullmatch(prompt):
        raise CLIError(f"prompt {index} ({prompt[:40]!r}) is not a list of token ids such as '2 100 7', "
                       f"and {why}")
    ids = [int(x) for x in re.split(r"[,\s]+", prompt.strip())]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CLIError(f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def encode_prompts(args, tokenizer, config) -> list[list[int]]:
    if tokenizer is None or args.ids:
        why = ("--ids says prompts are token ids" if args.ids else
               "there is no tokenizer to read text: pass --tokenizer DIR (a folder with tokenizer.json, or "
               "vocab.json + merges.txt, e.g. a download of facebook/opt-125m)")
        return [parse_ids(p, i, config.vocab_size, why) for i, p in enumerate(args.prompts)]
    return [tokenizer.encode(p) for p in args.prompts]


def check_lengths(rows: list[list[int]], max_new_tokens: int, max_positions: int) -> None:
    for i, row in enumerate(rows):
        if not row:
            raise CLIError(f"prompt {i} is empty")
        if len(row) > max_positions:
            raise CLIError(f"prompt {i} is {len(row)} tokens long, but the model takes at most {max_positions} "
                           f"(max_position_embeddings): shorten it")
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > max_positions:
        raise CLIError(f"the longest prompt has {longest} tokens; with --max-new-tokens {max_new_tokens} that "
                       f"passes the model's {max_positions} positions: use --max-new-tokens "
                       f"{max_positions - longest} or less")


class _Streamer:
    """Prints the new tokens of a one-prompt run as they come (text when a tokenizer is present)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def __call__(self, step, tokens, finished):
        if self.tokenizer is None:
            print(("" if step == 0 else " ") + str(int(tokens[0])), end="", flush=True)
            return
        self.tokens.append(int(tokens[0]))
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def close(self):
        if self.tokenizer is not None:
            rest = self.tokenizer.decode(self.tokens)[len(self.printed):]
            print(rest, end="")
        print(flush=True)


def run(args, console: Console) -> int:
    _check_options(args)
    source = resolve_model(args, console)
    config = source.config
    tokenizer = load_tokenizer(args.tokenizer, source, getattr(args, "cache_dir", None))
    if source.random:
        console.warn(f"optkit: the weights are RANDOM (preset {source.random.get('preset')}, seed "
                     f"{source.random.get('seed')}): the continuation is noise, not language. "
                     "Pass --model DIR to use a real checkpoint.")
    if tokenizer is None and not args.ids:
        console.warn(f"optkit: no tokenizer in {args.tokenizer or source.path}: prompts and output are token ids "
                     "(--tokenizer DIR to use one)")
    rows = encode_prompts(args, tokenizer, config)
    check_lengths(rows, args.max_new_tokens, config.max_position_embeddings)
    batch = left_pad(rows, config.pad_token_id if config.pad_token_id is not None else 1)

    if args.backend != "torch":  # torch also reads pytorch_model.bin; the others read safetensors
        source = with_safetensors(source, console)
    mesh = mesh_option(getattr(args, "mesh", None), args.backend)
    where = "" if mesh is None else f" on a mesh fsdp={mesh['fsdp']} x tp={mesh['tp']}"
    with console.step(f"loading {source.describe()} into {args.backend} ({args.dtype}){where}"):
        runner, _ = load_runner(args.backend, source.load_path, args.dtype, mesh=mesh)
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else 1
    options = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, eos_token_id=eos, pad_token_id=pad, seed=args.seed)
    if args.prompt_lookup:
        options["prompt_lookup_num_tokens"] = args.prompt_lookup
    T = batch["input_ids"].shape[1]
    native = runner.has_generate and not args.fallback_loop
    if not native and args.num_beams > 1:
        raise CLIError(f"--num-beams {args.num_beams}: beam search needs the {runner.name} backend's own "
                       "generate(); optkit's fallback loop does greedy search and sampling only")
    # the filters the fallback loop lacks: given only when asked for (else the model's generation_config decides)
    filters = {name: value for name, value in (("min_p", args.min_p), ("typical_p", args.typical_p))
               if value is not None}
    for name in filters:
        option = "--" + name.replace("_", "-")
        if not native:
            raise CLIError(f"{option}: needs the {runner.name} backend's own generate(); optkit's fallback loop "
                           "filters by --top-k and --top-p only")
        if not args.do_sample:
            console.warn(f"optkit: {option} filters only what sampling draws from; it does nothing without --do-sample")
    # One prompt streams its tokens as they come (where the backend can); a batch prints at the end.
    stream = len(rows) == 1 and args.num_beams == 1 and (not native or runner.can_stream)
    streamer = _Streamer(tokenizer if not args.ids else None) if stream else None
    # A per-step callback sends TF and Flax down their step-by-step host loop (~10% slower than the compiled
    # one), so it is asked for only when someone watches: a streamed prompt, or a progress bar on a terminal.
    watched = stream or (not console.quiet and sys.stderr.isatty())
    per_step = not native or (runner.can_stream and args.num_beams == 1 and watched)
    bar = console.progress(total=args.max_new_tokens, desc="tokens", unit="tok") \
        if streamer is None and per_step else None
    step = 0

    def on_token(tokens, finished=None):
        nonlocal step
        if streamer is not None:
            streamer(step, tokens, finished)
        if bar is not None:
            bar.update(1)
        step += 1

    if native:
        out = runner.generate(batch["input_ids"], batch["attention_mask"], num_beams=args.num_beams,
                              length_penalty=args.length_penalty,
                              streamer=on_token if per_step else None, **options, **filters)
    else:  # FALLBACK until every backend has generate (issue 6): re-forward loop in optkit_cli.sampling
        out = generate_loop(runner.forward, batch["input_ids"], batch["attention_mask"],
                            on_token=lambda _, tokens, finished: on_token(tokens, finished), **options)
    if bar is not None:
        bar.close()
    if streamer is not None:
        streamer.close()
        return 0
    new = np.asarray(out)[:, T:]
    for i, (prompt, row) in enumerate(zip(args.prompts, new)):
        row = _until_eos(row, eos)
        if len(rows) > 1:
            print(f"==> prompt {i}: {prompt} <==")
        if tokenizer is None or args.ids:
            print(" ".join(str(int(t)) for t in row))
        else:
            print(tokenizer.decode(row))
    sys.stdout.flush()
    return 0


def _until_eos(row: np.ndarray, eos: int | None) -> list[int]:
    """The new tokens of one row up to and including its eos (what follows is padding)."""
    row = [int(t) for t in row]
    if eos is not None and eos in row:
        row = row[:row.index(eos) + 1]
    return row
