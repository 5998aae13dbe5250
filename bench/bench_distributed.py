"""Beyond one device: what each device holds (from the spec), and sharded against unsharded Flax.

1. Bytes per device for every preset on common meshes, from opt_spec.parallel's partition table:
   weights, gradients and Adam's two moments (training), the KV cache of a batch (inference). No
   framework needed: this is what to read before buying machines.
2. The Flax model on simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here
   before JAX starts): forward and training step on meshes 8x1, 2x4, 4x2 against the same model on
   one device, as ratios in one run. On a CPU the 8 devices share the same cores, so this measures the
   cost of the SPMD program (collectives, resharding), not a speed-up; on 8 real accelerators the same
   code splits the work.

    python bench/bench_distributed.py [--dtype float16] [--batch 1] [--length 2048] [--no-run]
                                      [--layers 4] [--hidden 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from opt_spec import OPTConfig  # noqa: E402
from opt_spec.parallel import format_memory_table, memory_per_device, memory_table  # noqa: E402

MESHES = [(1, 1), (8, 1), (1, 8), (8, 8), (16, 8), (64, 8)]


def print_memory(dtype: str, batch: int, length: int) -> None:
    print(f"== bytes per device (GB = 1e9 bytes), {dtype} weights and KV cache, Adam moments float32, "
          f"KV cache for {batch} x {length} tokens; mesh = fsdp x tp ==")
    print(format_memory_table(memory_table(MESHES, dtype=dtype, batch=batch, length=length)))
    config = OPTConfig.from_preset("175b")
    m = memory_per_device(config, fsdp=8, tp=8, dtype=dtype, batch=batch, length=length)
    print(f"\n175b on fsdp=8 x tp=8 (64 devices), {dtype}: each device holds {m['weights'] / 1e9:.2f} GB of weights "
          f"(of {memory_per_device(config, 1, 1, dtype)['weights'] / 1e9:.0f} GB), {m['kv_cache'] / 1e9:.2f} GB of KV "
          f"cache; training adds {m['gradients'] / 1e9:.2f} GB of gradients and {m['adam'] / 1e9:.2f} GB of Adam "
          f"state: {m['training'] / 1e9:.1f} GB before activations (optkit's trainers keep float32 weights and "
          f"gradients: --dtype float32 gives {memory_per_device(config, 8, 8, 'float32')['training'] / 1e9:.1f} GB).")


def _median_time(fn, steps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_flax(layers: int, hidden: int, steps: int) -> None:
    import tempfile

    import jax

    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.distributed import make_mesh
    from opt_flax.training import FlaxTrainer
    from opt_spec import io as spec_io
    from opt_spec.testing import random_weights, synthetic_batch
    from opt_spec.training import TrainConfig

    config = OPTConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                       num_attention_heads=8, max_position_embeddings=256, dropout=0.0)
    batch = synthetic_batch("causal_lm", config, batch=8, length=128, seed=0)
    cfg = TrainConfig(learning_rate=1e-4, total_steps=100)
    print(f"\n== Flax on {jax.device_count()} simulated {jax.default_backend()} devices: {layers} layers, hidden "
          f"{hidden}, vocab 8192, batch 8 x 128 tokens, float32; median of {steps} ==")
    with tempfile.TemporaryDirectory() as path:
        spec_io.save_safetensors_dir(path, random_weights(config, "causal_lm", 0), config.to_dict())
        rows = []
        for mesh_shape in (None, (8, 1), (2, 4), (4, 2)):
            mesh = make_mesh(*mesh_shape) if mesh_shape else None
            model = FlaxOPTForCausalLM.from_pretrained(path, mesh=mesh)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if mesh is None:  # one jitted program, as the sharded model's call is
                run = jax.jit(lambda p, i, m, model=model: model.module.apply({"params": p}, i, m).logits)
                forward = _median_time(lambda: run(model.params, ids, mask).block_until_ready(), steps)
            else:
                forward = _median_time(lambda: model(ids, attention_mask=mask).logits.block_until_ready(), steps)
            trainer = FlaxTrainer(model, cfg)
            train = _median_time(lambda: jax.block_until_ready(trainer.train_step(batch)), steps)
            rows.append(("1 device" if mesh is None else f"{mesh_shape[0]}x{mesh_shape[1]}", forward, train))
    base_f, base_t = rows[0][1], rows[0][2]
    print(f"{'mesh':<9} {'forward s':>10} {'vs 1':>6} {'train step s':>13} {'vs 1':>6}")
    for name, f, t in rows:
        print(f"{name:<9} {f:>10.4f} {f / base_f:>6.2f} {t:>13.4f} {t / base_t:>6.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--no-run", action="store_true", help="only the bytes-per-device table")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    print_memory(args.dtype, args.batch, args.length)
    if not args.no_run:
        try:
            import jax  # noqa: F401
        except ImportError:
            print("\n(JAX is not installed: pip install 'optkit[flax]' for the sharded timings)")
            return 0
        run_flax(args.layers, args.hidden, args.steps)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
