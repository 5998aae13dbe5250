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
"""

from __future__ import annotations

import dataclasses
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
from opt_spec.layouts import native_path
from opt_spec import training as spec_training
from opt_spec.training import (CLIP_EPS, TASK_HEADS, TASK_INPUTS, TrainConfig, applies_weight_decay, learning_rate,
                               micro_batch_list, task_head)

from .modeling import MODULE_CLASSES
from .pretrained import MODEL_CLASSES, _params_table

CONVENTION = "flax"
STATE_FILE = "trainer_state.msgpack"
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


_STEP_FUNCTIONS: dict = {}  # insertion-ordered: the oldest entry goes first when it is full
_MAX_STEP_FUNCTIONS = 8


def step_functions(head: Head, config, dtype, precision, cfg: TrainConfig) -> StepFunctions:
    """Built once per (head, config, compute dtype, precision, cfg), so that trainers of the same
    model and settings (a resumed one, one per evaluation) reuse the compiled programs."""
    key = (Head(head), config, jnp.dtype(dtype).name, precision, cfg)
    if key in _STEP_FUNCTIONS:
        return _STEP_FUNCTIONS[key]
    module = MODULE_CLASSES[Head(head)](config, dtype=dtype, param_dtype=jnp.float32, precision=precision)
    tx = adamw(cfg, decay_mask(config, head))

    def loss(params, batch, key):
        return module.apply({"params": params}, **batch, deterministic=False, rngs={"dropout": key}).loss

    def grad(params, batch, rng):
        rng, key = jax.random.split(rng)
        value, grads = jax.value_and_grad(loss)(params, batch, key)
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
        return module.apply({"params": params}, **batch, deterministic=True)

    # Parameters and optimizer state are updated in place on accelerators (CPUs cannot donate buffers).
    donate = (0, 1) if jax.default_backend() != "cpu" else ()
    fns = StepFunctions(module, tx, loss, jax.jit(grad), jax.jit(apply, static_argnums=3, donate_argnums=donate),
                        jax.jit(fused, donate_argnums=donate), jax.jit(forward))
    if len(_STEP_FUNCTIONS) >= _MAX_STEP_FUNCTIONS:
        del _STEP_FUNCTIONS[next(iter(_STEP_FUNCTIONS))]
    _STEP_FUNCTIONS[key] = fns
    return fns


@jax.jit
def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


# ------------------------------------------------------------------------------------------ trainer
class FlaxTrainer:
    """AdamW fine-tuning of one Flax OPT model with a jitted train step (see the module docstring).

    `model.params` always holds the current parameters, so `model.save_pretrained` and calling the
    model work at any point.
    """

    def __init__(self, model, cfg: TrainConfig, task: str | None = None):
        self.task = task or next((t for t, h in TASK_HEADS.items() if h == model.head), None)
        if self.task is None or task_head(self.task) != model.head:
            raise ValueError(f"task {self.task} needs a model with a head; got {type(model).__name__}")
        bad = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(model.params) if leaf.dtype != jnp.float32}
        if bad:
            raise ValueError(f"train float32 parameters (bf16 mixed precision keeps float32 master weights); "
                             f"the model holds {', '.join(sorted(bad))}")
        self.model, self.cfg = model, cfg
        head = model.head
        if cfg.mixed_precision == "bf16":
            compute, precision = jnp.bfloat16, None
        else:
            compute, precision = model.dtype, model.precision
        self.fns = step_functions(head, model.config, compute, precision, cfg)
        self.module, self.tx = self.fns.module, self.fns.tx
        self.params = jax.tree_util.tree_map(jnp.asarray, model.params)
        self.opt_state = self.tx.init(self.params)
        self.rng = jax.random.PRNGKey(cfg.seed)
        self.step = 0
        self._keys = ("input_ids", "attention_mask", *TASK_INPUTS[self.task])

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, task: str, cfg: TrainConfig, config=None) -> "FlaxTrainer":
        model = MODEL_CLASSES[task_head(task)].from_pretrained(model_dir, config=config)
        return cls(model, cfg, task)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, cfg: TrainConfig | None = None) -> "FlaxTrainer":
        """A trainer that continues exactly where `save_checkpoint(directory)` left off."""
        info = _read_info(directory)
        saved = TrainConfig(**info["train_config"])
        if cfg is not None and cfg != saved:
            changed = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)]
            raise ValueError(f"{directory}: the checkpoint was trained with different settings ({', '.join(changed)}); "
                             "resume with the same ones")
        model = MODEL_CLASSES[task_head(info["task"])].from_pretrained(directory)
        trainer = cls(model, saved, info["task"])
        state = read_state_file(os.path.join(os.fspath(directory), STATE_FILE), trainer._state_template())
        trainer.opt_state = state["opt_state"]
        trainer.rng = jnp.asarray(state["rng"], jnp.uint32)
        trainer.step = int(state["step"])
        if trainer.step != info["step"]:
            raise ValueError(f"{directory}: {STATE_FILE} is at step {trainer.step}, {INFO_FILE} at {info['step']}")
        return trainer

    resume = from_checkpoint

    # ----------------------------------------------------------------------------------- training
    def train_step(self, micro_batches: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray]) -> dict:
        """One update from `gradient_accumulation_steps` micro-batches (a dict is one micro-batch).
        Returns the mean micro-batch loss, the rate used, the global gradient norm before clipping,
        and the number of real tokens."""
        micro_batches = micro_batch_list(micro_batches, self.cfg)
        n = len(micro_batches)
        batches = [_as_jax(b, self._keys) for b in micro_batches]
        tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in micro_batches)
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
        inputs = _as_jax(batch, self._keys)

        def loss_fn(params):
            return self.module.apply({"params": params}, **inputs, deterministic=True).loss

        loss, grads = jax.value_and_grad(loss_fn)(self.params)
        return float(loss), grads

    # --------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: spec_data.Dataset, batch_size: int = 8) -> dict[str, float]:
        """See opt_spec.training.evaluate."""
        return spec_training.evaluate(self.task, dataset, batch_size, self._eval_outputs)

    def _eval_outputs(self, batch) -> dict:
        out = self.fns.forward(self.params, _as_jax(batch, self._keys))
        return {"loss": float(out.loss),
                **{k: np.asarray(getattr(out, k), np.float32) for k in spec_training.EVAL_OUTPUTS[self.task]}}

    # -------------------------------------------------------------------------------- checkpoints
    def _state_template(self) -> dict:
        return {"opt_state": self.tx.init(self.params), "rng": np.zeros((2,), np.uint32), "step": 0}

    def save_checkpoint(self, directory: str | os.PathLike) -> str:
        """The Hugging Face directory plus the optimizer state, dropout key and step (msgpack)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory, params=self.params)
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


def _read_info(directory) -> dict:
    directory = os.fspath(directory)
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, STATE_FILE)):
        raise FileNotFoundError(f"{directory} is not a Flax training checkpoint: no {INFO_FILE} / {STATE_FILE}")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("backend") != "flax":
        raise ValueError(f"{path}: written by the {info.get('backend')} backend, not flax")
    return info
