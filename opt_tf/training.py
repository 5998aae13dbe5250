"""Fine-tuning in TensorFlow with Keras 3 (`compile` / `train_on_batch` / `fit`), following
opt_spec.training (the definitions every backend shares).

Keras's own AdamW does not compute the spec's update, so `SpecAdamW` (a keras.optimizers.Optimizer)
does, and `TFTrainer` compiles the model with it:

- Epsilon: Keras's Adam adds epsilon to sqrt(v) before bias correction ("epsilon hat":
  lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)), which is the spec's update only with eps
  scaled by sqrt(1 - b2^t). SpecAdamW computes m_hat / (sqrt(v_hat) + eps) as the spec (and
  torch.optim.AdamW, optax.adamw) do.
- Clipping: Keras's global_clipnorm scales by clip / max(norm, clip); the spec (and torch's
  clip_grad_norm_) by min(1, clip / (norm + 1e-6)). SpecAdamW clips with the spec's formula.
- Accumulation: Keras's `gradient_accumulation_steps` feeds its schedule the micro-batch count,
  not the update count; SpecAdamW accumulates itself (sum of the micro-batch gradients divided by
  their number, then clipping, then one update) and its schedule counts updates.
- The rate of the update after `step` updates is `SpecSchedule`'s float32 table of
  opt_spec.training.learning_rate, indexed by that count (every rate equals the spec's exactly).
- Weight decay is decoupled (p -= lr * (adam + wd * p)); variables whose spec kind does not decay
  (biases, LayerNorm) are excluded through Keras's `exclude_from_weight_decay(var_list=...)`.
- bf16 mixed precision: the model runs under the `mixed_bfloat16` policy (float32 variables,
  bfloat16 compute; the model's LayerNorm statistics, softmax and losses are float32).

A checkpoint is one folder: the Hugging Face directory (config.json, model.safetensors) plus
`optimizer.npz` (the optimizer's variables in Keras's own save_own_variables store: moments,
accumulators, iteration and update counters), `rng.npy` (the state of TF's global
tf.random.Generator, which opt_tf's dropout draws from; seeded with cfg.seed by the trainer) and
`trainer_state.json` (task, step, TrainConfig). A resumed run draws the same dropout masks.

Data parallelism: `TFTrainer(..., strategy=data_parallel_strategy(N))` (tf.distribute: MirroredStrategy
over local devices, MultiWorkerMirroredStrategy when TF_CONFIG is set) splits every micro-batch by rows
over the replicas. Each replica's loss is its share of the global batch's (its summed token losses over
the whole batch's token count, opt_tf.modeling.replica_share), SpecAdamW sums the replicas' gradients
and every replica applies the same update to its copy: N replicas take exactly the step one device takes
on the whole batch, however the padding falls. Checkpoints are the same files and resume exactly under
a strategy (the dropout generator then lives in the strategy's scope, one stream per replica).

The surface matches opt_torch.training.Trainer: `TFTrainer.from_pretrained(dir, task, cfg)`,
`TFTrainer.from_checkpoint(dir, cfg)`, `.step`, `.train_step(micro_batches)`,
`.evaluate(dataset, batch_size)`, `.save_checkpoint(dir)`, plus `.fit(batches)` (Keras fit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from opt_spec import data as spec_data
from opt_spec import io as spec_io
from opt_spec import training as spec_training
from opt_spec.errors import CheckpointError
from opt_spec.training import (CLIP_EPS, TASK_HEADS, TASK_INPUTS, TrainConfig, applies_weight_decay, learning_rate,
                               micro_batch_list, task_head)

from . import fast_paths
from .checkpoint import variable_map
from .modeling import MODEL_CLASSES

OPTIMIZER_FILE = "optimizer.npz"
RNG_FILE = "rng.npy"
INFO_FILE = "trainer_state.json"


def schedule_table(cfg: TrainConfig) -> np.ndarray:
    """float32 rates for update counts 0 .. total_steps + 1; every later count has the last rate
    (past total_steps + 1 the decay's progress is >= 1 whatever the warm-up)."""
    return np.asarray([learning_rate(step, cfg) for step in range(cfg.total_steps + 2)], dtype=np.float32)


# ------------------------------------------------------------------------------------ the optimizer
class SpecSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """update count -> float32(opt_spec.training.learning_rate(count, cfg))."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.table = schedule_table(cfg)

    def __call__(self, step):
        step = tf.minimum(tf.cast(step, tf.int64), self.cfg.total_steps + 1)
        return tf.gather(tf.constant(self.table), step)

    def get_config(self) -> dict:
        return dataclasses.asdict(self.cfg)


class SpecAdamW(keras.optimizers.Optimizer):
    """opt_spec.training's AdamW with its clipping, accumulation and schedule (see the module docstring).

    Variables: per trainable variable the moments `m`, `v` (and an accumulator when
    gradient_accumulation_steps > 1), plus `updates` (updates done: the schedule's step and Adam's
    t - 1), `micro_step` (micro-batches into the current update) and `grad_norm` (the global norm
    of the last update's gradients, before clipping). Keras's `iterations` counts micro-batches.
    """

    def __init__(self, cfg: TrainConfig, name: str = "spec_adamw", **kwargs):
        super().__init__(learning_rate=lambda: self._current_rate(), name=name, **kwargs)
        self.train_config = cfg
        self.schedule = SpecSchedule(cfg)

    def _current_rate(self):
        """The rate of the coming update (Keras's `learning_rate`)."""
        return self.schedule(self.updates if self.built else 0)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._m = [self.add_variable_from_reference(v, name="m") for v in variables]
        self._v = [self.add_variable_from_reference(v, name="v") for v in variables]
        self._acc = [self.add_variable_from_reference(v, name="accumulated_gradient") for v in variables] \
            if self.train_config.gradient_accumulation_steps > 1 else []
        self.updates = self.add_variable((), dtype="int64", name="updates")
        self.micro_step = self.add_variable((), dtype="int64", name="micro_step")
        self.grad_norm = self.add_variable((), dtype="float32", name="grad_norm")

    def _backend_apply_gradients(self, grads, trainable_variables):
        cfg = self.train_config
        A = cfg.gradient_accumulation_steps
        grads = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in grads]
        index = [self._get_variable_index(v) for v in trainable_variables]
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # Each replica's gradient is that of its share of the global batch's loss
            # (opt_tf.modeling.replica_share): their sum is the whole batch's gradient. Every replica then
            # runs the update below on its own copy of the variables (Keras's variables have aggregation
            # "none": a write in replica context goes to the local copy), the same math on the same
            # numbers, so the copies stay equal.
            grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if A == 1:
            self._update(grads, trainable_variables, index)
            return
        accs = [self._acc[i] for i in index]

        def update():
            self._update([(a + g) / A for a, g in zip(accs, grads)], trainable_variables, index)
            for a in accs:
                a.assign(tf.zeros_like(a))
            return tf.constant(True)

        def accumulate():
            for a, g in zip(accs, grads):
                a.assign_add(g)
            return tf.constant(False)

        tf.cond(tf.equal(self.micro_step, A - 1), update, accumulate)
        self.micro_step.assign((self.micro_step + 1) % A)

    def _update(self, grads, variables, index) -> None:
        """p -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p), after clipping by the global norm."""
        cfg = self.train_config
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        self.grad_norm.assign(norm)
        if cfg.max_grad_norm is not None:
            scale = tf.minimum(1.0, cfg.max_grad_norm / (norm + CLIP_EPS))
            grads = [g * scale for g in grads]
        lr = self.schedule(self.updates)
        t = tf.cast(self.updates + 1, tf.float32)
        b1, b2 = tf.constant(cfg.adam_beta1, tf.float32), tf.constant(cfg.adam_beta2, tf.float32)
        bias1, bias2 = 1.0 - tf.pow(b1, t), 1.0 - tf.pow(b2, t)
        for g, p, i in zip(grads, variables, index):
            m, v = self._m[i], self._v[i]
            m.assign(b1 * m + (1.0 - b1) * g)
            v.assign(b2 * v + (1.0 - b2) * tf.square(g))
            step = (m / bias1) / (tf.sqrt(v / bias2) + cfg.adam_epsilon)
            if cfg.weight_decay and self._use_weight_decay(p):
                step = step + cfg.weight_decay * p
            p.assign_sub(lr * step)
        self.updates.assign_add(1)

    def get_config(self) -> dict:
        return {"name": self.name, "train_config": dataclasses.asdict(self.train_config)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(TrainConfig(**config["train_config"]), name=config.get("name", "spec_adamw"))


# ------------------------------------------------------------------------------- the Keras model
class TrainingModel(keras.Model):
    """The OPT model with its own loss as the Keras loss, so `fit` / `train_on_batch` take the
    batches of opt_spec.data (dicts of input_ids, attention_mask, labels / start and end positions).

    Its steps are Keras's, except for the loss they report: Keras averages the replicas' losses
    weighted by their rows, which is the global batch's loss only when the rows split evenly; here
    the replicas' shares (opt_tf.modeling.replica_share) are summed, which is exact for any split."""

    def __init__(self, model: keras.Model, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{model.name}_training"), **kwargs)
        self.opt_model = model
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True  # every variable exists: the OPT model builds itself when constructed

    @property
    def metrics(self) -> list:
        return [self.loss_tracker]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: the OPT model builds itself and nothing else is compiled. (Keras's version,
        under a strategy, first averages the replicas' parts of the first batch to learn its shapes,
        which fails when the rows do not split evenly over the replicas.)"""

    def call(self, batch, training=False):
        return self.opt_model(dict(batch), training=training, use_cache=False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.opt_model.compute_loss(x, y, y_pred, sample_weight, training=training)

    def _track(self, share: tf.Tensor) -> dict:
        replica = tf.distribute.get_replica_context()
        total = replica.all_reduce(tf.distribute.ReduceOp.SUM, share) if replica is not None else share
        self.loss_tracker.update_state(total)
        loss = self.loss_tracker.result()
        strategy = tf.distribute.get_strategy()
        workers = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
            strategy.extended._in_multi_worker_mode()
        if workers:  # Keras averages logs over workers along axis 0, which a scalar lacks (tensorflow#72388)
            loss = loss[None]
        return {"loss": loss}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            share = self.compute_loss(x, y, self(x, training=True), sample_weight)
            scaled = self.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return self._track(share)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self._track(self.compute_loss(x, y, self(x, training=False), sample_weight, training=False))


# ------------------------------------------------------------------------------------------ helpers
def _as_tf(batch: Mapping, keys: Sequence[str]) -> dict[str, tf.Tensor]:
    """NumPy batch -> tensors (opt_spec.data.select_inputs' dtypes)."""
    return {key: tf.constant(value) for key, value in spec_data.select_inputs(batch, keys).items()}


def _scope(strategy: tf.distribute.Strategy | None):
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def _placed(model: keras.Model, strategy: tf.distribute.Strategy | None) -> bool:
    """Were `model`'s variables created under `strategy` (one copy per replica)?"""
    return strategy is None or all(getattr(v.value, "distribute_strategy", None) is strategy for v in model.weights)


def _rebuilt(model: keras.Model, dtype: str) -> keras.Model:
    """The same weights in a new model under the `dtype` policy, its variables made in the current scope."""
    copy = type(model)(model.config, dtype=dtype, _init=False)
    copy.set_weights_dict(model.get_weights_dict())
    return copy


def _dropout_generator(seed: int, strategy: tf.distribute.Strategy | None) -> tf.random.Generator:
    """TF's global generator, which opt_tf's dropout draws from, seeded with `seed`.

    Without a strategy it is reset in place (functions traced earlier hold the object). Under one it is
    a new generator made in the strategy's scope, one state per replica, so each replica draws its own
    masks, reproducibly; a generator made under a strategy cannot serve a plain trainer, so it is
    replaced again when one follows."""
    current = tf.random.get_global_generator()
    if strategy is None and not isinstance(current.state, tf.distribute.DistributedValues):
        current.reset_from_seed(seed)
        return current
    with _scope(strategy):
        generator = tf.random.Generator.from_seed(seed)
    tf.random.set_global_generator(generator)
    return generator


def split_rows(rows: int, replicas: int) -> list[slice]:
    """The rows of one global batch per replica: contiguous, sizes differing by at most one (a replica
    may get none). Any split gives the same update: the loss counts against the whole batch."""
    sizes = [rows // replicas + (i < rows % replicas) for i in range(replicas)]
    ends = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def data_parallel_strategy(replicas: int | None = None) -> tf.distribute.Strategy | None:
    """The tf.distribute strategy for `replicas` data-parallel replicas (call before TensorFlow runs anything).

    TF_CONFIG set: MultiWorkerMirroredStrategy over every worker's devices (then `replicas`, if given,
    must be the total it reports). Otherwise MirroredStrategy over the first `replicas` GPUs, or, on a
    machine without one, over `replicas` logical devices carved from the CPU (same numbers; useful
    for checking a multi-replica run). None (no strategy) for one replica."""
    if replicas is not None and replicas < 1:
        raise ValueError(f"replicas={replicas} must be at least 1")
    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        if replicas is not None and strategy.num_replicas_in_sync != replicas:
            raise ValueError(f"replicas={replicas}, but the TF_CONFIG cluster has {strategy.num_replicas_in_sync}")
        return strategy
    if replicas is None or replicas == 1:
        return None
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas > len(gpus):
            raise ValueError(f"replicas={replicas}, but {len(gpus)} GPUs are visible")
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(replicas)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError as err:  # TensorFlow has already initialized its devices
        if len(tf.config.list_logical_devices("CPU")) < replicas:
            raise RuntimeError(f"replicas={replicas} on the CPU needs logical devices configured before "
                               f"TensorFlow starts ({err})") from None
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


# ------------------------------------------------------------------------------------------ trainer
class TFTrainer:
    """AdamW fine-tuning of one TF OPT model through Keras (see the module docstring).

    `model` is the OPT model being trained (for bf16, a mixed_bfloat16 copy of the one given; under a
    strategy, a copy made in its scope unless the one given was).

    `strategy` (a tf.distribute strategy, e.g. `data_parallel_strategy(N)`): data parallelism. Each
    micro-batch is split by rows over the replicas and every update equals the one-device update on
    the whole micro-batch (the loss counts against the global batch's tokens, the gradients are
    summed across replicas); checkpoints are the same files, and resume exactly under a strategy.

    `jit_compile`: whether Keras compiles the train step (train_on_batch, fit) with XLA. The default,
    None, is True without a strategy: measured on the 125m step (bench/bench_train.py, 2-core CPU,
    float32) it takes 11.8 CPU s instead of 23.8 (Keras's "auto" leaves this model uncompiled).
    """

    def __init__(self, model: keras.Model, cfg: TrainConfig, task: str | None = None, jit_compile: bool | None = None,
                 strategy: tf.distribute.Strategy | None = None):
        self.task = task or next((t for t, h in TASK_HEADS.items() if h == model.head), None)
        if self.task is None or task_head(self.task) != model.head:
            raise ValueError(f"task {self.task} needs a model with a head; got {type(model).__name__}")
        bad = sorted({v.dtype for v in model.trainable_variables if v.dtype != "float32"})
        if bad:
            raise ValueError("train float32 variables (bf16 mixed precision keeps float32 master weights); "
                             f"the model holds {', '.join(bad)}")
        self.strategy, self.cfg = strategy, cfg
        dtype = "mixed_bfloat16" if cfg.mixed_precision == "bf16" else model.dtype_policy.name
        with _scope(strategy):
            if dtype != model.dtype_policy.name or not _placed(model, strategy):
                model = _rebuilt(model, dtype)
            self.model = model
            self.rng = _dropout_generator(cfg.seed, strategy)
            self.keras_model = TrainingModel(model)
            self.optimizer = SpecAdamW(cfg)
            variables = variable_map(model)
            self.optimizer.exclude_from_weight_decay(
                var_list=[var for spec, var in variables.values() if not applies_weight_decay(spec.kind)])
            self.jit_compile = strategy is None if jit_compile is None else bool(jit_compile)
            self.keras_model.compile(optimizer=self.optimizer, jit_compile=self.jit_compile)
            self.optimizer.build(self.keras_model.trainable_weights)
        # XLA on the CPU (opt_tf.fast_paths), entered around the compiled train step only: dropout masks from a
        # counter hash (no Philox pass); in bf16 the model's products accumulate in float32 on XLA's bf16
        # kernels (the same numbers, ~1.8x the product rate).
        self._speed = contextlib.nullcontext
        if self.jit_compile and fast_paths.enabled():
            self._speed = functools.partial(fast_paths.xla_cpu_training, model, cfg.mixed_precision == "bf16")
        self._keys = ("input_ids", "attention_mask", *TASK_INPUTS[self.task])
        self._forward = tf.function(self._forward_fn, reduce_retracing=True)

    @property
    def step(self) -> int:
        """Updates done."""
        return int(self.optimizer.updates.numpy())

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, task: str, cfg: TrainConfig, config=None,
                        jit_compile: bool | None = None, strategy: tf.distribute.Strategy | None = None,
                        gradient_checkpointing: bool = False) -> "TFTrainer":
        dtype = "mixed_bfloat16" if cfg.mixed_precision == "bf16" else None
        with _scope(strategy):
            model = MODEL_CLASSES[task_head(task)].from_pretrained(model_dir, config=config, dtype=dtype)
        if gradient_checkpointing:  # each decoder layer recomputed in the backward pass
            model.gradient_checkpointing_enable()
        return cls(model, cfg, task, jit_compile, strategy)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, cfg: TrainConfig | None = None,
                        jit_compile: bool | None = None, strategy: tf.distribute.Strategy | None = None,
                        gradient_checkpointing: bool = False) -> "TFTrainer":
        """A trainer that continues exactly where `save_checkpoint(directory)` left off."""
        info, info_path = spec_training.read_trainer_info(directory, "tf", INFO_FILE, (OPTIMIZER_FILE,))
        task, step, saved = spec_training.resume_info(info, info_path, directory, cfg)
        trainer = cls.from_pretrained(directory, task, saved, jit_compile=jit_compile, strategy=strategy,
                                      gradient_checkpointing=gradient_checkpointing)
        path = spec_io.checkpoint_file(directory, OPTIMIZER_FILE)
        # Files that may come from anyone: read only arrays of exactly this trainer's shapes and dtypes.
        variables = {str(i): (tuple(v.shape), np.dtype(v.dtype)) for i, v in enumerate(trainer.optimizer.variables)}
        trainer.optimizer.load_own_variables(spec_io.read_npz(path, variables))
        rng = trainer.rng.state
        trainer.rng.reset(spec_io.read_npy(spec_io.checkpoint_file(directory, RNG_FILE),
                                           (tuple(rng.shape), np.dtype(rng.dtype.as_numpy_dtype))))
        if trainer.step != step:  # the iteration count drives the schedule and Adam's bias correction
            raise CheckpointError(f"{directory}: {OPTIMIZER_FILE} is at step {trainer.step}, {INFO_FILE} at {step}")
        return trainer

    resume = from_checkpoint

    # ----------------------------------------------------------------------------------- training
    def train_step(self, micro_batches: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray]) -> dict:
        """One update from `gradient_accumulation_steps` micro-batches (a dict is one micro-batch),
        each through Keras's `train_on_batch`. Returns the mean micro-batch loss, the rate used, the
        global gradient norm before clipping, and the number of real tokens."""
        micro_batches = micro_batch_list(micro_batches, self.cfg)
        step = self.step
        with self._speed():
            losses = [self.keras_model.train_on_batch(x=self._replicated(_as_tf(b, self._keys)),
                                                      return_dict=True)["loss"] for b in micro_batches]
        tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in micro_batches)
        return {"loss": float(np.mean(losses)), "learning_rate": learning_rate(step, self.cfg),
                "grad_norm": float(self.optimizer.grad_norm.numpy()), "tokens": tokens}

    def _replicated(self, batch: dict[str, tf.Tensor]):
        """Under a strategy, the batch split by rows over the replicas (`split_rows`); each worker of a
        multi-worker strategy holds the same global batch and feeds its own replicas."""
        if self.strategy is None:
            return batch
        parts = split_rows(int(next(iter(batch.values())).shape[0]), self.strategy.num_replicas_in_sync)
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: {k: v[parts[ctx.replica_id_in_sync_group]] for k, v in batch.items()})

    def fit(self, batches: Iterable[Mapping[str, np.ndarray]], steps: int, callbacks=None, verbose=0):
        """Keras `fit` over `steps` updates drawn from an iterable of NumPy micro-batches (under a
        strategy each micro-batch is split over the replicas as in `train_step`)."""
        keys = self._keys
        micro = steps * self.cfg.gradient_accumulation_steps
        first = next(iter(batches))
        signature = {k: tf.TensorSpec((None,) * np.asarray(first[k]).ndim,
                                      tf.int64 if np.issubdtype(np.asarray(first[k]).dtype, np.integer) else tf.float32)
                     for k in keys}

        def dataset(replicas=(0,), of=1):
            """The rows of `replicas` (in order, one element each) of every micro-batch."""
            def generator():
                for batch in batches:
                    parts = split_rows(len(batch[keys[0]]), of)
                    for r in replicas:
                        yield {k: np.asarray(batch[k])[parts[r]] for k in keys}
            return tf.data.Dataset.from_generator(generator, output_signature=signature)

        data = dataset()
        if self.strategy is not None:
            def for_pipeline(ctx: tf.distribute.InputContext):  # one pipeline per worker, feeding its replicas
                local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
                first_replica = ctx.input_pipeline_id * local
                return dataset(range(first_replica, first_replica + local), ctx.num_replicas_in_sync)
            data = self.strategy.distribute_datasets_from_function(for_pipeline)
        with self._speed():
            return self.keras_model.fit(data, epochs=1, steps_per_epoch=micro, callbacks=callbacks, verbose=verbose,
                                        shuffle=False)

    def gradients(self, batch: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, {canonical name: gradient in the canonical layout}) of one batch, dropout off."""
        from opt_spec.layouts import from_native

        inputs = _as_tf(batch, self._keys)
        variables = variable_map(self.model)
        with tf.GradientTape() as tape:
            loss = self.model(inputs, training=False, use_cache=False).loss
        grads = tape.gradient(loss, [var for _, var in variables.values()])
        return float(loss), {name: from_native(spec, np.asarray(tf.convert_to_tensor(g)), "keras")
                             for (name, (spec, _)), g in zip(variables.items(), grads)}

    # --------------------------------------------------------------------------------- evaluation
    def _forward_fn(self, batch):
        out = self.model(batch, training=False, use_cache=False)
        if self.task == "question_answering":
            return {"loss": out.loss, "start_logits": out.start_logits, "end_logits": out.end_logits}
        return {"loss": out.loss, "logits": out.logits}

    def evaluate(self, dataset: spec_data.Dataset, batch_size: int = 8) -> dict[str, float]:
        """See opt_spec.training.evaluate."""
        return spec_training.evaluate(self.task, dataset, batch_size, self._eval_outputs)

    def _eval_outputs(self, batch) -> dict:
        out = self._forward(_as_tf(batch, self._keys))
        return {"loss": float(out["loss"]),
                **{k: np.asarray(tf.cast(out[k], tf.float32)) for k in spec_training.EVAL_OUTPUTS[self.task]}}

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike) -> str:
        """The Hugging Face directory plus the optimizer's variables (Keras store), the dropout
        generator's state and the step."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        store: dict = {}
        self.optimizer.save_own_variables(store)
        path = os.path.join(directory, OPTIMIZER_FILE)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **store)
        os.replace(path + ".tmp", path)
        rng_path = os.path.join(directory, RNG_FILE)
        with open(rng_path + ".tmp", "wb") as f:
            np.save(f, self.rng.state.numpy())
        os.replace(rng_path + ".tmp", rng_path)
        info = {"backend": "tf", "task": self.task, "step": self.step, "train_config": dataclasses.asdict(self.cfg)}
        with open(os.path.join(directory, INFO_FILE) + ".tmp", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        os.replace(os.path.join(directory, INFO_FILE) + ".tmp", os.path.join(directory, INFO_FILE))
        return directory

    save = save_checkpoint
