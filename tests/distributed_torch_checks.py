"""The split PyTorch model's checks, run by tests/test_torch_distributed.py under torchrun (CPU, gloo):

    torchrun --standalone --nproc-per-node 2 -m tests.distributed_torch_checks two WORKDIR
    torchrun --standalone --nproc-per-node 4 -m tests.distributed_torch_checks four WORKDIR

Several checks share one launch to pay the start-up once. Every rank compares its results with the
same model unsplit in its own process; rank 0 writes every rank's measurements (differences, bytes each
rank read) to WORKDIR/result.json, which the test asserts on. (Not to stdout: torchrun merges every rank's
output into one stream, where another rank's line can land inside a long one.)
"""

import dataclasses
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist


def _write(workdir: str, variant: str, head: str = "causal_lm") -> str:
    """A random checkpoint of one of opt_spec.testing's variants, written once by rank 0."""
    from opt_spec import io as spec_io
    from opt_spec.testing import VARIANTS, random_weights
    from opt_torch.modeling import MODEL_CLASSES

    config = VARIANTS[variant]
    path = os.path.join(workdir, f"{variant}-{head}")
    if dist.get_rank() == 0 and not os.path.isdir(path):
        spec_io.save_safetensors_dir(path, random_weights(config, head, seed=0), config.to_saved_dict(
            MODEL_CLASSES[head].__name__, "float32"))
    dist.barrier()
    return path


def _diff(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def _gathered(values: dict) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def _expected_bytes(model, itemsize: int = 4) -> int:
    """What one rank should read by the spec's table: each weight's block over tp, then FSDP2's share
    over dp (FSDP2 shards what the table keeps whole on fsdp too, on dim 0)."""
    from opt_spec import tied_source, weight_table
    from opt_spec.parallel import FSDP

    plan = model.sharding_plan
    total = 0
    for spec in weight_table(model.config, model.head):
        if spec.name in tied_source(model.config, model.head):
            continue
        n = int(np.prod(plan.shard_shape(spec)))
        total += n * itemsize // (plan.fsdp if FSDP not in plan.splits[spec.name] else 1)
    return total


def _lm_checks(path: str, mesh, ids, mask) -> dict:
    """Split vs unsplit: logits, a cache step, greedy and beam tokens, the whole state dict, save_pretrained."""
    from opt_torch import OPTForCausalLM
    from opt_torch.distributed import full_tensor

    one = OPTForCausalLM.from_pretrained(path)
    split = OPTForCausalLM.from_pretrained(path, device_mesh=mesh)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    out = {"bytes_read": split.bytes_read, "expected_bytes": _expected_bytes(split),
           "kv_heads": split.kv_heads}
    with torch.no_grad():
        want = one(ids_t, attention_mask=mask_t, use_cache=True)
        got = split(ids_t, attention_mask=mask_t, use_cache=True)
        real = mask_t.bool()
        out["logits"] = _diff(got.logits[real], want.logits[real])
        out["cache_heads"] = int(got.past_key_values.keys[0].shape[1])
        nxt = torch.argmax(want.logits[:, -1], -1)[:, None]
        mask2 = torch.cat([mask_t, torch.ones_like(nxt)], 1)
        step_want = one(nxt, attention_mask=mask2, past_key_values=want.past_key_values).logits
        step_got = split(nxt, attention_mask=mask2, past_key_values=got.past_key_values).logits
        out["cache_step"] = _diff(step_got, step_want)
    greedy = [m.generate(ids_t, attention_mask=mask_t, max_new_tokens=6) for m in (one, split)]
    beam = [m.generate(ids_t[:2], attention_mask=mask_t[:2], max_new_tokens=5, num_beams=3) for m in (one, split)]
    out["greedy_equal"] = bool(torch.equal(*greedy))
    out["beam_equal"] = bool(torch.equal(*beam))
    sampled = split.generate(ids_t, attention_mask=mask_t, max_new_tokens=6, do_sample=True)  # no seed given
    out["sampled_alike"] = all(x == sampled.tolist() for x in _gathered(sampled.tolist()))  # one draw for all
    whole = {n: full_tensor(t) for n, t in split.state_dict().items()}
    reference = one.state_dict()
    out["state_exact"] = sorted(whole) == sorted(reference) and all(torch.equal(whole[n], reference[n])
                                                                      for n in reference)
    out["tied"] = split.lm_head.weight is split.model.decoder.embed_tokens.weight
    saved = os.path.join(os.path.dirname(path), f"saved-{os.path.basename(path)}-{mesh.size(0)}x{mesh.size(1)}")
    split.save_pretrained(saved)
    again = OPTForCausalLM.from_pretrained(saved).state_dict()
    out["save_exact"] = all(torch.equal(again[n], reference[n]) for n in reference)
    return out


def _built_check(path: str, mesh, ids, mask) -> dict:
    """parallelize() on a model every rank built whole (the same checkpoint) vs the unsplit model."""
    from opt_torch import OPTForCausalLM
    from opt_torch.distributed import parallelize

    one = OPTForCausalLM.from_pretrained(path)
    split = parallelize(OPTForCausalLM.from_pretrained(path), mesh)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        return {"logits": _diff(split(ids_t, attention_mask=mask_t).logits, one(ids_t, attention_mask=mask_t).logits)}


def _grads(model) -> dict:
    from opt_torch.distributed import full_tensor

    return {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}


def _grad_checks(path: str, mesh, batches: list, mixed_precision=None) -> dict:
    """One update's backward (the micro-batches `batches`) of the split trainer vs one process on the
    whole of each."""
    from opt_spec.training import TrainConfig
    from opt_torch.training import Trainer

    cfg = TrainConfig(learning_rate=1e-3, total_steps=10, schedule="constant", mixed_precision=mixed_precision,
                      gradient_accumulation_steps=len(batches))
    one = Trainer.from_pretrained(path, "causal_lm", cfg)
    split = Trainer.from_pretrained(path, "causal_lm", cfg, device_mesh=mesh)
    loss_one, _ = one.backward(batches)
    loss_split, _ = split.backward(batches)
    want, got = _grads(one.model), _grads(split.model)
    scale = max(float(g.abs().max()) for g in want.values())
    out = {"loss": abs(loss_one - loss_split), "grads": max(_diff(got[n], want[n]) for n in want) / scale,
           "grad_names_equal": sorted(got) == sorted(want)}
    if mixed_precision is not None:  # the rounding's own size: one process with and without it
        exact = Trainer.from_pretrained(path, "causal_lm", dataclasses.replace(cfg, mixed_precision=None))
        loss_exact, _ = exact.backward(batches)
        exact_grads = _grads(exact.model)
        out["loss_value"] = loss_one
        out["noise_grads"] = max(_diff(want[n], exact_grads[n]) for n in want) / scale
    return out


def _classifier_checks(workdir: str, mesh, ids, mask) -> dict:
    """A sequence classifier (its own checkpoint) split vs one process: the pooled logits."""
    from opt_spec.testing import VARIANTS
    from opt_torch import OPTForSequenceClassification

    path = _write(workdir, "pre_ln", head="sequence_classification")
    one = OPTForSequenceClassification.from_pretrained(path)
    split = OPTForSequenceClassification.from_pretrained(path, device_mesh=mesh)
    ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        return {"logits": _diff(split(ids_t, attention_mask=mask_t).logits, one(ids_t, attention_mask=mask_t).logits)}


def _fresh_head_check(path: str, mesh) -> dict:
    """A classification head the causal-LM checkpoint lacks: drawn once (rank 0) and split, so every
    rank holds blocks of the same matrix."""
    from opt_torch import OPTForSequenceClassification
    from opt_torch.distributed import full_tensor

    split = OPTForSequenceClassification.from_pretrained(path, device_mesh=mesh)
    score = full_tensor(split.score.weight)
    everyone = _gathered(score.tolist())
    return {"same_on_every_rank": all(x == everyone[0] for x in everyone), "std": float(score.std()),
            "init_std": split.config.init_std}


def _batch(config, rows: int = 4, length: int = 8, seed: int = 3) -> dict:
    """A causal-LM micro-batch whose rows hold different numbers of labelled tokens (padding, ignored
    labels), so that a rank's mean differs from the global one."""
    from opt_spec.numerics import IGNORE_INDEX
    from opt_spec.testing import random_batch

    ids, mask = random_batch(config, batch=rows, length=length, seed=seed, left_pad=(0, 3, 5, 1)[:rows])
    labels = np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64)
    labels[0, 2:5] = IGNORE_INDEX
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), "labels": labels}


def _training_checks(path: str, mesh, workdir: str) -> dict:
    """Two updates at this mesh, a DCP checkpoint, a resume on the same mesh (exact), and the full
    state the single-process resume in the test must reproduce."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from opt_spec.training import TrainConfig
    from opt_torch.distributed import full_tensor, reshard
    from opt_torch.training import Trainer

    cfg = TrainConfig(learning_rate=1e-2, total_steps=10, warmup_steps=1, max_grad_norm=0.5, seed=5)
    trainer = Trainer.from_pretrained(path, "causal_lm", cfg, device_mesh=mesh)
    batches = [_batch(trainer.model.config, seed=s) for s in (4, 5, 6)]
    for b in batches[:2]:
        trainer.train_step(b)
    ckpt = os.path.join(workdir, f"ckpt-{mesh.size(0)}x{mesh.size(1)}")
    trainer.save_checkpoint(ckpt)
    reshard(trainer.model)
    options = StateDictOptions(full_state_dict=True)  # whole tensors on every rank
    full_optim = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    weights = {n: full_tensor(t) for n, t in trainer.model.state_dict().items()}
    if dist.get_rank() == 0:  # what a resume must reproduce (written now: "step" is the live tensor)
        arrays = {f"w/{n}": t.numpy() for n, t in weights.items()}
        arrays.update({f"o/{n}/{k}": torch.as_tensor(v).numpy() for n, s in full_optim["state"].items()
                       for k, v in s.items()})
        np.savez(os.path.join(workdir, f"state-{mesh.size(0)}x{mesh.size(1)}.npz"), **arrays)
        with open(os.path.join(workdir, "batch3.json"), "w") as f:
            json.dump({k: v.tolist() for k, v in batches[2].items()}, f)
    resumed = Trainer.from_checkpoint(ckpt, device_mesh=mesh)
    again = get_optimizer_state_dict(resumed.model, resumed.optimizer, options=options)
    differ = [f"{n}/{k}" for n, s in full_optim["state"].items() for k, v in s.items()
              if not torch.equal(again["state"][n][k], v)]
    differ += [n for n, t in resumed.model.state_dict().items() if not torch.equal(full_tensor(t), weights[n])]
    same_step = resumed.step == trainer.step == 2
    step3 = trainer.train_step(batches[2])
    step3_resumed = resumed.train_step(batches[2])
    out = {"resume_same_mesh_differ": differ, "resume_same_mesh_step": same_step,
           "resume_same_mesh_loss": abs(step3["loss"] - step3_resumed["loss"]), "step3_loss": step3["loss"],
           "checkpoint": ckpt}
    return out


def _refusals(tp_mesh) -> dict:
    """What parallelize refuses, in words: tp not dividing the heads, a mesh without ("dp", "tp")."""
    from torch.distributed.device_mesh import init_device_mesh

    from opt_spec.testing import VARIANTS
    from opt_torch import OPTForCausalLM
    from opt_torch.distributed import parallelize

    def error(fn) -> str:
        try:
            fn()
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return ""

    one_head = VARIANTS["pre_ln"].replace(num_attention_heads=1)
    other = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    return {"heads": error(lambda: parallelize(OPTForCausalLM(one_head), tp_mesh)),
            "dims": error(lambda: parallelize(OPTForCausalLM(VARIANTS["pre_ln"]), other))}


def _cli_check(model_dir: str, data: str, workdir: str) -> dict:
    """`optkit train --backend torch` in this torchrun job: without --mesh, every process is data parallel."""
    from optkit_cli.main import main

    out = os.path.join(workdir, "cli-dp2")
    code = main(["train", "--model", model_dir, "--data", data, "--eval-data", data, "--output", out, "--task",
                 "causal_lm", "--backend", "torch", "--batch-size", "4", "--seq-len", "16", "--lr", "5e-3",
                 "--warmup", "1", "--steps", "4", "--save-every", "2", "--eval-every", "2", "-q"])
    return {"code": code, "output": out, "group_kept": dist.is_initialized()}


def two(workdir: str, cli_model: str | None = None, cli_data: str | None = None) -> dict:
    """tp=2 (inference, gradients) and dp=2 (FSDP2 gradients, trainer checkpoints, the CLI) in one
    2-process job."""
    from torch.distributed.device_mesh import init_device_mesh

    from opt_spec.testing import VARIANTS, random_batch

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out = {}
    tp_mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    dp_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    ids, mask = random_batch(VARIANTS["pre_ln"], batch=3, length=7, seed=1, left_pad=(0, 2, 4))
    for name in ("pre_ln", "untied_head", "post_ln_proj"):
        path = _write(workdir, name)
        out[f"tp2/{name}"] = _lm_checks(path, tp_mesh, ids, mask)
    path = _write(workdir, "pre_ln")
    out["dp2/lm"] = _lm_checks(path, dp_mesh, ids, mask)
    batch = _batch(VARIANTS["pre_ln"])
    out["tp2/grads"] = _grad_checks(path, tp_mesh, [batch])
    out["refusals"] = _refusals(tp_mesh)
    out["dp2/grads"] = _grad_checks(path, dp_mesh, [batch])
    out["dp2/grads_odd_batch"] = _grad_checks(path, dp_mesh, [_batch(VARIANTS["pre_ln"], rows=3)])
    out["dp2/grads_accumulated"] = _grad_checks(path, dp_mesh, [batch, _batch(VARIANTS["pre_ln"], seed=8)])
    out["tp2/classifier"] = _classifier_checks(workdir, tp_mesh, ids, mask)
    out["tp2/built"] = _built_check(path, tp_mesh, ids, mask)
    out["dp2/built"] = _built_check(path, dp_mesh, ids, mask)
    out["dp2/fresh_head"] = _fresh_head_check(path, dp_mesh)
    out["dp2/training"] = _training_checks(path, dp_mesh, workdir)
    if cli_model is not None:
        out["dp2/cli"] = _cli_check(cli_model, cli_data, workdir)
    return out


def four(workdir: str) -> dict:
    """dp=2 x tp=2: forward, generate, state and gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    from opt_spec.testing import VARIANTS, random_batch

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ids, mask = random_batch(VARIANTS["pre_ln"], batch=3, length=7, seed=1, left_pad=(0, 2, 4))
    path = _write(workdir, "pre_ln")
    return {"dp2tp2/lm": _lm_checks(path, mesh, ids, mask),
            "dp2tp2/grads": _grad_checks(path, mesh, [_batch(VARIANTS["pre_ln"])]),
            "dp2tp2/grads_bf16": _grad_checks(path, mesh, [_batch(VARIANTS["pre_ln"])], mixed_precision="bf16")}


if __name__ == "__main__":
    result = {"two": two, "four": four}[sys.argv[1]](*sys.argv[2:])
    per_rank = _gathered(result)
    if dist.get_rank() == 0:
        with open(os.path.join(sys.argv[2], "result.json"), "w") as f:
            json.dump({"ranks": per_rank}, f)
    dist.barrier()
    dist.destroy_process_group()
