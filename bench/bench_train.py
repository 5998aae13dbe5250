"""Training speed: optkit's trainers against a plain Hugging Face 4.57.6 PyTorch loop, same run.

A random 125m-shaped float32 causal LM (written once to a temporary directory), batch 8 x 128 tokens
of random ids, AdamW (lr 1e-4, weight decay 0.01 on linear weights and embeddings only, warm-up 1,
linear decay), global-norm clipping at 1.0, dropout as the config says (0.1). Each row runs
--warmup untimed updates, then --steps timed ones; tokens/s = 8 x 128 / median seconds per update.

    python bench/bench_train.py [--backends torch,hf,tf,flax] [--steps 3] [--warmup 1] [--device cpu] [--bf16]

RUNNERS maps a row name to `fn(path, cfg, batches, device, warmup) -> [seconds per update, ...]`
(the updates after the first `warmup` ones; `_timed` does that for a step function); a backend adds
its row by adding its function there. The machine is often shared: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opt_spec import OPTConfig, weight_table  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import random_weight  # noqa: E402
from opt_spec.training import TrainConfig, learning_rate  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

BATCH, SEQ = 8, 128


def make_checkpoint(config, path: str) -> None:
    tensors = ((w.name, random_weight(w, config, seed=0) * 0.5) for w in weight_table(config, "causal_lm")
               if w.name != "lm_head.weight")
    spec_io.write_safetensors(os.path.join(path, spec_io.SAFE_WEIGHTS_NAME), tensors)
    config.to_json_file(os.path.join(path, spec_io.CONFIG_NAME))


def make_batches(config, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, config.vocab_size, size=(BATCH, SEQ)).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def _timed(step, batches, warmup: int, sync=lambda: None) -> list[float]:
    times = []
    for i, batch in enumerate(batches):
        sync()
        t = time.perf_counter()
        step(batch)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def run_torch(path, cfg, batches, device, warmup):
    import torch

    from opt_torch.training import Trainer

    trainer = Trainer.from_pretrained(path, "causal_lm", cfg, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return _timed(lambda b: trainer.train_step([b]), batches, warmup, sync)


def run_hf(path, cfg, batches, device, warmup):
    """The plain loop people write with transformers: forward with labels, backward, clip, step."""
    import torch
    import transformers

    model = transformers.OPTForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or "layer_norm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or "layer_norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, cfg) / cfg.learning_rate)

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=cfg.mixed_precision == "bf16")

    def step(batch):
        inputs = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return _timed(step, batches, warmup, sync)


def run_tf(path, cfg, batches, device, warmup):
    """opt_tf.training.TFTrainer: Keras train_on_batch with SpecAdamW, XLA-compiled (TF picks its own device)."""
    from opt_tf.training import TFTrainer

    trainer = TFTrainer.from_pretrained(path, "causal_lm", cfg, jit_compile=True)
    return _timed(lambda b: trainer.train_step([b]), batches, warmup)


def run_flax(path, cfg, batches, device, warmup):
    """opt_flax.training.FlaxTrainer: one jitted step (JAX picks its own device); waits for the result."""
    from opt_flax.training import FlaxTrainer

    trainer = FlaxTrainer.from_pretrained(path, "causal_lm", cfg)
    return _timed(lambda b: trainer.train_step([b]), batches, warmup)  # train_step returns Python floats


# Row name -> runner. TF and Flax add "tf" / "flax" rows here (their own functions).
RUNNERS = {"torch": run_torch, "hf": run_hf, "tf": run_tf, "flax": run_flax}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=None, help=f"comma-separated rows (default: all of {', '.join(RUNNERS)})")
    p.add_argument("--preset", default="125m")
    p.add_argument("--steps", type=int, default=3, help="timed updates per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (default 1)")
    p.add_argument("--device", default="cpu", help="torch device for the torch and hf rows (default cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast; float32 weights)")
    args = p.parse_args(argv)
    names = args.backends.split(",") if args.backends else list(RUNNERS)
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; available: {', '.join(RUNNERS)}")
    config = OPTConfig.from_preset(args.preset)
    n = args.warmup + args.steps
    cfg = TrainConfig(learning_rate=1e-4, weight_decay=0.01, warmup_steps=1, total_steps=n + 1, max_grad_norm=1.0,
                      mixed_precision="bf16" if args.bf16 else None)
    batches = make_batches(config, n)
    precision = "bf16 mixed" if args.bf16 else "float32"
    print(f"training {args.preset}: batch {BATCH} x {SEQ}, AdamW, clip 1.0, {precision}, {args.warmup} warm-up + "
          f"{args.steps} timed updates, device {args.device}, {os.cpu_count()} CPUs", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(config, path)
        for name in names:
            try:
                times = RUNNERS[name](path, cfg, batches, args.device, args.warmup)
            except Exception as err:  # one failing row does not hide the others
                print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
                continue
            rows[name] = statistics.median(times)
            print(f"{name}: {', '.join(f'{t:.2f}' for t in times)} s per update", flush=True)
    if not rows:
        return 1
    base = rows.get("hf")
    print("\n| row | s / update (median) | tokens/s | vs hf |\n|---|---|---|---|")
    for name, t in rows.items():
        rel = f"{base / t:.2f}x" if base else "-"
        print(f"| {name} | {t:.3f} | {BATCH * SEQ / t:,.0f} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
