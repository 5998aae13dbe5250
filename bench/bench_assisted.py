"""Assisted decoding's speed: prompt lookup and an assistant model against plain greedy decoding, same weights,
same run; in PyTorch also against Hugging Face 4.57.6's plain and prompt-lookup generate (the only backend it has
them in), in TensorFlow and Flax against their one compiled decode loop and their step-by-step host loop (which
assisted decoding runs on).

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

    python bench/bench_assisted.py [--backends torch,tf,flax] [--preset 125m] [--repeats 3] [--new 128]
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
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        (bench_torch if backend == "torch" else bench_xla)(args, backend)


def cases(little, twin) -> dict:
    """The assisted cases every backend runs (module docstring): name -> generate's keywords."""
    return {"prompt lookup k=10": dict(prompt_lookup_num_tokens=10),
            "assistant, 2 layers": dict(assistant_model=little, num_assistant_tokens=5),
            "assistant, own weights": dict(assistant_model=twin, num_assistant_tokens=10)}


def timed(runs: dict, repeats: int) -> dict:
    """Best seconds of each run over `repeats` interleaved rounds."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def report(title: str, new: int, best: dict, base: str, passes: dict) -> None:
    print(title)
    print(f"{'case':32s} {'tokens/s':>9s} {'vs ' + base:>16s} {'passes/token':>13s}")
    for name in best:
        rate = new / best[name]
        per = "" if passes.get(name) is None else f"{passes[name] / new:.2f}"
        print(f"{name:32s} {rate:9.1f} {rate * best[base] / new:15.2f}x {per:>13s}")


def bench_xla(args, backend: str) -> None:
    """TensorFlow or Flax: plain decoding's compiled loop and host loop, and the assisted cases (on the host loop)."""
    if backend == "tf":
        from opt_tf import TFOPTForCausalLM as cls
    else:
        from opt_flax import FlaxOPTForCausalLM as cls
    config = OPTConfig.from_preset(args.preset)
    small = config.replace(num_hidden_layers=2, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as big_dir, tempfile.TemporaryDirectory() as small_dir:
        make_checkpoint(config, big_dir, seed=0)
        make_checkpoint(small, small_dir, seed=1)
        model, twin, little = cls.from_pretrained(big_dir), cls.from_pretrained(big_dir), cls.from_pretrained(small_dir)
        weights = little.get_weights_dict() if backend == "tf" else None
        if backend == "tf":  # the untied head names the id after the one the random model repeats (bench_torch)
            weights["lm_head.weight"] = np.roll(weights["model.decoder.embed_tokens.weight"], 1, axis=0)
            little.set_weights_dict(weights)
        else:
            embedding = little.params["model"]["decoder"]["embed_tokens"]["embedding"]
            little.params["lm_head"]["kernel"] = np.roll(np.asarray(embedding), 1, axis=0).T
        ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, PROMPT)).astype(np.int32)
        ids[:, 0] = config.bos_token_id
        settings = dict(max_new_tokens=args.new, eos_token_id=config.vocab_size - 1)
        runs = {"plain, compiled loop": lambda: model.generate(ids, **settings),
                "plain, host loop": lambda: model.generate(ids, streamer=lambda tokens: None, **settings)}
        runs.update({name: (lambda kw=kw: model.generate(ids, **settings, **kw))
                     for name, kw in cases(little, twin).items()})
        want = np.asarray(runs["plain, compiled loop"]())
        for name, run in runs.items():  # warm-up (compiles), tokens checked
            if not np.array_equal(np.asarray(run()), want):
                raise SystemExit(f"{backend} {name}: tokens differ from plain decoding")
        best = timed(runs, args.repeats)
    report(f"{backend}: {args.preset}, float32, batch 1, {PROMPT}-token prompt, {args.new} new tokens, best of "
           f"{args.repeats}", args.new, best, "plain, compiled loop", {})


def bench_torch(args, backend: str = "torch") -> None:
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
        runs = {"optkit plain": lambda: model.generate(ids, **settings)}
        runs.update({f"optkit {name}": (lambda kw=kw: model.generate(ids, **settings, **kw))
                     for name, kw in cases(little, twin).items()})
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
        best = timed(runs, args.repeats)
    report(f"torch: {args.preset}, float32, batch 1, {PROMPT}-token prompt, {args.new} new tokens, "
           f"{torch.get_num_threads()} threads, best of {args.repeats}", args.new, best, "optkit plain", passes)


if __name__ == "__main__":
    main()
