"""Training speed: optkit's trainers against a plain Hugging Face 4.57.6 PyTorch loop, same run.

A random 125m-shaped float32 causal LM (written once to a temporary directory), batch 8 x 128 tokens
of random ids, AdamW (lr 1e-4, weight decay 0.01 on linear weights and embeddings only, warm-up 1,
linear decay), global-norm clipping at 1.0, dropout as the config says (0.1). Every trainer is built
as a user builds it (its defaults), takes --warmup untimed updates, then --rounds timed ones.

    python bench/bench_train.py [--backends hf,torch,tf,flax] [--rounds 3] [--warmup 1] [--bf16] [--sequential]
                                [--retain-memory]

The rows take turns: round r times one update of every row (hf, torch, tf, flax, hf, ...), so other
work on a shared machine slows them alike, and each row's tokens/s is 8 x 128 / its median seconds per
update; "vs hf" is the ratio of the medians. "CPU s / update" is the process's CPU time during a row's
updates (all threads): on a machine busier than its cores, where wall time is shared out, the work.
Each update's load average (os.getloadavg, 1 minute) is recorded and printed with the table: compare
rows of one run only. --sequential builds and runs one
row at a time instead (one trainer in memory, not four: ~10 GB for 125m).

The "floor" line under the table is the roofline: the update's matrix-product FLOPs (`step_flops`)
divided by the rate torch's GEMM reaches on the step's own shapes in this run, float32 or bf16 as the
run trains (measured before and after the rows, the better kept). No trainer can beat it without
changing the math; a row's "of floor" is floor / its seconds.

--retain-memory keeps freed memory in the process (opt_spec/host.py, what `optkit train` does by default) for
every row alike; the "faults" column counts the page faults of a row's updates either way.

BUILDERS maps a row name to `fn(path, cfg, device) -> step`, where `step(batch)` makes one update and
returns once it is done; a backend adds its row by adding its function there.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
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


def make_batches(config, n: int, seed: int = 0, seq_len: int = SEQ) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, config.vocab_size, size=(BATCH, seq_len)).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    return out


def step_flops(config, batch: int, seq_len: int) -> float:
    """Matrix-product FLOPs of one update of batch x seq_len tokens: 2 per multiply-add forward, twice
    that backward (the input's and the weight's gradients), for every linear layer, the tied head and
    the attention products (q.k and p.v over the row's positions, counted whole though causal)."""
    H, E, F, L, V = (config.hidden_size, config.word_embed_proj_dim, config.ffn_dim, config.num_hidden_layers,
                     config.vocab_size)
    linear = L * (4 * H * H + 2 * H * F) + V * E + (2 * E * H if config.has_projections else 0)  # per token
    attention = L * 2 * seq_len * H  # per token
    return 6.0 * batch * seq_len * (linear + attention)


def gemm_rate(config, tokens: int, bf16: bool, device: str = "cpu") -> float:
    """FLOP/s of torch's matrix product on the update's shapes: their FLOPs over the sum of each
    shape's best time of three."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    H, F, V = config.hidden_size, config.ffn_dim, config.vocab_size
    sync = _cuda_sync(device)
    flops, seconds = 0.0, 0.0
    for M, K, N in [(tokens, H, F), (tokens, F, H), (H, tokens, F), (tokens, H, V)]:  # fc1, fc2, a gradient, head
        a, b = torch.randn(M, K, dtype=dtype, device=device), torch.randn(K, N, dtype=dtype, device=device)
        a @ b
        sync()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        flops, seconds = flops + 2 * M * K * N, seconds + best
    return flops / seconds


def _cuda_sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def build_torch(path, cfg, device):
    from opt_torch.training import Trainer

    trainer = Trainer.from_pretrained(path, "causal_lm", cfg, device=device)
    sync = _cuda_sync(device)
    return lambda b: (trainer.train_step([b]), sync())


def build_hf(path, cfg, device):
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
    sync = _cuda_sync(device)

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
        sync()

    return step


def build_tf(path, cfg, device):
    """opt_tf.training.TFTrainer with its defaults (TF picks its own device); returns Python floats."""
    from opt_tf.training import TFTrainer

    trainer = TFTrainer.from_pretrained(path, "causal_lm", cfg)
    return lambda b: trainer.train_step([b])


def build_flax(path, cfg, device):
    """opt_flax.training.FlaxTrainer with its defaults (JAX picks its own device); returns Python floats."""
    from opt_flax.training import FlaxTrainer

    trainer = FlaxTrainer.from_pretrained(path, "causal_lm", cfg)
    return lambda b: trainer.train_step([b])


# Row name -> builder of its step function.
BUILDERS = {"hf": build_hf, "torch": build_torch, "tf": build_tf, "flax": build_flax}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(step, batch) -> tuple[float, float, float, int]:
    """(wall seconds, load average, CPU seconds of this process: all its threads, the step's work; page faults)."""
    t, c, f = time.perf_counter(), _cpu_seconds(), _faults()
    step(batch)
    return time.perf_counter() - t, os.getloadavg()[0], _cpu_seconds() - c, _faults() - f


def run_rows(names, path, cfg, batches, device, warmup: int, sequential: bool) -> dict[str, list[tuple]]:
    """{row: [(seconds, load average), ...] of its timed updates}; a row that fails is reported and left out."""
    times: dict[str, list[tuple]] = {}

    def build(name):
        try:
            step = BUILDERS[name](path, cfg, device)
            for b in batches[:warmup]:
                step(b)
            return step
        except Exception as err:  # one failing row does not hide the others
            print(f"{name}: failed: {type(err).__name__}: {err}", flush=True)
            return None

    if sequential:
        for name in names:
            step = build(name)
            if step is not None:
                times[name] = [_timed(step, b) for b in batches[warmup:]]
                print(f"{name}: {', '.join(f'{t:.2f}' for t, *_ in times[name])} s per update", flush=True)
            del step
            gc.collect()
        return times
    steps = {name: step for name in names if (step := build(name)) is not None}
    for r, batch in enumerate(batches[warmup:]):
        line = []
        for name, step in steps.items():
            times.setdefault(name, []).append(_timed(step, batch))
            line.append(f"{name} {times[name][-1][0]:.2f}s")
        print(f"round {r + 1}: {', '.join(line)} (load {os.getloadavg()[0]:.1f})", flush=True)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=None, help=f"comma-separated rows (default: all of {', '.join(BUILDERS)})")
    p.add_argument("--preset", default="125m")
    p.add_argument("--seq-len", type=int, default=SEQ, help=f"tokens per row (default {SEQ})")
    p.add_argument("--rounds", "--steps", type=int, default=3, help="timed updates per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (default 1)")
    p.add_argument("--device", default="cpu", help="torch device for the torch and hf rows (default cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast; float32 weights)")
    p.add_argument("--sequential", action="store_true", help="one row after the other (less memory, not interleaved)")
    p.add_argument("--retain-memory", action="store_true",
                   help="keep freed memory in the process for every row (opt_spec/host.py; optkit train's default)")
    args = p.parse_args(argv)
    if args.retain_memory:
        from opt_spec.host import retain_freed_memory

        retain_freed_memory()
    names = args.backends.split(",") if args.backends else list(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; available: {', '.join(BUILDERS)}")
    config = OPTConfig.from_preset(args.preset)
    n = args.warmup + args.rounds
    cfg = TrainConfig(learning_rate=1e-4, weight_decay=0.01, warmup_steps=1, total_steps=n + 1, max_grad_norm=1.0,
                      mixed_precision="bf16" if args.bf16 else None)
    batches = make_batches(config, n, seq_len=args.seq_len)
    precision = "bf16 mixed" if args.bf16 else "float32"
    print(f"training {args.preset}: batch {BATCH} x {args.seq_len}, AdamW, clip 1.0, {precision}, "
          f"{'freed memory retained, ' if args.retain_memory else ''}"
          f"{args.warmup} warm-up + {args.rounds} timed updates, "
          f"{'one row after the other' if args.sequential else 'rows interleaved'}, "
          f"device {args.device}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    tokens = BATCH * args.seq_len
    rate = gemm_rate(config, tokens, args.bf16, args.device)
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(config, path)
        times = run_rows(names, path, cfg, batches, args.device, args.warmup, args.sequential)
    rate = max(rate, gemm_rate(config, tokens, args.bf16, args.device))
    floor = step_flops(config, BATCH, args.seq_len) / rate
    if not times:
        return 1
    rows = {name: statistics.median(t for t, *_ in ts) for name, ts in times.items()}
    base = rows.get("hf")
    cpu = {name: statistics.median(c for _, _, c, _ in ts) for name, ts in times.items()}
    faults = {name: statistics.median(f for *_, f in ts) for name, ts in times.items()}
    print("\n| row | s / update (median) | tokens/s | vs hf | of floor | CPU s / update | page faults / update "
          "| load during |\n|---|---|---|---|---|---|---|---|")
    for name, t in rows.items():
        rel = f"{base / t:.2f}x" if base else "-"
        loads = [load for _, load, *_ in times[name]]
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {rel} | {floor / t:.2f} | {cpu[name]:.2f} | "
              f"{faults[name]:,.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    flops, kind = step_flops(config, BATCH, args.seq_len), "bf16" if args.bf16 else "float32"
    print(f"\nfloor: {floor:.2f} s / update ({tokens / floor:,.0f} tokens/s): {flops:.3g} matrix-product FLOPs "
          f"at {rate / 1e9:.0f} GFLOP/s ({kind} GEMM, torch, this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
