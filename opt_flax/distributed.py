"""OPT beyond one device on jax.sharding: the spec's partition table as NamedShardings on an (fsdp, tp) mesh.

    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.distributed import make_mesh

    mesh = make_mesh(fsdp=2, tp=4)                       # 8 devices; axes ("fsdp", "tp"), Auto axis type
    model = FlaxOPTForCausalLM.from_pretrained("opt-30b", mesh=mesh, dtype="bfloat16")
    out = model(input_ids, attention_mask=mask)          # any batch size, numpy or jax inputs
    tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=20, num_beams=4)
    trainer = FlaxTrainer(model, cfg, mesh=mesh)         # params, gradients, Adam state split by the table
    model.save_pretrained("out/")                        # gathered one tensor at a time

Where everything lives (opt_spec.parallel decides, this module only spells it in JAX):
- Parameters: each weight's canonical split mapped through the Flax layout (kernels are (in, out)),
  as a NamedSharding. `from_pretrained(..., mesh=)` builds every parameter with
  `jax.make_array_from_callback`, whose callback reads one device's block from the memory-mapped
  safetensors (or .bin) file, so no host ever holds a whole model (`model.bytes_read` counts it).
- Activations: the batch on fsdp when fsdp divides it, replicated otherwise (exact, only less
  parallel: any batch size works); inside the model, `with_sharding_constraint` pins each layer's
  output to the batch split, each column-parallel projection's output features to tp, and the KV cache
  (B, nh, S, hs) to (batch, tp). The constraints are added from outside the linen modules with
  `nn.intercept_methods`, so modeling.py is the same code on one device and on many.
- Every program (forward, generate, the train step, the optimizer's init) is a `jax.jit` with explicit
  in/out shardings; XLA's SPMD partitioner inserts the gathers (fsdp) and sums (tp).
- Multi-host: call `initialize(...)` (jax.distributed.initialize) first, then the same code. Model
  calls take the whole batch on every process; the trainer takes each process's own rows
  (`make_array_from_process_local_data`), the global batch being their concatenation in process order.
  Results come back to every process with `gather`; only process 0 writes Hugging Face files.
- Trainer checkpoints keep the optimizer state sharded with Orbax (`trainer_state.orbax/`), next to the
  Hugging Face folder; both restore onto any mesh (or onto one device).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opt_spec import Head, OPTConfig, WeightKind
from opt_spec import io as spec_io
from opt_spec.layouts import from_native, native_path, native_shape, to_native
from opt_spec.parallel import FSDP, TP, batch_axis, check_plan, native_split, output_split
from opt_spec.weights import WeightSpec, strip_base_prefix

from .modeling import KVCache, OPTDecoderLayer

CONVENTION = "flax"
AXES = (FSDP, TP)


# ------------------------------------------------------------------------------------------ meshes
def make_mesh(fsdp: int = -1, tp: int = 1, devices=None) -> Mesh:
    """A Mesh with axes ("fsdp", "tp") of Auto axis type over `devices` (default: every device of every
    process, or the first fsdp x tp of them). fsdp=-1 takes the devices that tp leaves. tp is the inner
    axis, so a tp group sits on neighbouring devices (one host, where the sums over tp are cheap)."""
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, value in (("fsdp", fsdp), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1) \
                or (name == "tp" and value == -1):
            raise ValueError(f"make_mesh: {name}={value!r} must be a positive int" +
                             (" (or -1: the devices tp leaves)" if name == "fsdp" else ""))
    if fsdp == -1:
        if n % tp:
            raise ValueError(f"make_mesh: tp={tp} does not divide the {n} devices")
        fsdp = n // tp
    if not given and fsdp * tp < n:
        devices, n = devices[:fsdp * tp], fsdp * tp
    if fsdp * tp != n:
        raise ValueError(f"make_mesh: fsdp={fsdp} x tp={tp} = {fsdp * tp} devices, but "
                         f"{'the devices given are' if given else 'there are'} {n} ({jax.device_count()} in all; on a "
                         "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts simulates N)")
    return jax.make_mesh((fsdp, tp), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """(fsdp, tp) of a mesh, which must have exactly the axes "fsdp" and "tp", of Auto type."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see opt_flax.distributed.make_mesh), "
                        f"got {type(mesh).__name__}")
    if set(mesh.axis_names) != set(AXES) or len(mesh.axis_names) != 2:
        raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)}; optkit's partition table uses exactly "
                         f"{AXES} (a size-1 axis is fine): build it with opt_flax.distributed.make_mesh")
    not_auto = [f"{a}: {t.name}" for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if not_auto:
        raise ValueError(f"mesh axes must be of Auto type ({', '.join(not_auto)}): the model is sharded by "
                         "jit's propagation from the partition table, and linen's embedding lookup fails on "
                         "Explicit axes. Build the mesh with opt_flax.distributed.make_mesh, or "
                         "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * 2)")
    return mesh.shape[FSDP], mesh.shape[TP]


def initialize(coordinator_address: str, num_processes: int, process_id: int, **kwargs) -> None:
    """jax.distributed.initialize for one process of a multi-host run (call it before anything else
    touches JAX). On CPUs the collectives between processes go through gloo."""
    if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def _pretrained():
    from . import pretrained  # which imports this module lazily, when a model meets a mesh

    return pretrained


def _keys(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


# ---------------------------------------------------------------------------------------- the plan
class MeshPlan:
    """The partition table of one model (config, head) on one mesh, as JAX shardings, plus the jit,
    placement and gathering that every sharded program of that model uses."""

    def __init__(self, mesh: Mesh, config: OPTConfig, head: Head | str):
        self.mesh, self.config, self.head = mesh, config, Head(head)
        self.fsdp, self.tp = mesh_shape(mesh)
        self.plan = check_plan(config, self.fsdp, self.tp, self.head)
        self.specs = {".".join(native_path(s, CONVENTION)): s for s in _pretrained()._params_table(config, self.head)}
        # a linear layer's output features: tp for column-parallel layers (keyed by base-model scope)
        self.linear_out = {strip_base_prefix(s.name.rsplit(".", 1)[0]): output_split(self.plan, s)
                           for s in self.specs.values() if s.kind is WeightKind.LINEAR_WEIGHT}
        self.replicated = NamedSharding(mesh, P())

    @property
    def key(self) -> tuple:
        return (self.mesh, self.config, self.head)

    # ------------------------------------------------------------------------------- shardings
    def weight(self, spec: WeightSpec) -> NamedSharding:
        return NamedSharding(self.mesh, P(*native_split(spec, self.plan.splits[spec.name], CONVENTION)))

    def params(self) -> dict:
        """A tree of NamedShardings shaped like the Flax parameters."""
        tree: dict = {}
        for path, spec in self.specs.items():
            _pretrained()._set_path(tree, path.split("."), self.weight(spec))
        return tree

    def batch(self, rows: int, ndim: int = 1) -> NamedSharding:
        """Rows on fsdp when fsdp divides them, else replicated (other dimensions whole)."""
        return NamedSharding(self.mesh, P(batch_axis(rows, self.fsdp), *([None] * (ndim - 1))))

    def cache(self, rows: int) -> KVCache:
        """Shardings of a KVCache of `rows` rows: (B, nh, S, hs) on (batch, tp), the length replicated."""
        kv = NamedSharding(self.mesh, P(batch_axis(rows, self.fsdp), TP if self.tp > 1 else None, None, None))
        L = self.config.num_hidden_layers
        return KVCache(keys=[kv] * L, values=[kv] * L, length=self.replicated)

    def outputs(self, shapes) -> Any:
        """Shardings for a model output (a tree of ShapeDtypeStructs): the cache as `cache`, causal-LM
        logits (B, T, V) with the vocabulary where the LM head leaves it, scalars replicated, every
        other array by its leading (batch) dimension."""
        vocab = self.plan.splits.get("lm_head.weight", (None,))[0]

        def one(path, leaf):
            names = _keys(path)
            if leaf.ndim == 0:
                return self.replicated
            if "past_key_values" in names and leaf.ndim == 4:
                return self.cache(leaf.shape[0]).keys[0]
            axis = batch_axis(leaf.shape[0], self.fsdp)
            if names[-1:] == ["logits"] and leaf.ndim == 3 and vocab == TP:
                return NamedSharding(self.mesh, P(axis, None, TP))
            return NamedSharding(self.mesh, P(axis))

        return jax.tree_util.tree_map_with_path(one, shapes)

    def opt_state(self, tx) -> Any:
        """Shardings of an optax state: a leaf under a parameter's path (Adam's moments) is split like
        that parameter; counts, norms and other scalars are replicated."""
        abstract: dict = {}
        for path, spec in self.specs.items():
            _pretrained()._set_path(abstract, path.split("."),
                                    jax.ShapeDtypeStruct(native_shape(spec, CONVENTION), jnp.float32))
        shapes = jax.eval_shape(tx.init, abstract)
        by_path = {path: (native_shape(spec, CONVENTION), self.weight(spec)) for path, spec in self.specs.items()}

        def one(path, leaf):
            names = _keys(path)
            for start in range(len(names)):
                shape, sharding = by_path.get(".".join(names[start:]), (None, None))
                if shape == tuple(leaf.shape):
                    return sharding
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, shapes)

    # ------------------------------------------------------------------------------ activations
    def constrain(self, next_fun, args, kwargs, context):
        """An nn.intercept_methods interceptor: pins the outputs of layers, projections and embeddings
        to the table's activation splits (with_sharding_constraint)."""
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        if isinstance(module, OPTDecoderLayer):
            cache, i = kwargs.get("cache"), module.layer_idx
            if cache is not None:  # the buffers this layer's update wrote
                kv = self.cache(cache.batch_size).keys[0]
                cache.keys[i], cache.values[i] = (jax.lax.with_sharding_constraint(a, kv)
                                                  for a in (cache.keys[i], cache.values[i]))
            return self._pin(out, None)
        if isinstance(module, nn.Dense):
            return self._pin(out, self.linear_out.get(strip_base_prefix(".".join(module.path))))
        if isinstance(module, nn.Embed):
            return self._pin(out, None)
        return out

    def _pin(self, x, last_axis):
        if not isinstance(x, jax.Array) or x.ndim < 2:
            return x
        spec = P(batch_axis(x.shape[0], self.fsdp), *([None] * (x.ndim - 2)), last_axis)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def jit(self, fn: Callable, in_shardings, out_shardings, **kwargs) -> Callable:
        """jax.jit of fn with explicit shardings, tracing it with the activation constraints."""
        def constrained(*args):
            with nn.intercept_methods(self.constrain):
                return fn(*args)

        return jax.jit(constrained, in_shardings=in_shardings, out_shardings=out_shardings, **kwargs)

    # ----------------------------------------------------------------------------- placement
    def put(self, x, sharding: NamedSharding) -> jax.Array:
        """A global array of x (the same whole array on every process) laid out as `sharding`."""
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # a typed key
            return jax.random.wrap_key_data(self.put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    def put_batch(self, x, process_local: bool = False) -> jax.Array:
        """A batch (B, ...) as a global array split on fsdp. process_local: x is this process's rows of
        a global batch that concatenates every process's rows (the trainer's convention); otherwise x
        is the whole batch, the same on every process."""
        if not process_local or jax.process_count() == 1:
            return self.put(x, self.batch(np.shape(x)[0], np.ndim(x)))
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if batch_axis(rows, self.fsdp) is None:  # not divisible: every process gets every row
            from jax.experimental import multihost_utils

            return self.put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), self.batch(rows, x.ndim))
        return jax.make_array_from_process_local_data(self.batch(rows, x.ndim), x)

    def gather(self, x) -> np.ndarray:
        """The whole array on the host of every process."""
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    def read(self, spec: WeightSpec, source: np.ndarray, dtype, stats: dict | None = None) -> jax.Array:
        """One parameter as a sharded array, each device's block read from `source` (canonical layout,
        memory-mapped: only the block's bytes are read). stats[name] adds up the bytes read."""
        native = to_native(spec, source, CONVENTION)  # a view: a transposed kernel reads nothing yet

        def block(index):
            piece = native[index]
            if stats is not None:
                stats[spec.name] = stats.get(spec.name, 0) + piece.nbytes
            out = np.array(piece, dtype=dtype)  # a copy of the block: the mapped pages can go
            spec_io.release_pages(piece)
            return out

        return jax.make_array_from_callback(native.shape, self.weight(spec), block)

    def place_params(self, params: Mapping) -> dict:
        """Parameters laid out by the table (arrays already laid out so are left alone)."""
        return jax.tree_util.tree_map(lambda x, s: x if getattr(x, "sharding", None) == s else self.put(x, s),
                                      dict(params), self.params())


# ------------------------------------------------------------------------------------- models
def shard_model(model, mesh: Mesh):
    """Lays a Flax OPT model's parameters out on `mesh` by the partition table; its calls, generate and
    save_pretrained then run sharded. Returns the model."""
    model.sharding = MeshPlan(mesh, model.config, model.head)
    model.params = model.sharding.place_params(model.params)
    model.__dict__.pop("_generation_fns", None)
    model.__dict__.pop("_sharded_fns", None)
    return model


def load_params(sharding: MeshPlan, tensors: Mapping[str, np.ndarray], fresh: Mapping[str, Callable], dtype,
                stats: dict) -> dict:
    """The Flax parameter tree, each weight read block by block from `tensors` (canonical, memory-mapped);
    fresh[name]() makes a weight the checkpoint lacks (in Flax layout)."""
    params: dict = {}
    for path, spec in sharding.specs.items():
        if spec.name in fresh:
            value = sharding.put(np.asarray(fresh[spec.name](), dtype=dtype), sharding.weight(spec))
        else:
            value = sharding.read(spec, tensors[spec.name], dtype, stats)
        _pretrained()._set_path(params, path.split("."), value)
    return params


def apply(model, params, deterministic: bool, rngs: dict, kwargs: dict):
    """model.module.apply under a jit with explicit shardings (the sharded model's __call__)."""
    sharding: MeshPlan = model.sharding
    cache = kwargs.pop("past_key_values", None)
    hidden = bool(kwargs.pop("output_hidden_states", False))
    arrays = {k: v for k, v in kwargs.items() if v is not None}
    if cache is not None and "attention_mask" in arrays:  # as wide as the cache: its length is traced under the jit
        new = np.shape(arrays.get("input_ids", arrays.get("inputs_embeds")))[1]
        arrays["attention_mask"] = cache.attention_mask(jnp.asarray(arrays["attention_mask"]), new)
    rows = np.shape(next(iter(arrays.values())))[0] if arrays else 1
    key = (deterministic, hidden, tuple(sorted(arrays)), cache is not None, tuple(sorted(rngs)),
           batch_axis(rows, sharding.fsdp), tuple(np.ndim(v) for _, v in sorted(arrays.items())))
    fns = model.__dict__.setdefault("_sharded_fns", {})
    params = model.params if params is None else params
    placed = {k: sharding.put_batch(v) for k, v in arrays.items()}
    rngs = {k: sharding.put(v, sharding.replicated) for k, v in rngs.items()}
    if key not in fns:
        def run(params, arrays, cache, rngs):
            return model.module.apply({"params": params}, deterministic=deterministic, rngs=rngs,
                                      past_key_values=cache, output_hidden_states=hidden, **arrays)

        in_shardings = (sharding.params(), {k: sharding.batch(rows, np.ndim(v)) for k, v in arrays.items()},
                        sharding.cache(cache.batch_size) if cache is not None else None,
                        {k: sharding.replicated for k in rngs})
        out_shardings = sharding.outputs(jax.eval_shape(run, params, placed, cache, rngs))
        fns[key] = sharding.jit(run, in_shardings, out_shardings)
    return fns[key](params, placed, cache, rngs)


def zeros_cache(model, batch_size: int, max_length: int) -> KVCache:
    """An empty KV cache laid out as (batch, tp) on the model's mesh."""
    sharding: MeshPlan = model.sharding

    def make():
        return KVCache.zeros(model.config, batch_size, max_length, model.dtype)

    return jax.jit(make, out_shardings=sharding.cache(batch_size))()


def generation_fn(model, fn: Callable, batch_size: int, embeds: bool = False, past: bool = False) -> Callable:
    """The decode loop `fn(params, ids, mask, knobs, key[, inputs_embeds | past]) -> (new tokens (B, N), steps,
    extras)` under a jit with explicit shardings (extras, generate's optional outputs, replicated); ids and
    mask (the whole batch), and inputs_embeds (B, P, E) when `embeds`, are split like the rows before the call;
    `past` (when set: a re-used cache's per layer (keys, values) (B, nh, C, hs)) is laid out as the cache."""
    sharding: MeshPlan = model.sharding
    rows, vectors = sharding.batch(batch_size, 2), sharding.batch(batch_size, 3)
    kv = sharding.cache(batch_size).keys[0]
    layers = ((kv, kv),) * model.config.num_hidden_layers
    starts = ((vectors,) if embeds else ()) + ((layers,) if past else ())
    jitted = sharding.jit(fn, (sharding.params(), rows, rows, sharding.replicated, sharding.replicated) + starts,
                          (rows, sharding.replicated, sharding.replicated))

    def call(params, ids, mask, knobs, key, *inputs):
        knobs = jax.tree_util.tree_map(lambda x: sharding.put(x, sharding.replicated), knobs)
        placed = (jax.tree_util.tree_map(sharding.put, x, s) for x, s in zip(inputs, starts, strict=True))
        return jitted(params, sharding.put(ids, rows), sharding.put(mask, rows), knobs,
                      sharding.put(key, sharding.replicated), *placed)

    return call


def save_pretrained(model, path, params, max_shard_size) -> list[str]:
    """A Hugging Face folder from sharded parameters, each tensor gathered to the host only while it is
    written. Every process takes part in the gathers; process 0 writes."""
    from .pretrained import check_params

    sharding: MeshPlan = model.sharding
    leaves = check_params(model.params if params is None else params, model.config, model.head)
    entries = [(spec.name, spec.shape, np.dtype(leaf.dtype),
                lambda spec=spec, leaf=leaf: from_native(spec, sharding.gather(leaf), CONVENTION))
               for spec, leaf in leaves.values()]
    dtypes = {str(np.dtype(e[2])) for e in entries}
    config_dict = model.config.to_saved_dict(type(model).__name__.removeprefix("Flax"),
                                             dtypes.pop() if len(dtypes) == 1 else None)
    if jax.process_index() != 0:
        for entry in entries:
            entry[3]()
        sync_processes("save_pretrained")
        return []
    files = spec_io.save_safetensors_entries(path, entries, config_dict, max_shard_size)
    sync_processes("save_pretrained")
    return files


def sync_processes(name: str) -> None:
    """Waits until every process of a multi-host run gets here (nothing to do in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------ training
class ByBatch:
    """A jitted program per batch layout (split on fsdp or replicated), chosen by the batch's rows."""

    def __init__(self, sharding: MeshPlan, build: Callable, batch_arg: int):
        self.sharding, self.build, self.batch_arg, self.fns = sharding, build, batch_arg, {}

    def __call__(self, *args):
        batch = args[self.batch_arg]
        rows = next(iter(batch.values())).shape[0]
        axis = batch_axis(rows, self.sharding.fsdp)
        if axis not in self.fns:
            self.fns[axis] = self.build({k: self.sharding.batch(rows, v.ndim) for k, v in batch.items()})
        return self.fns[axis](*args)


def step_functions(sharding: MeshPlan, tx, grad, apply_updates, fused, forward, gradients, donate=()) -> dict:
    """The trainer's programs (opt_flax.training.step_functions) under jits with explicit shardings:
    parameters and gradients split by the table, the optimizer state like its parameters, batches on
    fsdp, scalars and keys replicated."""
    params, rep, opt = sharding.params(), sharding.replicated, sharding.opt_state(tx)

    def build_forward(batch):
        holder = {}

        def call(p, b):  # the output's shardings come from its shapes, known at the first call
            if "fn" not in holder:
                holder["fn"] = sharding.jit(forward, (params, batch), sharding.outputs(jax.eval_shape(forward, p, b)))
            return holder["fn"](p, b)

        return call

    return dict(
        grad=ByBatch(sharding, lambda batch: sharding.jit(grad, (params, batch, rep), (rep, params, rep)), 1),
        apply=sharding.jit(apply_updates, (params, opt, params), (params, opt, rep), static_argnums=3,
                           donate_argnums=donate),
        fused=ByBatch(sharding, lambda batch: sharding.jit(fused, (params, opt, batch, rep),
                                                           (params, opt, rep, rep, rep), donate_argnums=donate), 2),
        forward=ByBatch(sharding, build_forward, 1),
        gradients=ByBatch(sharding, lambda batch: sharding.jit(gradients, (params, batch), (rep, params)), 1),
    )


def save_state(path: str, opt_state, rng) -> None:
    """The optimizer state and dropout key as an Orbax checkpoint at `path`, each process writing its own
    blocks. Written to a sibling folder first and swapped in, so an interrupted save leaves the previous
    state whole."""
    import orbax.checkpoint as ocp

    final = os.path.abspath(path)
    partial = final + ".partial"
    if jax.process_index() == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    sync_processes("orbax-clean")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(partial, {"opt_state": opt_state, "rng": rng})
    checkpointer.wait_until_finished()
    checkpointer.close()
    sync_processes("orbax-saved")
    if jax.process_index() == 0:
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    sync_processes("orbax-swapped")


def restore_state(path: str, opt_template, opt_shardings, rng_sharding) -> tuple[Any, jax.Array]:
    """(optimizer state, dropout key) from `save_state`, laid out on the shardings given (any mesh)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    target = {"opt_state": jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                  opt_template, opt_shardings),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rng_sharding)}
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(path, target)
    except Exception as err:
        raise ValueError(f"{path}: cannot be restored as this trainer's state ({type(err).__name__}: {err})") \
            from None
    finally:
        checkpointer.close()
    return state["opt_state"], state["rng"]


__all__ = ["AXES", "MeshPlan", "initialize", "make_mesh", "mesh_shape", "shard_model"]
