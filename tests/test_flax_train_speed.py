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


def _table_sized_zeros(jaxpr, shape) -> int:
    """broadcast_in_dim equations producing an array of the embedding table's shape (nested ones too)."""
    n = sum(e.primitive.name == "broadcast_in_dim" and e.outvars[0].aval.shape == shape for e in jaxpr.eqns)
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _table_sized_zeros(getattr(sub, "jaxpr", sub), shape)
    return n


@pytest.mark.parametrize("mixed_precision", [None, "bf16"])
def test_the_lookup_gradient_added_into_the_head_s_is_the_plain_gradient(mixed_precision):
    from opt_spec.testing import VARIANTS, random_weights, synthetic_batch
    from opt_spec.training import TrainConfig
    from opt_flax import FlaxOPTForCausalLM, canonical_to_params
    from opt_flax.training import FlaxTrainer, _as_jax

    config = VARIANTS["pre_ln"]  # tied head, pad token 1
    model = FlaxOPTForCausalLM(config, canonical_to_params(random_weights(config, "causal_lm", seed=0), config,
                                                           "causal_lm"))
    trainer = FlaxTrainer(model, TrainConfig(learning_rate=1e-3, total_steps=4, mixed_precision=mixed_precision))
    batch = _as_jax(synthetic_batch("causal_lm", config), trainer._keys)
    ids = np.asarray(batch["input_ids"])
    assert np.any(ids == config.pad_token_id) and len(np.unique(ids)) < ids.size  # pads and repeated tokens
    key = jax.random.PRNGKey(3)  # dropout on: the same masks in both
    plain = jax.value_and_grad(trainer.fns.loss)
    fast = fast_paths.value_and_grad_lookup_into_head(trainer.fns.loss, trainer.module.numerics.dtype)
    want, want_grads = jax.jit(plain)(trainer.params, batch, key)
    got, got_grads = jax.jit(fast)(trainer.params, batch, key)
    assert float(got) == float(want)
    table = trainer.params["model"]["decoder"]["embed_tokens"]["embedding"]
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree_util.tree_leaves(want_grads),
                            strict=True):
        assert g.dtype == w.dtype == jnp.float32
        # bf16: the plain sum of the two parts is rounded to bf16 once more (< 1 ulp of the largest entry)
        tol = 0 if mixed_precision is None or "embed_tokens" not in jax.tree_util.keystr(path) else 2e-3
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol * float(jnp.abs(w).max()))
    pad_row = np.asarray(got_grads["model"]["decoder"]["embed_tokens"]["embedding"])[config.pad_token_id]
    assert np.any(pad_row)  # the head's part only (the lookups of the pad token pass none)
    # no zero buffer the size of the table for the lookup's gradient
    args = (trainer.params, batch, key)
    assert _table_sized_zeros(jax.make_jaxpr(plain)(*args).jaxpr, table.shape) >= 1
    assert _table_sized_zeros(jax.make_jaxpr(fast)(*args).jaxpr, table.shape) == 0
