"""The Flax model on many (simulated) devices: opt_flax.distributed on jax.sharding.

Each test runs tests/distributed_flax_checks.py in child processes with 8 CPU devices (or 2 processes of
4 that form one mesh over gloo), since JAX fixes its device count when it starts, and asserts on the
measurements the child reports: meshes 8x1, 2x4 and 4x2 against one device (logits within a bound set
by float32's own rounding, greedy, beam and beam-sampled tokens identical, one training step's gradients within 1e-6),
the bytes each weight costs to load, refused plans, Orbax checkpoints restored onto another mesh."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from opt_spec import io as spec_io
from opt_spec.parallel import check_plan
from opt_spec.testing import VARIANTS, random_batch, random_weights, synthetic_batch
from opt_spec.weights import weight_table

from .conftest import Workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _result(path, code: int, proc_out: str, proc_err: str) -> dict:
    """The child's measurements, from the file it writes when it finishes (its output is for errors only)."""
    assert code == 0 and os.path.isfile(path), \
        f"the child failed (exit {code}):\n{proc_out[-3000:]}\n{proc_err[-6000:]}"
    with open(path) as f:
        return json.load(f)


def _run(command, workdir, *args, timeout=600) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.distributed_flax_checks", command, workdir, *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    return _result(os.path.join(workdir, f"result-{command}.json"), proc.returncode, proc.stdout, proc.stderr)


def test_sharded_inference_matches_one_device(tmp_path):
    r = _run("inference", str(tmp_path))
    floor = r["noise_floor"]  # max |one device float32 - float64| over real tokens: float32's own rounding
    assert 0 < floor < 1e-4
    config = VARIANTS["pre_ln"]
    for mesh, m in r["meshes"].items():
        # a different order of the same float32 sums: as close to the exact logits as one device is
        assert m["logits_vs_float64"] <= 2 * floor, (mesh, m["logits_vs_float64"], floor)
        assert m["logits_vs_one_device"] <= 4 * floor, (mesh, m["logits_vs_one_device"], floor)
        assert m["odd_batch_vs_one_device"] <= 4 * floor, mesh  # 3 rows: replicated, not an error
        fsdp, tp = map(int, mesh.split("x"))
        plan = check_plan(config, fsdp, tp)
        for spec in weight_table(config, "causal_lm"):
            if spec.name not in r["meshes"][mesh]["bytes_read"]:
                continue
            got, expected, whole = m["bytes_read"][spec.name]
            # each device read its own block from the mapped file: numel x replication over the devices
            # (a weight whole on every device is read once and copied by JAX)
            split = any(plan.splits[spec.name])
            assert got == (spec.numel * 4 * plan.replication(spec) if split else spec.numel * 4), (mesh, spec.name)
            assert got == expected and (not split or got < whole * fsdp * tp)
        assert len(m["bytes_read"]) == len([w for w in weight_table(config, "causal_lm")
                                            if w.name != "lm_head.weight"])
    assert r["meshes"]["2x4"]["logits_spec"] == "P('fsdp', None, 'tp')"  # rows on fsdp, vocabulary on tp
    m = r["meshes"]["2x4"]
    assert m["greedy_equal"] and m["beam_equal"] and m["embeds_equal"] and m["ids_and_embeds_equal"]
    assert m["beam_sampling_equal"] and m["reused_cache_equal"] == [True, True]
    assert len({tuple(row) for row in m["greedy_tokens"]}) > 1  # the rows differ: a mixed-up batch would show
    assert m["saved_equal"] and m["saved_generation_config"]
    assert m["kernel_spec"] == "P('fsdp', 'tp')"  # fc1 kernel (in, out): in on fsdp, out on tp
    assert m["cache_spec"] == "P('fsdp', 'tp', None, None)"
    assert r["untied_proj_vs_one_device"] <= 4 * floor and r["classifier_vs_one_device"] <= 4 * floor
    errors = r["errors"]
    assert "tp=8 does not divide the 4 attention heads" in errors["tp_not_dividing_heads"]
    assert "Auto" in errors["explicit_axes"] and "Explicit" in errors["explicit_axes"]
    assert "('data', 'model')" in errors["axis_names"] and "('fsdp', 'tp')" in errors["axis_names"]
    assert "16 devices, but there are 8" in errors["device_count"]
    assert "4 devices, but the devices given are 6" in errors["devices_given"]
    assert errors["subset"] == "(2, 2)"  # fewer than all: the first fsdp x tp devices


def test_sharded_training_and_orbax_checkpoints(tmp_path):
    r = _run("training", str(tmp_path))
    assert r["grad_max"] > 0.01  # gradients that could differ
    assert r["grad_max_diff"] <= 1e-6 and r["loss_diff"] <= 1e-6 and r["step_loss_diff"] <= 1e-6
    assert r["update_max_rel_excess"] <= 0  # |update - spec AdamW| <= 2e-7 + 2e-6 |value| everywhere
    assert r["param_spec"] == r["adam_mu_spec"] == "P('fsdp', 'tp')"  # Adam's moments split like the weight
    assert "trainer_state.orbax" in r["files"] and "model.safetensors" in r["files"]
    for where in ("restored_8x1", "restored_one_device"):
        got = r[where]
        assert got["opt_state_equal"] and got["params_equal"] and got["rng_equal"] and got["step"] == 1, where
    assert r["restored_8x1"]["mu_spec"] == "P('fsdp', None)"  # laid out on the new mesh
    assert r["msgpack_on_mesh_equal"] and r["msgpack_on_mesh_spec"] == "P('fsdp', 'tp')"


def test_two_processes_of_four_devices(tmp_path):
    import jax

    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.training import FlaxTrainer
    from opt_spec.training import TrainConfig

    config = VARIANTS["pre_ln"]
    path = tmp_path / "checkpoint"
    spec_io.save_safetensors_dir(path, random_weights(config, "causal_lm", 0), config.to_dict())
    cmd = [sys.executable, "-m", "tests.distributed_flax_checks", "host"]
    env = dict(_env(), TF_CPP_MIN_LOG_LEVEL="2")  # XLA's errors shown: a coordinator port taken meanwhile is retried
    workers = Workers(lambda ports: [Workers.spawn([*cmd, str(i), str(ports[0]), str(tmp_path)], cwd=ROOT, env=env)
                                     for i in range(2)], ports=1)
    # the reference on this process's one device while the two children run
    ids, mask = random_batch(config, batch=4, length=9, seed=1, left_pad=(0, 3, 5, 1))
    one = FlaxOPTForCausalLM.from_pretrained(path)
    forward = jax.jit(lambda p, i, m: one.module.apply({"params": p}, i, m).logits)
    want = np.asarray(forward(one.params, ids, mask))
    greedy = np.asarray(one.generate(ids, attention_mask=mask, max_new_tokens=4)).tolist()
    trainer = FlaxTrainer(one, TrainConfig(learning_rate=1e-2, total_steps=5))
    step = trainer.train_step(synthetic_batch("causal_lm", config, batch=8, length=12, seed=0))
    results = [_result(tmp_path / f"result-host-{i}.json", *run) for i, run in enumerate(workers.wait())]
    real = mask.astype(bool)
    for i, r in enumerate(results):
        assert r["devices"] == [8, 4] and r["process"] == i
        got = np.load(tmp_path / f"logits-{i}.npy")
        assert np.abs(got - want)[real].max() <= 1e-5
        assert r["greedy"] == greedy
        # each process fed its own 4 rows; the step is the one-device step on all 8
        assert r["step"]["tokens"] == step["tokens"]
        assert abs(r["step"]["loss"] - step["loss"]) <= 1e-6
        assert abs(r["step"]["grad_norm"] - step["grad_norm"]) <= 1e-5 * step["grad_norm"]
        assert r["restored_equal"] and "trainer_state.orbax" in r["files"]


def test_cli_mesh(tmp_path):
    """optkit parity / generate / train --mesh in one 8-device process: the sharded run agrees with the
    unsharded one; --mesh is refused in words for torch and for a tp that does not divide the heads."""
    pytest.importorskip("tokenizers")
    from tests.test_data import CORPUS, build_tokenizer

    model = tmp_path / "model"
    tok = build_tokenizer(model)
    config = VARIANTS["pre_ln"].replace(vocab_size=max(96, tok.vocab_size), max_position_embeddings=64)
    spec_io.save_safetensors_dir(model, random_weights(config, "causal_lm", 2), config.to_dict())
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    r = _run("cli", str(tmp_path), str(model), str(data))

    parity = r["parity"]
    assert parity["code"] == 0, parity["stderr"]
    (pair,) = parity["report"]["pairs"]
    assert (pair["a"], pair["b"]) == ("flax", "flax[fsdp=2,tp=2]")
    assert pair["within_tolerance"] and pair["max_abs_diff"] < 1e-4 and pair["greedy_agree"] == pair["tokens"]
    mesh, one = r["generate_mesh"], r["generate_one"]
    assert mesh["code"] == 0 and one["code"] == 0, mesh["stderr"]
    assert "on a mesh fsdp=1 x tp=4" in mesh["stderr"]
    assert mesh["stdout"] == one["stdout"] and len(mesh["stdout"].split()) >= 8  # 2 prompts x 5 ids + headers
    train = r["train"]
    assert train["code"] == 0, train["stderr"]
    steps = [rec for rec in train["records"] if rec["kind"] == "train"]
    assert [rec["step"] for rec in steps] == [1, 2] and all(np.isfinite(rec["loss"]) for rec in steps)
    (evaluation,) = [rec for rec in train["records"] if rec["kind"] == "eval"]  # the sharded evaluate
    assert evaluation["step"] == 2 and np.isfinite(evaluation["loss"]) and evaluation["perplexity"] > 1
    assert "trainer_state.orbax" in train["files"] and "tokenizer.json" in train["files"]
    assert r["torch_mesh"]["code"] == 2 and "flax backend" in r["torch_mesh"]["stderr"]
    assert r["bad_tp"]["code"] != 0 and "tp=3 does not divide the 4 attention heads" in r["bad_tp"]["stderr"]
