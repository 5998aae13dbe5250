"""opt_flax.fast_paths and the trainer's use of it: the rewrites change how XLA's CPU backend runs a step
(their speed is measured in bench/), not the math; these tests pin what each one does."""

import numpy as np
import pytest

pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from opt_spec.testing import VARIANTS, random_weights, synthetic_batch  # noqa: E402
from opt_spec.training import TrainConfig  # noqa: E402
from opt_flax import FlaxOPTForCausalLM, canonical_to_params, fast_paths  # noqa: E402
from opt_flax.modeling import OPTForCausalLMModule  # noqa: E402
from opt_flax.training import FlaxTrainer, _as_jax  # noqa: E402

CONFIG = VARIANTS["pre_ln"]  # 2 layers
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrites apply on XLA's CPU backend")


def _tree_close(a, b) -> None:
    """Equal up to float32 rounding (XLA fuses, and so rounds, a little differently around a cond)."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def _dots(jaxpr) -> list:
    """Every dot_general equation of a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(getattr(sub, "jaxpr", sub))
    return found


@on_cpu
def test_materialize_is_an_identity_that_xla_keeps():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    f = lambda x: jnp.sum(jnp.sin(fast_paths.materialize(x * 2.0)) ** 2)  # noqa: E731
    np.testing.assert_array_equal(fast_paths.materialize(x), x)
    np.testing.assert_array_equal(jax.grad(f)(x), jax.grad(lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2))(x))
    nan_first = x.at[0, 0].set(jnp.nan)  # the other branch: still x
    np.testing.assert_array_equal(fast_paths.materialize(nan_first), nan_first)
    # the point of it: a conditional survives XLA's optimizations, forward and in the gradient
    assert jax.jit(fast_paths.materialize).lower(x).compile().as_text().count("conditional(") == 1
    assert jax.jit(jax.grad(f)).lower(x).compile().as_text().count("conditional(") == 2


def test_materialized_layers_leave_the_loss_and_gradients_unchanged():
    module = OPTForCausalLMModule(CONFIG)
    params = canonical_to_params(random_weights(CONFIG, "causal_lm", seed=1), CONFIG, "causal_lm")
    batch = _as_jax(synthetic_batch("causal_lm", CONFIG), ("input_ids", "attention_mask", "labels"))

    def loss(p):
        return module.apply({"params": p}, **batch).loss

    def loss_materialized(p):
        with fast_paths.materialized_layers():
            return loss(p)

    _tree_close(jax.jit(jax.value_and_grad(loss_materialized))(params), jax.jit(jax.value_and_grad(loss))(params))
    conds = str(jax.make_jaxpr(loss_materialized)(params)).count("cond[")
    assert conds == CONFIG.num_hidden_layers and "cond[" not in str(jax.make_jaxpr(loss)(params))
    with fast_paths.materialized_layers(on=False):
        assert "cond[" not in str(jax.make_jaxpr(loss)(params))


def test_f32_accumulated_dots_rewrites_every_bf16_product():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (4, 64))
    w1 = jax.random.normal(k2, (64, 32)).astype(jnp.bfloat16)
    w2 = jax.random.normal(k3, (32, 8)).astype(jnp.bfloat16)

    def f(x, w1, w2):  # a bf16 product inside a jit, a custom_jvp (relu), a cond; and a float32 one
        h = jax.jit(lambda a, b: a @ b)(x.astype(jnp.bfloat16), w1)
        h = lax.cond(h[0, 0] > -1e9, lambda y: jax.nn.relu(y) @ w2, lambda y: y[:, :8], h)
        return jnp.sum((h.astype(jnp.float32) @ x.T[:8, :3]) ** 2)

    fast = fast_paths.f32_accumulated_dots(jax.value_and_grad(f, argnums=(0, 1)))
    value, grads = jax.jit(fast)(x, w1, w2)
    want_value, want_grads = jax.value_and_grad(f, argnums=(0, 1))(x, w1, w2)
    np.testing.assert_allclose(value, want_value, rtol=2e-2)  # bf16 rounding of the intermediate products
    for g, want in zip(grads, want_grads):
        assert g.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32), rtol=5e-2, atol=5e-2)

    before = [e for e in _dots(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(x, w1, w2).jaxpr)
              if e.outvars[0].aval.dtype == jnp.bfloat16]
    after = _dots(jax.make_jaxpr(fast)(x, w1, w2).jaxpr)
    assert before  # forward and backward bf16 products, nested in the jit and the cond
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in after)
    assert sum(e.params["preferred_element_type"] == jnp.float32 for e in after) >= len(before)
    # the product itself: float32 accumulation, rounded once to bf16
    a, b = x.astype(jnp.bfloat16), w1
    want = lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(fast_paths.f32_accumulated_dots(lambda a, b: a @ b))(a, b), want)


def _bf16_sums(jaxpr) -> list:
    """Every reduce_sum of bfloat16 values in a jaxpr, nested ones included."""
    found = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum" and e.invars[0].aval.dtype == jnp.bfloat16]
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _bf16_sums(getattr(sub, "jaxpr", sub))
    return found


def test_f32_accumulated_sums_bf16_gradients_in_float32():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 128, 16)).astype(jnp.bfloat16)
    bias = jnp.linspace(-1.0, 1.0, 16)

    def f(bias, x):  # a bf16 bias add: its gradient is a bf16 sum over the tokens
        y = jax.jit(lambda a, b: a + b.astype(jnp.bfloat16))(x, bias)
        return jnp.sum(y.astype(jnp.float32) * jnp.arange(16.0))

    plain = jax.grad(f)
    assert _bf16_sums(jax.make_jaxpr(plain)(bias, x).jaxpr)
    fast = fast_paths.f32_accumulated(plain)
    assert not _bf16_sums(jax.make_jaxpr(fast)(bias, x).jaxpr)
    # the sum of each column's 1024 bf16 gradients (x is not involved: d/dbias of y = 1), rounded once to bf16
    want = (np.full((8 * 128, 16), 1.0, np.float32) * np.asarray(jnp.arange(16.0).astype(jnp.bfloat16),
                                                                 np.float32)).sum(0)
    got = jax.jit(fast)(bias, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32))
    # products are rewritten as by f32_accumulated_dots
    w = jnp.ones((16, 4), jnp.bfloat16)
    assert all(e.outvars[0].aval.dtype == jnp.float32
               for e in _dots(jax.make_jaxpr(fast_paths.f32_accumulated(lambda a: a @ w))(x).jaxpr))


def _trainer(**cfg) -> FlaxTrainer:
    model = FlaxOPTForCausalLM(CONFIG, canonical_to_params(random_weights(CONFIG, "causal_lm", seed=0), CONFIG,
                                                           "causal_lm"))
    return FlaxTrainer(model, TrainConfig(learning_rate=1e-3, total_steps=4, **cfg))


@on_cpu
@pytest.mark.parametrize("precision", [None, "bf16"])
def test_the_cpu_train_step_is_rewritten(precision):
    trainer = _trainer(mixed_precision=precision)
    batch = _as_jax(synthetic_batch("causal_lm", CONFIG), trainer._keys)
    lowered = trainer.fns.fused.lower(trainer.params, trainer.opt_state, batch, trainer.rng)
    compiled = lowered.compile().as_text()
    assert compiled.count("conditional(") == 2 * CONFIG.num_hidden_layers  # each layer's input, forward and back
    dots = _dots(jax.make_jaxpr(trainer.fns.fused)(trainer.params, trainer.opt_state, batch, trainer.rng).jaxpr)
    assert dots and all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)  # bf16 inputs accumulate in f32
    if precision == "bf16":
        assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
        plain = jax.make_jaxpr(jax.grad(trainer.fns.loss))(trainer.params, batch, trainer.rng)
        assert _bf16_sums(plain.jaxpr)  # the bias gradients
        step = jax.make_jaxpr(trainer.fns.fused)(trainer.params, trainer.opt_state, batch, trainer.rng)
        assert not _bf16_sums(step.jaxpr)  # every bf16 sum accumulates in float32


def test_the_step_updates_the_trainer_s_own_buffers_in_place():
    model = FlaxOPTForCausalLM(CONFIG, canonical_to_params(random_weights(CONFIG, "causal_lm", seed=0), CONFIG,
                                                           "causal_lm"))
    given = model.params
    trainer = FlaxTrainer(model, TrainConfig(learning_rate=1e-3, total_steps=4))
    before = trainer.params
    batch = synthetic_batch("causal_lm", CONFIG)
    trainer.train_step(batch)
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(before))  # donated: updated in place
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(given))  # the caller's arrays are intact
    assert model.params is trainer.params


def test_accumulation_sums_into_the_running_sum():
    from opt_flax.training import _tree_add

    a = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    b = {"w": jnp.full((2, 3), 0.5), "b": jnp.arange(3.0)}
    want = {k: np.asarray(a[k]) + np.asarray(b[k]) for k in a}
    total = _tree_add(a, b)
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(a))  # its buffers now hold the sum
    for k in want:
        np.testing.assert_array_equal(total[k], want[k])
