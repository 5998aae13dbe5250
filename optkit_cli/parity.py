"""`optkit parity`: one checkpoint, every installed backend, the same left-padded batch, compared.

For each pair of backends that ran: the max and mean |logits difference| over real (unpadded)
tokens, and how many greedy (argmax) tokens agree; per backend: import, load and forward times (the
first forward includes tracing / compilation in TensorFlow and JAX). Exit status: 0 when every pair
is within the tolerance, 1 when a pair is not (or a backend failed to load or run), 2 on a usage error.

Default tolerances (max |difference| of logits, absolute), set from measurements on the random 125m
checkpoint, whose logits reach |63|: between torch, tf and flax the max differences were 7.6e-5
(float32), 0.10 (float16) and 1.05 (bfloat16); a real bug (a transposed or missing weight) moves
logits by whole units or more. --tolerance sets another bound.

Every backend reads model.safetensors and pytorch_model.bin (as the facebook/opt-* downloads ship)
directly; a folder of another format (tf_model.h5, flax_model.msgpack, ...) is converted once to a
cached safetensors copy, so that every backend loads the very same tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import numpy as np

from opt_spec.backend import BACKENDS, BackendUnavailableError, backend_name
from opt_spec.testing import random_batch
from opt_spec.tokenizer import TokenizerUnavailableError

from .checkpoints import load_tokenizer, resolve_model, with_safetensors
from .common import CLIError, Console, seed_type
from .runners import DTYPES, BackendNotReady, install_hint, load_runner, mesh_option

DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 2.0}
DEFAULT_PROMPTS = ("Hello, my name is", "The capital of France is",
                   "In a shocking finding, scientists discovered a herd of unicorns living in")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default=",".join(BACKENDS), metavar="LIST",
                   help="comma-separated backends to compare (default: torch,tf,flax; missing ones are skipped)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype in every backend")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="largest allowed max |logits difference| (default: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true",
                   help="also fail when a backend is skipped or fewer than two backends ran")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenize --prompt with the tokenizer in DIR "
                   "(default: the model folder's, when it has one)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt of the batch (repeat for more; needs a tokenizer)")
    p.add_argument("--length", type=int, default=16, metavar="T",
                   help="tokens per row of the random batch used without a tokenizer (default 16)")
    p.add_argument("--seed", type=seed_type, default=0, metavar="N", help="seed of the random batch")
    p.add_argument("--mesh", metavar="fsdp=F,tp=T",
                   help="also run the flax backend sharded over F x T devices (jax.sharding) and compare it with "
                        "the unsharded backends: a CI gate for a sharding plan (a CPU-only machine simulates the "
                        "devices)")


def parse_backends(text: str) -> list[str]:
    names = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            name = backend_name(part)
        except ValueError:
            raise CLIError(f"unknown backend {part.strip()!r} in --backends; choose from "
                           f"{', '.join(BACKENDS)}") from None
        if name not in names:
            names.append(name)
    if not names:
        raise CLIError("--backends is empty")
    return names


def make_batch(args, source, console: Console) -> tuple[np.ndarray, np.ndarray, str]:
    config = source.config
    tokenizer = None
    try:
        tokenizer = load_tokenizer(args.tokenizer, source, getattr(args, "cache_dir", None))
    except TokenizerUnavailableError as err:
        if args.tokenizer or args.prompt:
            raise
        console.warn(f"optkit: {err}; using random token ids")
    if args.prompt and tokenizer is None:
        raise CLIError(f"--prompt needs a tokenizer, and {source.path} has none: add --tokenizer DIR")
    if tokenizer is not None:
        prompts = args.prompt or list(DEFAULT_PROMPTS)
        batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="np")
        ids, mask, what = batch["input_ids"], batch["attention_mask"], f"{len(prompts)} tokenized prompts"
    else:
        if args.length < 1:
            raise CLIError(f"--length {args.length}: must be at least 1")
        pads = tuple(min(p, args.length - 1) for p in (0, 3, 5))
        ids, mask = random_batch(config, batch=3, length=args.length, seed=args.seed, left_pad=pads)
        what = f"random token ids (seed {args.seed})"
    if ids.shape[1] > config.max_position_embeddings:
        raise CLIError(f"the batch is {ids.shape[1]} tokens long, but the model takes at most "
                       f"{config.max_position_embeddings} (max_position_embeddings): use shorter prompts or "
                       "a smaller --length")
    return ids, mask, what


def run_backend(name: str, path: str, dtype: str, ids, mask, mesh: dict | None = None,
                label: str | None = None) -> tuple[dict, np.ndarray | None]:
    entry = {"backend": label or name, "status": "ok"}
    try:
        runner, entry["import_s"] = load_runner(name, path, dtype, mesh=mesh)
    except (BackendUnavailableError, BackendNotReady) as err:
        return {**entry, "status": "skipped", "reason": str(err), "install": install_hint(name)}, None
    except Exception as err:  # a checkpoint this backend cannot load is a parity failure, not a crash
        return {**entry, "status": "failed", "reason": f"loading: {type(err).__name__}: {err}"}, None
    entry["import_s"], entry["load_s"] = round(entry["import_s"], 4), round(runner.load_s, 4)
    try:
        start = time.perf_counter()
        runner.forward(ids, mask)
        entry["first_forward_s"] = round(time.perf_counter() - start, 4)
        start = time.perf_counter()
        logits = runner.forward(ids, mask)
        entry["forward_s"] = round(time.perf_counter() - start, 4)
    except Exception as err:
        return {**entry, "status": "failed", "reason": f"forward: {type(err).__name__}: {err}"}, None
    finally:
        del runner
        gc.collect()
    if logits.shape[:2] != ids.shape:
        return {**entry, "status": "failed",
                "reason": f"logits have shape {logits.shape}, expected {ids.shape + (-1,)}"}, None
    return entry, logits


def compare(a: np.ndarray, b: np.ndarray, mask: np.ndarray, tolerance: float) -> dict:
    real = mask.astype(bool)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))[real]  # (real tokens, V)
    finite = bool(np.isfinite(a[real]).all() and np.isfinite(b[real]).all())
    agree = int((a.argmax(-1) == b.argmax(-1))[real].sum())
    max_diff = float(diff.max()) if finite else math.inf
    return {"max_abs_diff": max_diff, "mean_abs_diff": float(diff.mean()) if finite else math.inf,
            "finite": finite, "greedy_agree": agree, "tokens": int(real.sum()),
            "within_tolerance": finite and max_diff <= tolerance}


def run(args, console: Console) -> int:
    names = parse_backends(args.backends)
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    if not tolerance >= 0:  # nan too: no difference would be within it
        raise CLIError(f"--tolerance {tolerance}: must be >= 0")
    source = with_safetensors(resolve_model(args, console), console)
    ids, mask, what = make_batch(args, source, console)

    runs = [(name, name, None) for name in names]  # (label, backend, mesh)
    mesh = mesh_option(getattr(args, "mesh", None))
    if mesh is not None:  # the sharded flax run, compared with every unsharded one (flax's included)
        if "flax" not in names:
            runs.append(("flax", "flax", None))
        runs.append((f"flax[fsdp={mesh['fsdp']},tp={mesh['tp']}]", "flax", mesh))

    results, logits = [], {}
    for label, name, on in runs:
        console.info(f"{label}: loading {source.load_path} ({args.dtype}) and running the batch ...")
        sharded = {} if on is None else {"mesh": on, "label": label}
        entry, out = run_backend(name, source.load_path, args.dtype, ids, mask, **sharded)
        results.append(entry)
        if out is not None:
            logits[label] = out
        elif entry["status"] == "skipped":
            console.info(f"  skipped: {entry['reason']}")
        else:
            console.info(f"  FAILED: {entry['reason']}")
    ran = list(logits)
    pairs = [{"a": a, "b": b, **compare(logits[a], logits[b], mask, tolerance)}
             for i, a in enumerate(ran) for b in ran[i + 1:]]
    failed = [r["backend"] for r in results if r["status"] == "failed"]
    skipped = [r["backend"] for r in results if r["status"] == "skipped"]
    passed = (all(p["within_tolerance"] for p in pairs) and not failed
              and (not args.strict or (not skipped and len(ran) >= 2)))
    report = {
        "model": source.path, "loaded_from": source.load_path, "random_weights": source.random, "dtype": args.dtype,
        "hub_id": source.hub_id or None, "tolerance": tolerance,
        "batch": {"shape": list(ids.shape), "real_tokens": int(mask.sum()), "source": what},
        "backends": results, "pairs": pairs, "passed": passed,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if not ran:
        raise CLIError("no backend ran: " + "; ".join(f"{r['backend']}: {r['reason']}" for r in results))
    return 0 if passed else 1


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(report: dict) -> None:
    rnd = report["random_weights"]
    model = report["model"] + (f"  (RANDOM weights: preset {rnd.get('preset')}, seed {rnd.get('seed')})" if rnd else "")
    if report["loaded_from"] != report["model"]:
        model += f"  (loaded as safetensors from {report['loaded_from']})"
    if report.get("hub_id"):
        model = f"{report['hub_id']}: {model}"
    B, T = report["batch"]["shape"]
    print(f"model:  {model}")
    print(f"batch:  {B} rows x {T} tokens, left-padded, {report['batch']['real_tokens']} real tokens; "
          f"{report['batch']['source']}; dtype {report['dtype']}")
    print()
    print(f"{'backend':<8} {'status':<8} {'import s':>9} {'load s':>8} {'1st forward s':>14} {'forward s':>10}")
    for r in report["backends"]:
        if r["status"] == "ok":
            print(f"{r['backend']:<8} {'ok':<8} {_fmt(r.get('import_s'), '9.2f')} {_fmt(r.get('load_s'), '8.2f')} "
                  f"{_fmt(r.get('first_forward_s'), '14.3f')} {_fmt(r.get('forward_s'), '10.3f')}")
        else:
            print(f"{r['backend']:<8} {r['status']:<8} {r['reason']}")
    print()
    tol = report["tolerance"]
    if report["pairs"]:
        print(f"{'pair':<14} {'max |diff|':>11} {'mean |diff|':>12} {'greedy tokens agree':>20}  within {tol:g}")
        for p in report["pairs"]:
            agree = f"{p['greedy_agree']}/{p['tokens']}"
            print(f"{p['a'] + ' vs ' + p['b']:<14} {p['max_abs_diff']:>11.2e} {p['mean_abs_diff']:>12.2e} "
                  f"{agree:>20}  {'yes' if p['within_tolerance'] else 'NO'}")
        print()
    ran = sum(r["status"] == "ok" for r in report["backends"])
    if ran < 2:
        print(f"only {ran} backend ran: nothing to compare (install more: pip install 'optkit[all]')")
    if report["passed"]:
        print(f"PASS: every pair within {tol:g} ({report['dtype']})" if report["pairs"] else "PASS (nothing compared)")
    else:
        bad = [f"{p['a']} vs {p['b']}" for p in report["pairs"] if not p["within_tolerance"]]
        why = [f"{', '.join(bad)} beyond {tol:g}"] if bad else []
        why += [f"{r['backend']} failed" for r in report["backends"] if r["status"] == "failed"]
        if not why:
            why = ["--strict and a backend was skipped or fewer than two ran"]
        print("FAIL: " + "; ".join(why))
