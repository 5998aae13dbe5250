"""Fine-tuning in JAX/Flax, following opt_spec.training (the definitions every backend shares).

- An optax chain evaluating the spec exactly, `adamw(cfg, mask)`:
    clip_by_global_norm_spec   g * min(1, max_grad_norm / (norm + 1e-6)), the spec's formula (optax's
                               own clip_by_global_norm divides by the norm itself and only above it)
    scale_by_adam              m_hat / (sqrt(v_hat) + eps), bias corrected at update count t
    add_decayed_weights        + weight_decay * p, masked by the spec's `applies_weight_decay`
    scale_by_learning_rate     * -learning_rate(count, cfg): a float32 table of the spec's rates
                               indexed by the update count, so every rate equals the spec's exactly
- Gradient accumulation: the gradients of the micro-batches of one `train_step` are summed and
  divided by their number before the chain (clipping included) runs once; the schedule counts updates.
- bf16 mixed precision: the module computes in bfloat16 (`dtype`), parameters, optimizer state and
  losses stay float32; the attention softmax and the loss are float32 in any case.
- Lookups of the pad token pass no gradient to its embedding row (torch's padding_idx), as in every
  backend's model.
- Dropout draws from an explicit key (`self.rng`) split once per micro-batch inside the jitted step;
  it is saved with every checkpoint, so a resumed run draws the same masks.

A checkpoint is one folder: the Hugging Face directory (config.json, model.safetensors) plus
`trainer_state.msgpack` (optimizer state, dropout key, step; flax.serialization) and
`trainer_state.json` (task, step, TrainConfig), the same surface as opt_torch.training.Trainer:
`FlaxTrainer.from_pretrained(dir, task, cfg)`, `FlaxTrainer.from_checkpoint(dir, cfg)`, `.step`,
`.train_step(micro_batches)`, `.evaluate(dataset, batch_size)`, `.save_checkpoint(dir)`.

On many devices (`FlaxTrainer(model, cfg, mesh=mesh)`, or any of the constructors with mesh=): the
parameters, gradients and Adam moments are split by opt_spec.parallel's table, batches over fsdp,
and every step is a jit with explicit shardings (opt_flax.distributed). Such a trainer saves its
optimizer state with Orbax (`trainer_state.orbax/`, each device writing its blocks) instead of
msgpack; either kind of checkpoint resumes on any mesh or on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from opt_spec import Head
from opt_spec.errors import CheckpointError
from opt_spec import data as spec_data
from opt_spec import io as spec_io
from opt_spec.inputs import check_token_ids
from opt_spec.layouts import native_path
from opt_spec import training as spec_training
from opt_spec.training import (CLIP_EPS, TASK_HEADS, TASK_INPUTS, TrainConfig, applies_weight_decay, learning_rate,
                               micro_batch_list, task_head)

from . import fast_paths
from .modeling import MODULE_CLASSES, Numerics
from .pretrained import MODEL_CLASSES, _params_table

CONVENTION = "flax"
STATE_FILE = "trainer_state.msgpack"
STATE_DIR = "trainer_state.orbax"  # the optimizer state of a trainer on a mesh (opt_flax.distributed)
INFO_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------ the optimizer
def decay_mask(config, head: Head | str) -> dict:
    """A tree shaped like the parameters: True where the spec decays the weight (linear weights,
    embeddings), False for biases and LayerNorm parameters."""
    mask: dict = {}
    for spec in _params_table(config, Head(head)):
        *scopes, leaf = native_path(spec, CONVENTION)
        node = mask
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = applies_weight_decay(spec.kind)
    return mask


def schedule_table(cfg: TrainConfig) -> np.ndarray:
    """float32 rates for update counts 0 .. total_steps + 1; every later count has the last rate
    (past total_steps + 1 the decay's progress is >= 1 whatever the warm-up)."""
    return np.asarray([learning_rate(step, cfg) for step in range(cfg.total_steps + 2)], dtype=np.float32)


def spec_schedule(cfg: TrainConfig):
    """An optax schedule: update count -> float32(opt_spec.training.learning_rate(count, cfg))."""
    table = jnp.asarray(schedule_table(cfg))

    def schedule(count):
        return table[jnp.minimum(count, cfg.total_steps + 1)]

    return schedule


class ClipState(NamedTuple):
    global_norm: jax.Array  # the norm of the last gradients seen, before clipping (float32)


def clip_by_global_norm_spec(max_grad_norm: float | None) -> optax.GradientTransformation:
    """Every gradient times opt_spec.training.clip_scale(global norm, max_grad_norm), norm in float32."""

    def init(params):
        del params
        return ClipState(global_norm=jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(updates)))
        if max_grad_norm is not None:
            scale = jnp.minimum(1.0, max_grad_norm / (norm + CLIP_EPS))
            updates = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates)
        return updates, ClipState(global_norm=norm)

    return optax.GradientTransformation(init, update)


def adamw(cfg: TrainConfig, mask) -> optax.GradientTransformation:
    """opt_spec.training's AdamW: p -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p) after clipping."""
    return optax.chain(
        clip_by_global_norm_spec(cfg.max_grad_norm),
        optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, eps_root=0.0),
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(spec_schedule(cfg)),
    )


# ------------------------------------------------------------------------------------------ helpers
def _as_jax(batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, jax.Array]:
    """NumPy batch -> JAX arrays (opt_spec.data.select_inputs' dtypes)."""
    return {key: jnp.asarray(value) for key, value in spec_data.select_inputs(batch, keys).items()}


class StepFunctions(NamedTuple):
    """The jitted pieces of training one model with one TrainConfig (shared by equal trainers)."""

    module: Any
    tx: optax.GradientTransformation
    loss: Any      # (params, batch, dropout key) -> loss (not jitted)
    grad: Any      # (params, batch, rng) -> (loss, grads, rng)
    apply: Any     # (params, opt_state, grad_sum, n) -> (params, opt_state, global norm)
    fused: Any     # (params, opt_state, batch, rng) -> (params, opt_state, rng, loss, global norm)
    forward: Any   # (params, batch) -> model output, dropout off
    gradients: Any = None  # (params, batch) -> (loss, grads), dropout off


_STEP_FUNCTIONS: dict = {}  # insertion-ordered: the oldest entry goes first when it is full
_MAX_STEP_FUNCTIONS = 8


def step_functions(head: Head, config, dtype, precision, cfg: TrainConfig, sharding=None,
                   remat: bool = False) -> StepFunctions:
    """Built once per (head, config, compute dtype, precision, cfg, mesh), so that trainers of the same
    model and settings (a resumed one, one per evaluation) reuse the compiled programs. With a
    sharding (opt_flax.distributed.MeshPlan) every program is jitted with explicit shardings."""
    key = (Head(head), config, jnp.dtype(dtype).name, precision, cfg, sharding.key if sharding is not None else None,
           remat)
    if key in _STEP_FUNCTIONS:
        return _STEP_FUNCTIONS[key]
    module = MODULE_CLASSES[Head(head)](config, numerics=Numerics(dtype, jnp.float32, precision), remat=remat)
    tx = adamw(cfg, decay_mask(config, head))
    cpu = sharding is None and fast_paths.enabled()  # XLA CPU rewrites (opt_flax.fast_paths): the same math
    lm_loss = cpu and Head(head) == Head.CAUSAL_LM  # the same loss in fewer passes (opt_flax.fast_paths)

    def loss(params, batch, key):
        with fast_paths.materialized_layers(cpu):
            if lm_loss and "labels" in batch:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = module.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": key}).logits
                return fast_paths.causal_lm_loss(logits, batch["labels"])
            return module.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": key}).loss

    tied = lm_loss and config.tie_word_embeddings  # the lookup's gradient added into the head's (fast_paths)
    value_and_grad = fast_paths.value_and_grad_lookup_into_head(loss, dtype) if tied else jax.value_and_grad(loss)

    def grad(params, batch, rng):
        rng, key = jax.random.split(rng)
        value, grads = value_and_grad(params, batch, key)
        return value, grads, rng

    def apply(params, opt_state, grad_sum, n: int):
        grads = grad_sum if n == 1 else jax.tree_util.tree_map(lambda g: g / n, grad_sum)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, opt_state[0].global_norm

    def fused(params, opt_state, batch, rng):
        value, grads, rng = grad(params, batch, rng)
        params, opt_state, norm = apply(params, opt_state, grads, 1)
        return params, opt_state, rng, value, norm

    def forward(params, batch):
        with fast_paths.materialized_layers(cpu):
            return module.apply({"params": params}, **batch, deterministic=True)

    def gradients(params, batch):
        return jax.value_and_grad(lambda p: forward(p, batch).loss)(params)

    if sharding is None:
        # bf16 on the CPU: every bf16 product and sum accumulates in float32 (the fast kernels; opt_flax.fast_paths)
        fast = fast_paths.f32_accumulated if cpu and jnp.dtype(dtype) == jnp.bfloat16 else (lambda f: f)
        # Parameters and optimizer state are updated in place (donated; the CPU too: no fresh 3 x 125m
        # buffers to allocate and fault in every step). The trainer owns its copies (FlaxTrainer.__init__).
        fns = StepFunctions(module, tx, loss, jax.jit(fast(grad)),
                            jax.jit(apply, static_argnums=3, donate_argnums=(0, 1)),
                            jax.jit(fast(fused), donate_argnums=(0, 1)), jax.jit(fast(forward)),
                            jax.jit(fast(gradients)))
    else:
        donate = (0, 1) if jax.default_backend() != "cpu" else ()
        from .distributed import step_functions as sharded_step_functions

        fns = StepFunctions(module, tx, loss, **sharded_step_functions(sharding, tx, grad, apply, fused, forward,
                                                                       gradients, donate))
    if len(_STEP_FUNCTIONS) >= _MAX_STEP_FUNCTIONS:
        del _STEP_FUNCTIONS[next(iter(_STEP_FUNCTIONS))]
    _STEP_FUNCTIONS[key] = fns
    return fns


@functools.partial(jax.jit, donate_argnums=0)
def _tree_add(a, b):
    """a + b, summed into a's buffers (a is the running sum of micro-batch gradients)."""
    return jax.tree_util.tree_map(jnp.add, a, b)


# ------------------------------------------------------------------------------------------ trainer
class FlaxTrainer:
    """AdamW fine-tuning of one Flax OPT model with a jitted train step (see the module docstring).

    `model.params` always holds the current parameters, so `model.save_pretrained` and calling the
    model work at any point.
    """

    def __init__(self, model, cfg: TrainConfig, task: str | None = None, mesh=None):
        self.task = task or next((t for t, h in TASK_HEADS.items() if h == model.head), None)
        if self.task is None or task_head(self.task) != model.head:
            raise ValueError(f"task {self.task} needs a model with a head; got {type(model).__name__}")
        bad = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(model.params) if leaf.dtype != jnp.float32}
        if bad:
            raise ValueError(f"train float32 parameters (bf16 mixed precision keeps float32 master weights); "
                             f"the model holds {', '.join(sorted(bad))}")
        if mesh is not None and (model.sharding is None or model.sharding.mesh != mesh):
            from .distributed import shard_model

            shard_model(model, mesh)
        self.sharding = model.sharding  # None on one device
        self.model, self.cfg = model, cfg
        head = model.head
        if cfg.mixed_precision == "bf16":
            compute, precision = jnp.bfloat16, None
        else:
            compute, precision = model.dtype, model.precision
        # gradient checkpointing as the model has it (model.gradient_checkpointing_enable(): nn.remat per layer)
        self.fns = step_functions(head, model.config, compute, precision, cfg, self.sharding, model.module.remat)
        self.module, self.tx = self.fns.module, self.fns.tx
        self.params = jax.tree_util.tree_map(jnp.asarray, model.params)
        self.rng = jax.random.PRNGKey(cfg.seed)
        if self.sharding is None:
            # the steps donate (update in place) the trainer's parameters: its own copies, so that arrays
            # the caller still holds (the model's, say) stay valid; the model then holds the trainer's
            self.params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), self.params)
            self.model.params = self.params
            self.opt_state = self.tx.init(self.params)
        else:
            sh = self.sharding
            self.opt_state = sh.jit(self.tx.init, (sh.params(),), sh.opt_state(self.tx))(self.params)
            self.rng = sh.put(self.rng, sh.replicated)
        self.step = 0
        self._keys = ("input_ids", "attention_mask", *TASK_INPUTS[self.task])

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, task: str, cfg: TrainConfig, config=None,
                        mesh=None, gradient_checkpointing: bool = False) -> "FlaxTrainer":
        model = MODEL_CLASSES[task_head(task)].from_pretrained(model_dir, config=config, mesh=mesh)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return cls(model, cfg, task)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, cfg: TrainConfig | None = None, mesh=None,
                        gradient_checkpointing: bool = False) -> "FlaxTrainer":
        """A trainer that continues exactly where `save_checkpoint(directory)` left off, on `mesh` (None:
        one device) whatever the mesh it was saved from."""
        info, info_path = spec_training.read_trainer_info(directory, "flax", INFO_FILE, (STATE_FILE, STATE_DIR))
        task, step, saved = spec_training.resume_info(info, info_path, directory, cfg)
        model = MODEL_CLASSES[task_head(task)].from_pretrained(directory, mesh=mesh)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainer = cls(model, saved, task)
        if info.get("state") == "orbax":
            trainer._restore_orbax(directory)
            trainer.step = step
            _check_counts(trainer.opt_state, step, f"{directory}: {STATE_DIR}")
            return trainer
        path = spec_io.checkpoint_file(directory, STATE_FILE)
        state = read_state_file(path, trainer._state_template())
        _check_counts(state["opt_state"], step, path)
        trainer.opt_state = state["opt_state"]
        trainer.rng = jnp.asarray(state["rng"], jnp.uint32)
        if trainer.sharding is not None:  # a one-device checkpoint resumed on a mesh
            sh = trainer.sharding
            trainer.opt_state = jax.tree_util.tree_map(sh.put, trainer.opt_state, sh.opt_state(trainer.tx))
            trainer.rng = sh.put(trainer.rng, sh.replicated)
        trainer.step = int(state["step"])
        if trainer.step != step:
            raise CheckpointError(f"{directory}: {STATE_FILE} is at step {trainer.step}, {INFO_FILE} at {step}")
        return trainer

    resume = from_checkpoint

    def _restore_orbax(self, directory) -> None:
        from .distributed import restore_state

        if self.sharding is not None:
            shardings, rng_sharding = self.sharding.opt_state(self.tx), self.sharding.replicated
        else:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings, rng_sharding = jax.tree_util.tree_map(lambda _: device, self.opt_state), device
        # the folder may come from anyone: no symlinks, no more bytes than twice this state (+ Orbax's metadata)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.opt_state))
        path = spec_io.state_folder(directory, STATE_DIR, spec_io.state_folder_limit(nbytes))
        self.opt_state, self.rng = restore_state(path, self.opt_state, shardings, rng_sharding)

    def _inputs(self, batch: Mapping[str, np.ndarray], process_local: bool = False) -> dict:
        """A batch as JAX arrays; on a mesh split over fsdp (process_local: this process's rows of the
        global batch, else the whole batch on every process)."""
        # on the host first: an embedding lookup past the table gives NaN under XLA, and training would go on
        check_token_ids(batch["input_ids"], self.model.config.vocab_size)
        if self.sharding is None:
            return _as_jax(batch, self._keys)
        return {k: self.sharding.put_batch(v, process_local)
                for k, v in spec_data.select_inputs(batch, self._keys).items()}

    def _host(self, x) -> np.ndarray:
        return np.asarray(x) if self.sharding is None else self.sharding.gather(x)

    # ----------------------------------------------------------------------------------- training
    def train_step(self, micro_batches: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray]) -> dict:
        """One update from `gradient_accumulation_steps` micro-batches (a dict is one micro-batch).
        Returns the mean micro-batch loss, the rate used, the global gradient norm before clipping,
        and the number of real tokens."""
        micro_batches = micro_batch_list(micro_batches, self.cfg)
        n = len(micro_batches)
        batches = [self._inputs(b, process_local=True) for b in micro_batches]
        tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in micro_batches)
        if jax.process_count() > 1:  # every process's rows
            from jax.experimental import multihost_utils

            tokens = int(np.sum(multihost_utils.process_allgather(np.int64(tokens))))
        lr = learning_rate(self.step, self.cfg)
        fns = self.fns
        if n == 1:
            self.params, self.opt_state, self.rng, loss, norm = fns.fused(self.params, self.opt_state, batches[0],
                                                                          self.rng)
            losses = [loss]
        else:
            losses, acc = [], None
            for batch in batches:  # the sum of the micro-batch gradients, divided by n in `apply`
                loss, grads, self.rng = fns.grad(self.params, batch, self.rng)
                acc = grads if acc is None else _tree_add(acc, grads)
                losses.append(loss)
            self.params, self.opt_state, norm = fns.apply(self.params, self.opt_state, acc, n)
        self.step += 1
        self.model.params = self.params
        return {"loss": float(np.mean([float(x) for x in losses])), "learning_rate": lr,
                "grad_norm": float(norm), "tokens": tokens}

    def gradients(self, batch: Mapping[str, np.ndarray]) -> tuple[float, dict]:
        """(loss, gradient tree) of one batch with dropout off, at the current parameters."""
        loss, grads = self.fns.gradients(self.params, self._inputs(batch))
        return float(self._host(loss)), grads

    # --------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: spec_data.Dataset, batch_size: int = 8) -> dict[str, float]:
        """See opt_spec.training.evaluate."""
        return spec_training.evaluate(self.task, dataset, batch_size, self._eval_outputs)

    def _eval_outputs(self, batch) -> dict:
        out = self.fns.forward(self.params, self._inputs(batch))
        return {"loss": float(self._host(out.loss)),
                **{k: self._host(getattr(out, k)).astype(np.float32) for k in spec_training.EVAL_OUTPUTS[self.task]}}

    # -------------------------------------------------------------------------------- checkpoints
    def _state_template(self) -> dict:
        return {"opt_state": self.tx.init(self.params), "rng": np.zeros((2,), np.uint32), "step": 0}

    def save_checkpoint(self, directory: str | os.PathLike) -> str:
        """The Hugging Face directory plus the optimizer state, dropout key and step (msgpack)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory, params=self.params)
        if self.sharding is not None:  # the optimizer state stays split: Orbax, every device its blocks
            from .distributed import save_state, sync_processes

            save_state(os.path.join(directory, STATE_DIR), self.opt_state, self.rng)
            info = {"backend": "flax", "task": self.task, "step": self.step, "state": "orbax",
                    "train_config": dataclasses.asdict(self.cfg)}
            if jax.process_index() == 0:
                _write_atomic(os.path.join(directory, INFO_FILE), json.dumps(info, indent=2).encode())
            sync_processes("trainer-checkpoint")  # every process returns once the checkpoint is complete
            return directory
        state = {"opt_state": jax.device_get(self.opt_state), "rng": np.asarray(self.rng), "step": self.step}
        _write_atomic(os.path.join(directory, STATE_FILE), flax.serialization.to_bytes(state))
        info = {"backend": "flax", "task": self.task, "step": self.step,
                "train_config": dataclasses.asdict(self.cfg)}
        _write_atomic(os.path.join(directory, INFO_FILE), json.dumps(info, indent=2).encode())
        return directory

    save = save_checkpoint


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def read_state_file(path: str, template: dict) -> dict:
    """The msgpack trainer state at `path` restored into `template`'s tree. The file may come from
    someone else, so: it may be at most a little larger than the template's arrays (it is read whole);
    msgpack's reader checks each length against the bytes given and bounds nesting by its stack; and
    what comes back must be the template's tree with its shapes and dtypes, leaf for leaf. Anything
    else is a CheckpointError naming the file (and the entry)."""
    leaves = jax.tree_util.tree_leaves_with_path(template)
    limit = 2 * sum(getattr(x, "nbytes", 8) for _, x in leaves) + 1024 * len(leaves) + (1 << 20)
    if os.path.getsize(path) > limit:
        raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, more than this trainer's state takes "
                              f"(at most {limit})")
    with open(path, "rb") as f:
        data = f.read()
    try:
        state = flax.serialization.from_bytes(template, data)
    except Exception as err:  # msgpack's and flax's refusals: truncated, too deep, not this tree
        raise CheckpointError(f"{path}: cannot be read as this trainer's state ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    got, tree = jax.tree_util.tree_flatten_with_path(state)
    if tree != jax.tree_util.tree_structure(template):
        raise CheckpointError(f"{path}: holds another tree than this trainer's state ({len(got)} leaves, "
                              f"expected {len(leaves)})")
    def dtype(x):  # of an array, a NumPy scalar or a Python number
        return np.dtype(getattr(x, "dtype", type(x)))

    for (keys, want), (_, value) in zip(leaves, got):
        if np.shape(value) != np.shape(want) or dtype(value) != dtype(want):
            raise CheckpointError(f"{path}: entry {jax.tree_util.keystr(keys)} is {np.shape(value)} {dtype(value)}, "
                                  f"expected {np.shape(want)} {dtype(want)}")
    return state


def _check_counts(opt_state, step: int, where: str) -> None:
    """Every update count in the optax state (Adam's bias correction, the schedule's index) must be the
    checkpoint's step: a count from a file decides the learning rate and Adam's correction of each update."""
    for keys, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if getattr(keys[-1], "name", None) != "count":
            continue
        count = int(np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf))  # replicated
        if count != step:
            raise CheckpointError(f"{where}: entry {jax.tree_util.keystr(keys)} is {count}, not the checkpoint's "
                                  f"step {step}")
