"""Flax fine-tuning: the optax chain evaluates opt_spec.training exactly; the trainer learns, accumulates,
resumes and runs in bf16."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from opt_spec import Head, WeightKind, weight_table  # noqa: E402
from opt_spec import data as spec_data  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.layouts import native_path  # noqa: E402
from opt_spec import testing
from opt_spec.testing import VARIANTS, random_weights  # noqa: E402
from opt_spec.training import TrainConfig, clip_scale, learning_rate, reference_adamw_step  # noqa: E402
from opt_flax import (  # noqa: E402
    FlaxOPTForCausalLM,
    FlaxOPTForQuestionAnswering,
    FlaxOPTForSequenceClassification,
    canonical_to_params,
)
from opt_flax.training import (  # noqa: E402
    FlaxTrainer,
    _as_jax,
    clip_by_global_norm_spec,
    decay_mask,
    spec_schedule,
)

CONFIG = VARIANTS["pre_ln"]
MODELS = {"causal_lm": FlaxOPTForCausalLM, "sequence_classification": FlaxOPTForSequenceClassification,
          "question_answering": FlaxOPTForQuestionAnswering}


def synthetic_batch(task: str, config=CONFIG, batch: int = 8, length: int = 12, seed: int = 0) -> dict:
    return testing.synthetic_batch(task, config, batch, length, seed)


def _leaves(tree) -> dict:
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------- the chain
@pytest.mark.parametrize("cfg", [
    TrainConfig(learning_rate=3e-4, warmup_steps=5, total_steps=23, schedule="linear"),
    TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=17, schedule="cosine"),
    TrainConfig(learning_rate=2e-5, warmup_steps=4, total_steps=10, schedule="constant"),
    TrainConfig(learning_rate=1e-3, warmup_steps=10, total_steps=10, schedule="cosine"),
], ids=["linear", "cosine", "constant", "all-warmup"])
def test_schedule_equals_spec_at_every_step(cfg):
    schedule = jax.jit(spec_schedule(cfg))
    for step in range(cfg.total_steps + 5):
        assert float(schedule(jnp.int32(step))) == np.float32(learning_rate(step, cfg)), step


def test_clipping_is_the_spec_formula_not_optax():
    grads = {"a": jnp.asarray([[0.6, -0.2], [0.1, 0.3]], jnp.float32), "b": jnp.asarray([0.4, -0.5], jnp.float32)}
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads.values())))
    for max_norm in (0.3, norm, 5.0):
        tx = clip_by_global_norm_spec(max_norm)
        clipped, state = tx.update(grads, tx.init(grads))
        scale = clip_scale(norm, max_norm)
        assert float(state.global_norm) == pytest.approx(norm, rel=1e-6)
        for k in grads:
            np.testing.assert_allclose(clipped[k], np.asarray(grads[k]) * scale, rtol=1e-6)
    # at max_norm == norm the spec still scales (by norm / (norm + 1e-6)); optax's formula does not
    spec, _ = clip_by_global_norm_spec(norm).update(grads, None)
    theirs, _ = optax.clip_by_global_norm(norm).update(grads, None)
    assert not np.array_equal(np.asarray(spec["a"]), np.asarray(theirs["a"]))
    assert clip_by_global_norm_spec(None).update(grads, None)[0]["a"] is grads["a"]


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_ln_affine", "no_bias"])
def test_decay_mask_follows_the_spec_kinds(variant):
    config = VARIANTS[variant]
    for head in ("causal_lm", "sequence_classification", "question_answering"):
        mask = _leaves(decay_mask(config, head))
        model = MODELS[head].from_config(config)
        assert sorted(mask) == sorted(_leaves(model.params))
        kinds = {".".join(native_path(s, "flax")): s.kind for s in weight_table(config, head)}
        for path, decays in mask.items():
            assert bool(decays) == (kinds[path] in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING)), path


# -------------------------------------------------------------------------------- the trainer
def _trainer(task="causal_lm", config=CONFIG, seed=0, **cfg) -> FlaxTrainer:
    model = MODELS[task](config, canonical_to_params(random_weights(config, task, seed=seed), config, task))
    return FlaxTrainer(model, TrainConfig(**cfg), task)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_updates_are_the_spec_adamw(accumulation):
    """Warm-up, linear decay, clipping (active), weight decay on weights only, bias correction and
    micro-batch averaging, against a NumPy transcription of opt_spec.training over 3 updates."""
    cfg = dict(learning_rate=1e-2, warmup_steps=1, total_steps=5, weight_decay=0.3, max_grad_norm=0.5,
               gradient_accumulation_steps=accumulation)
    trainer = _trainer(**cfg)
    kinds = {".".join(native_path(s, "flax")): s.kind for s in weight_table(CONFIG, "causal_lm")}
    batch = synthetic_batch("causal_lm", batch=8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    micro = [batch] if accumulation == 1 else halves
    state: dict = {}
    for step in range(3):
        params = _leaves(trainer.params)
        grads = [_leaves(trainer.fns.grad(trainer.params, _as_jax(b, trainer._keys), trainer.rng)[1]) for b in micro]
        mean = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
        expected = reference_adamw_step(params, mean, state, step, trainer.cfg, kinds)
        metrics = trainer.train_step(micro)
        assert metrics["learning_rate"] == learning_rate(step, trainer.cfg)
        assert metrics["grad_norm"] > 2 * 0.5  # clipping is active
        got = _leaves(trainer.params)
        for path, value in expected.items():
            np.testing.assert_allclose(got[path], value, rtol=2e-6, atol=2e-7, err_msg=f"update {step}: {path}")
    assert trainer.step == 3 and int(trainer.opt_state[-1].count) == 3  # the schedule counts updates
    with pytest.raises(ValueError, match=f"gradient_accumulation_steps={accumulation}"):
        trainer.train_step([batch] * (accumulation + 1))


def test_resume_continues_exactly(tmp_path):
    """With dropout on: the loss curve after a resume equals the uninterrupted one."""
    config = dataclasses.replace(CONFIG, dropout=0.1, attention_dropout=0.1)
    common = dict(learning_rate=1e-2, warmup_steps=2, total_steps=8, weight_decay=0.01, seed=3)
    trainer = _trainer(config=config, **common)
    batches = [synthetic_batch("causal_lm", seed=s) for s in range(6)]
    for b in batches[:3]:
        trainer.train_step(b)
    trainer.save_checkpoint(tmp_path / "ckpt")
    uninterrupted = [trainer.train_step(b) for b in batches[3:]]

    resumed = FlaxTrainer.from_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 3 and resumed.cfg == trainer.cfg
    after = [resumed.train_step(b) for b in batches[3:]]
    assert [m["loss"] for m in after] == [m["loss"] for m in uninterrupted]
    assert [m["grad_norm"] for m in after] == [m["grad_norm"] for m in uninterrupted]
    for path, value in _leaves(trainer.params).items():
        np.testing.assert_array_equal(_leaves(resumed.params)[path], value, err_msg=path)
    # dropout really was on: the same batch gives different losses with different keys
    inputs = _as_jax(batches[0], trainer._keys)
    loss = jax.jit(trainer.fns.loss)
    assert float(loss(trainer.params, inputs, jax.random.PRNGKey(0))) != \
        float(loss(trainer.params, inputs, jax.random.PRNGKey(1)))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Flax training checkpoint"):
        FlaxTrainer.from_checkpoint(tmp_path)
    trainer = _trainer(learning_rate=1e-3)
    trainer.save_checkpoint(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").is_file() and (tmp_path / "c" / "config.json").is_file()
    with pytest.raises(ValueError, match="different settings .*learning_rate"):
        FlaxTrainer.from_checkpoint(tmp_path / "c", TrainConfig(learning_rate=2e-3))


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification", "question_answering"])
def test_fine_tuning_drives_the_loss_down(task):
    model = MODELS[task].from_config(CONFIG, seed=0)
    trainer = FlaxTrainer(model, TrainConfig(learning_rate=3e-2, warmup_steps=2, total_steps=30, weight_decay=0.01))
    batch = synthetic_batch(task)
    losses = [trainer.train_step(batch)["loss"] for _ in range(30)]
    assert losses[-1] < 0.1 * losses[0], losses
    assert model.params is trainer.params  # the model holds what was trained


def test_bf16_mixed_precision_trains_float32_weights():
    bf16 = _trainer(learning_rate=1e-2, schedule="constant", mixed_precision="bf16")
    assert bf16.module.numerics.dtype == jnp.bfloat16
    batch = synthetic_batch("causal_lm")
    loss32 = float(bf16.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss)
    m16 = bf16.train_step(batch)
    assert m16["loss"] != loss32 and m16["loss"] == pytest.approx(loss32, rel=2e-2)  # bf16 forward, float32 loss
    losses = [bf16.train_step(batch)["loss"] for _ in range(8)]
    assert np.isfinite(losses).all() and losses[-1] < m16["loss"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16.params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16.opt_state) if hasattr(leaf, "dtype")
            and jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}


def test_evaluate_and_save_load(tmp_path):
    trainer = _trainer(learning_rate=1e-3)
    batch = synthetic_batch("causal_lm", batch=4)
    rows = [list(r[m == 1]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    dataset = spec_data.Dataset("causal_lm", rows, pad_token_id=CONFIG.pad_token_id)
    result = trainer.evaluate(dataset, batch_size=4)
    expected = trainer.model(dataset.collate(range(4))["input_ids"], attention_mask=dataset.collate(range(4))[
        "attention_mask"], labels=dataset.collate(range(4))["labels"]).loss
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-6)
    path = trainer.save_checkpoint(tmp_path / "c")
    arrays = spec_io.load_checkpoint_dir(path)
    assert sorted(arrays) == sorted(random_weights(CONFIG, Head.CAUSAL_LM))


def test_gradient_checkpointing_gives_the_same_updates():
    """A model with gradient checkpointing enabled trains with nn.remat per layer (the trainer builds its
    programs with the model's setting) and makes the same updates, dropout included."""
    # adam_epsilon 1e-4: a bias whose gradient is rounding noise (zero in exact arithmetic) would otherwise
    # have it amplified by up to 1 / eps, and recomputation rounds differently (see test_training_parity.py)
    cfg = dict(learning_rate=1e-3, warmup_steps=0, total_steps=4, adam_epsilon=1e-4)
    plain = _trainer(**cfg)
    model = MODELS["causal_lm"](CONFIG, canonical_to_params(random_weights(CONFIG, "causal_lm", seed=0), CONFIG,
                                                            "causal_lm"))
    model.gradient_checkpointing_enable()
    remat = FlaxTrainer(model, TrainConfig(**cfg), "causal_lm")
    assert remat.module.remat and not plain.module.remat
    for step in range(2):
        batch = synthetic_batch("causal_lm", seed=step)
        a, b = plain.train_step([batch]), remat.train_step([batch])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    for (path, x), y in zip(_leaves(plain.params).items(), _leaves(remat.params).values()):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6, err_msg=path)
