"""The Flax backend on a GPU (skipped without one): float32 parity with opt_torch (on the CPU) at
precision="highest", half precision without NaN, and the jitted KV cache. Prints what it measures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opt_flax import FlaxOPTForCausalLM
from opt_flax.pretrained import MODEL_CLASSES as FLAX_CLASSES
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch.modeling import MODEL_CLASSES as TORCH_CLASSES

from .conftest import HEADS, max_abs_diff

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU for JAX")


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def main_output(out):
    for field in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, field, None)
        if value is not None:
            return np.asarray(value.detach() if isinstance(value, torch.Tensor) else value, dtype=np.float32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gpu_float32_matches_torch(tmp_path, name):
    config = VARIANTS[name]
    ids, mask = random_batch(config)
    for head in HEADS:
        path = tmp_path / head
        spec_io.save_safetensors_dir(path, random_weights(config, head), config.to_dict())
        with torch.no_grad():
            expected = main_output(TORCH_CLASSES[head].from_pretrained(path)(torch.from_numpy(ids).long(),
                                                                            torch.from_numpy(mask).long()))
        keep = mask if expected.ndim >= 2 and expected.shape[:2] == mask.shape else None
        diffs = {}
        for precision in ("highest", None):
            model = FLAX_CLASSES[head].from_pretrained(path, precision=precision)
            forward = jax.jit(lambda p, i, m: model(i, m, params=p))
            diffs[precision] = max_abs_diff(main_output(forward(model.params, jnp.asarray(ids), jnp.asarray(mask))),
                                            expected, keep)
        print(f"\nGPU {name} {head}: highest {diffs['highest']:.2e}, default precision {diffs[None]:.2e}")
        assert diffs["highest"] <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_half_precision_and_cache(tmp_path, dtype):
    config = VARIANTS["post_ln_proj"]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config), config.to_dict())
    ref = FlaxOPTForCausalLM.from_pretrained(tmp_path, precision="highest")
    model = FlaxOPTForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ids, mask = random_batch(config, length=10)
    expected = np.asarray(ref(ids, mask).logits)
    forward = jax.jit(lambda p, i, m: model(i, m, params=p))
    logits = forward(model.params, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert logits.dtype == dtype and bool(jnp.isfinite(logits).all())
    diff = max_abs_diff(np.asarray(logits, np.float32), expected, mask)
    print(f"\nGPU {jnp.dtype(dtype).name} vs float32: {diff:.3f} (max |logit| {np.abs(expected).max():.2f})")
    assert diff < 0.15 * float(np.abs(expected).max())

    # the jitted cache, float32 at full precision
    cache = ref.init_cache(3, 12)
    full_mask = np.zeros((3, 12), np.int32)
    full_mask[:, :10] = mask
    step = jax.jit(lambda p, i, m, c: ref(i, m, params=p, past_key_values=c))
    out = step(ref.params, jnp.asarray(ids[:, :6]), jnp.asarray(full_mask), cache)
    steps = [np.asarray(out.logits)]
    for t in range(6, 10):
        out = step(ref.params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(full_mask), out.past_key_values)
        steps.append(np.asarray(out.logits))
    cached = max_abs_diff(np.concatenate(steps, 1), expected, mask)
    print(f"GPU cached decoding vs full forward: {cached:.2e}")
    assert cached <= 1e-5
