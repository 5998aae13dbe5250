"""TensorFlow beyond one device: tf.distribute data parallelism that equals one device.

- Every head learns through plain Keras `fit` / `evaluate` with its own loss (nothing passed to `compile`).
- MirroredStrategy over 2 logical CPU devices, in one subprocess (logical devices are fixed before
  TensorFlow starts, and a process holds one strategy: collectives are keyed per strategy): one SGD
  step of plain `fit` on rows with very different numbers of real tokens equals the step one device
  takes on the whole batch, for every head; TFTrainer under the strategy (rows that split unevenly, a
  replica left without any, gradient accumulation, `train_step` and `fit`) equals one device, keeps
  the replicas' copies equal, and resumes from a checkpoint exactly with dropout on.
- MultiWorkerMirroredStrategy: two local worker processes (TF_CONFIG on localhost ports) equal one device.
- `optkit train --backend tf --replicas 2` equals the run on one device.
- A keras.distribution set while an opt_tf model is built is an error (Keras ignores it under TensorFlow).
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from opt_spec import weight_table  # noqa: E402
from opt_spec.testing import VARIANTS, random_weights, synthetic_batch  # noqa: E402
from opt_spec.training import TrainConfig, reference_adamw_step  # noqa: E402
from opt_tf import TFOPTForCausalLM, TFOPTForQuestionAnswering, TFOPTForSequenceClassification  # noqa: E402
from opt_tf.training import TFTrainer, data_parallel_strategy, split_rows  # noqa: E402

from .conftest import Workers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = VARIANTS["pre_ln"]
MODELS = {"causal_lm": TFOPTForCausalLM, "sequence_classification": TFOPTForSequenceClassification,
          "question_answering": TFOPTForQuestionAnswering}
# AdamW as the trainer runs it (adam_epsilon 1e-4: see test_updates_are_the_spec_adamw in test_tf_training.py).
TRAIN = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=6, weight_decay=0.1, max_grad_norm=0.5,
                    adam_epsilon=1e-4, gradient_accumulation_steps=2)


def uneven_batch(task: str) -> dict:
    """4 rows of 10 tokens, left-padded by 0, 1, 6 and 8: split over 2 replicas, one holds 19 real tokens
    and the other 6. QA: one row's answer lies outside the sequence (left out of the loss)."""
    rng = np.random.default_rng(0)
    pads = np.array([0, 1, 6, 8])
    mask = (np.arange(10)[None] >= pads[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(3, CONFIG.vocab_size, size=(4, 10)), CONFIG.pad_token_id)
    batch = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
    if task == "causal_lm":
        batch["labels"] = np.where(mask == 1, ids, -100).astype(np.int64)
    elif task == "sequence_classification":
        batch["labels"] = np.array([0, 2, 1, 2], np.int64)
    else:
        batch["start_positions"] = np.array([1, 3, 7, 12], np.int64)
        batch["end_positions"] = np.array([4, 5, 9, 9], np.int64)
    return batch


def model(task: str, config=CONFIG):
    m = MODELS[task](config)
    m.set_weights_dict(random_weights(config, task, seed=1))
    return m


def relative_difference(a: dict, b: dict) -> float:
    """max |a - b| over every tensor, relative to the largest |b| (b: the one-device reference)."""
    return max(float(np.abs(a[k] - b[k]).max()) for k in b) / max(float(np.abs(v).max()) for v in b.values())


def micro_batches(rows=(5, 1), seed: int = 0) -> list:
    """Updates of two micro-batches each, of `rows` rows (5 split 3 + 2 over two replicas, 1 leaves one
    replica without any)."""
    return [[synthetic_batch("causal_lm", CONFIG, n, 10, seed=seed + 2 * u + k) for k, n in enumerate(rows)]
            for u in range(2)]


def check_updates(trainer: TFTrainer, updates: list, fit_first: bool = False) -> dict:
    """Runs `updates` on a trainer under a strategy, each against the update one device computes from the
    whole micro-batches: the spec's AdamW (float64 NumPy) on the gradients of one eager forward at the
    same weights. Returns the worst excess over the tolerance of test_updates_are_the_spec_adamw (<= 0
    passes), the largest difference relative to the update's size, and the losses and gradient norms."""
    kinds = {spec.name: spec.kind for spec in weight_table(CONFIG, "causal_lm")}
    state, out = {}, {"excess": -1.0, "relative": 0.0, "loss": [], "grad_norm": []}
    for step, micro in enumerate(updates):
        params = trainer.model.get_weights_dict()
        losses, grads = zip(*(trainer.gradients(b) for b in micro))
        mean = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
        expected = reference_adamw_step(params, mean, state, step, TRAIN, kinds)
        if fit_first and step == 0:
            loss = trainer.fit(micro, steps=1).history["loss"][0]
        else:
            loss = trainer.train_step(micro)["loss"]
        got = trainer.model.get_weights_dict()
        out["excess"] = max(out["excess"], *(float((np.abs(got[k] - e) - 5e-7 - 2e-6 * np.abs(e)).max())
                                             for k, e in expected.items()))
        out["relative"] = max(out["relative"], relative_difference({k: got[k] - params[k] for k in params},
                                                                   {k: expected[k] - params[k] for k in params}))
        norm = float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in mean.values())))
        out["loss"].append([loss, float(np.mean(losses))])
        out["grad_norm"].append([float(trainer.optimizer.grad_norm.numpy()), norm])
    return out


def assert_updates(out: dict) -> None:
    assert out["excess"] <= 0, out
    for got, want in out["loss"] + out["grad_norm"]:
        assert got == pytest.approx(want, rel=1e-5), out


def run_python(code: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


# ------------------------------------------------------------------------------------- one device
@pytest.mark.parametrize("task", list(MODELS))
def test_every_head_fits_with_its_own_loss(task):
    """One SGD step of plain `fit` (targets in the input dict, or as y) is lr times the gradient of the
    head's loss, and `evaluate` reports that loss; nothing is passed to compile as a loss."""
    batch = uneven_batch(task)
    m = model(task)
    with tf.GradientTape() as tape:
        loss = m(batch, use_cache=False).loss
    variables = m.trainable_variables
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]
    before = [v.numpy() for v in variables]
    m.compile(optimizer=keras.optimizers.SGD(0.5))
    assert m.evaluate(batch, batch_size=4, verbose=0) == pytest.approx(float(loss), rel=1e-6)
    names = m.loss_inputs
    inputs = {k: v for k, v in batch.items() if k not in names}
    targets = batch[names[0]] if len(names) == 1 else tuple(batch[n] for n in names)
    m.fit(inputs, targets, batch_size=4, epochs=1, verbose=0, shuffle=False)
    step = {v.path: b - v.numpy() for v, b in zip(variables, before)}
    expected = {v.path: 0.5 * g for v, g in zip(variables, grads)}
    assert relative_difference(step, expected) < 1e-5
    with pytest.raises(ValueError, match="sample_weight is not supported"):
        m.fit(inputs, targets, sample_weight=np.ones(4), batch_size=4, verbose=0)
    with pytest.raises(ValueError, match=f"needs its targets.*{names[0]}"):
        m.fit(batch["input_ids"], batch_size=4, verbose=0)


def test_keras_distribution_is_refused():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    try:
        with pytest.raises(RuntimeError, match="keras.distribution is set .*opt_torch or opt_flax"):
            TFOPTForCausalLM(CONFIG)
    finally:
        keras.distribution.set_distribution(None)
    TFOPTForCausalLM(CONFIG)


def test_split_rows_covers_every_row_once():
    for rows, replicas in [(5, 2), (1, 2), (8, 3), (0, 2)]:
        parts = split_rows(rows, replicas)
        assert len(parts) == replicas
        assert np.concatenate([np.arange(rows)[p] for p in parts]).tolist() == list(range(rows))
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------- MirroredStrategy, 2 devices
def _mirrored_child(workdir: str) -> None:
    """Runs in a fresh process with 2 logical CPU devices; writes the measurements to WORKDIR/result.json."""
    strategy = data_parallel_strategy(2)
    assert strategy.num_replicas_in_sync == 2
    out = {}
    t0 = time.perf_counter()
    # plain Keras fit / evaluate, every head: the one-device step is lr times the eager gradient
    for task in MODELS:
        batch = uneven_batch(task)
        reference = model(task)
        with tf.GradientTape() as tape:
            loss = reference(batch, use_cache=False).loss
        grads = tape.gradient(loss, reference.trainable_variables)
        expected = {v.path.split("/", 1)[1]: 0.5 * tf.convert_to_tensor(g).numpy()
                    for v, g in zip(reference.trainable_variables, grads)}
        with strategy.scope():
            m = model(task)
            m.compile(optimizer=keras.optimizers.SGD(0.5))
        before = {v.path.split("/", 1)[1]: v.numpy() for v in m.trainable_variables}
        dataset = tf.data.Dataset.from_tensor_slices(batch).batch(4)
        if task == "question_answering":  # evaluate's loss is the same compute_loss; one head under the strategy
            out["evaluate"] = [m.evaluate(dataset, verbose=0), float(loss)]
        m.fit(dataset, epochs=1, verbose=0)
        step = {k: before[k] - v.numpy() for k, v in ((v.path.split("/", 1)[1], v) for v in m.trainable_variables)}
        out[f"fit/{task}"] = relative_difference(step, expected)

    out["seconds/fit"] = time.perf_counter() - t0
    # TFTrainer: two updates (Keras fit, then train_step) against one device
    trainer = TFTrainer(model("causal_lm"), TRAIN, strategy=strategy)
    out["trainer"] = check_updates(trainer, micro_batches(), fit_first=True)  # fit's step has any shape
    out["trainer/step"] = trainer.step
    out["trainer/replicas_equal"] = all(
        all(np.array_equal(x.numpy(), strategy.experimental_local_results(v.value)[0].numpy())
            for x in strategy.experimental_local_results(v.value))
        for v in trainer.model.weights + trainer.optimizer.variables)
    out["seconds/trainer"] = time.perf_counter() - t0

    # checkpoint and exact resume under the strategy, dropout on
    dropout = dataclasses.replace(CONFIG, dropout=0.1, attention_dropout=0.1)
    cfg = dataclasses.replace(TRAIN, gradient_accumulation_steps=1)
    trainer = TFTrainer(model("causal_lm", dropout), cfg, strategy=strategy)
    batches = [synthetic_batch("causal_lm", CONFIG, 4, 10, seed=10 + s) for s in range(3)]  # one shape: one trace
    trainer.train_step(batches[0])
    directory = os.path.join(workdir, "checkpoint")
    trainer.save_checkpoint(directory)
    saved_rng = trainer.rng.state.numpy()
    uninterrupted = [trainer.train_step(b)["loss"] for b in batches[1:]]
    out["resume/dropout_drew"] = not np.array_equal(saved_rng, trainer.rng.state.numpy())
    resumed = TFTrainer.from_checkpoint(directory, strategy=strategy)
    out["resume/step"] = resumed.step
    out["resume/loss"] = [uninterrupted, [resumed.train_step(b)["loss"] for b in batches[1:]]]
    final, again = trainer.model.get_weights_dict(), resumed.model.get_weights_dict()
    out["resume/weights_equal"] = all(np.array_equal(final[k], again[k]) for k in final)
    out["seconds/resume"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)


@pytest.mark.slow  # one subprocess: ~12 compiled steps on 2 logical devices
def test_mirrored_strategy_equals_one_device(tmp_path):
    r = run_python(f"from tests.test_tf_distributed import _mirrored_child; _mirrored_child({str(tmp_path)!r})")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "result.json").read_text())
    for task in MODELS:
        assert out[f"fit/{task}"] < 1e-6, (task, out[f"fit/{task}"])  # 1.5-3x the step before
    assert out["evaluate"][0] == pytest.approx(out["evaluate"][1], rel=1e-6)
    assert_updates(out["trainer"])
    assert out["trainer/step"] == 2 and out["trainer/replicas_equal"]
    assert out["resume/step"] == 1 and out["resume/dropout_drew"]
    assert out["resume/loss"][1] == out["resume/loss"][0] and out["resume/weights_equal"]


# --------------------------------------------------------------- MultiWorkerMirroredStrategy, 2 workers
def _worker_child(path: str) -> None:
    """One of two worker processes (TF_CONFIG set): two updates checked as in the mirrored test; the
    chief writes the result."""
    strategy = data_parallel_strategy(2)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    out = check_updates(TFTrainer(model("causal_lm"), TRAIN, strategy=strategy), micro_batches())
    if strategy.extended.should_checkpoint:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f)


@pytest.mark.slow  # two worker processes
def test_multi_worker_mirrored_strategy_equals_one_device(tmp_path):
    path = tmp_path / "chief.json"
    code = f"from tests.test_tf_distributed import _worker_child; _worker_child({str(path)!r})"

    def launch(ports):  # the two workers on localhost, TF_CONFIG naming each one's task
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        return [Workers.spawn([sys.executable, "-c", code], cwd=ROOT, env=dict(
            os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")) for index in range(2)]

    for exit_code, _, err in Workers(launch, ports=2).wait(timeout=300):
        assert exit_code == 0, err[-3000:]
    assert_updates(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow  # a CLI run in a fresh process
def test_cli_train_with_replicas_equals_one_device(tmp_path):
    """`optkit train --backend tf --replicas 2` (2 logical CPU devices) against the same run on one device,
    in this process through TFTrainer: the same losses and gradient norms at every step, and final weights
    that give the same loss. (Not the weights element by element: with the CLI's adam_epsilon 1e-8, Adam
    turns the rounding noise of exactly-zero gradients, such as k_proj's bias, into steps of up to lr.)"""
    pytest.importorskip("tokenizers")
    from opt_spec import data as spec_data
    from opt_spec import io as spec_io
    from opt_spec.tokenizer import OPTTokenizer
    from tests.test_data import build_tokenizer

    model_dir, out = tmp_path / "model", tmp_path / "run"
    tok = build_tokenizer(model_dir)
    config = CONFIG.replace(vocab_size=max(96, tok.vocab_size), max_position_embeddings=64)
    spec_io.save_safetensors_dir(model_dir, random_weights(config, "causal_lm", seed=2), config.to_dict())
    text = tmp_path / "train.txt"
    text.write_text("Hello, my name is Ada and I like tea.\n\nThe quick brown fox jumps over the lazy dog!\n" * 3,
                    encoding="utf-8")
    args = ["train", "--model", model_dir, "--task", "causal_lm", "--data", text, "--backend", "tf", "--output", out,
            "--steps", 2, "--batch-size", 3, "--seq-len", 16, "--lr", "5e-3", "--grad-accum", 2, "--replicas", 2, "-q"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    cli = subprocess.Popen([sys.executable, "-m", "optkit_cli.main", *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:  # the one-device run here while the CLI's process starts and trains
        train_set = spec_data.load("causal_lm", [str(text)], OPTTokenizer.from_pretrained(model_dir, config), 16)
        stream = spec_data.BatchStream(train_set, 3, seed=0)
        one = TFTrainer.from_pretrained(model_dir, "causal_lm", TrainConfig(learning_rate=5e-3, total_steps=2,
                                                                            gradient_accumulation_steps=2))
        steps = [one.train_step([stream.batch(2 * step + k) for k in range(2)]) for step in range(2)]
        _, err = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = spec_io.load_checkpoint_dir(out / "final")
    train = [x for x in records if x["kind"] == "train"]
    for key in ("loss", "grad_norm"):
        assert [x[key] for x in train] == pytest.approx([x[key] for x in steps], rel=1e-5), key
    replicated = TFOPTForCausalLM(config)
    replicated.set_weights_dict(weights)
    batch = stream.batch(0)
    assert float(replicated(batch, use_cache=False).loss) == \
        pytest.approx(float(one.model(batch, use_cache=False).loss), rel=1e-5)
    assert float(replicated(batch, use_cache=False).loss) != pytest.approx(
        float(TFOPTForCausalLM.from_pretrained(model_dir)(batch, use_cache=False).loss), rel=1e-3)  # it learned


def test_cli_replicas_is_for_the_tf_backend(tmp_path, capsys):
    from optkit_cli.main import main

    common = ["train", "--model", str(tmp_path), "--task", "causal_lm", "--data", "x.txt", "--output",
              str(tmp_path / "o")]
    assert main([*common, "--backend", "torch", "--replicas", "2"]) == 2
    assert "--replicas is the tf backend's data parallelism" in capsys.readouterr().err
    assert main([*common, "--backend", "tf", "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
