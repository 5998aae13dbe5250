"""What fine-tuning means, once for every backend: optimizer settings, the learning-rate schedule,
which weights decay, and how gradients are clipped and accumulated.

Each backend implements these natively (torch.optim.AdamW, an optax chain, Keras AdamW) and must
evaluate them identically; the plain-Python functions here are the definitions the tests compare with.

- AdamW (decoupled weight decay): for each weight p with gradient g at update t = 1, 2, ...:
  m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; m_hat = m / (1 - b1^t); v_hat = v / (1 - b2^t);
  p = p - lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p)   where wd = 0 for weights that do not decay.
- Learning rate: `learning_rate(step, cfg)` for the update that follows `step` updates (0 for the
  first): linear warm-up from 0 over warmup_steps, then linear or cosine decay to 0 at total_steps
  (or constant) — Hugging Face's schedules, so the first update of a warm-up has rate 0.
- Weight decay applies to linear weights and embeddings, never to biases or LayerNorm parameters.
- Gradient clipping by global norm (all gradients together, in float32):
  g = g * min(1, max_grad_norm / (norm + 1e-6)).
- Gradient accumulation: the gradients of `gradient_accumulation_steps` micro-batches are averaged
  (each micro-batch loss is a mean) before clipping and one update; the schedule counts updates.
- Mixed precision "bf16": forward and backward compute in bfloat16, weights, optimizer state, loss and
  softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np

from .errors import CheckpointError
from .inputs import check_seed
from .weights import Head, WeightKind

SCHEDULES = ("linear", "cosine", "constant")
CLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # None or "bf16"
    seed: int = 0

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r}: {why}")

        if not 0 < self.learning_rate < math.inf:  # nan and inf too: one update would make every weight nan
            fail("learning_rate", "must be a finite number > 0")
        if not 0 <= self.weight_decay < math.inf:
            fail("weight_decay", "must be a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        if not 0 < self.adam_epsilon < math.inf:
            fail("adam_epsilon", "must be a finite number > 0")
        check_seed(self.seed, "TrainConfig.seed")
        for name in ("warmup_steps", "total_steps", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(name, "must be a non-negative int")
        if self.total_steps < 1:
            fail("total_steps", "must be at least 1")
        if self.gradient_accumulation_steps < 1:
            fail("gradient_accumulation_steps", "must be at least 1")
        if self.warmup_steps > self.total_steps:
            fail("warmup_steps", f"is more than total_steps={self.total_steps}")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {SCHEDULES}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            fail("max_grad_norm", "must be > 0 or None")
        if self.mixed_precision not in (None, "bf16"):
            fail("mixed_precision", "must be None or 'bf16'")


class ResumeMismatchError(ValueError):
    """A trainer checkpoint resumed with other settings than it was trained with: the run would not
    continue the saved one (another schedule, optimizer or seed). The caller's mistake, not the file's."""


def resume_config(directory, saved: object, cfg: TrainConfig | None) -> TrainConfig:
    """The settings a resumed trainer continues with: `saved`, the train_config dict its checkpoint in
    `directory` holds (refused with a CheckpointError naming the folder unless it makes a TrainConfig);
    `cfg`, when given, must equal it (ResumeMismatchError naming each setting that differs). Every
    backend's from_checkpoint calls this."""
    try:
        if not isinstance(saved, dict):
            raise TypeError(f"a {type(saved).__name__}, not a mapping")
        saved = TrainConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory}: the saved train_config is not valid ({err})") from None
    if cfg is not None and cfg != saved:
        fields = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)]
        changed = [f"{name}: {getattr(saved, name)!r} saved, {getattr(cfg, name)!r} given" for name in fields]
        err = ResumeMismatchError(f"{directory}: the checkpoint was trained with different settings "
                                  f"({'; '.join(changed)}); resume with the same ones")
        err.fields = fields
        raise err
    return saved


MAX_STEP = 2**31 - 1  # optax counts updates in an int32; no run comes near it
TRAINER_STATE_KEYS = ("task", "step", "train_config")


def read_trainer_info(directory, backend: str, info_file: str, state: tuple[str, ...]) -> tuple[dict, str]:
    """(info_file's object, its path) of a training checkpoint the TF or Flax trainer wrote: the file and
    one of `state` (the backend's optimizer state, a file or a folder) must be there, the file is read by
    the checkpoint rules (inside the folder, bounded JSON: it may come from anyone) and must name `backend`."""
    import os

    from .io import checkpoint_file, json_object

    directory = os.fspath(directory)
    if not os.path.lexists(os.path.join(directory, info_file)) or \
            not any(os.path.lexists(os.path.join(directory, name)) for name in state):
        framework = {"tf": "TensorFlow", "flax": "Flax"}.get(backend, backend)
        raise FileNotFoundError(f"{directory} is not a {framework} training checkpoint: no {info_file} / "
                                f"{' or '.join(state)}")
    path = checkpoint_file(directory, info_file)
    info = json_object(path)
    if info.get("backend") != backend:
        raise CheckpointError(f"{path}: written by the {info.get('backend')!r:.40} backend, not {backend}")
    return info, path


def resume_info(info, where: str, directory, cfg: TrainConfig | None) -> tuple[str, int, TrainConfig]:
    """(task, step, TrainConfig) of what a trainer checkpoint in `directory` states about itself in the file
    `where` (trainer_state.json, trainer_state.pt), checked once for every backend because the file may come
    from anyone: a known task, a step that is an int in [0, MAX_STEP] (a negative one would give the warm-up
    a negative learning rate), and its train_config through resume_config (equal to `cfg` when given).
    CheckpointError naming `where` and the entry."""
    if not isinstance(info, Mapping) or any(k not in info for k in TRAINER_STATE_KEYS):
        raise CheckpointError(f"{where}: not a trainer state (needs {', '.join(TRAINER_STATE_KEYS)})")
    task, step, train_config = (info[k] for k in TRAINER_STATE_KEYS)
    if not isinstance(task, str) or task not in TASK_HEADS:
        raise CheckpointError(f"{where}: task={task!r:.100} is not one of {', '.join(TASK_HEADS)}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{where}: step={step!r:.100} is not a number of updates (an int in [0, {MAX_STEP}])")
    return task, int(step), resume_config(directory, train_config, cfg)


def checkpoint_nbytes(config, task: str) -> int:
    """A lower bound of one trainer checkpoint's size: every parameter as float32 weights plus AdamW's two
    float32 moments (12 bytes a parameter; the RNG, schedule and counters are small). Asked of the disk
    before a run starts and before every save, so a run of hours does not learn at its first checkpoint
    that the disk cannot hold one."""
    from .weights import count_parameters

    return 12 * count_parameters(config, task_head(task))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The rate of the update that follows `step` completed updates."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.learning_rate
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.learning_rate * max(0.0, 1.0 - progress)
    return cfg.learning_rate * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def applies_weight_decay(kind: WeightKind) -> bool:
    """Linear weights and embeddings decay; biases and LayerNorm parameters do not."""
    return kind in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING)


def clip_scale(global_norm: float, max_grad_norm: float | None) -> float:
    """The factor every gradient is multiplied by before the update."""
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (global_norm + CLIP_EPS))


# ---------------------------------------------------------------------- tasks, batches, evaluation
TASK_HEADS = {"causal_lm": Head.CAUSAL_LM, "sequence_classification": Head.SEQUENCE_CLASSIFICATION,
              "question_answering": Head.QUESTION_ANSWERING}
TASK_INPUTS = {"causal_lm": ("labels",), "sequence_classification": ("labels",),
               "question_answering": ("start_positions", "end_positions")}
EVAL_OUTPUTS = {"causal_lm": (), "sequence_classification": ("logits",),
                "question_answering": ("start_logits", "end_logits")}


def task_head(task: str) -> Head:
    if not isinstance(task, str) or task not in TASK_HEADS:
        raise ValueError(f"task={task!r}; choose one of {', '.join(TASK_HEADS)}")
    return TASK_HEADS[task]


def micro_batch_list(micro_batches, cfg: TrainConfig) -> list:
    """The micro-batches of one update (a single mapping is one micro-batch), checked against
    cfg.gradient_accumulation_steps."""
    if isinstance(micro_batches, Mapping):
        micro_batches = [micro_batches]
    micro_batches = list(micro_batches)
    if len(micro_batches) != cfg.gradient_accumulation_steps:
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{cfg.gradient_accumulation_steps}")
    return micro_batches


def loss_count(task: str, batch: Mapping[str, np.ndarray]) -> int:
    """What a batch's mean loss averages over: for causal_lm the labelled next-token positions (a
    label that is not IGNORE_INDEX, after the first position), for the other tasks the examples. A
    batch split over data-parallel ranks weights each rank's mean by its share of this count, so the
    update is that of the whole batch's mean."""
    from .numerics import IGNORE_INDEX

    if task == "causal_lm":
        return int((np.asarray(batch["labels"])[:, 1:] != IGNORE_INDEX).sum())
    return len(np.asarray(batch["attention_mask"]))


def evaluate(task: str, dataset, batch_size: int, forward: Callable[[dict], dict]) -> dict[str, float]:
    """Every backend's evaluation: `forward(batch)` returns the batch's mean loss ("loss", a float)
    and the task's EVAL_OUTPUTS as float32 NumPy arrays.

    causal_lm: loss (token-weighted), perplexity; sequence_classification: loss, accuracy and F1 (or
    mse); question_answering: loss, exact_match, f1 (percent)."""
    from . import data as spec_data
    from . import metrics

    nll, count, losses, logits, labels, predictions, golds = 0.0, 0, [], [], [], [], []
    for indices, batch in spec_data.eval_batches(dataset, batch_size):
        out = forward(batch)
        if task == "causal_lm":
            n = loss_count(task, batch)
            nll += out["loss"] * n
            count += n
            continue
        losses.append((out["loss"], len(indices)))
        if task == "sequence_classification":
            logits.append(out["logits"])
            labels.append(batch["labels"])
        else:
            predictions += spec_data.qa_predictions(dataset, indices, batch, out["start_logits"], out["end_logits"])
            golds += [dataset.meta[i].answers for i in indices]
    if task == "causal_lm":
        mean = nll / max(count, 1)
        return {"loss": mean, "perplexity": metrics.perplexity(mean)}
    mean = sum(loss * k for loss, k in losses) / sum(k for _, k in losses)
    if task == "sequence_classification":
        return {"loss": mean, **metrics.classification(np.concatenate(logits), np.concatenate(labels))}
    return {"loss": mean, **metrics.squad(predictions, golds)}


def reference_adamw_step(params: Mapping, grads: Mapping, state: dict, step: int, cfg: TrainConfig,
                         kinds: Mapping) -> dict:
    """One update of the AdamW above in float64 NumPy: the definition the backends are tested against.

    params, grads: {key: array}; kinds: {key: WeightKind}; state: this function's moments (start {}),
    updated in place; step: updates already applied. Returns the new {key: array}."""
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads.values()))
    scale = clip_scale(norm, cfg.max_grad_norm)
    lr, t = learning_rate(step, cfg), step + 1
    out = {}
    for key, p in params.items():
        g = np.asarray(grads[key], np.float64) * scale
        m = state.setdefault(("m", key), 0.0) * cfg.adam_beta1 + (1 - cfg.adam_beta1) * g
        v = state.setdefault(("v", key), 0.0) * cfg.adam_beta2 + (1 - cfg.adam_beta2) * g * g
        state[("m", key)], state[("v", key)] = m, v
        m_hat, v_hat = m / (1 - cfg.adam_beta1 ** t), v / (1 - cfg.adam_beta2 ** t)
        decay = cfg.weight_decay if applies_weight_decay(kinds[key]) else 0.0
        out[key] = p - lr * (m_hat / (np.sqrt(v_hat) + cfg.adam_epsilon) + decay * p)
    return out
