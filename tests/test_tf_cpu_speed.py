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
    assert len(v3) == linears + 1  # every Linear and the tied head; attention's own products stay as they are
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
    assert float32._speed is contextlib.nullcontext  # float32: nothing to change
