"""The sharded Flax model's checks, run in child processes by tests/test_flax_distributed.py: the device
count of a JAX process is fixed when its backend starts, so each check runs in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX is imported. Several checks share one
process to pay start-up and compilation once. Each writes its measurements as JSON to
WORKDIR/result-COMMAND.json (result-host-PROCESS.json), which the test asserts on: a file, not a line
among whatever else the process prints.

    python -m tests.distributed_flax_checks inference WORKDIR     (8 devices)
    python -m tests.distributed_flax_checks training WORKDIR      (8 devices)
    python -m tests.distributed_flax_checks cli WORKDIR MODEL DATA (8 devices)
    python -m tests.distributed_flax_checks host PROCESS PORT WORKDIR   (4 devices, one of 2 processes)
"""

import json
import os
import sys

import numpy as np


def _setup(devices: int) -> None:
    if "jax" in sys.modules:
        raise RuntimeError("run this file in a fresh interpreter: JAX is already started")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"


def _write(workdir, config, head="causal_lm", seed=0) -> str:
    from opt_spec import io as spec_io
    from opt_spec.testing import random_weights

    path = os.path.join(workdir, f"{head}-{seed}-{config.num_hidden_layers}-{config.tie_word_embeddings}")
    if not os.path.isdir(path):
        spec_io.save_safetensors_dir(path, random_weights(config, head, seed), config.to_dict())
    return path


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


def _logits(model, ids, mask) -> np.ndarray:
    """An unsharded model's logits through one jitted program (faster than op-by-op on 8 devices)."""
    import jax

    run = jax.jit(lambda p, i, m: model.module.apply({"params": p}, i, m).logits)
    return np.asarray(run(model.params, ids, mask))


def _float64_logits(model, ids, mask) -> np.ndarray:
    """The same model in float64: the reference the float32 runs' rounding is measured against."""
    import jax

    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model.params)
        exact = type(model)(model.config, params, dtype=np.float64, param_dtype=np.float64)
        return _logits(exact, ids, mask).astype(np.float64)


# ------------------------------------------------------------------------------------------ inference
def inference(workdir: str) -> dict:
    """Meshes 8x1, 2x4, 4x2 against one device: logits (a divisible and an odd batch), greedy and beam
    tokens (greedy also from inputs_embeds and from a re-used cache of the prompt's first tokens), bytes read per
    weight, save_pretrained, refused plans and meshes."""
    _setup(8)
    import jax
    from jax.sharding import AxisType

    from opt_flax import FlaxOPTForCausalLM, FlaxOPTForSequenceClassification
    from opt_flax.distributed import make_mesh
    from opt_spec import io as spec_io
    from opt_spec.parallel import check_plan
    from opt_spec.testing import VARIANTS, random_batch, random_weights
    from opt_spec.weights import weight_table

    config = VARIANTS["pre_ln"]
    path = _write(workdir, config)
    ids, mask = random_batch(config, batch=4, length=9, seed=1, left_pad=(0, 3, 5, 1))
    one = FlaxOPTForCausalLM.from_pretrained(path)
    want = _logits(one, ids, mask)
    exact = _float64_logits(one, ids, mask)
    real = mask.astype(bool)
    out = {"noise_floor": float(np.abs(want - exact)[real].max()), "meshes": {}}
    greedy = np.asarray(one.generate(ids, attention_mask=mask, max_new_tokens=6))
    beam = np.asarray(one.generate(ids[:3], attention_mask=mask[:3], max_new_tokens=5, num_beams=3))
    beam_sampling = dict(max_new_tokens=5, num_beams=2, do_sample=True, top_k=0, top_p=0.5, seed=3)
    drawn = np.asarray(one.generate(ids, attention_mask=mask, **beam_sampling))  # 4 rows: split over fsdp
    itemsize = 4
    for fsdp, tp in ((8, 1), (2, 4), (4, 2)):
        mesh = make_mesh(fsdp, tp)
        model = FlaxOPTForCausalLM.from_pretrained(path, mesh=mesh)
        logits = model(ids, attention_mask=mask).logits
        odd = np.asarray(model(ids[:3], attention_mask=mask[:3]).logits)  # 3 rows: not divisible by fsdp
        plan = check_plan(config, fsdp, tp)
        reads = {}
        for spec in weight_table(config, "causal_lm"):
            if spec.name in model.bytes_read:
                split = any(plan.splits[spec.name])
                expected = spec.numel * itemsize * (plan.replication(spec) if split else 1)
                reads[spec.name] = [model.bytes_read[spec.name], expected, spec.numel * itemsize]
        entry = {
            "logits_vs_one_device": float(np.abs(np.asarray(logits) - want)[real].max()),
            "logits_vs_float64": float(np.abs(np.asarray(logits) - exact)[real].max()),
            "odd_batch_vs_one_device": float(np.abs(odd - want[:3])[real[:3]].max()),
            "logits_spec": str(logits.sharding.spec),
            "bytes_read": reads,
        }
        if (fsdp, tp) == (2, 4):
            entry["greedy_equal"] = bool(np.array_equal(np.asarray(model.generate(ids, attention_mask=mask,
                                                                                  max_new_tokens=6)), greedy))
            entry["beam_equal"] = bool(np.array_equal(np.asarray(model.generate(
                ids[:3], attention_mask=mask[:3], max_new_tokens=5, num_beams=3)), beam))
            entry["beam_sampling_equal"] = bool(np.array_equal(np.asarray(model.generate(
                ids, attention_mask=mask, **beam_sampling)), drawn))  # the same key, the same draws
            entry["greedy_tokens"] = greedy[:, ids.shape[1]:].tolist()
            table = np.asarray(one.params["model"]["decoder"]["embed_tokens"]["embedding"])
            for name, given, rows in (("embeds", {}, greedy[:, ids.shape[1]:]),  # the rows start empty
                                      ("ids_and_embeds", {"input_ids": ids}, greedy)):
                got = model.generate(inputs_embeds=table[ids], attention_mask=mask, max_new_tokens=6, **given)
                entry[f"{name}_equal"] = bool(np.array_equal(np.asarray(got), rows))  # the prompt's own vectors
            C = 6  # generate(past_key_values=) with the mesh's own cache of the prompt's first C tokens
            reused = model(ids[:, :C], attention_mask=mask[:, :C],
                           past_key_values=model.init_cache(4, 8)).past_key_values
            entry["reused_cache_equal"] = [bool(np.array_equal(np.asarray(model.generate(
                ids, attention_mask=mask, max_new_tokens=6, past_key_values=reused, **host)), greedy))
                for host in ({}, {"logits_processor": [lambda rows, scores: scores]})]  # compiled and host loops
            saved = os.path.join(workdir, "saved-2x4")
            model.save_pretrained(saved)
            original = random_weights(config, "causal_lm", 0)
            back = spec_io.load_safetensors_dir(saved)
            entry["saved_equal"] = sorted(back) == sorted(original) and all(
                np.array_equal(back[k], original[k]) for k in original)
            entry["saved_generation_config"] = os.path.isfile(os.path.join(saved, "generation_config.json"))
            entry["kernel_spec"] = str(model.params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"].sharding.spec)
            cache = model.init_cache(4, 16)
            entry["cache_spec"] = str(cache.keys[0].sharding.spec)
        out["meshes"][f"{fsdp}x{tp}"] = entry

    # projections and an untied head; a classifier whose 3 labels no axis splits
    untied = VARIANTS["post_ln_proj"].replace(tie_word_embeddings=False)
    path = _write(workdir, untied)
    one = FlaxOPTForCausalLM.from_pretrained(path)
    model = FlaxOPTForCausalLM.from_pretrained(path, mesh=make_mesh(2, 4))
    out["untied_proj_vs_one_device"] = float(np.abs(np.asarray(model(ids, attention_mask=mask).logits)
                                                    - _logits(one, ids, mask))[real].max())
    path = _write(workdir, config, "sequence_classification")
    one = FlaxOPTForSequenceClassification.from_pretrained(path)
    model = FlaxOPTForSequenceClassification.from_pretrained(path, mesh=make_mesh(4, 2))
    out["classifier_vs_one_device"] = float(np.abs(np.asarray(model(ids, attention_mask=mask).logits)
                                                   - _logits(one, ids, mask)).max())

    path = _write(workdir, config)
    out["errors"] = {
        "tp_not_dividing_heads": _error(lambda: FlaxOPTForCausalLM.from_pretrained(path, mesh=make_mesh(1, 8))),
        "explicit_axes": _error(lambda: FlaxOPTForCausalLM.from_pretrained(
            path, mesh=jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2))),
        "axis_names": _error(lambda: FlaxOPTForCausalLM.from_pretrained(
            path, mesh=jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2))),
        "device_count": _error(lambda: make_mesh(4, 4)),
        "devices_given": _error(lambda: make_mesh(2, 2, devices=jax.devices()[:6])),
        "subset": str(make_mesh(2, 2).devices.shape),
    }
    return out


# ------------------------------------------------------------------------------------------- training
def training(workdir: str) -> dict:
    """On 2x4: one step's gradients against one device, the update against the spec's AdamW, where the
    optimizer state lives; Orbax save on 2x4 restored exactly onto 8x1 and onto one device; a one-device
    checkpoint resumed on a mesh."""
    _setup(8)
    import jax

    from opt_flax.distributed import make_mesh
    from opt_flax.training import FlaxTrainer
    from opt_spec.layouts import native_path
    from opt_spec.testing import VARIANTS, synthetic_batch
    from opt_spec.training import TrainConfig, reference_adamw_step
    from opt_spec.weights import weight_table

    config = VARIANTS["pre_ln"]
    path = _write(workdir, config)
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=5, weight_decay=0.3, max_grad_norm=0.5)
    batch = synthetic_batch("causal_lm", config, batch=8, length=12, seed=0)

    def leaves(tree):
        return {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(jax.device_get(x), np.float64)
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    one = FlaxTrainer.from_pretrained(path, "causal_lm", cfg)
    loss_one, grads_one = one.gradients(batch)
    mesh = make_mesh(2, 4)
    trainer = FlaxTrainer.from_pretrained(path, "causal_lm", cfg, mesh=mesh)
    loss, grads = trainer.gradients(batch)
    g1, g2 = leaves(grads_one), leaves(grads)
    out = {"loss_diff": abs(loss - loss_one), "grad_max_diff": max(float(np.abs(g1[k] - g2[k]).max()) for k in g1),
           "grad_max": max(float(np.abs(v).max()) for v in g1.values())}

    kinds = {".".join(native_path(s, "flax")): s.kind for s in weight_table(config, "causal_lm")}
    expected = reference_adamw_step(leaves(trainer.params), g2, {}, 0, cfg, kinds)
    metrics = trainer.train_step(batch)
    got = leaves(trainer.params)
    out["update_max_rel_excess"] = max(float((np.abs(got[k] - expected[k]) - 2e-7 - 2e-6 * np.abs(expected[k])).max())
                                       for k in expected)
    out["step_loss_diff"] = abs(metrics["loss"] - loss_one)
    mu = trainer.opt_state[1].mu["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"]
    out["adam_mu_spec"] = str(mu.sharding.spec)
    out["param_spec"] = str(trainer.params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"].sharding.spec)

    saved = os.path.join(workdir, "trainer-2x4")
    trainer.save_checkpoint(saved)
    out["files"] = sorted(os.listdir(saved))
    for name, target in (("8x1", make_mesh(8, 1)), ("one_device", None)):
        back = FlaxTrainer.from_checkpoint(saved, mesh=target)
        a, b = jax.tree_util.tree_leaves(trainer.opt_state), jax.tree_util.tree_leaves(back.opt_state)
        out[f"restored_{name}"] = {
            "opt_state_equal": len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                                        for x, y in zip(a, b)),
            "params_equal": all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
                jax.tree_util.tree_leaves(trainer.params), jax.tree_util.tree_leaves(back.params))),
            "rng_equal": bool(np.array_equal(np.asarray(trainer.rng), np.asarray(back.rng))),
            "step": back.step,
            "mu_spec": str(back.opt_state[1].mu["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"].sharding.spec)
            if target is not None else None,
        }
    # a one-device (msgpack) checkpoint resumed on the 2x4 mesh: the one-device trainer given the state
    # of the step above (gathered), so that nothing is compiled for it
    one.params = jax.tree_util.tree_map(np.asarray, trainer.params)
    one.opt_state = jax.tree_util.tree_map(np.asarray, trainer.opt_state)
    one.step = 1
    single = os.path.join(workdir, "trainer-one")
    one.save_checkpoint(single)
    back = FlaxTrainer.from_checkpoint(single, mesh=mesh)
    a, b = jax.tree_util.tree_leaves(one.opt_state), jax.tree_util.tree_leaves(back.opt_state)
    out["msgpack_on_mesh_equal"] = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    out["msgpack_on_mesh_spec"] = str(back.opt_state[1].nu["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"]
                                      .sharding.spec)
    return out


# ------------------------------------------------------------------------------------------------ CLI
def cli(workdir: str, model_dir: str, data: str) -> dict:
    """optkit parity / generate / train with --mesh, run in this process (8 devices) through main()."""
    _setup(8)
    import contextlib
    import io

    from optkit_cli.main import main

    def run(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        return code, out.getvalue(), err.getvalue()

    result = {}
    code, out, err = run("parity", "--model", model_dir, "--backends", "flax", "--mesh", "fsdp=2,tp=2", "--json",
                         "-q", "--prompt", "Hello, my name is Ada.", "--prompt", "The lazy dog")
    result["parity"] = {"code": code, "report": json.loads(out) if code in (0, 1) else None, "stderr": err[-2000:]}
    prompt = "2 31 7 15 9"
    code, out, err = run("generate", "--model", model_dir, "--backend", "flax", "--ids", "--max-new-tokens", "5",
                         "--mesh", "fsdp=1,tp=4", prompt, "2 80 41 3 66")
    result["generate_mesh"] = {"code": code, "stdout": out, "stderr": err[-2000:]}
    code, out, err = run("generate", "--model", model_dir, "--backend", "flax", "--ids", "--max-new-tokens", "5",
                         prompt, "2 80 41 3 66")
    result["generate_one"] = {"code": code, "stdout": out}
    output = os.path.join(workdir, "run")
    code, out, err = run("train", "--model", model_dir, "--task", "causal_lm", "--data", data, "--backend", "flax",
                         "--mesh", "fsdp=2,tp=4", "--output", output, "--steps", "2", "--batch-size", "4",
                         "--eval-data", data,
                         "--seq-len", "16", "--save-every", "2", "-q")
    with open(os.path.join(output, "metrics.jsonl")) if code == 0 else contextlib.nullcontext() as f:
        records = [json.loads(line) for line in f] if f else []
    result["train"] = {"code": code, "stderr": err[-2000:], "records": records,
                       "files": sorted(os.listdir(os.path.join(output, "checkpoint-2"))) if code == 0 else []}
    code, out, err = run("generate", "--model", model_dir, "--backend", "torch", "--ids", "--mesh", "tp=2", prompt)
    result["torch_mesh"] = {"code": code, "stderr": err}
    code, out, err = run("generate", "--model", model_dir, "--backend", "flax", "--ids", "--mesh", "fsdp=2,tp=3",
                         prompt)
    result["bad_tp"] = {"code": code, "stderr": err}
    return result


# ----------------------------------------------------------------------------------------- multi-host
def host(process_id: int, port: int, workdir: str) -> dict:
    """One of two processes of 4 CPU devices each (gloo collectives), one 2x4 mesh over both: the whole
    batch's logits and greedy tokens, then one training step fed each process's own rows, and an Orbax
    checkpoint written by both and restored by both."""
    _setup(4)
    from opt_flax.distributed import initialize

    initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax

    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.distributed import make_mesh
    from opt_flax.training import FlaxTrainer
    from opt_spec.testing import VARIANTS, random_batch, synthetic_batch
    from opt_spec.training import TrainConfig

    config = VARIANTS["pre_ln"]
    path = os.path.join(workdir, "checkpoint")
    ids, mask = random_batch(config, batch=4, length=9, seed=1, left_pad=(0, 3, 5, 1))
    model = FlaxOPTForCausalLM.from_pretrained(path, mesh=make_mesh(2, 4))
    out = {"devices": [jax.device_count(), jax.local_device_count()], "process": jax.process_index()}
    logits = model(ids, attention_mask=mask).logits
    np.save(os.path.join(workdir, f"logits-{process_id}.npy"), model.sharding.gather(logits))
    out["greedy"] = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=4)).tolist()
    trainer = FlaxTrainer(model, TrainConfig(learning_rate=1e-2, total_steps=5))
    batch = synthetic_batch("causal_lm", config, batch=8, length=12, seed=0)
    rows = slice(4 * process_id, 4 * process_id + 4)
    out["step"] = trainer.train_step({k: v[rows] for k, v in batch.items()})
    saved = os.path.join(workdir, "trainer")
    trainer.save_checkpoint(saved)
    back = FlaxTrainer.from_checkpoint(saved, mesh=make_mesh(4, 2))
    out["restored_equal"] = all(np.array_equal(model.sharding.gather(x), back.sharding.gather(y)) for x, y in zip(
        jax.tree_util.tree_leaves(trainer.opt_state), jax.tree_util.tree_leaves(back.opt_state)))
    out["files"] = sorted(os.listdir(saved))
    return out


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "host":
        result, workdir, command = host(int(rest[0]), int(rest[1]), rest[2]), rest[2], f"host-{rest[0]}"
    elif command == "cli":
        result, workdir = cli(*rest), rest[0]
    else:
        result, workdir = {"inference": inference, "training": training}[command](rest[0]), rest[0]
    with open(os.path.join(workdir, f"result-{command}.json"), "w") as f:
        json.dump(result, f)
