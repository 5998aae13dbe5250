"""Beyond one device in PyTorch: the model split over torchrun processes against one process, as ratios.

For meshes dp x tp = 1x2 (tensor parallel), 2x1 (FSDP2) and 2x2, one torchrun launch each (gloo on the
CPU, or NCCL with one GPU per process), against the same model unsplit in one process of this run:
the forward of a batch, 16 greedy new tokens, one training step (forward, backward, AdamW), and the
bytes each rank read from the checkpoint. On a CPU the processes share the same cores and one thread
each, so the ratios measure what splitting costs (collectives, the module path instead of the fused
decode step), not a speed-up; on N accelerators the same code splits the work N ways.

    python bench/bench_distributed_torch.py [--layers 4] [--hidden 256] [--heads 8] [--vocab 8192]
                                            [--batch 4] [--length 64] [--repeats 5] [--meshes 1x2,2x1,2x2]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NEW_TOKENS = 16


def _config(args):
    from opt_spec import OPTConfig

    return OPTConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                     ffn_dim=4 * args.hidden, num_attention_heads=args.heads, max_position_embeddings=512,
                     dropout=0.0)


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(path: str, args, mesh=None) -> dict:
    """Seconds per forward, per generate call, per train step (medians), and the bytes this rank read."""
    import numpy as np
    import torch

    from opt_spec.testing import random_batch
    from opt_spec.training import TrainConfig
    from opt_torch import OPTForCausalLM
    from opt_torch.training import Trainer

    config = _config(args)
    kwargs = {"device_mesh": mesh} if mesh is not None else {}
    model = OPTForCausalLM.from_pretrained(path, **kwargs)
    ids, mask = random_batch(config, batch=args.batch, length=args.length, seed=1,
                             left_pad=tuple(range(0, 2 * args.batch, 2)))
    ids, mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    out = {"bytes_read": getattr(model, "bytes_read", None)}
    with torch.no_grad():
        out["forward_s"] = _median(lambda: model(ids, attention_mask=mask), args.repeats)
    out["generate_s"] = _median(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS),
                                max(1, args.repeats // 2))
    labels = np.where(mask.numpy() == 1, ids.numpy(), -100)
    batch = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "labels": labels}
    trainer = Trainer(OPTForCausalLM.from_pretrained(path, **kwargs), TrainConfig(total_steps=1000), **kwargs)
    out["train_step_s"] = _median(lambda: trainer.train_step(batch), args.repeats)
    return out


def worker(args) -> None:
    """One rank of a torchrun launch: the split model's timings; rank 0 writes them as JSON to --result (not
    to stdout, which torchrun shares among the ranks: another rank's text can land inside the line)."""
    import torch.distributed as dist

    from opt_torch.distributed import init_mesh

    dp, tp = (int(x) for x in args.worker.split("x"))
    mesh = init_mesh(dp=dp, tp=tp)
    result = measure(args.path, args, mesh)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result["bytes_read"])
    result["bytes_read"] = everyone
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--meshes", default="1x2,2x1,2x2", help="dp x tp, comma separated")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from opt_spec import count_parameters
    from opt_spec import io as spec_io
    from opt_spec.testing import random_weights

    config = _config(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        weights = random_weights(config, "causal_lm", 0)
        spec_io.save_safetensors_dir(path, weights, config.to_saved_dict("OPTForCausalLM", "float32"))
        total = sum(a.nbytes for a in weights.values())
        torch.set_num_threads(1)  # as each torchrun rank runs (OMP_NUM_THREADS=1)
        base = measure(path, args)
        print(f"OPT {args.layers} layers x {args.hidden} wide, {args.heads} heads, vocab {args.vocab} "
              f"({count_parameters(config) / 1e6:.1f}M parameters, {total / 1e6:.1f} MB float32); batch "
              f"{args.batch} x {args.length}, {NEW_TOKENS} new tokens; one process, one thread: forward "
              f"{base['forward_s'] * 1e3:.1f} ms, generate {base['generate_s'] * 1e3:.0f} ms, train step "
              f"{base['train_step_s'] * 1e3:.1f} ms\n")
        print(f"{'mesh dp x tp':<13} {'ranks':>5} {'forward':>8} {'generate':>9} {'train step':>11} "
              f"{'bytes read per rank':>22}")
        for text in args.meshes.split(","):
            dp, tp = (int(x) for x in text.split("x"))
            result = os.path.join(tmp, f"result-{text}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={dp * tp}",
                   os.path.abspath(__file__), "--worker", text, "--path", path, "--result", result,
                   *[f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "vocab", "batch", "length",
                                                          "repeats")]]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode or not os.path.isfile(result):
                print(f"{text:<13} failed:\n{r.stderr[-3000:]}")
                continue
            with open(result) as f:
                got = json.load(f)
            share = max(got["bytes_read"]) / total
            ratio = {k: got[k] / base[k] for k in ("forward_s", "generate_s", "train_step_s")}
            print(f"{text:<13} {dp * tp:>5} {ratio['forward_s']:>7.2f}x {ratio['generate_s']:>8.2f}x "
                  f"{ratio['train_step_s']:>10.2f}x {max(got['bytes_read']) / 1e6:>10.2f} MB ({share:.0%})")
        print("\nratios: time on the mesh / time in one process (lower is faster); bytes: the most any rank read")


if __name__ == "__main__":
    main()
