"""opt_torch.training: losses drop on every head, the optimizer follows opt_spec.training exactly
(schedule, decay groups, clipping, AdamW in NumPy), accumulation, resume, bf16, checkpointing, CLI."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from opt_spec import Head, WeightKind, weight_table
from opt_spec import data as spec_data
from opt_spec.testing import VARIANTS
from opt_spec.training import TrainConfig, applies_weight_decay, clip_scale, learning_rate
from opt_torch.modeling import MODEL_CLASSES
from opt_torch.training import TASK_HEADS, Trainer, clip_gradients, param_groups

CONFIG = VARIANTS["pre_ln"]  # vocab 96, hidden 32, 2 layers, dropout 0, 3 labels


def make_model(task, config=CONFIG, seed=0):
    return MODEL_CLASSES[TASK_HEADS[task]].from_config(config, seed=seed)


def synthetic(task, n=8, T=24, seed=0) -> spec_data.Dataset:
    """A small task a tiny model can learn in a few dozen steps: rows count up from a random start
    (causal LM: only the first token is unpredictable); the class is the start's residue mod 3; the
    answer is the two tokens after a marker (id 3) put at a random place."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 30, size=n)
    rows = [[2] + [4 + (int(s) + t) % 30 for t in range(T - 1)] for s in starts]
    if task == "causal_lm":
        return spec_data.Dataset(task, rows)
    if task == "sequence_classification":
        return spec_data.Dataset(task, rows, [int(s) % 3 for s in starts])
    spans, meta = [], []
    for r in rows:
        m = int(rng.integers(1, T - 2))
        r[m] = 3
        spans.append((m + 1, m + 2))
        words = [f"w{t}" for t in r[1:]]  # the context: one word per token after </s>
        ends = np.cumsum([len(w) + 1 for w in words])
        offsets = tuple((int(e - len(w) - 1), int(e - 1)) for w, e in zip(words, ends))
        meta.append(spec_data.QAMeta(" ".join(words), 1, offsets, (f"w{r[m + 1]} w{r[m + 2]}",)))
    return spec_data.Dataset(task, rows, spans, meta)


def run(trainer, stream, steps):
    accum = trainer.cfg.gradient_accumulation_steps
    out = []
    while trainer.step < steps:
        k = trainer.step * accum
        out.append(trainer.train_step([stream.batch(k + j) for j in range(accum)]))
    return out


@pytest.mark.parametrize("task", list(TASK_HEADS))
def test_loss_drops_below_ten_percent_on_every_head(task):
    cfg = TrainConfig(learning_rate=2e-2, warmup_steps=3, total_steps=30, schedule="constant", weight_decay=0.01,
                      max_grad_norm=1.0)
    trainer = Trainer(make_model(task), cfg)
    ds = synthetic(task)
    stream = spec_data.BatchStream(ds, 4, seed=0)
    losses = [r["loss"] for r in run(trainer, stream, 30)]
    final = trainer.evaluate(ds, batch_size=8)
    assert final["loss"] < 0.1 * losses[0], (losses[0], losses[-5:], final)
    if task == "causal_lm":
        assert final["perplexity"] == pytest.approx(math.exp(final["loss"]))
    elif task == "sequence_classification":
        assert final["accuracy"] == 1.0
    else:
        assert final["exact_match"] >= 75.0 and final["f1"] >= 80.0  # span decoding through the offsets


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_optimizer_rate_is_the_spec_rate_at_every_step(schedule):
    cfg = TrainConfig(learning_rate=3e-3, warmup_steps=3, total_steps=9, schedule=schedule)
    trainer = Trainer(make_model("causal_lm"), cfg)
    stream = spec_data.BatchStream(synthetic("causal_lm"), 2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for step in range(cfg.total_steps):
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [learning_rate(step, cfg)] * 2
        out = trainer.train_step(stream.batch(step))
        assert out["learning_rate"] == learning_rate(step, cfg)
        if step == 0:  # warm-up starts at rate 0: the first update changes nothing
            assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_weight_decay_groups_follow_the_spec_kinds():
    for variant in ("pre_ln", "post_ln_proj", "untied_head"):
        model = make_model("causal_lm", VARIANTS[variant])
        groups = param_groups(model, TrainConfig(weight_decay=0.1))
        kinds = {s.name: s.kind for s in weight_table(model.config, Head.CAUSAL_LM)}
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {names[id(p)] for p in groups[0]["params"]}
        no_decay = {names[id(p)] for p in groups[1]["params"]}
        assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
        assert decay | no_decay == set(names.values()) and not decay & no_decay
        assert all(kinds[n] in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING) for n in decay)
        assert all(n.endswith(".bias") or "layer_norm" in n for n in no_decay)
        assert "model.decoder.layers.0.self_attn_layer_norm.weight" in no_decay
        assert "model.decoder.layers.0.fc1.bias" in no_decay and "model.decoder.layers.0.fc1.weight" in decay


def test_clipping_is_the_spec_formula():
    model = make_model("causal_lm")
    batch = synthetic("causal_lm").collate(range(4))
    for max_norm in (1e-3, 0.37, 1.1, 1e9, None):
        model.zero_grad()
        model(input_ids=torch.as_tensor(batch["input_ids"]), labels=torch.as_tensor(batch["labels"])).loss.backward()
        grads = [p.grad.double().numpy().copy() for p in model.parameters()]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        got_norm, scale = clip_gradients(list(model.parameters()), max_norm)
        assert got_norm.dtype == torch.float32 and float(got_norm) == pytest.approx(norm, rel=1e-6)
        assert float(scale) == clip_scale(float(got_norm), max_norm)  # the spec's function, bit for bit
        expected = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
        assert scale == pytest.approx(expected, rel=1e-6)
        for g, p in zip(grads, model.parameters()):
            np.testing.assert_allclose(p.grad.numpy(), g * expected, rtol=1e-6, atol=1e-12)


def test_three_updates_equal_spec_adamw_in_numpy():
    """Warm-up, linear decay, decay groups and active clipping: torch's updates = the spec's formulas."""
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=1, total_steps=4, max_grad_norm=0.5)
    model = make_model("causal_lm", VARIANTS["untied_head"])
    trainer = Trainer(model, cfg)
    kinds = {s.name: s.kind for s in weight_table(model.config, Head.CAUSAL_LM)}
    params = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    m = {n: np.zeros_like(v) for n, v in params.items()}
    v = {n: np.zeros_like(x) for n, x in params.items()}
    stream = spec_data.BatchStream(synthetic("causal_lm"), 4)
    for step in range(3):
        batch = stream.batch(step)
        probe = make_model("causal_lm", VARIANTS["untied_head"])  # gradient at the current weights
        probe.load_state_dict(model.state_dict())
        probe(input_ids=torch.as_tensor(batch["input_ids"]), labels=torch.as_tensor(batch["labels"])).loss.backward()
        grads = {n: p.grad.double().numpy() for n, p in probe.named_parameters()}
        scale = clip_scale(math.sqrt(sum(float((g ** 2).sum()) for g in grads.values())), cfg.max_grad_norm)
        assert scale < 1.0  # clipping is active
        lr, t = learning_rate(step, cfg), step + 1
        for n in params:
            g = grads[n] * scale
            m[n] = cfg.adam_beta1 * m[n] + (1 - cfg.adam_beta1) * g
            v[n] = cfg.adam_beta2 * v[n] + (1 - cfg.adam_beta2) * g * g
            m_hat, v_hat = m[n] / (1 - cfg.adam_beta1 ** t), v[n] / (1 - cfg.adam_beta2 ** t)
            wd = cfg.weight_decay if applies_weight_decay(kinds[n]) else 0.0
            params[n] = params[n] - lr * (m_hat / (np.sqrt(v_hat) + cfg.adam_epsilon) + wd * params[n])
        trainer.train_step(batch)
        for n, p in model.named_parameters():
            np.testing.assert_allclose(p.detach().numpy(), params[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_accumulating_two_micro_batches_of_two_equals_one_batch_of_four():
    ds = synthetic("causal_lm")
    base = dict(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, total_steps=5, max_grad_norm=0.5)
    one = Trainer(make_model("causal_lm"), TrainConfig(**base))
    two = Trainer(make_model("causal_lm"), TrainConfig(**base, gradient_accumulation_steps=2))
    r1 = one.train_step(ds.collate([0, 1, 2, 3]))
    r2 = two.train_step([ds.collate([0, 1]), ds.collate([2, 3])])
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    assert r1["tokens"] == r2["tokens"] == 4 * 24
    for (n, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        # the averaged (and clipped) gradients agree to float32 rounding; the weights after Adam's
        # sign-like first step agree to a small fraction of the learning rate
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-7, err_msg=n)
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=1e-3 * 1e-2, err_msg=n)
    with pytest.raises(ValueError, match="micro-batches"):
        two.train_step(ds.collate([0, 1]))


@pytest.mark.parametrize("task", ["causal_lm", pytest.param("question_answering", marks=pytest.mark.slow)])
def test_resume_continues_exactly(task, tmp_path):
    """With dropout on: the losses after a resume equal the uninterrupted run's, bit for bit."""
    config = CONFIG.replace(dropout=0.1, attention_dropout=0.1)
    cfg = TrainConfig(learning_rate=5e-3, weight_decay=0.01, warmup_steps=2, total_steps=6,
                      gradient_accumulation_steps=2, seed=7)
    stream = spec_data.BatchStream(synthetic(task, n=10), 2, seed=3)
    full = [r["loss"] for r in run(Trainer(make_model(task, config), cfg), stream, 6)]

    first = Trainer(make_model(task, config), cfg)
    head = [r["loss"] for r in run(first, stream, 3)]
    first.save_checkpoint(tmp_path / "ckpt")
    del first
    torch.manual_seed(12345)  # whatever happens to the global generator in between
    resumed = Trainer.from_checkpoint(tmp_path / "ckpt", cfg)
    assert resumed.step == 3
    tail = [r["loss"] for r in run(resumed, stream, 6)]
    assert head + tail == full
    generation = ["generation_config.json"] if task == "causal_lm" else []  # decoding defaults: causal LMs only
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(["config.json", "model.safetensors", "trainer_state.pt",
                                                            *generation])
    with pytest.raises(ValueError, match="learning_rate"):
        Trainer.from_checkpoint(tmp_path / "ckpt", dataclasses.replace(cfg, learning_rate=1e-3))


def test_resume_continues_exactly_after_layerdrop_skipped_layers(tmp_path):
    """LayerDrop skips whole layers in an update: AdamW then leaves their parameters alone, step counters
    included, so a checkpoint holds counters below its step (or no state at all for a layer never run yet).
    Such a checkpoint of optkit's own resumes, and continues the uninterrupted run bit for bit."""
    config = CONFIG.replace(layerdrop=0.5)
    cfg = TrainConfig(learning_rate=5e-3, weight_decay=0.01, warmup_steps=1, total_steps=6, seed=3)
    stream = spec_data.BatchStream(synthetic("causal_lm", n=10), 2, seed=1)
    full = [r["loss"] for r in run(Trainer(make_model("causal_lm", config), cfg), stream, 6)]
    first = Trainer(make_model("causal_lm", config), cfg)
    head = [r["loss"] for r in run(first, stream, 3)]
    counts = [float(first.optimizer.state[p]["step"]) if p in first.optimizer.state else 0.0 for p in first.params]
    assert min(counts) < 3 == max(counts)  # some layer was skipped: the case this test is about
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = Trainer.from_checkpoint(tmp_path / "ckpt", cfg)
    assert head + [r["loss"] for r in run(resumed, stream, 6)] == full


def test_a_hostile_trainer_state_is_refused(tmp_path):
    """trainer_state.pt from someone else: a compressed (inflatable) record or a storage cut short is
    refused by the spec's reader before torch inflates or trusts anything."""
    import zipfile

    from opt_spec.errors import CheckpointError

    trainer = Trainer(make_model("causal_lm"), TrainConfig(learning_rate=1e-3, total_steps=4))
    run(trainer, spec_data.BatchStream(synthetic("causal_lm"), 2), 1)
    trainer.save_checkpoint(tmp_path / "c")
    state = tmp_path / "c" / "trainer_state.pt"
    with zipfile.ZipFile(state) as z:
        records = {info.filename: z.read(info) for info in z.infolist()}
    with zipfile.ZipFile(state, "w", compression=zipfile.ZIP_DEFLATED) as z:  # same content, deflated
        for name, data in records.items():
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match="compressed"):
        Trainer.from_checkpoint(tmp_path / "c")
    storage = next(n for n in records if "/data/" in n and len(records[n]) >= 12)
    with zipfile.ZipFile(state, "w") as z:  # one storage record cut to a third
        for name, data in records.items():
            z.writestr(name, data[:len(data) // 3] if name == storage else data)
    with pytest.raises(CheckpointError, match="storage record"):
        Trainer.from_checkpoint(tmp_path / "c")


def test_a_trainer_state_naming_an_optimizer_folder_outside_is_refused(tmp_path):
    """trainer_state.pt names the folder of a split trainer's optimizer state (optimizer_dcp): a name that
    leaves the checkpoint, or a folder holding a symlink, is refused before DCP reads anything."""
    from opt_spec.errors import CheckpointError

    cfg = TrainConfig(learning_rate=1e-3, total_steps=4)
    trainer = Trainer(make_model("causal_lm"), cfg)
    trainer.save_checkpoint(tmp_path / "c")
    state = torch.load(tmp_path / "c" / "trainer_state.pt", weights_only=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name, match in [(str(outside), "plain relative path"), ("../elsewhere", "plain relative path"),
                        ("trainer_state.dcp", "symlink")]:
        inside = tmp_path / "c" / "trainer_state.dcp"
        inside.mkdir(exist_ok=True)
        if not (inside / ".metadata").exists():
            os.symlink(outside, inside / ".metadata")
        torch.save({**state, "optimizer_dcp": name}, tmp_path / "c" / "trainer_state.pt")
        with pytest.raises(CheckpointError, match=match):
            Trainer.from_checkpoint(tmp_path / "c")


def test_bf16_mixed_precision_trains_with_float32_weights():
    cfg = TrainConfig(learning_rate=2e-2, total_steps=8, schedule="constant", mixed_precision="bf16")
    trainer = Trainer(make_model("sequence_classification"), cfg)
    stream = spec_data.BatchStream(synthetic("sequence_classification"), 8)
    fp32 = Trainer(make_model("sequence_classification"), dataclasses.replace(cfg, mixed_precision=None))
    first = fp32.train_step(stream.batch(0))["loss"]
    losses = [r["loss"] for r in run(trainer, stream, 8)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.75 * losses[0]
    assert losses[0] == pytest.approx(first, rel=2e-2) and losses[0] != first  # bf16 compute, close to fp32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the forward does run in bf16
        logits = trainer.model(input_ids=torch.as_tensor(stream.batch(0)["input_ids"])).logits
    assert logits.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients():
    config = CONFIG.replace(dropout=0.1)
    batch = synthetic("causal_lm").collate(range(4))
    grads = []
    for checkpointing in (False, True):
        model = make_model("causal_lm", config)
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        torch.manual_seed(0)
        model(input_ids=torch.as_tensor(batch["input_ids"]), labels=torch.as_tensor(batch["labels"])).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from tests.test_data import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-train")
    tok = build_tokenizer(path)
    config = CONFIG.replace(vocab_size=max(96, tok.vocab_size), max_position_embeddings=64, num_labels=2)
    make_model("causal_lm", config).save_pretrained(path)
    return path


def optkit(*args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    return subprocess.run([sys.executable, "-m", "optkit_cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_train_causal_lm_with_eval_checkpoints_and_resume(tiny_model_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("Hello, my name is Ada and I like tea.\n\nThe quick brown fox jumps over the lazy dog!\n" * 3,
                    encoding="utf-8")
    out = tmp_path / "run"
    common = ["train", "--model", tiny_model_dir, "--task", "causal_lm", "--data", text, "--eval-data", text,
              "--backend", "torch", "--output", out, "--batch-size", 2, "--seq-len", 16, "--lr", "5e-3",
              "--warmup", 1, "--eval-every", 2, "--save-every", 2]
    r = optkit(*common, "--steps", 4)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"]
    evals = [x for x in records if x["kind"] == "eval"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and [x["step"] for x in evals] == [2, 4]
    assert all({"loss", "learning_rate", "tokens_per_s", "grad_norm"} <= set(x) for x in train)
    assert "perplexity" in evals[-1]
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert (out / "final" / "config.json").is_file()
    # resuming at step 2 replays steps 3 and 4 exactly
    out2 = tmp_path / "resumed"
    r = optkit(*[a if a != out else out2 for a in common], "--steps", 4, "--resume", out / "checkpoint-2")
    assert r.returncode == 0, r.stderr
    again = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in again if x["kind"] == "train"] == [x["loss"] for x in train[2:]]


def test_cli_train_reports_bad_data_with_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n', encoding="utf-8")
    r = optkit("train", "--model", tiny_model_dir, "--task", "sequence_classification", "--data", bad,
               "--backend", "torch", "--output", tmp_path / "o", "--steps", 2, "--seq-len", 32)
    assert r.returncode == 1  # refused input, not a usage error
    assert f"{bad}:2: missing field 'label'" in r.stderr and "Traceback" not in r.stderr
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"context": "Paris is big.", "question": "What?",
                              "answers": {"text": ["Rome"], "answer_start": [0]}}) + "\n", encoding="utf-8")
    r = optkit("train", "--model", tiny_model_dir, "--task", "question_answering", "--data", qa,
               "--backend", "torch", "--output", tmp_path / "o2", "--steps", 2, "--seq-len", 32)
    assert r.returncode == 1 and f"{qa}:1: answer 'Rome' is not in the context" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    r = optkit("train", "--model", tiny_model_dir, "--task", "causal_lm", "--data", empty,
               "--backend", "torch", "--output", tmp_path / "o3", "--steps", 2, "--seq-len", 32)
    assert r.returncode == 1 and f"{empty}: empty file" in r.stderr and "Traceback" not in r.stderr


def test_fused_adamw_and_its_fallback_give_the_same_updates():
    """The trainer's AdamW is torch's fused kernel (one pass per tensor), which reads every tensor as a
    flat block: the trainer gives q/k/v dense storage of their own, and a layout changed under it
    (pack_weights, which `.to()` also runs) sends the update down foreach's path instead of a wrong one."""
    # adam_epsilon 1e-4: k_proj.bias's gradient is rounding noise (zero in exact arithmetic), which Adam
    # would amplify by up to 1 / eps (see tests/test_training_parity.py)
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, total_steps=5, max_grad_norm=0.5,
                      adam_epsilon=1e-4)
    stream = spec_data.BatchStream(synthetic("causal_lm"), 4)
    fused, repacked = Trainer(make_model("causal_lm"), cfg), Trainer(make_model("causal_lm"), cfg)
    reference = make_model("causal_lm")  # foreach AdamW on the model as it is laid out
    optimizer = torch.optim.AdamW(param_groups(reference, cfg), lr=learning_rate(0, cfg), eps=cfg.adam_epsilon,
                                  foreach=True)
    for step in range(3):
        batch = stream.batch(step)
        if step == 1:
            repacked.model.pack_weights()  # q/k/v column blocks again: the moments keep their strides
        assert fused.train_step(batch)["loss"] == pytest.approx(repacked.train_step(batch)["loss"], rel=1e-6)
        optimizer.zero_grad(set_to_none=True)
        reference(input_ids=torch.as_tensor(batch["input_ids"]), labels=torch.as_tensor(batch["labels"])).loss.backward()
        clip_gradients([p for p in reference.parameters()], cfg.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.step()
    assert all(g["fused"] for g in fused.optimizer.param_groups)
    assert not any(g["fused"] for g in repacked.optimizer.param_groups)  # it fell back
    for (n, p), q, r in zip(fused.model.named_parameters(), repacked.model.parameters(), reference.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), r.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(q.detach().numpy(), r.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)


def test_the_fused_update_clips_in_its_own_pass_on_row_major_weights():
    """The trainer stores every parameter row-major (so autograd never copies a gradient into another
    layout) and hands the clip scale to the fused AdamW kernel (grad_scale) instead of multiplying the
    gradients first: the same update and the same clipped gradients as clipping, then stepping."""
    # adam_epsilon 1e-4: k_proj.bias's gradient is rounding noise (see the test above)
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, total_steps=5, max_grad_norm=0.05,
                      adam_epsilon=1e-4)
    batch = spec_data.BatchStream(synthetic("causal_lm"), 4).batch(0)
    trainer, reference = Trainer(make_model("causal_lm"), cfg, compile=False), make_model("causal_lm")
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    optimizer = torch.optim.AdamW(param_groups(reference, cfg), lr=learning_rate(0, cfg), eps=cfg.adam_epsilon,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), foreach=True)
    out = trainer.train_step(batch)
    reference(input_ids=torch.as_tensor(batch["input_ids"]), labels=torch.as_tensor(batch["labels"])).loss.backward()
    norm, scale = clip_gradients(list(reference.parameters()), cfg.max_grad_norm)
    assert float(scale) < 0.5 and out["grad_norm"] == pytest.approx(float(norm), rel=1e-5)  # clipping was active
    optimizer.step()
    assert trainer.optimizer.grad_scale is not None
    for (n, p), r in zip(trainer.model.named_parameters(), reference.parameters()):
        assert p.grad.stride() == p.stride(), n
        np.testing.assert_allclose(p.grad.numpy(), r.grad.numpy(), rtol=1e-5, atol=1e-9, err_msg=n)
        np.testing.assert_allclose(p.detach().numpy(), r.detach().numpy(), rtol=1e-5, atol=1e-7, err_msg=n)


def test_cli_compile_option_is_torch_only(tiny_model_dir, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("hello world\n" * 50)
    r = optkit("train", "--model", tiny_model_dir, "--task", "causal_lm", "--data", data, "--backend", "flax",
               "--output", tmp_path / "o", "--steps", 1, "--seq-len", 16, "--compile", "on")
    assert r.returncode == 2 and "--compile on is a torch backend option" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_cli_gradient_checkpointing_in_every_backend(tiny_model_dir, tmp_path, backend):
    """--gradient-checkpointing reaches the TF and Flax trainers too (same losses as without it). The two runs
    go at once: each is mostly its framework's start."""
    text = tmp_path / "train.txt"
    text.write_text("Hello, my name is Ada and I like tea.\n\nThe quick brown fox jumps over the lazy dog!\n" * 3)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    runs = {}
    for flag in ([], ["--gradient-checkpointing"]):
        args = ["train", "--model", tiny_model_dir, "--task", "causal_lm", "--data", text, "--backend", backend,
                "--output", tmp_path / f"o{len(flag)}", "--steps", 2, "--seq-len", 16, *flag]
        runs[len(flag)] = subprocess.Popen([sys.executable, "-m", "optkit_cli.main", *map(str, args)], text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    losses = []
    try:
        for n, proc in runs.items():
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
            records = [json.loads(line) for line in (tmp_path / f"o{n}" / "metrics.jsonl").read_text().splitlines()]
            losses.append([x["loss"] for x in records if x["kind"] == "train"])
    finally:  # a failed run or a timeout leaves no process behind
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)
