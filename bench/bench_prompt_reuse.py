"""Prompt re-use's speed: generate(past_key_values=cache of the prompt's first C tokens) against the same call
without it, per backend, same weights, same run.

A random 125m-shaped float32 model (--preset), batch --batch, prompts of --prompt tokens whose first --shared are
one shared start (a system prompt, few-shot examples), --new new tokens, greedy. The cache of the shared start is
made once (its time is printed too, and is what each call without it pays again); each call then feeds only
the last prompt - shared tokens. Every call must give the tokens of the call without the cache (checked). Prints
seconds per generate call (best of --repeats, the two cases interleaved, after a warm-up that compiles) and the
ratio.

    python bench/bench_prompt_reuse.py [--backends torch,tf,flax] [--preset 125m] [--prompt 512] [--shared 480]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opt_spec import OPTConfig, weight_table  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import random_weight  # noqa: E402


def make_checkpoint(config: OPTConfig, path: str) -> None:
    tensors = ((w.name, random_weight(w, config, seed=0)) for w in weight_table(config, "causal_lm")
               if w.name != "lm_head.weight" or not config.tie_word_embeddings)
    spec_io.write_safetensors(os.path.join(path, spec_io.SAFE_WEIGHTS_NAME), tensors)
    config.to_json_file(os.path.join(path, spec_io.CONFIG_NAME))


def backend(name: str, path: str):
    """(model, the shared start's cache maker, generate, tokens as NumPy) for one backend."""
    if name == "torch":
        import torch

        from opt_torch import OPTForCausalLM

        torch.set_grad_enabled(False)
        model = OPTForCausalLM.from_pretrained(path).eval()
        as_input = torch.from_numpy
    elif name == "tf":
        import tensorflow as tf

        from opt_tf import TFOPTForCausalLM

        model = TFOPTForCausalLM.from_pretrained(path)
        as_input = tf.constant
    else:
        import jax.numpy as jnp

        from opt_flax import FlaxOPTForCausalLM

        model = FlaxOPTForCausalLM.from_pretrained(path)
        as_input = jnp.asarray

    def cache(ids, mask, C):
        start = dict(use_cache=True) if name != "flax" else dict(past_key_values=model.init_cache(len(ids), C))
        return model(as_input(ids[:, :C]), attention_mask=as_input(mask[:, :C]), **start).past_key_values

    def generate(ids, mask, past=None, **settings):
        extra = {} if past is None else dict(past_key_values=past)
        return np.asarray(model.generate(as_input(ids), attention_mask=as_input(mask), **extra, **settings))

    return cache, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="torch,tf,flax")
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--shared", type=int, default=480)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = OPTConfig.from_preset(args.preset)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    ids[:, 0] = config.bos_token_id
    ids[:, :args.shared] = ids[:1, :args.shared]  # every row starts with the same shared tokens
    mask = np.ones_like(ids)
    settings = dict(max_new_tokens=args.new, eos_token_id=config.vocab_size - 1)  # EOS effectively off
    print(f"{args.preset}, float32, batch {args.batch}, prompt {args.prompt} tokens of which {args.shared} shared, "
          f"{args.new} new, best of {args.repeats}")
    print(f"{'backend':8s} {'without (s)':>12s} {'with cache (s)':>15s} {'speed-up':>9s} {'cache once (s)':>15s}")
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(config, path)
        for name in args.backends.split(","):
            make_cache, generate = backend(name, path)
            t = time.perf_counter()
            past = make_cache(ids, mask, args.shared)
            once = time.perf_counter() - t
            want = generate(ids, mask, **settings)  # warm-up (compiles) and the reference tokens
            if not np.array_equal(generate(ids, mask, past, **settings), want):
                raise SystemExit(f"{name}: the tokens with the cache differ from those without")
            best = {"without": float("inf"), "with": float("inf")}
            for _ in range(args.repeats):
                for case, cached in (("without", None), ("with", past)):
                    t = time.perf_counter()
                    generate(ids, mask, cached, **settings)
                    best[case] = min(best[case], time.perf_counter() - t)
            print(f"{name:8s} {best['without']:12.3f} {best['with']:15.3f} {best['without'] / best['with']:8.2f}x "
                  f"{once:15.3f}")


if __name__ == "__main__":
    main()
