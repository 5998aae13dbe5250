"""opt_tf.fast_paths: the bf16 products accumulated in float32 compute the model's own forward and
gradients (to bf16 rounding), and the trainer uses them for its XLA-compiled bf16 step only."""

import contextlib

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tensorflow as tf  # noqa: E402

from opt_spec import testing  # noqa: E402
from opt_spec.testing import VARIANTS, random_weights  # noqa: E402
from opt_spec.training import TrainConfig  # noqa: E402
from opt_tf import TFOPTForCausalLM, fast_paths, modeling  # noqa: E402
from opt_tf.training import TFTrainer  # noqa: E402


def _model(name: str, dtype="mixed_bfloat16"):
    config = VARIANTS[name]
    model = TFOPTForCausalLM(config, dtype=dtype)
    model.set_weights_dict(random_weights(config, "causal_lm", seed=3))
    return model, testing.synthetic_batch("causal_lm", config, 4, 10, 1)


def _loss_and_grads(model, batch, fast: bool):
    """The XLA-compiled loss and gradients of every trainable variable, dropout off."""
    inputs = {k: tf.constant(v) for k, v in batch.items()}

    @tf.function(jit_compile=True)
    def run():
        with tf.GradientTape() as tape:
            out = model(inputs, training=False, use_cache=False)
        grads = tape.gradient(out.loss, model.trainable_variables)
        return out.loss, out.logits, [tf.convert_to_tensor(g) for g in grads]

    with fast_paths.f32_accumulated_dots(model) if fast else contextlib.nullcontext():
        loss, logits, grads = run()
    return float(loss), np.asarray(tf.cast(logits, tf.float32)), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("name", ["post_ln_proj", "untied_head"])
def test_f32_accumulated_products_give_the_models_forward_and_gradients(name):
    model, batch = _model(name)
    loss, logits, grads = _loss_and_grads(model, batch, fast=False)
    fast_loss, fast_logits, fast_grads = _loss_and_grads(model, batch, fast=True)
    assert fast_loss == pytest.approx(loss, rel=1e-3)
    assert np.abs(fast_logits - logits).max() <= 0.02 * np.abs(logits).max()  # bf16 logits, ~2 roundings apart
    for var, g, f in zip(model.trainable_variables, grads, fast_grads):
        assert f.dtype == np.float32 and f.shape == g.shape
        # the same products rounded to bf16 in a different order: a few bf16 ulps of the gradient's scale
        assert np.linalg.norm(f - g) <= 2e-2 * np.linalg.norm(g) + 1e-6, var.path
    # outside the context the model is its own again
    assert all("call" not in vars(layer) for layer in model._flatten_layers() if isinstance(layer, modeling.Linear))
    assert all("scores" not in vars(layer) and "mix" not in vars(layer) for layer in model._flatten_layers()
               if isinstance(layer, modeling.TFOPTAttention))
    assert "lm_logits" not in vars(model)


def _products(dtype: str) -> list:
    """The matrix products of the model's traced forward inside the context."""
    model, batch = _model("pre_ln", dtype)
    inputs = {k: tf.constant(v) for k, v in batch.items()}
    fn = tf.function(lambda: model(inputs, training=False, use_cache=False).logits)
    with fast_paths.f32_accumulated_dots(model):
        graph = fn.get_concrete_function().graph
    linears = sum(isinstance(layer, modeling.Linear) for layer in model._flatten_layers())
    return [op for op in graph.get_operations() if op.type.startswith("BatchMatMul") or op.type == "MatMul"], linears


def test_the_products_are_bf16_with_a_float32_result():
    """What makes it fast (the module docstring): XLA gets BatchMatMulV3 bf16 x bf16 -> float32."""
    products, linears = _products("mixed_bfloat16")
    v3 = [op for op in products if op.type == "BatchMatMulV3" and op.get_attr("Tout") == tf.float32]
    # every Linear, the tied head and attention's own two products per layer
    assert len(v3) == linears + 1 + 2 * VARIANTS["pre_ln"].num_hidden_layers
    assert not [op for op in products if op not in v3]
    assert {op.inputs[0].dtype for op in v3} == {tf.bfloat16}


def test_a_float32_model_is_left_as_it_is():
    products, linears = _products("float32")
    assert len(products) == linears + 1 + 2 * VARIANTS["pre_ln"].num_hidden_layers  # + attention's two per layer
    assert all(op.type != "BatchMatMulV3" or op.get_attr("Tout") == tf.float32 and op.inputs[0].dtype == tf.float32
               for op in products)


@pytest.mark.slow
def test_the_bf16_trainer_takes_the_same_updates():
    """The XLA-compiled bf16 train step uses the products (CPU); updates match the plain step's."""
    config = VARIANTS["pre_ln"]
    batch = testing.synthetic_batch("causal_lm", config, 8, 12, 0)
    runs = {}
    for fast in (False, True):
        model = TFOPTForCausalLM(config)
        model.set_weights_dict(random_weights(config, "causal_lm"))
        trainer = TFTrainer(model, TrainConfig(learning_rate=1e-3, mixed_precision="bf16", weight_decay=0.01))
        assert trainer._speed is not contextlib.nullcontext
        if not fast:
            trainer._speed = contextlib.nullcontext
        runs[fast] = [trainer.train_step(batch) for _ in range(3)]
    for plain, fast in zip(runs[False], runs[True]):
        assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-3)
        assert fast["grad_norm"] == pytest.approx(plain["grad_norm"], rel=2e-3)
    assert runs[True][-1]["loss"] < runs[True][0]["loss"]
    float32 = TFTrainer(TFOPTForCausalLM(config), TrainConfig(learning_rate=1e-3))
    with float32._speed():  # float32: the hashed dropout only
        assert fast_paths.HASHED_DROPOUT and "call" not in vars(float32.model.model.decoder.layers[0].fc1)
    assert not fast_paths.HASHED_DROPOUT


def _hashed(x, rate, seed, jit=True):
    """fast_paths.dropout inside hashed_dropout(), XLA-compiled (as in the trainer) or eager."""
    with fast_paths.hashed_dropout():
        run = tf.function(lambda x, s: fast_paths.dropout(x, rate, s), jit_compile=True) if jit else \
            (lambda x, s: fast_paths.dropout(x, rate, s))
        return np.asarray(tf.cast(run(tf.constant(x), tf.constant(seed, tf.int64)), tf.float32))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_hashed_dropout_masks_are_random_and_exact(rate):
    n = 1 << 20
    x = np.ones((16, 64, 1024), np.float32)
    y = _hashed(x, rate, [7, 11])
    keep = y != 0
    # the kept elements are scaled by 1 / (1 - rate) and nothing else changes
    np.testing.assert_allclose(y[keep], np.float32(1 / (1 - rate)), rtol=1e-7)
    # the keep fraction is 1 - rate within 5 binomial standard deviations
    sd = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) < 5 * sd
    # no structure along any axis: every row / column of the flat mask keeps about the same fraction
    flat = keep.reshape(1024, 1024)
    for means in (flat.mean(0), flat.mean(1)):
        assert abs(means.mean() - (1 - rate)) < 5 * sd and means.std() < 1.3 * np.sqrt(rate * (1 - rate) / 1024)
    # neighbours (also across rows) and the same element under another seed are independent: P(both kept) = p^2
    other = _hashed(x, rate, [7, 12]) != 0
    for a, b in ((keep.ravel()[:-1], keep.ravel()[1:]), (keep[:, :-1], keep[:, 1:]), (keep, other)):
        assert abs((a & b).mean() - (1 - rate) ** 2) < 5 * np.sqrt((1 - rate) ** 2 * (1 - (1 - rate) ** 2) / a.size)
    # a seed is a mask: the same seed, in another program (eager) or another dtype, drops the same elements
    np.testing.assert_array_equal(_hashed(x, rate, [7, 11], jit=False) != 0, keep)
    np.testing.assert_array_equal(_hashed(x.astype(tf.bfloat16.as_numpy_dtype), rate, [7, 11]) != 0, keep)


def test_hashed_dropout_gradient_is_the_mask():
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 8, 32)).astype(np.float32))
    seed = tf.constant([3, 5], tf.int64)
    with fast_paths.hashed_dropout():
        @tf.function(jit_compile=True)
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fast_paths.dropout(x, 0.25, seed)
                loss = tf.reduce_sum(y * 3.0)
            return y, tape.gradient(loss, x)
        y, g = run(x)
    np.testing.assert_allclose(g.numpy(), np.where(y.numpy() != 0, 3.0 / 0.75, 0.0), rtol=1e-6)
    # shapes known only when the program runs (Keras fit's dataset): the same mask
    dynamic = tf.function(lambda x: fast_paths.dropout(x, 0.25, seed), jit_compile=True,
                          input_signature=[tf.TensorSpec([None] * 3, tf.float32)])
    with fast_paths.hashed_dropout():
        np.testing.assert_array_equal(dynamic(x).numpy(), y.numpy())
    # outside the context: TF's own stateless dropout
    np.testing.assert_array_equal(fast_paths.dropout(x, 0.25, seed).numpy(),
                                  tf.nn.experimental.stateless_dropout(x, 0.25, seed).numpy())


def test_the_trainer_draws_hashed_masks_in_its_compiled_step(monkeypatch):
    """Every dropout of the XLA-compiled train step (float32 here; bf16 alike) is a hashed one."""
    import dataclasses

    drawn = []
    hashed_bits = fast_paths.hashed_bits
    monkeypatch.setattr(fast_paths, "hashed_bits", lambda shape, seed: drawn.append(seed) or hashed_bits(shape, seed))
    config = dataclasses.replace(VARIANTS["pre_ln"], dropout=0.1, attention_dropout=0.1)
    model = TFOPTForCausalLM(config)
    model.set_weights_dict(random_weights(config, "causal_lm"))
    trainer = TFTrainer(model, TrainConfig(learning_rate=1e-3))
    batch = testing.synthetic_batch("causal_lm", config, 4, 10, 0)
    first, second = trainer.train_step(batch), trainer.train_step(batch)
    assert len(drawn) == 3 * config.num_hidden_layers  # traced once: attention and two residual dropouts per layer
    assert first["loss"] != second["loss"] and not fast_paths.HASHED_DROPOUT

