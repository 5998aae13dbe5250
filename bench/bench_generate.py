"""Generation speed: optkit's generate against Hugging Face 4.57.6's in the same backend, same weights.

A random 125m-shaped float32 model (built once, tensor by tensor, in a temporary directory), a
16-token prompt, 64 new tokens (EOS disabled so every run decodes all 64), batch 1 and batch 8.
Batch 1 is bound by reading every weight once per token, so the table also gives that limit:
weight bytes per token divided by a large-array read rate measured in this same run.

    python bench/bench_generate.py [--backends torch,tf,flax] [--preset 125m] [--repeats 3] [--streamer]

Prints a table of tokens/s (new tokens x batch / seconds, best of --repeats after a warm-up run).
--streamer also times optkit's generate with a streamer (a no-op callable): in TensorFlow and Flax that
runs the decode one compiled step at a time from Python (opt_spec.generation), the price of streaming.
The repeats are interleaved - read rate, optkit, Hugging Face, for each batch size, round after round -
so that the shared machine's drifting memory bandwidth (the read rate moved by +-15% within minutes
here) affects all of them alike; the limit uses the best read rate seen (the strictest limit), and the
table also gives the share of the limit at the median read rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opt_spec import OPTConfig, count_parameters, weight_table  # noqa: E402
from opt_spec import io as spec_io
from opt_spec.testing import random_weight  # noqa: E402
from tests.hf_reference import hf_tf_causal_lm  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

PROMPT, NEW = 16, 64


def read_rate_gb_s(size_mb: int = 1024) -> float:
    """Bytes/s at which a matrix-vector product reads a large float32 matrix, using every core through
    BLAS: the access pattern of decoding one token (each weight read once), with no model around it."""
    cols = 4096
    a = np.ones((size_mb * 2**20 // 4 // cols, cols), dtype=np.float32)
    x = np.ones(cols, dtype=np.float32)
    a @ x
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def weight_bytes_per_token(config: OPTConfig) -> int:
    """float32 bytes read per decoded token: every weight once, except the position table and the
    token embedding's lookup (the tied LM head reads the embedding matrix in full)."""
    positions = (config.max_position_embeddings + 2) * config.hidden_size
    return (count_parameters(config) - positions) * 4


def make_prompts(config: OPTConfig, rows: int, dtype=np.int64) -> np.ndarray:
    """(rows, PROMPT) random token ids starting with BOS, the same in every benchmark that decodes."""
    ids = np.random.default_rng(0).integers(3, config.vocab_size, size=(rows, PROMPT)).astype(dtype)
    ids[:, 0] = config.bos_token_id
    return ids


def make_checkpoint(config: OPTConfig, path: str) -> None:
    tensors = ((w.name, random_weight(w, config, seed=0) * 0.5) for w in weight_table(config, "causal_lm")
               if w.name != "lm_head.weight")
    spec_io.write_safetensors(os.path.join(path, spec_io.SAFE_WEIGHTS_NAME), tensors)
    config.to_json_file(os.path.join(path, spec_io.CONFIG_NAME))


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int) -> dict:
    """{name: best seconds} over `rounds` rounds that call every fn once each, after a warm-up call."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], seconds(fn))
    return best


def torch_runs(path, config, ids, mask):
    import torch
    import transformers

    from opt_torch import OPTForCausalLM

    torch.set_grad_enabled(False)
    ours = OPTForCausalLM.from_pretrained(path)
    ref = transformers.OPTForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    vocab_eos = config.vocab_size - 1  # a token the random model effectively never picks first

    def ours_fn(b, **extra):
        return lambda: ours.generate(ids_t[:b], mask_t[:b], max_new_tokens=NEW, eos_token_id=vocab_eos, **extra)

    def ref_fn(b):
        return lambda: ref.generate(input_ids=ids_t[:b], attention_mask=mask_t[:b], max_new_tokens=NEW,
                                    min_new_tokens=NEW, do_sample=False, pad_token_id=1)
    return ours_fn, ref_fn


def tf_runs(path, config, ids, mask):
    """optkit's generate (one XLA-compiled decode loop) against Hugging Face's TF generate under
    tf.function(jit_compile=True), as Hugging Face documents for XLA generation."""
    import tensorflow as tf
    import transformers

    from opt_tf import TFOPTForCausalLM

    transformers.logging.set_verbosity_error()  # its TF deprecation notice and padding-side guess
    ours = TFOPTForCausalLM.from_pretrained(path)
    ref = hf_tf_causal_lm(config, spec_io.load_safetensors_dir(path))
    ref_generate = tf.function(ref.generate, jit_compile=True)
    ids_t, mask_t = tf.constant(ids, tf.int32), tf.constant(mask, tf.int32)
    vocab_eos = config.vocab_size - 1  # a token the random model effectively never picks first

    def ours_fn(b, **extra):
        return lambda: ours.generate(ids[:b], mask[:b], max_new_tokens=NEW, eos_token_id=vocab_eos, **extra).numpy()

    def ref_fn(b):
        return lambda: ref_generate(ids_t[:b], attention_mask=mask_t[:b], max_new_tokens=NEW,
                                    min_length=PROMPT + NEW, eos_token_id=vocab_eos, do_sample=False,
                                    pad_token_id=1).numpy()
    return ours_fn, ref_fn


def flax_runs(path, config, ids, mask):
    """optkit's generate (one jitted lax.while_loop decode, compiled once per shape) against Hugging
    Face's FlaxOPTForCausalLM.generate on our parameter tree as is, wrapped in jax.jit with the params
    as an argument (as Hugging Face's Flax examples run it; called plainly it recompiles every call)."""
    import jax
    import transformers

    from opt_flax import FlaxOPTForCausalLM

    transformers.logging.set_verbosity_error()  # its Flax deprecation notice
    ours = FlaxOPTForCausalLM.from_pretrained(path)
    with jax.numpy_dtype_promotion("standard"):  # Hugging Face's code relies on implicit promotion
        ref = transformers.FlaxOPTForCausalLM(transformers.OPTConfig(**config.to_dict()), _do_init=False)
    vocab_eos = config.vocab_size - 1  # a token the random model effectively never picks first

    @jax.jit
    def ref_generate(params, ids_b, mask_b):
        with jax.numpy_dtype_promotion("standard"):
            return ref.generate(ids_b, attention_mask=mask_b, params=params, max_new_tokens=NEW,
                                min_length=PROMPT + NEW, eos_token_id=vocab_eos, do_sample=False,
                                pad_token_id=1).sequences

    ids_j, mask_j = jax.numpy.asarray(ids, jax.numpy.int32), jax.numpy.asarray(mask, jax.numpy.int32)

    def ours_fn(b, **extra):
        return lambda: ours.generate(ids[:b], mask[:b], max_new_tokens=NEW, eos_token_id=vocab_eos,
                                     **extra).block_until_ready()

    def ref_fn(b):
        return lambda: ref_generate(ours.params, ids_j[:b], mask_j[:b]).block_until_ready()
    return ours_fn, ref_fn


RUNNERS = {"torch": torch_runs, "tf": tf_runs, "flax": flax_runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(RUNNERS))
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--streamer", action="store_true", help="also time generate with a streamer")
    args = parser.parse_args(argv)
    config = OPTConfig.from_preset(args.preset).replace(dropout=0.0)
    batches = [int(b) for b in args.batches.split(",")]
    ids = make_prompts(config, max(batches))
    mask = np.ones_like(ids)
    wb = weight_bytes_per_token(config)
    rates = []
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(config, path)
        rows = []
        for backend in args.backends.split(","):
            ours_fn, ref_fn = RUNNERS[backend](path, config, ids, mask)
            fns = {}
            for b in batches:
                fns[("ours", b)], fns[("ref", b)] = ours_fn(b), ref_fn(b)
                if args.streamer:
                    fns[("streamer", b)] = ours_fn(b, streamer=lambda tokens: None)
            fns["rate"] = lambda: rates.append(read_rate_gb_s())
            best = interleaved(fns, args.repeats)
            rows.extend((backend, b, NEW * b / best[("ours", b)], NEW * b / best[("ref", b)],
                         NEW * b / best[("streamer", b)] if args.streamer else None) for b in batches)
    rate, typical = max(rates), float(np.median(rates))
    limit, typical_limit = rate * 1e9 / wb, typical * 1e9 / wb
    print(f"# {args.preset} float32, prompt {PROMPT}, {NEW} new tokens; read rate {min(rates):.1f}-{rate:.1f} GB/s "
          f"(median {typical:.1f}), {wb / 1e6:.0f} MB of weights per token -> batch-1 limit {limit:.1f} tok/s "
          f"at the best read rate ({typical_limit:.1f} at the median)")
    print(f"{'backend':8} {'batch':>5} {'optkit tok/s':>13} {'HF tok/s':>9} {'vs HF':>6} {'of limit':>9} "
          f"{'(median)':>9}" + (f" {'with streamer':>14}" if args.streamer else ""))
    for backend, b, ours_tps, ref_tps, streamed in rows:
        of_limit = f"{ours_tps / limit:8.0%}  {ours_tps / typical_limit:8.0%}" if b == 1 else " " * 18
        more = f" {streamed:14.1f}" if streamed is not None else ""
        print(f"{backend:8} {b:5d} {ours_tps:13.1f} {ref_tps:9.1f} {ours_tps / ref_tps:5.2f}x {of_limit}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
