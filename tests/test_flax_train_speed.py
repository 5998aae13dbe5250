"""opt_flax.fast_paths: the train step's causal-LM loss equals opt_flax.modeling's and the spec's, value
and gradient, in float32 and from bf16 logits, with ignored labels, and 0 over nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opt_flax import fast_paths, modeling
from opt_spec import IGNORE_INDEX, numerics


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_lm_loss_equals_the_model_s(dtype):
    rng = np.random.default_rng(0)
    B, T, V = 3, 7, 50
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 4, dtype)
    labels = rng.integers(0, V, size=(B, T))
    labels[0, 2:5] = IGNORE_INDEX  # ignored targets, and a first label that no logit predicts
    labels[1, 0] = IGNORE_INDEX
    labels = jnp.asarray(labels)
    want, want_grad = jax.value_and_grad(modeling.causal_lm_loss)(logits, labels)
    got, got_grad = jax.value_and_grad(fast_paths.causal_lm_loss)(logits, labels)
    assert got.dtype == jnp.float32 and got_grad.dtype == dtype
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(got), numerics.causal_lm_loss(np.asarray(logits, np.float32), labels), rtol=1e-6)
    tol = 1e-7 if dtype == jnp.float32 else 1e-3  # bf16 gradients: one rounding of values below ~0.1
    np.testing.assert_allclose(np.asarray(got_grad, np.float32), np.asarray(want_grad, np.float32), atol=tol)
    assert np.all(np.asarray(got_grad)[:, -1] == 0) and np.all(np.asarray(got_grad)[0, 1:4] == 0)


def test_nothing_kept_is_zero_with_zero_gradients_as_the_model_s():
    logits = jnp.ones((1, 3, 5))
    labels = jnp.full((1, 3), IGNORE_INDEX)
    for loss in (fast_paths.causal_lm_loss, modeling.causal_lm_loss):
        value, grad = jax.value_and_grad(loss)(logits, labels)
        assert float(value) == 0.0 and not np.any(np.asarray(grad))
