"""Checks and timings that need a GPU (run by hand on a CUDA machine; CI has none).

    python bench/gpu_check.py [--backends torch,flax]

torch: float16/bfloat16 forward on a left-padded batch (eager and sdpa) is finite and close to
float32; eager equals sdpa in float32; greedy generate with compile=True (torch.compile, CUDA graphs
where it can) gives the same tokens as eager; tokens/s of generate on a random 125m-shaped model.
flax: the same forward checks on the GPU, under jax.jit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opt_spec import OPTConfig  # noqa: E402
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights  # noqa: E402


def report(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def masked_max(a, b, mask):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d[np.asarray(mask).astype(bool)].max())


def torch_checks(dirs, big_dir, big_config) -> bool:
    import torch

    from opt_torch import OPTForCausalLM

    torch.set_grad_enabled(False)
    dev = "cuda"
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}")
    ok = True
    for name, path in dirs.items():
        config = VARIANTS[name]
        ids, mask = (torch.from_numpy(a).long().to(dev) for a in random_batch(config, seed=1))
        ref = OPTForCausalLM.from_pretrained(path, device=dev, attn_implementation="eager")(ids, mask).logits
        sdpa32 = OPTForCausalLM.from_pretrained(path, device=dev)(ids, mask).logits
        ok &= report(f"torch {name} fp32 eager==sdpa", masked_max(ref.cpu(), sdpa32.cpu(), mask.cpu()) <= 1e-4,
                     f"max {masked_max(ref.cpu(), sdpa32.cpu(), mask.cpu()):.2e}")
        scale = float(ref.abs().max())
        for dtype in (torch.float16, torch.bfloat16):
            for attn in ("eager", "sdpa"):
                m = OPTForCausalLM.from_pretrained(path, dtype=dtype, device=dev, attn_implementation=attn)
                out = m(ids, mask).logits
                d = masked_max(out.float().cpu(), ref.cpu(), mask.cpu())
                finite = bool(torch.isfinite(out).all())
                ok &= report(f"torch {name} {str(dtype)[6:]} {attn}", finite and d < 0.1 * scale,
                             f"max diff {d:.3e} (logit scale {scale:.1f})")
    # generate: compiled == eager, and speed
    model = OPTForCausalLM.from_pretrained(big_dir, dtype=torch.float16, device=dev)
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        ids = torch.from_numpy(rng.integers(3, big_config.vocab_size, (batch, 16))).to(dev)
        eos = big_config.vocab_size - 1
        timings = {}
        outs = {}
        for compile_ in (False, True):
            outs[compile_] = model.generate(ids, max_new_tokens=64, eos_token_id=eos, compile=compile_)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs[compile_] = model.generate(ids, max_new_tokens=64, eos_token_id=eos, compile=compile_)
            torch.cuda.synchronize()
            timings[compile_] = 64 * batch / (time.perf_counter() - t)
        ok &= report(f"torch generate compile==eager batch {batch}", torch.equal(outs[False], outs[True]))
        print(f"  torch 125m fp16 batch {batch}: eager {timings[False]:.0f} tok/s, compile {timings[True]:.0f} tok/s")
    return ok


def flax_checks(dirs) -> bool:
    import jax
    import jax.numpy as jnp

    from opt_flax import FlaxOPTForCausalLM

    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}")
    ok = True
    for name, path in dirs.items():
        config = VARIANTS[name]
        ids, mask = random_batch(config, seed=1)
        ref = np.asarray(FlaxOPTForCausalLM.from_pretrained(path)(ids, attention_mask=mask).logits)
        scale = float(np.abs(ref).max())
        for dtype in (jnp.float16, jnp.bfloat16):
            m = FlaxOPTForCausalLM.from_pretrained(path, dtype=dtype)
            fn = jax.jit(lambda p, i, a, m=m: m(i, attention_mask=a, params=p).logits)
            out = np.asarray(fn(m.params, ids, mask)).astype(np.float32)
            d = masked_max(out, ref, mask)
            ok &= report(f"flax {name} {jnp.dtype(dtype).name} jit", bool(np.isfinite(out).all()) and d < 0.1 * scale,
                         f"max diff {d:.3e}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="torch,flax")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as root:
        dirs = {}
        for name in ("pre_ln", "post_ln_proj", "no_bias"):
            dirs[name] = os.path.join(root, name)
            spec_io.save_safetensors_dir(dirs[name], random_weights(VARIANTS[name], seed=3), VARIANTS[name].to_dict())
        big_config = OPTConfig.from_preset("125m").replace(dropout=0.0)
        big_dir = os.path.join(root, "125m")
        big_weights = random_weights(big_config, seed=0, dtype=np.float16)
        spec_io.save_safetensors_dir(big_dir, big_weights, big_config.to_dict())
        for backend in args.backends.split(","):
            try:
                if backend == "torch":
                    ok &= torch_checks(dirs, big_dir, big_config)
                elif backend == "flax":
                    ok &= flax_checks(dirs)
            except Exception as err:  # report and go on to the next backend
                import traceback
                traceback.print_exc()
                ok &= report(f"{backend} checks ran", False, repr(err))
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
