"""Assisted decoding's speed in PyTorch: prompt lookup and an assistant model against plain greedy decoding,
and Hugging Face 4.57.6's plain and prompt-lookup generate, same weights, same run.

A random 125m-shaped float32 model (--preset), one 64-token prompt, 128 new tokens (EOS off), batch 1. What
assisted decoding gains depends only on how many candidates the model takes, so the cases span it:
  - prompt lookup (k = 10): a random model with a tied head soon repeats its last token (its hidden state stays
    close to that token's embedding), so its own row supplies candidates it takes: the best case (a real model
    copying from its prompt, in summaries or code edits, sits between this and the worst);
  - an assistant of 2 layers whose untied head names the id after the one a random model would repeat: it
    never guesses right, so this is the cost of drafting and checking for nothing, the worst case;
  - an assistant with the model's own weights: every candidate is taken, the most a forward pass can check,
    though drafting then costs as much as decoding (no real assistant is that large).
Every case must give plain decoding's tokens (checked). Prints tokens/s (best of --repeats, interleaved),
the ratio to optkit's plain decoding, and the model's forward passes per new token.

    python bench/bench_assisted.py [--preset 125m] [--repeats 3] [--new 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # transformers may import TensorFlow
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opt_spec import OPTConfig, weight_table  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import random_weight  # noqa: E402

PROMPT = 64


def make_checkpoint(config: OPTConfig, path: str, seed: int) -> None:
    tensors = ((w.name, random_weight(w, config, seed=seed) * 0.5) for w in weight_table(config, "causal_lm")
               if w.name != "lm_head.weight" or not config.tie_word_embeddings)
    spec_io.write_safetensors(os.path.join(path, spec_io.SAFE_WEIGHTS_NAME), tensors)
    config.to_json_file(os.path.join(path, spec_io.CONFIG_NAME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()

    import torch
    import transformers

    from opt_torch import OPTForCausalLM

    torch.set_grad_enabled(False)
    config = OPTConfig.from_preset(args.preset)
    small = config.replace(num_hidden_layers=2, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as big_dir, tempfile.TemporaryDirectory() as small_dir:
        make_checkpoint(config, big_dir, seed=0)
        make_checkpoint(small, small_dir, seed=1)
        model = OPTForCausalLM.from_pretrained(big_dir).eval()
        twin = OPTForCausalLM.from_pretrained(big_dir).eval()
        little = OPTForCausalLM.from_pretrained(small_dir).eval()
        with torch.no_grad():  # a random tied model repeats its last token; this head names the next id instead
            little.lm_head.weight.copy_(little.get_input_embeddings().weight.roll(1, 0))
        hf = transformers.OPTForCausalLM.from_pretrained(big_dir, dtype=torch.float32).eval()
        ids = torch.from_numpy(np.random.default_rng(0).integers(3, config.vocab_size, (1, PROMPT))).long()
        ids[:, 0] = config.bos_token_id
        eos = config.vocab_size - 1  # a token the random model effectively never picks
        settings = dict(max_new_tokens=args.new, eos_token_id=eos)
        cases = {
            "optkit plain": dict(),
            "optkit prompt lookup k=10": dict(prompt_lookup_num_tokens=10),
            "optkit assistant, 2 layers": dict(assistant_model=little, num_assistant_tokens=5),
            "optkit assistant, own weights": dict(assistant_model=twin, num_assistant_tokens=10),
        }
        runs = {name: (lambda kw=kw: model.generate(ids, **settings, **kw)) for name, kw in cases.items()}
        runs["HF plain"] = lambda: hf.generate(ids, min_new_tokens=args.new, do_sample=False, pad_token_id=1,
                                               **settings)
        runs["HF prompt lookup k=10"] = lambda: hf.generate(ids, min_new_tokens=args.new, do_sample=False,
                                                            pad_token_id=1, prompt_lookup_num_tokens=10, **settings)
        want = runs["optkit plain"]()
        passes = {}
        for name, run in runs.items():  # warm-up, tokens checked, the model's passes through its module
            calls = []
            handle = model.model.register_forward_hook(lambda *a: calls.append(1))
            out = run()
            handle.remove()
            if not torch.equal(out[:, :want.shape[1]], want):  # (HF's prompt lookup may run 1 token past the limit)
                raise SystemExit(f"{name}: tokens differ from plain decoding")
            passes[name] = len(calls) if name.startswith("optkit") and name != "optkit plain" else None
        passes["optkit plain"] = args.new  # the prompt, then one fused step per token but the last
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                t = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t)
    base = args.new / best["optkit plain"]
    print(f"{args.preset}, float32, batch 1, {PROMPT}-token prompt, {args.new} new tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'case':32s} {'tokens/s':>9s} {'vs plain':>9s} {'passes/token':>13s}")
    for name in runs:
        rate = args.new / best[name]
        per = "" if passes.get(name) is None else f"{passes[name] / args.new:.2f}"
        print(f"{name:32s} {rate:9.1f} {rate / base:8.2f}x {per:>13s}")


if __name__ == "__main__":
    main()
