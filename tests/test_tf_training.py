"""TensorFlow fine-tuning: SpecAdamW evaluates opt_spec.training exactly; the Keras trainer learns,
accumulates, resumes and runs in mixed bf16."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_spec import weight_table  # noqa: E402
from opt_spec import data as spec_data  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec import testing
from opt_spec.testing import VARIANTS, random_weights  # noqa: E402
from opt_spec.training import TrainConfig, applies_weight_decay, learning_rate, reference_adamw_step  # noqa: E402
from opt_tf import TFOPTForCausalLM, TFOPTForQuestionAnswering, TFOPTForSequenceClassification, variable_map  # noqa: E402
from opt_tf.training import SpecSchedule, TFTrainer  # noqa: E402

CONFIG = VARIANTS["pre_ln"]
MODELS = {"causal_lm": TFOPTForCausalLM, "sequence_classification": TFOPTForSequenceClassification,
          "question_answering": TFOPTForQuestionAnswering}


def synthetic_batch(task: str, config=CONFIG, batch: int = 8, length: int = 12, seed: int = 0) -> dict:
    return testing.synthetic_batch(task, config, batch, length, seed)


def _trainer(task="causal_lm", config=CONFIG, seed=0, **cfg) -> TFTrainer:
    model = MODELS[task](config)
    model.set_weights_dict(random_weights(config, task, seed=seed))
    return TFTrainer(model, TrainConfig(**cfg), task)


# --------------------------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("cfg", [
    TrainConfig(learning_rate=3e-4, warmup_steps=5, total_steps=23, schedule="linear"),
    TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=17, schedule="cosine"),
    TrainConfig(learning_rate=2e-5, warmup_steps=4, total_steps=10, schedule="constant"),
    TrainConfig(learning_rate=1e-3, warmup_steps=10, total_steps=10, schedule="cosine"),
], ids=["linear", "cosine", "constant", "all-warmup"])
def test_schedule_equals_spec_at_every_step(cfg):
    schedule = SpecSchedule(cfg)
    for step in range(cfg.total_steps + 5):
        assert float(schedule(tf.constant(step, tf.int64))) == np.float32(learning_rate(step, cfg)), step
    assert SpecSchedule(TrainConfig(**schedule.get_config())).get_config() == schedule.get_config()


def test_weight_decay_excludes_biases_and_layer_norm():
    trainer = _trainer(learning_rate=1e-3, weight_decay=0.1)
    for name, (spec, var) in variable_map(trainer.model).items():
        assert trainer.optimizer._use_weight_decay(var) == applies_weight_decay(spec.kind), name


@pytest.mark.parametrize("accumulation", [1, 2])
def test_updates_are_the_spec_adamw(accumulation):
    """Warm-up, linear decay, clipping (active), weight decay on weights only, bias correction and
    micro-batch averaging, against a NumPy transcription of opt_spec.training over 3 updates.
    (adam_epsilon 1e-4 keeps Adam from amplifying the rounding between the eager gradients used
    here and the compiled ones of train_on_batch; see tests/test_training_parity.py.)"""
    trainer = _trainer(learning_rate=1e-2, warmup_steps=1, total_steps=5, weight_decay=0.3, max_grad_norm=0.5,
                       adam_epsilon=1e-4, gradient_accumulation_steps=accumulation)
    kinds = {s.name: s.kind for s in weight_table(CONFIG, "causal_lm")}
    batch = synthetic_batch("causal_lm", batch=8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    micro = [batch] if accumulation == 1 else halves
    state: dict = {}
    for step in range(3):
        assert float(trainer.optimizer.learning_rate) == np.float32(learning_rate(step, trainer.cfg))
        params = trainer.model.get_weights_dict()
        grads = [trainer.gradients(b)[1] for b in micro]
        mean = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
        expected = reference_adamw_step(params, mean, state, step, trainer.cfg, kinds)
        metrics = trainer.train_step(micro)
        assert metrics["learning_rate"] == learning_rate(step, trainer.cfg)
        assert metrics["grad_norm"] > 2 * 0.5  # clipping is active
        got = trainer.model.get_weights_dict()
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=2e-6, atol=5e-7, err_msg=f"update {step}: {name}")
    assert trainer.step == 3  # updates; Keras's iterations count micro-batches
    assert int(trainer.optimizer.iterations) == 3 * accumulation
    with pytest.raises(ValueError, match=f"gradient_accumulation_steps={accumulation}"):
        trainer.train_step([batch] * (accumulation + 1))


# ----------------------------------------------------------------------------------- the trainer
def test_resume_continues_exactly(tmp_path):
    """With dropout on and accumulation: the loss curve after a resume equals the uninterrupted one."""
    config = dataclasses.replace(CONFIG, dropout=0.1, attention_dropout=0.1)
    common = dict(learning_rate=1e-2, warmup_steps=2, total_steps=8, weight_decay=0.01, gradient_accumulation_steps=2)
    trainer = _trainer(config=config, **common)
    micro = [[synthetic_batch("causal_lm", batch=4, seed=2 * s + k) for k in range(2)] for s in range(6)]
    for m in micro[:3]:
        trainer.train_step(m)
    trainer.save_checkpoint(tmp_path / "ckpt")
    uninterrupted = [trainer.train_step(m) for m in micro[3:]]

    resumed = TFTrainer.from_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 3 and resumed.cfg == trainer.cfg
    after = [resumed.train_step(m) for m in micro[3:]]
    assert [m["loss"] for m in after] == [m["loss"] for m in uninterrupted]
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in uninterrupted]
    final, final_resumed = trainer.model.get_weights_dict(), resumed.model.get_weights_dict()
    for name, value in final.items():
        np.testing.assert_array_equal(final_resumed[name], value, err_msg=name)
    # dropout really was on: the same batch, two draws
    batch = micro[0][0]
    assert float(trainer.model(batch, training=True, use_cache=False).loss) != \
        float(trainer.model(batch, training=True, use_cache=False).loss)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a TensorFlow training checkpoint"):
        TFTrainer.from_checkpoint(tmp_path)
    trainer = _trainer(learning_rate=1e-3)
    trainer.save_checkpoint(tmp_path / "c")
    assert sorted(spec_io.load_checkpoint_dir(tmp_path / "c")) == sorted(random_weights(CONFIG, "causal_lm"))
    with pytest.raises(ValueError, match="different settings .*learning_rate"):
        TFTrainer.from_checkpoint(tmp_path / "c", TrainConfig(learning_rate=2e-3))


def test_a_hostile_optimizer_state_is_refused(tmp_path):
    """optimizer.npz and rng.npy of a checkpoint from someone else: only arrays of this trainer's shapes."""
    from opt_spec.errors import CheckpointError

    trainer = _trainer(learning_rate=1e-3)
    trainer.train_step(synthetic_batch("causal_lm", batch=2))
    trainer.save_checkpoint(tmp_path / "c")
    state = dict(np.load(tmp_path / "c" / "optimizer.npz"))
    bomb = {k: v for k, v in state.items()} | {"0": np.zeros((1 << 26,), np.int64)}  # 512 MB inflated
    cases = {
        "compressed": (lambda f: np.savez_compressed(f, **state), "is compressed"),
        "inflates": (lambda f: np.savez_compressed(f, **bomb), "is compressed|holds"),
        "reshaped": (lambda f: np.savez(f, **(state | {"1": state["1"].reshape(-1)[:3]})), "holds .* expected"),
        "objects": (lambda f: np.savez(f, **(state | {"1": np.array([print], dtype=object)})), "holds .* object"),
        "extra": (lambda f: np.savez(f, **(state | {"extra": np.zeros(2)})), "unexpected: \\['extra'\\]"),
    }
    good = (tmp_path / "c" / "optimizer.npz").read_bytes()
    for name, (write, match) in cases.items():
        with open(tmp_path / "c" / "optimizer.npz", "wb") as f:
            write(f)
        with pytest.raises(CheckpointError, match=match):
            TFTrainer.from_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "optimizer.npz").write_bytes(good)
    np.save(tmp_path / "c" / "rng.npy", np.zeros((1 << 20,), np.int64))
    with pytest.raises(CheckpointError, match="rng.npy: holds"):
        TFTrainer.from_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification", "question_answering"])
def test_fine_tuning_drives_the_loss_down(task):
    model = MODELS[task].from_config(CONFIG, seed=0)
    trainer = TFTrainer(model, TrainConfig(learning_rate=3e-2, warmup_steps=2, total_steps=30, weight_decay=0.01))
    batch = synthetic_batch(task)
    losses = [trainer.train_step(batch)["loss"] for _ in range(30)]
    assert losses[-1] < 0.1 * losses[0], losses
    assert trainer.model is model


def test_bf16_mixed_precision_trains_float32_weights():
    model = TFOPTForCausalLM(CONFIG)
    model.set_weights_dict(random_weights(CONFIG, "causal_lm"))
    batch = synthetic_batch("causal_lm")
    loss32 = float(model(batch, use_cache=False).loss)
    trainer = TFTrainer(model, TrainConfig(learning_rate=1e-2, schedule="constant", mixed_precision="bf16"))
    assert trainer.model.dtype_policy.name == "mixed_bfloat16" and trainer.model.compute_dtype == "bfloat16"
    m16 = trainer.train_step(batch)
    assert m16["loss"] != loss32 and m16["loss"] == pytest.approx(loss32, rel=2e-2)  # bf16 forward, float32 loss
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert np.isfinite(losses).all() and losses[-1] < m16["loss"]
    assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}
    assert {v.dtype for v in trainer.optimizer.variables if "int" not in v.dtype} == {"float32"}


def test_keras_fit_and_evaluate(tmp_path):
    trainer = _trainer(learning_rate=1e-3, total_steps=10)
    batch = synthetic_batch("causal_lm", batch=4)
    rows = [list(r[m == 1]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    dataset = spec_data.Dataset("causal_lm", rows, pad_token_id=CONFIG.pad_token_id)
    result = trainer.evaluate(dataset, batch_size=4)
    full = dataset.collate(range(4))
    assert result["loss"] == pytest.approx(float(trainer.model(full, use_cache=False).loss), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-6)

    history = trainer.fit(spec_data.BatchStream(dataset, batch_size=2, seed=0), steps=3)
    assert trainer.step == 3 and len(history.history["loss"]) == 1
    assert trainer.evaluate(dataset, batch_size=4)["loss"] < result["loss"]
    assert isinstance(trainer.optimizer, keras.optimizers.Optimizer)


def test_the_train_step_is_xla_compiled_unless_asked_not_to():
    """Without a strategy Keras compiles train_on_batch and fit with XLA (half the CPU time of the 125m
    step, bench/bench_train.py); Keras's own "auto" would leave this model uncompiled."""
    trainer = _trainer(learning_rate=1e-3)
    assert trainer.jit_compile is True and trainer.keras_model.jit_compile is True
    trainer.train_step(synthetic_batch("causal_lm"))
    assert trainer.keras_model.jit_compile is True  # Keras found nothing it could not compile
    model = MODELS["causal_lm"](CONFIG)
    model.set_weights_dict(random_weights(CONFIG, "causal_lm"))
    plain = TFTrainer(model, TrainConfig(learning_rate=1e-3), jit_compile=False)
    assert plain.keras_model.jit_compile is False


def test_gradient_checkpointing_gives_the_same_updates(tmp_path):
    """TFTrainer.from_pretrained(gradient_checkpointing=True) recomputes each layer in the backward pass and
    makes the same updates, dropout included."""
    # adam_epsilon 1e-4: a bias whose gradient is rounding noise (zero in exact arithmetic) would otherwise
    # have it amplified by up to 1 / eps, and recomputation rounds differently (see test_training_parity.py)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=4, adam_epsilon=1e-4)
    model = MODELS["causal_lm"](CONFIG)
    model.set_weights_dict(random_weights(CONFIG, "causal_lm", seed=0))
    model.save_pretrained(tmp_path / "m")
    plain = TFTrainer.from_pretrained(tmp_path / "m", "causal_lm", cfg)
    remat = TFTrainer.from_pretrained(tmp_path / "m", "causal_lm", cfg, gradient_checkpointing=True)
    assert remat.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    for step in range(2):
        batch = synthetic_batch("causal_lm", seed=step)
        a, b = plain.train_step([batch]), remat.train_step([batch])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for x, y in zip(plain.model.weights, remat.model.weights):
        np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=1e-5, atol=1e-6, err_msg=x.path)
