"""Fine-tuning in PyTorch, following opt_spec.training (the definitions every backend shares).

- `torch.optim.AdamW` with two parameter groups: weights that decay (linear weights, embeddings)
  and those that do not (biases, LayerNorm), decided by each parameter's kind in the spec's table.
- `SpecSchedule`, an LRScheduler whose rate for the update after `step` updates is exactly
  `opt_spec.training.learning_rate(step, cfg)` (no multiplication by a base rate).
- Global-norm clipping: the norm of all gradients is computed in float32 and every gradient is
  multiplied by `clip_scale(norm, max_grad_norm)`.
- Gradient accumulation: each micro-batch loss is divided by the number of micro-batches before
  backward, so the update sees their average gradient.
- bf16 mixed precision: forward and backward under torch.autocast(bfloat16); weights, optimizer
  state and the losses stay float32.
- Dropout draws from torch's global generator, seeded with cfg.seed when the trainer is made; its
  state is saved with every checkpoint, so a resumed run draws the same masks (the compiled forward
  draws its own masks from it, other ones than the eager model's: resume compiled as you started).
- Speed: the training forward runs through torch.compile (opt_torch.fast_paths) for models of 20M
  parameters or more on one process (`compile=None`; True/False force it), falling back to the eager
  model if compiling fails; the first compiled update's time is returned as `compile_s`.

A checkpoint is one folder: the Hugging Face directory (config.json, model.safetensors) plus
`trainer_state.pt` (optimizer, scheduler, RNG state, step, the TrainConfig) written with torch.save.

Many processes (torchrun): `Trainer(model, cfg, device_mesh=mesh)` (or `from_pretrained(...,
device_mesh=mesh)`) splits the model over a ("dp", "tp") mesh (opt_torch.distributed: tensor
parallelism, FSDP2). Every rank is given the same global micro-batches and keeps its dp rows (all of
them when dp does not divide the batch); each rank's mean loss is weighted by its share of the batch's
`loss_count` (labelled tokens for causal_lm), so the update is the whole batch's, and the reported
loss is the global mean. The optimizer state is saved with torch.distributed.checkpoint, one file per
rank, in `trainer_state.dcp/` next to the whole Hugging Face folder; it loads onto any mesh, or into a
single-process trainer (save at dp=2, resume at dp=1). Each dp rank draws its own dropout (seed + its
dp index; a tp group draws the same).

The surface the CLI drives (the TF and Flax trainers offer the same): `Trainer.from_pretrained(dir,
task, cfg)`, `Trainer.from_checkpoint(dir, cfg)`, `.step`, `.train_step(micro_batches)`,
`.evaluate(dataset, batch_size)`, `.save_checkpoint(dir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from typing import Mapping, Sequence

import numpy as np
import torch

from opt_spec import weight_table
from opt_spec import data as spec_data
from opt_spec import io as spec_io
from opt_spec import training as spec_training
from opt_spec.errors import CheckpointError
from opt_spec.parallel import batch_axis
from opt_spec.torch_pickle import TorchZipReader
from opt_spec.training import (CLIP_EPS, TASK_HEADS, TASK_INPUTS, TrainConfig, applies_weight_decay, learning_rate,
                               loss_count, micro_batch_list, task_head)

from . import fast_paths
from .distributed import VIEW_WARNING
from .modeling import MODEL_CLASSES

STATE_FILE = "trainer_state.pt"
DCP_DIR = "trainer_state.dcp"  # a split trainer's optimizer state (torch.distributed.checkpoint)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """[{decaying params, weight_decay}, {the rest, 0.0}] by each parameter's kind in the spec."""
    kinds = {spec.name: spec.kind for spec in weight_table(model.config, model.head)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a tied head shares embed_tokens and is listed once
        if name not in kinds:
            raise ValueError(f"parameter {name!r} is not in the spec's weight table for {model.head.value}")
        if param.requires_grad:
            (decay if applies_weight_decay(kinds[name]) else no_decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class SpecSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's lr to opt_spec.training.learning_rate(step, cfg) for the coming update."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.cfg = cfg
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [learning_rate(self.last_epoch, self.cfg) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_last_lr": list(self._last_lr)}

    def load_state_dict(self, state: Mapping) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._last_lr = list(state["_last_lr"])
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


def clip_gradients(parameters: Sequence[torch.Tensor], max_grad_norm: float | None, multiply: bool = True):
    """Multiplies all gradients in place by clip_scale(global norm, max_grad_norm); returns the norm
    (float32 tensor) and the scale (float64 tensor). The norm is the float32 2-norm of the per-tensor
    float32 norms; the scale is min(1, max_grad_norm / (norm + 1e-6)) evaluated in float64, as the
    spec's Python function does, on the device (no host round trip in the middle of a step).
    multiply=False only computes them (the fused optimizer applies the scale in its own pass)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(()), torch.ones((), dtype=torch.float64)
    if any(g.dtype != torch.float32 for g in grads):
        raise ValueError("gradients must be float32 (float32 master weights)")
    if any(type(g) is not torch.Tensor for g in grads):  # DTensors of a split model, possibly on several meshes
        from .distributed import grad_norm, local_tensors

        norm, grads = grad_norm(grads), local_tensors(grads)
    else:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if max_grad_norm is None:
        return norm, torch.ones((), dtype=torch.float64, device=norm.device)
    # clip_scale(norm, max_grad_norm) bit for bit: a tensor / tensor division (scalar / tensor is
    # computed as scalar * reciprocal, one rounding more)
    norm64 = norm.double()
    scale = torch.clamp(torch.full_like(norm64, max_grad_norm) / (norm64 + CLIP_EPS), max=1.0)
    if multiply:
        torch._foreach_mul_(grads, scale.float())
    return norm, scale


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one block of memory, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted(zip(t.stride(), t.shape)):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _fusable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch's fused AdamW computes the update: it walks a parameter, its gradient and its
    moments as flat blocks, which is right only when all are dense with the same strides."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            moments = [v for k, v in optimizer.state.get(p, {}).items() if k != "step"]
            if not all(_dense(t) and t.stride() == p.stride() for t in (p, p.grad, *moments)):
                return False
    return True


def _to_torch(batch: Mapping[str, np.ndarray], keys: Sequence[str], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(batch[k]), device=device) for k in keys}


class Trainer:
    """AdamW fine-tuning of one OPT torch model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, task: str | None = None,
                 gradient_checkpointing: bool = False, seed_rng: bool = True, device_mesh=None,
                 compile: bool | None = None):
        self.task = task or next(t for t, h in TASK_HEADS.items() if h == model.head)
        if task_head(self.task) != model.head:
            raise ValueError(f"task {self.task} needs a {task_head(self.task).value} model, got {type(model).__name__}")
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("train float32 weights (bf16 mixed precision keeps float32 master weights); "
                             f"the model holds {model.dtype}")
        self.mesh = device_mesh if device_mesh is not None else getattr(model, "device_mesh", None)
        self.dp, self.dp_index = 1, 0
        if self.mesh is not None:
            from . import distributed

            if not distributed.is_split(model):
                distributed.parallelize(model, self.mesh)
            elif model.device_mesh is not self.mesh:
                raise ValueError("the model is split over another mesh than device_mesh")
            distributed.reshard(model)  # the optimizer must hold FSDP2's shards, not a root a forward gathered
            self.dp, self.dp_index = distributed.mesh_shape(self.mesh)[0], distributed.dp_rank(self.mesh)
        self.model, self.cfg = model, cfg
        self.device = model.device
        model.set_gradient_checkpointing(gradient_checkpointing)
        if seed_rng:
            torch.manual_seed(cfg.seed + self.dp_index)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one pass over each parameter, its gradient and moments instead of foreach's ~8 (the 125m
        # update took 0.5 s instead of 1.2 s on 2 CPU cores); a split model's DTensors take foreach's.
        # The fused kernel walks each tensor as one flat block, and the backward's products give each weight
        # gradient row-major: every parameter gets row-major storage of its own (nn.Linear's). The decoding
        # layout (opt_torch.fast_paths: transposed weights; then also q/k/v column blocks of one matrix) made
        # autograd copy 73 gradients into it per update, 0.3-0.5 s of a 125m bf16 update. Decoding packs again
        # (pack_weights).
        self.fused = self.mesh is None
        if self.fused:
            with torch.no_grad():
                for p in self.params:
                    if not p.is_contiguous():
                        p.data = p.data.contiguous()
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=learning_rate(0, cfg),
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                           weight_decay=cfg.weight_decay, fused=self.fused or None)
        self.scheduler = SpecSchedule(self.optimizer, cfg)
        self.step = 0
        self.compiled = (fast_paths.CompiledForward(model) if fast_paths.wants_compile(
            model, compile, self.mesh is not None, gradient_checkpointing) else None)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, task: str, cfg: TrainConfig, config=None,
                        gradient_checkpointing: bool = False, device: str = "cpu", device_mesh=None,
                        compile: bool | None = None) -> "Trainer":
        model_cls = MODEL_CLASSES[task_head(task)]
        model = model_cls.from_pretrained(model_dir, config=config, device=device, device_mesh=device_mesh)
        return cls(model, cfg, task, gradient_checkpointing, device_mesh=device_mesh, compile=compile)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, cfg: TrainConfig | None = None,
                        gradient_checkpointing: bool = False, device: str = "cpu", device_mesh=None,
                        compile: bool | None = None) -> "Trainer":
        """A trainer that continues exactly where `save_checkpoint(directory)` left off, on this mesh or
        on one process, whatever the mesh that saved it."""
        state, path = _read_state(directory)
        task, step, saved = spec_training.resume_info(state, path, directory, cfg)
        model = MODEL_CLASSES[task_head(task)].from_pretrained(directory, device=device, device_mesh=device_mesh)
        trainer = cls(model, saved, task, gradient_checkpointing, seed_rng=False, device_mesh=device_mesh,
                      compile=compile)
        trainer._load_state(state, step, directory, path)
        return trainer

    # ----------------------------------------------------------------------------------- training
    def _autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, batch: Mapping[str, np.ndarray], train: bool = False):
        # A batch without padding (packed causal-LM blocks) needs no mask: plain causal attention
        # lets SDPA pick its fastest kernels; the result is the same.
        padded = not np.asarray(batch["attention_mask"]).all()
        keys = ("input_ids", "attention_mask") if padded else ("input_ids",)
        inputs = _to_torch(batch, (*keys, *TASK_INPUTS[self.task]), self.device)
        model = self.compiled if train and self.compiled is not None else self.model
        with self._autocast():
            return model(**inputs, use_cache=False)

    def train_step(self, micro_batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """One update from `gradient_accumulation_steps` micro-batches (a dict is one micro-batch).
        Returns the mean micro-batch loss, the rate used, the global gradient norm before clipping,
        and the number of real tokens."""
        micro_batches = micro_batch_list(micro_batches, self.cfg)

        def gradients():
            self.optimizer.zero_grad(set_to_none=True)
            return self.backward(micro_batches)

        first = self.compiled is not None and self.compiled.seconds is None and self.compiled.active
        loss, tokens = self.compiled.run_first(gradients) if self.compiled is not None else gradients()
        # a layout changed under the trainer (.to(), pack_weights) takes foreach's path
        fused = self.fused and _fusable(self.optimizer)
        if self.fused:
            for group in self.optimizer.param_groups:
                group["fused"] = fused or None
        # The fused kernel clips too: it divides each gradient by grad_scale = 1 / clip scale in its one pass
        # (storing the clipped gradient) instead of a pass of its own (0.3-0.5 s of a 125m update, 2 cores);
        # a division by the reciprocal, within one rounding of the multiplication.
        norm, scale = clip_gradients(self.params, self.cfg.max_grad_norm, multiply=not fused)
        self.optimizer.grad_scale = scale.reciprocal().float() if fused and self.cfg.max_grad_norm is not None else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        out = {"loss": loss, "learning_rate": lr, "grad_norm": float(norm), "tokens": tokens}
        if first and self.compiled.seconds is not None:
            out["compile_s"] = self.compiled.seconds  # this update's forward and backward, compiling included
        return out

    def backward(self, micro_batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, int]:
        """Adds one update's gradients to the parameters' .grad (each micro-batch's mean loss divided by
        their number) and returns the mean micro-batch loss and the number of real tokens. Under a mesh
        each rank takes its rows of every (global) micro-batch, weighted by their share of its loss."""
        n = len(micro_batches)
        self.model.train()
        losses, tokens = [], 0
        for i, batch in enumerate(micro_batches):
            rows, share = self._rows(batch)
            if self.dp > 1 and n > 1:  # FSDP2 reduces the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == n - 1)
            with warnings.catch_warnings():  # also where a caller's catch_warnings dropped parallelize's filter
                warnings.filterwarnings("ignore", message=VIEW_WARNING)
                out = self._forward(rows, train=True)
            loss = out.loss
            if share == 0:  # no labelled token among this rank's rows: it still joins FSDP2's collectives
                loss = out.logits.sum() * 0.0
            weight = share * self.dp  # FSDP2 averages over dp: each rank's part of the whole batch's mean
            ((loss if weight == 1 else loss * weight) / n).backward()
            losses.append(loss.detach() * share if self.dp > 1 else loss.detach())  # summed over dp below
            tokens += int(np.asarray(batch["attention_mask"]).sum())
        total = torch.stack(losses)
        if self.dp > 1:
            torch.distributed.all_reduce(total, group=self.mesh.get_group("dp"))
        loss_values = total.cpu().tolist()  # the one host sync of a step
        return sum(loss_values) / n, tokens

    def _rows(self, batch: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], float]:
        """This rank's rows of a global micro-batch and their share of its loss_count. Without a mesh, or
        when dp does not divide the batch (opt_spec.parallel.batch_axis: every rank takes it whole,
        exact but less parallel), the whole batch with share 1 / dp."""
        B = len(np.asarray(batch["attention_mask"]))
        if self.dp == 1 or batch_axis(B, self.dp) is None:
            return batch, 1.0 / self.dp
        k = B // self.dp
        rows = {key: np.asarray(v)[self.dp_index * k:(self.dp_index + 1) * k] for key, v in batch.items()}
        total = loss_count(self.task, batch)
        return rows, (loss_count(self.task, rows) / total if total else 1.0 / self.dp)

    # --------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, dataset: spec_data.Dataset, batch_size: int = 8) -> dict[str, float]:
        """See opt_spec.training.evaluate."""
        self.model.eval()
        return spec_training.evaluate(self.task, dataset, batch_size, self._eval_outputs)

    def _eval_outputs(self, batch) -> dict:
        out = self._forward(batch)
        return {"loss": out.loss.item(),
                **{k: getattr(out, k).float().cpu().numpy() for k in spec_training.EVAL_OUTPUTS[self.task]}}

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike) -> str:
        """The Hugging Face directory plus trainer_state.pt (optimizer, schedule, RNG, step); under a mesh
        every rank calls it, and the optimizer state goes to trainer_state.dcp/."""
        directory = os.fspath(directory)
        if self.mesh is not None:
            return self._save_split(directory)
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        state = {"step": self.step, "task": self.task, "train_config": dataclasses.asdict(self.cfg),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        path = os.path.join(directory, STATE_FILE)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        return directory

    def _save_split(self, directory: str) -> str:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        writer = dist.get_rank() == 0
        self.model.save_pretrained(directory)  # whole tensors, rank 0 writes (a collective)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)  # this rank's shards, by parameter name
        final = os.path.join(directory, DCP_DIR)
        tmp = final + ".tmp"
        if writer and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save({"optimizer": optimizer}, checkpoint_id=tmp)  # one file per rank, then the metadata
        rngs = [None] * dist.get_world_size()  # each dp rank's dropout generator (a tp group shares one)
        dist.all_gather_object(rngs, (self.dp_index, torch.get_rng_state()))
        by_dp = dict(rngs)
        if writer:
            if os.path.isdir(final):  # the earlier save is removed only once the new one is complete
                shutil.rmtree(final)
            os.replace(tmp, final)
            state = {"step": self.step, "task": self.task, "train_config": dataclasses.asdict(self.cfg),
                     "optimizer_dcp": DCP_DIR, "scheduler": self.scheduler.state_dict(),
                     "rng_cpu": by_dp[0], "rng_cpu_dp": [by_dp[i] for i in range(self.dp)],
                     "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            path = os.path.join(directory, STATE_FILE)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
        return directory

    def _load_state(self, state: Mapping, step: int, directory: str | os.PathLike, path: str) -> None:
        """The optimizer, schedule and RNG state of trainer_state.pt (`state`, at update `step`), each checked
        against this trainer's own first: the file may come from anyone."""
        own = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        if "optimizer_dcp" in state:
            self._load_dcp_optimizer(directory, state["optimizer_dcp"])
            counts = [self.optimizer.state[p].get("step") for g in self.optimizer.param_groups for p in g["params"]
                      if p in self.optimizer.state]
            if not all(_update_count(c, step) for c in counts):
                raise CheckpointError(f"{path}: optimizer_dcp holds AdamW state whose step counters are not counts "
                                      f"of updates in [1, {step}] (the checkpoint's step {step})")
        elif self.mesh is not None:
            raise ValueError(f"{directory}: a single-process checkpoint; resume it without device_mesh (a split "
                             "trainer reads the optimizer state that split trainers save, trainer_state.dcp)")
        else:
            self._check_optimizer_state(state.get("optimizer"), step, f"{path}: optimizer")
            self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, own):  # loading takes the file's betas, eps,
            params = group["params"]  # weight decay and flags: this TrainConfig's are put back
            group.clear()
            group.update(settings, params=params)
        # the schedule is a function of the step (opt_spec.training.learning_rate): the file's own copy is not read
        self.scheduler.load_state_dict({"last_epoch": step, "_last_lr": [learning_rate(step, self.cfg)] *
                                        len(self.optimizer.param_groups)})
        self.step = step
        rngs, cuda = state.get("rng_cpu_dp"), state.get("rng_cuda")  # rng_cpu_dp: each dp rank's, of a split save
        for key, value in (("rng_cpu_dp", rngs), ("rng_cuda", cuda)):
            if value is not None and not isinstance(value, (list, tuple)):  # a tensor's truth value is an error
                raise CheckpointError(f"{path}: {key} is not a list of generator states")
        rngs = rngs or [state.get("rng_cpu")]
        own = torch.get_rng_state()
        for i, rng in enumerate(rngs):
            if not (isinstance(rng, torch.Tensor) and rng.dtype == own.dtype and rng.shape == own.shape):
                raise CheckpointError(f"{path}: rng_cpu[{i}] is not a CPU generator state ({own.numel()} bytes)")
        if self.dp_index < len(rngs):
            torch.set_rng_state(rngs[self.dp_index])
        else:  # a dp rank the saving run did not have: fresh dropout
            torch.manual_seed(self.cfg.seed + self.dp_index)
        if cuda and torch.cuda.is_available():
            try:
                torch.cuda.set_rng_state_all(cuda)
            except (RuntimeError, TypeError) as err:
                raise CheckpointError(f"{path}: rng_cuda is not this machine's CUDA generator states ({err})") from None

    def _check_optimizer_state(self, saved, step: int, where: str) -> None:
        """What AdamW would hold after `step` updates of this trainer, or a CheckpointError naming the entry:
        its groups over the same numbers of parameters (their settings are this TrainConfig's, put back after
        loading), and for each parameter it holds state of (those that had a gradient) both moments of its shape
        and dtype (torch would broadcast a (1,) moment without a word) and a step counter (_update_count)."""
        mine = self.optimizer.state_dict()["param_groups"]
        groups, entries = (saved.get("param_groups"), saved.get("state")) if isinstance(saved, Mapping) else (0, 0)
        if not isinstance(groups, list) or not isinstance(entries, Mapping) or len(groups) != len(mine) or not all(
                isinstance(g, Mapping) and isinstance(g.get("params"), list) and len(g["params"]) == len(w["params"])
                for g, w in zip(groups, mine)):
            raise CheckpointError(f"{where}: not this trainer's AdamW state ({len(mine)} param_groups of "
                                  f"{[len(w['params']) for w in mine]} parameters, and a state map)")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        if not all(isinstance(i, int) and 0 <= i < len(params) for i in entries):
            raise CheckpointError(f"{where}: holds the state of parameters this trainer does not have (it has "
                                  f"{len(params)}, numbered from 0)")
        for i, entry in entries.items():
            p = params[i]
            if not isinstance(entry, Mapping) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
                raise CheckpointError(f"{where}: state[{i}] is not AdamW's (step, exp_avg, exp_avg_sq)")
            for key in ("exp_avg", "exp_avg_sq"):
                t = entry[key]
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                    got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise CheckpointError(f"{where}: state[{i}][{key!r}] is {got}; its parameter is "
                                          f"{tuple(p.shape)} {p.dtype}")
            count = entry["step"]
            if not _update_count(count, step):
                raise CheckpointError(f"{where}: state[{i}]['step'] is {count!r:.60}, not a count of updates in "
                                      f"[1, {step}] (the checkpoint's step {step})")

    def _load_dcp_optimizer(self, directory, name: str) -> None:
        """The optimizer state of a split trainer's checkpoint, resharded onto this trainer's mesh (or
        gathered whole onto one process): DCP reads each rank's blocks of the saved shards."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from .distributed import dcp_load

        # the name and the folder come from the file: a plain folder inside the checkpoint, no symlinks, and no
        # more bytes than twice the whole optimizer state (the moments are twice the parameters) + DCP's metadata
        moments = 2 * sum(p.numel() * 4 for p in self.params)  # of the whole (global) float32 parameters
        path = spec_io.state_folder(directory, name, spec_io.state_folder_limit(moments),
                                    f"{STATE_FILE}: optimizer_dcp")
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)  # the layout to fill: this run's shards
        dcp_load({"optimizer": optimizer}, path, single_process=self.mesh is None)  # runs no code from the files
        set_optimizer_state_dict(self.model, self.optimizer, optimizer)


def _update_count(count, step: int) -> bool:
    """Whether `count` is an AdamW step counter of a trainer `step` updates in: a one-element tensor holding an
    int in [1, step] (it decides the bias correction). Below `step` for a parameter without a gradient in some
    updates (LayerDrop skipped its layer): AdamW left it alone then, counter included."""
    if not (isinstance(count, torch.Tensor) and count.numel() == 1):
        return False
    value = float(_local(count).item())
    return value.is_integer() and 1 <= value <= step


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly distributed) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _read_state(directory) -> tuple[dict, str]:
    """(trainer_state.pt's dict, its path)."""
    if not os.path.lexists(os.path.join(os.fspath(directory), STATE_FILE)):
        raise FileNotFoundError(f"{directory} is not a training checkpoint: no {STATE_FILE}")
    path = spec_io.checkpoint_file(directory, STATE_FILE)  # inside the folder, a regular file
    # A checkpoint may come from anyone. torch.load(weights_only=True) runs no code, but it inflates a
    # compressed record whole and trusts the records' sizes: the spec's reader checks the zip, the pickle
    # and every storage record first (CheckpointError naming the record), then torch reads what passed.
    TorchZipReader(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
