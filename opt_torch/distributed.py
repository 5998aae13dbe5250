"""OPT beyond one device in PyTorch: tensor parallelism (DTensor), FSDP2, sharded loading, device_map.

Many processes (torchrun), one model split over them:

    # torchrun --standalone --nproc-per-node 4 script.py
    from opt_torch import OPTForCausalLM
    from opt_torch.distributed import init_mesh

    mesh = init_mesh(dp=2, tp=2)        # init_device_mesh(type, (2, 2), mesh_dim_names=("dp", "tp"))
    model = OPTForCausalLM.from_pretrained("opt-1.3b", device_mesh=mesh)   # each rank reads only its blocks
    logits = model(input_ids).logits    # the same input_ids on every rank; whole logits on every rank
    tokens = model.generate(input_ids, max_new_tokens=20, num_beams=4)
    model.save_pretrained("out/")       # gathered one tensor at a time; rank 0 writes

`parallelize(model, mesh)` splits a model already built, and `opt_torch.training.Trainer(...,
device_mesh=mesh)` trains one (checkpoints with torch.distributed.checkpoint). One process, a model
larger than its accelerator:

    model = OPTForCausalLM.from_pretrained("opt-30b", device_map="auto", offload_folder="offload/",
                                           max_memory={0: "70GiB", "cpu": "100GiB"})   # accelerate's dispatch

Where everything goes (opt_spec.parallel decides; this module spells it with torch's engines):
- The mesh has dims ("dp", "tp"): "dp" is the spec's fsdp axis; tp is the inner dim, so that a tp group
  is neighbouring ranks (one node, where its sums per layer are cheap).
- tp: `parallelize_module` with each layer's style from the table (`tensor_parallel_style`): COLUMN ->
  ColwiseParallel (q, k, v, fc1; an LM head then gathers its logits whole), ROW -> RowwiseParallel
  (out_proj, fc2), VOCAB -> RowwiseParallel on the token embedding (each rank looks up its block of the
  vocabulary; the sum over tp fills in the rest). A layer the table leaves whole (an axis that does not
  divide it) stays replicated. Each attention then holds num_heads / tp heads, and so does the KV
  cache; a tied LM head is tied again (parallelize_module gives each module a parameter of its own).
- dp: FSDP2 `fully_shard` per decoder layer, then at the root, each parameter sharded on the dimension
  the table splits over fsdp (a column-parallel matrix on its input side, Shard(1)), or on dim 0 where
  the table keeps it whole (biases, norms: FSDP2 reduces the gradients only of what it shards).
- The weights are plain contiguous (out, in) tensors: the CPU layout of opt_torch.fast_paths (views into a
  shared buffer), which DTensor and FSDP2 cannot slice, is undone, and the forward and generate take
  the module path (the fast paths step aside for DTensor parameters and hooks; one device's decoding
  keeps them).
- Inputs: every rank passes the same input_ids (a tp group must see the same tokens: broadcast them, or
  seed sampling alike; generate's choices then agree because the logits do). The trainer takes the
  global batch on every rank and keeps its own dp rows.
- `from_pretrained(path, device_mesh=mesh)` builds the model on the meta device, splits it, and fills
  each rank's blocks from the memory-mapped checkpoint (opt_spec.io): a rank reads its bytes only
  (`model.bytes_read`). `save_pretrained` writes the usual whole Hugging Face folder from rank 0.

FSDP2 keeps the root's parameters gathered after a forward without backward (generate, evaluation):
an optimizer built then would see the gathered tensors, not the sharded ones. `reshard(model)` first
(the trainer does).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from opt_spec import OPTConfig, WeightKind, check_weights, tied_source, weight_table
from opt_spec import io as spec_io
from opt_spec.parallel import COLUMN, FSDP, ROW, VOCAB, check_plan, tensor_parallel_style
from opt_spec.weights import LoadPlan, Role, WeightSpec

from .checkpoint import numpy_to_torch, torch_to_numpy
from .fast_paths import unpack_weights

DIMS = ("dp", "tp")  # torch's names for the spec's (fsdp, tp)
# FSDP2 warns, at a layer's first call, that it returns views (a decoder layer's keys and values): an
# in-place change of them would skip its hooks. Nothing changes them; the warning is silenced.
VIEW_WARNING = r"FSDP2-wrapped module \(FSDPOPTDecoderLayer\) returned a view"


# ------------------------------------------------------------------------------------------ meshes
def init_mesh(dp: int = -1, tp: int = 1, device_type: str | None = None) -> DeviceMesh:
    """The ("dp", "tp") DeviceMesh over every process of the job. Starts the process group first if
    nobody has: from torchrun's environment (NCCL on GPUs, each process on its LOCAL_RANK's GPU; gloo on
    CPUs), or, in a process not launched by torchrun, a group of one. dp=-1: the ranks tp leaves."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    for name, value in (("dp", dp), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and not (name == "dp" and value == -1)):
            raise ValueError(f"init_mesh: {name}={value!r} must be a positive int" +
                             (" (or -1: the ranks tp leaves)" if name == "dp" else ""))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if dp == -1:
        if world % tp:
            raise ValueError(f"init_mesh: tp={tp} does not divide the {world} processes")
        dp = world // tp
    if dp * tp != world:
        raise ValueError(f"init_mesh: dp={dp} x tp={tp} = {dp * tp} processes, but the job has {world} "
                         "(torchrun --nproc-per-node per node x --nnodes)")
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=DIMS)


def mesh_shape(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp, tp) of a mesh, which must have exactly the dims ("dp", "tp")."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"device_mesh must be a torch DeviceMesh (see opt_torch.distributed.init_mesh), "
                        f"got {type(mesh).__name__}")
    if tuple(mesh.mesh_dim_names or ()) != DIMS:
        raise ValueError(f"the mesh has dims {mesh.mesh_dim_names}; optkit splits over exactly {DIMS} (a size-1 "
                         "dim is fine): init_device_mesh(device_type, (dp, tp), mesh_dim_names=('dp', 'tp'))")
    return mesh.size(0), mesh.size(1)


def dp_rank(mesh: DeviceMesh) -> int:
    """This process's coordinate on the dp dim (which rows of a global batch it takes)."""
    return mesh.get_local_rank("dp")


def is_split(model: nn.Module) -> bool:
    """Whether `model` was split over a mesh by `parallelize` (its parameters may be DTensors)."""
    return getattr(model, "device_mesh", None) is not None


# --------------------------------------------------------------------------------------- the split
def plain_layout(model: nn.Module) -> None:
    """Every parameter plain and contiguous, and kept so by `.to()` and loading (opt_torch.fast_paths)."""
    from .modeling import OPTPreTrainedModel

    for m in model.modules():
        if isinstance(m, OPTPreTrainedModel):
            m.packed_layout = False
    unpack_weights(model)


def _torch_style(style: str, spec: WeightSpec):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style == COLUMN:  # an LM head's logits are the model's output: gathered whole on every rank
        return ColwiseParallel(output_layouts=Replicate()) if spec.role is Role.LM_HEAD else ColwiseParallel()
    if style == ROW:
        return RowwiseParallel()
    if style == VOCAB:  # token ids whole on every rank; the partial lookups are summed
        return RowwiseParallel(input_layouts=Replicate())
    raise ValueError(f"{spec.name}: no torch style for {style!r}")


def _fsdp_placement(split: tuple):
    """FSDP2's placement of one parameter: the table's fsdp dimension, else dim 0 (FSDP2 shards all it
    manages)."""
    from torch.distributed.tensor import Shard

    return Shard(split.index(FSDP)) if FSDP in split else Shard(0)


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Tensor parallelism over "tp" from the spec's table, then FSDP2 over "dp" per decoder layer and at
    the root (either size may be 1: that part is skipped). Changes `model` in place and returns it; a
    plan that cannot work (tp not dividing the heads) is refused in words before anything changes.
    Every rank must hold the same weights (the same checkpoint or seed): FSDP2 keeps each rank's share
    of its own copy. (from_pretrained(device_mesh=) never builds the whole model.)"""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from .modeling import OPTAttention, OPTDecoderLayer

    if is_split(model):
        raise ValueError(f"{type(model).__name__} is already split over a mesh")
    dp, tp = mesh_shape(mesh)
    plan = check_plan(model.config, fsdp=dp, tp=tp, head=model.head)
    plain_layout(model)
    specs = {s.name: s for s in weight_table(model.config, model.head)}
    if tp > 1:
        styles = {}
        for spec in specs.values():
            style = tensor_parallel_style(plan, spec)
            if style is not None:
                styles[spec.name.rsplit(".", 1)[0]] = _torch_style(style, spec)
        parallelize_module(model, mesh["tp"], styles)
        for m in model.modules():
            if isinstance(m, OPTAttention):
                m.num_heads //= tp  # whole heads per rank (check_plan made sure tp divides them)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # parallelize_module replaced the head's parameter by a copy
    if dp > 1:
        placements = {id(p): _fsdp_placement(plan.splits[name]) for name, p in model.named_parameters()}
        place = lambda p: placements[id(p)]  # noqa: E731
        warnings.filterwarnings("ignore", message=VIEW_WARNING)
        for m in model.modules():
            if isinstance(m, OPTDecoderLayer):
                fully_shard(m, mesh=mesh["dp"], shard_placement_fn=place)
        fully_shard(model, mesh=mesh["dp"], shard_placement_fn=place)
    model.device_mesh = mesh
    model.sharding_plan = plan
    return model


def reshard(model: nn.Module) -> None:
    """Puts every FSDP2 unit back to its shards (a forward without backward leaves the root gathered)."""
    if not is_split(model):
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_box(param: torch.Tensor) -> tuple[slice, ...]:
    """The slices of the whole (canonical) tensor that this rank holds of `param`."""
    if not _is_dtensor(param):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _is_dtensor(t) -> bool:  # without importing torch.distributed.tensor (~2 s) where no model is split
    return hasattr(t, "placements") and hasattr(t, "to_local")


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every rank of its mesh calls it)."""
    return param.full_tensor() if _is_dtensor(param) else param


def shared_seed() -> int:
    """A fresh random seed drawn by rank 0 and given to every rank (sampling on a split model)."""
    seed = [torch.seed() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0)
    return int(seed[0])


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _fresh(spec: WeightSpec, config: OPTConfig, dtype, device) -> torch.Tensor:
    """A head the checkpoint lacks, whole, the same on every rank: drawn on rank 0, broadcast."""
    t = torch.zeros(spec.shape, dtype=dtype, device=device)
    if spec.kind is WeightKind.LINEAR_WEIGHT:
        if dist.get_rank() == 0:
            t.normal_(0.0, config.init_std)
        dist.broadcast(t, src=0)
    return t


def load_split(cls, config: OPTConfig, attn_implementation: str, tensors: Mapping[str, np.ndarray],
               load_plan: LoadPlan, dtype: torch.dtype, mesh: DeviceMesh) -> nn.Module:
    """from_pretrained(path, device_mesh=mesh): the model built on the meta device, split, then each
    rank's blocks copied from the memory-mapped arrays `tensors` (only those bytes are read)."""
    dp, tp = mesh_shape(mesh)
    check_plan(config, fsdp=dp, tp=tp, head=cls.head)  # refuse before building anything
    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    model.to(dtype)
    parallelize(model, mesh)
    model.to_empty(device=_mesh_device(mesh))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    fresh = {spec.name: spec for spec in load_plan.fresh}
    read = 0
    with torch.no_grad():
        for name, param in model.named_parameters():  # the same order on every rank (fresh heads broadcast)
            box = local_box(param)
            local = param.to_local() if _is_dtensor(param) else param
            if name in fresh:
                block = _fresh(fresh[name], config, dtype, local.device)[box]
            else:
                array = tensors[name][box]
                read += array.nbytes
                block = numpy_to_torch(array)
            if tuple(block.shape) != tuple(local.shape):
                raise RuntimeError(f"{name}: this rank holds {tuple(local.shape)}, its block is {tuple(block.shape)}")
            local.copy_(block)
    model.bytes_read = read
    return model


# ------------------------------------------------------------------------------------ device_map
def _device_of(device_map: Mapping[str, object], name: str):
    """The device_map entry of a parameter: the longest module prefix that names it ("" names all)."""
    best = None
    for prefix, device in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, device)
    if best is None:
        raise ValueError(f"device_map places no module holding {name}")
    return best[1]


def _torch_device(device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def load_dispatched(cls, config: OPTConfig, attn_implementation: str, tensors: Mapping[str, np.ndarray],
                    load_plan: LoadPlan, dtype: torch.dtype, device_map, max_memory=None,
                    offload_folder=None) -> nn.Module:
    """from_pretrained(path, device_map=...): accelerate's dispatch. "auto" fills the accelerators in
    order up to max_memory, then the CPU, then disk (each decoder layer whole); a dict maps module
    names to a GPU index, "cpu" or "disk". Each weight is read once from the memory-mapped checkpoint
    straight to its place; weights on "disk" go to offload_folder (a scratch folder the model reads
    them back from at every forward: accelerate's numpy files and index.json)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    plain_layout(model)
    model.to(dtype)
    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["OPTDecoderLayer"],
                                           dtype=dtype)
    elif isinstance(device_map, (str, int, torch.device)):
        device_map = {"": device_map}
    elif isinstance(device_map, Mapping):
        device_map = dict(device_map)
    else:
        raise TypeError(f"device_map={device_map!r}: expected 'auto', a device, or a dict of module name -> device")
    devices = set(device_map.values())
    if "disk" in devices and offload_folder is None:
        raise ValueError("device_map puts weights on 'disk': pass offload_folder=DIR (a scratch folder for them)")
    if offload_folder is not None:
        os.makedirs(offload_folder, exist_ok=True)
    tied = tied_source(config, cls.head)
    for alias, source in tied.items():
        if _device_of(device_map, alias) != _device_of(device_map, source):
            raise ValueError(f"device_map puts {alias} on {_device_of(device_map, alias)!r} but {source}, the "
                             f"weight it is tied to, on {_device_of(device_map, source)!r}: put both on one device")
    fresh = {spec.name: spec for spec in load_plan.fresh}
    index: dict = {}
    for name, _ in list(model.named_parameters()):
        if name in tied:
            continue
        if name in fresh:
            value = torch.zeros(fresh[name].shape, dtype=dtype)
            if fresh[name].kind is WeightKind.LINEAR_WEIGHT:
                value.normal_(0.0, config.init_std)
        else:
            value = numpy_to_torch(tensors[name]).to(dtype)
        device = _device_of(device_map, name)
        if device == "disk":
            offload_weight(value, name, offload_folder, index)
            for alias, source in tied.items():  # the tied head's hook looks its weight up by its own name
                if source == name:
                    offload_weight(value, alias, offload_folder, index)
        else:
            set_module_tensor_to_device(model, name, _torch_device(device), value=value)
    if index:
        save_offload_index(index, offload_folder)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
    main = accelerators[0] if accelerators else "cpu"  # accelerate tells "cpu" by its name
    dispatch_model(model, device_map, main_device=main, offload_dir=offload_folder, offload_index=index or None,
                   force_hooks=True)
    model.main_device = _torch_device(main)
    return model


# -------------------------------------------------------------------------------------------- saving
def _offloaded(model: nn.Module, name: str) -> torch.Tensor:
    """An offloaded weight, read back through the accelerate hook that loads it at every forward."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hooks = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        for hook in getattr(hooks, "hooks", [hooks]):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                try:
                    return hook.weights_map[".".join(parts[i:])]
                except KeyError:
                    pass
    raise RuntimeError(f"{name} is offloaded, but no accelerate hook holds it")


def save_split(model: nn.Module, path, max_shard_size="5GB") -> list[str]:
    """save_pretrained of a split or dispatched model: the usual whole Hugging Face folder, each tensor
    gathered (or read back from the offload folder) and written before the next, by rank 0; every rank
    of a split model calls it (the gathers are collectives)."""
    path = os.fspath(path)
    reshard(model)
    state = model.state_dict()
    tied = tied_source(model.config, model.head)
    names = [n for n in state if n not in tied]
    check_weights({n: tuple(state[n].shape) for n in names}, model.config, model.head,
                  where=f"{type(model).__name__}.state_dict()")

    def make(name: str) -> Callable[[], np.ndarray]:
        t = state[name]
        if t.is_meta:
            return lambda: torch_to_numpy(_offloaded(model, name).to(t.dtype))
        return lambda: torch_to_numpy(full_tensor(t))

    writer = not dist.is_initialized() or dist.get_rank() == 0
    entries = [(n, tuple(state[n].shape), torch_to_numpy(torch.empty(0, dtype=state[n].dtype)).dtype, make(n))
               for n in names]
    files = []
    if writer:
        config_dict = model.config.to_saved_dict(type(model).__name__, str(model.dtype).removeprefix("torch."))
        files = spec_io.save_safetensors_entries(path, entries, config_dict, max_shard_size)
        if hasattr(model, "_save_generation_config"):
            model._save_generation_config(path)
    elif is_split(model):
        for _, _, _, gather in entries:  # the same gathers, in the writer's order
            gather()
    if is_split(model):
        dist.barrier()
    return files


# ------------------------------------------------------------------------- DCP checkpoints from anyone
MAX_DCP_METADATA_BYTES = 256 << 20  # OPT-175b's optimizer state has ~1,200 tensors: a few MB of metadata
_DCP = "torch.distributed.checkpoint."
_DCP_GLOBALS = {(_DCP + "metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def dcp_reader(path):
    """torch.distributed.checkpoint's file reader and load planner for a checkpoint folder that may come
    from anyone: DCP unpickles its `.metadata` and the non-tensor values (the optimizer's settings)
    freely, which would run whatever code they name. Here the metadata is read by an unpickler that
    builds DCP's own records and nothing else (at most MAX_DCP_METADATA_BYTES), every data file it
    names must be a plain file of the folder (opt_spec.io.checkpoint_file), and the values are read
    with torch.load(weights_only=True). Returns (storage_reader, planner) for dcp.load."""
    import io
    import pickle

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from opt_spec.errors import CheckpointError

    folder = os.fspath(path)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
                return super().find_class(module, name)
            raise CheckpointError(f"{folder}/.metadata refers to {module}.{name}: not part of a DCP checkpoint's "
                                  "metadata (refused, nothing of it was run)")

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            meta_path = spec_io.checkpoint_file(folder, ".metadata")
            if os.path.getsize(meta_path) > MAX_DCP_METADATA_BYTES:
                raise CheckpointError(f"{meta_path}: {os.path.getsize(meta_path):,} bytes; DCP metadata is read up "
                                      f"to {MAX_DCP_METADATA_BYTES:,}")
            with open(meta_path, "rb") as f:
                try:
                    metadata = Unpickler(f).load()
                except CheckpointError:
                    raise
                except Exception as err:
                    raise CheckpointError(f"{meta_path}: not DCP metadata ({type(err).__name__}: {err})") from None
            if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
                raise CheckpointError(f"{meta_path}: holds a {type(metadata).__name__}, not DCP metadata")
            for index, info in metadata.storage_data.items():
                spec_io.checkpoint_file(folder, getattr(info, "relative_path", None),
                                        entry=f"{meta_path}: storage of {getattr(index, 'fqn', index)!r:.200}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                plain = torch.load(value, weights_only=True)  # numbers, strings, tuples: or refused
            except Exception as err:
                raise CheckpointError(f"{folder}: {read_item.dest_index.fqn} is not plain data "
                                      f"({type(err).__name__}: {str(err)[:300]})") from None
            again = io.BytesIO()
            torch.save(plain, again)  # DCP's own loader then reads only what was just checked
            again.seek(0)
            super().load_bytes(read_item, again)

    return Reader(folder), Planner()


def dcp_load(state: dict, path, single_process: bool = False) -> None:
    """dcp.load of `state` (filled in place) from a folder that may come from anyone (dcp_reader). A
    refusal is raised as the CheckpointError that says why (DCP would wrap it in a CheckpointException
    listing tracebacks per rank). single_process: load without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from opt_spec.errors import CheckpointError

    reader, planner = dcp_reader(path)
    reader.read_metadata()  # a refused checkpoint is refused here, before DCP starts
    try:
        with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=single_process)
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, CheckpointError)]
        if refused:
            raise refused[0] from None
        raise


# ------------------------------------------------------------------------------------------ training
def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The float32 2-norm of the per-tensor float32 norms (opt_spec.training's clipping norm) for
    gradients that may be DTensors on different meshes: each tensor's norm is completed over its mesh
    (a sum over its shards), then they are combined as on one device."""
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g, 2, dtype=torch.float32)
        norms.append(full_tensor(n))
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's own part of every tensor (in-place updates of these change the DTensors)."""
    return [t.to_local() if _is_dtensor(t) else t for t in tensors]


__all__ = ["DIMS", "dcp_load", "dcp_reader", "dp_rank", "full_tensor", "grad_norm", "init_mesh", "is_split",
           "load_dispatched", "load_split", "local_box", "mesh_shape", "parallelize", "plain_layout", "reshard",
           "save_split", "shared_seed"]
