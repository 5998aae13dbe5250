"""Training speed as users see it: `optkit train` per backend against a plain Hugging Face loop, same run.

A random 125m-shaped float32 causal LM with a byte-level BPE tokenizer trained here, random text
packed into blocks of 128 tokens, batch 8, AdamW (lr 1e-4, weight decay 0.01, warm-up 1, linear
decay), clipping at 1.0. Each row is a fresh process: `optkit train --backend B` (its
metrics.jsonl tokens_per_s), or, for "hf", this script's --hf-loop (the loop people write with
transformers, on the same batches, writing the same metrics). A row's tokens/s is the median over
the updates after the first --skip ones (compilation, warm-up) of every round; rows alternate within
a round so that a shared machine's load falls on all of them. Each run's load average is printed.

    python bench/bench_train_cli.py [--backends hf,torch,tf,flax] [--rounds 2] [--steps 5] [--skip 2] [--bf16]
                                    [--no-retain-memory] [--hf-retain-memory]

`optkit train` keeps freed memory in its process by default (opt_spec/host.py: no page faults every
step); --no-retain-memory runs it without, --hf-retain-memory gives the Hugging Face loop the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opt_spec import OPTConfig  # noqa: E402
from opt_spec.training import TrainConfig, learning_rate  # noqa: E402

BATCH, SEQ = 8, 128
ROWS = ("hf", "torch", "tf", "flax")


def make_model(path: str, preset: str) -> str:
    """A random checkpoint (bench_train's weights) plus a BPE tokenizer and a text file to train on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_train import make_checkpoint

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
    text = "\n\n".join(" ".join(rng.choice(words, size=200)) + "." for _ in range(300))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    model = os.path.join(path, "model")
    os.makedirs(model)
    make_checkpoint(OPTConfig.from_preset(preset), model)
    tok.save(os.path.join(model, "tokenizer.json"))
    data = os.path.join(path, "train.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(text)
    return data


def hf_loop(model: str, data: str, output: str, steps: int, bf16: bool, seq_len: int = SEQ, retain: bool = False) -> None:
    """transformers' model, torch AdamW (decay on weights), LambdaLR, clip_grad_norm_, the CLI's batches."""
    import torch
    import transformers

    from opt_spec import data as spec_data
    from opt_spec.host import retain_freed_memory
    from opt_spec.tokenizer import OPTTokenizer

    if retain:
        retain_freed_memory()
    config = OPTConfig.from_pretrained(model)
    dataset = spec_data.load("causal_lm", [data], OPTTokenizer.from_pretrained(model, config), seq_len)
    stream = spec_data.BatchStream(dataset, BATCH, seed=0)
    cfg = TrainConfig(learning_rate=1e-4, weight_decay=0.01, warmup_steps=1, total_steps=steps)
    net = transformers.OPTForCausalLM.from_pretrained(model, dtype=torch.float32).train()
    decay = [p for n, p in net.named_parameters() if not (n.endswith(".bias") or "layer_norm" in n)]
    no_decay = [p for n, p in net.named_parameters() if n.endswith(".bias") or "layer_norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate(s, cfg) / cfg.learning_rate)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "metrics.jsonl"), "w", encoding="utf-8") as log:
        for step in range(steps):
            batch = stream.batch(step)
            t0 = time.perf_counter()
            inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = net(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()
            dt = time.perf_counter() - t0
            tokens = int(batch["attention_mask"].sum())
            log.write(json.dumps({"kind": "train", "step": step + 1, "loss": value, "tokens": tokens,
                                  "tokens_per_s": tokens / dt}) + "\n")


def run_row(name: str, model: str, data: str, output: str, steps: int, bf16: bool, seq_len: int = SEQ,
            retain: bool = True, hf_retain: bool = False) -> list[float]:
    """tokens_per_s of every update of one fresh run of row `name`."""
    if name == "hf":
        cmd = [sys.executable, os.path.abspath(__file__), "--hf-loop", model, data, output, str(steps), str(seq_len)]
        cmd += ["--retain-memory"] if hf_retain else []
    else:
        cmd = [sys.executable, "-m", "optkit_cli.main", "train", "--model", model, "--task", "causal_lm", "--data",
               data, "--backend", name, "--output", output, "--steps", str(steps), "--batch-size", str(BATCH),
               "--seq-len", str(seq_len), "--lr", "1e-4", "--warmup", "1", "--weight-decay", "0.01", "-q"]
        cmd += [] if retain else ["--no-retain-memory"]
    cmd += ["--bf16"] if bf16 else []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: exit {res.returncode}: {res.stderr[-2000:]}")
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["tokens_per_s"] for r in records if r["kind"] == "train"]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--hf-loop":
        model, data, output, steps, seq_len = sys.argv[2:7]
        hf_loop(model, data, output, int(steps), "--bf16" in sys.argv[7:], int(seq_len), "--retain-memory" in sys.argv[7:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(ROWS), help="comma-separated rows (default: hf,torch,tf,flax)")
    p.add_argument("--preset", default="125m")
    p.add_argument("--seq-len", type=int, default=SEQ, help=f"block length (default {SEQ})")
    p.add_argument("--rounds", type=int, default=2, help="runs of every row, alternating (default 2)")
    p.add_argument("--steps", type=int, default=5, help="updates per run (default 5)")
    p.add_argument("--skip", type=int, default=2, help="first updates of a run left out (default 2)")
    p.add_argument("--bf16", action="store_true", help="--bf16 (bf16 mixed precision)")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="optkit train's --retain-memory (its default: on)")
    p.add_argument("--hf-retain-memory", action="store_true", help="the same setting for the Hugging Face loop")
    args = p.parse_args(argv)
    names = args.backends.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; available: {', '.join(ROWS)}")
    if args.steps <= args.skip:
        p.error("--steps must be more than --skip")
    print(f"optkit train, {args.preset}: batch {BATCH} x {args.seq_len}, {'bf16 mixed' if args.bf16 else 'float32'}, "
          f"{args.rounds} rounds of {args.steps} updates (first {args.skip} left out), {os.cpu_count()} CPUs, "
          f"retained memory: optkit {'on' if args.retain_memory else 'off'}, hf {'on' if args.hf_retain_memory else 'off'}",
          flush=True)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_model(tmp, args.preset)
        model = os.path.join(tmp, "model")
        for r in range(args.rounds):
            for name in names:
                try:
                    got = run_row(name, model, data, os.path.join(tmp, f"{name}-{r}"), args.steps, args.bf16,
                                  args.seq_len, args.retain_memory, args.hf_retain_memory)
                except RuntimeError as err:
                    print(f"{name}: failed: {err}", flush=True)
                    continue
                speeds[name] += got[args.skip:]
                loads[name].append(os.getloadavg()[0])
                print(f"round {r + 1} {name}: {', '.join(f'{s:.0f}' for s in got)} tokens/s "
                      f"(load {loads[name][-1]:.1f})", flush=True)
    rows = {n: statistics.median(s) for n, s in speeds.items() if s}
    if not rows:
        return 1
    base = rows.get("hf")
    print("\n| row | tokens/s (median) | vs hf | load after runs |\n|---|---|---|---|")
    for name, s in rows.items():
        rel = f"{s / base:.2f}x" if base else "-"
        print(f"| {name} | {s:,.0f} | {rel} | {', '.join(f'{x:.1f}' for x in loads[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
