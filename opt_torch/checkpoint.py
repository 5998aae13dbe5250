"""Hugging Face checkpoint directories for the PyTorch backend: from_pretrained / save_pretrained.

Loading builds the module on the meta device (no wasted initialization), reads each tensor once
(memory-mapped by opt_spec.io: safetensors, or pickles through the spec's restricted torch-zip reader),
checks every name and shape against the spec's weight table, and assigns the tensors. Only a head the
checkpoint lacks is initialized.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_dtypes
import numpy as np
import torch

from opt_spec import Head, OPTConfig, WeightKind, check_weights, planned_tensors, tied_source, weight_table
from opt_spec import io as spec_io
from opt_spec.surface import auto_dtype, dtype_argument
from opt_spec.hub import pretrained_folder
from opt_spec.inputs import check_seed

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in TORCH_DTYPES:
        return TORCH_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(TORCH_DTYPES)}, 'auto' or a torch.dtype")


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A NumPy array (bfloat16 through ml_dtypes included) -> a torch tensor that owns its memory."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.array(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: memory-mapped array} for every weight of a Hugging Face directory.

    pytorch_model.bin is read as the other backends read it, by the spec's bounded reader
    (opt_spec.torch_pickle), not by torch.load: with mmap, torch trusts the sizes in the pickle (a
    record cut short is read on into its neighbours), and it expands a compressed record whole."""
    return spec_io.load_checkpoint_dir(directory)


class PretrainedMixin:
    """from_config / from_pretrained / save_pretrained for the OPT modules (mixed into nn.Module)."""

    head: Head

    @classmethod
    def from_config(cls, config: OPTConfig, dtype=None, attn_implementation: str = "sdpa", seed: int | None = None,
                    *, torch_dtype=None):
        """A freshly initialized model (normal(0, init_std) weights, zero pad row). torch_dtype: dtype's older
        Hugging Face name."""
        if seed is not None:
            torch.manual_seed(check_seed(seed))
        model = cls(config, attn_implementation=attn_implementation)
        dtype = resolve_dtype(dtype_argument(dtype, torch_dtype))
        return model.to(dtype) if dtype not in (None, "auto") else model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=None, attn_implementation: str = "sdpa",
                        config: OPTConfig | None = None, device: str | torch.device = "cpu", *, torch_dtype=None,
                        revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None,
                        device_mesh=None, device_map=None, max_memory=None, offload_folder=None):
        """Loads a Hugging Face directory (safetensors, sharded or not, or pytorch_model.bin).

        dtype: None -> float32; 'auto' -> config.json's dtype, else the checkpoint's; or a dtype to cast
        to (torch_dtype is its older Hugging Face name: either may be given).
        `path` may also be a Hugging Face Hub id ("facebook/opt-125m") at `revision`, read from the
        Hugging Face cache (`cache_dir`) or downloaded unless local_files_only / HF_HUB_OFFLINE=1
        (opt_spec.hub.resolve_pretrained); an existing local folder always wins.
        device_mesh: a ("dp", "tp") DeviceMesh: the model split over the processes of a torchrun job,
        each reading only its own blocks. device_map ("auto", a device, or {module: device}), with
        max_memory and offload_folder: one process, layers spread over accelerators, CPU and disk by
        accelerate. See opt_torch.distributed.
        """
        name_or_path, path, config = pretrained_folder(path, config, revision=revision, cache_dir=cache_dir,
                                                       local_files_only=local_files_only, token=token)
        dtype = resolve_dtype(dtype_argument(dtype, torch_dtype))
        plan, tensors = planned_tensors(read_checkpoint(path), config, cls.head, cls.__name__, path)
        table = weight_table(config, cls.head)

        if dtype is None:
            dtype = torch.float32
        elif dtype == "auto":
            first = next(iter(tensors.values()))
            saved = str(first.dtype).removeprefix("torch.") if isinstance(first, torch.Tensor) \
                else str(np.dtype(first.dtype))
            dtype = resolve_dtype(auto_dtype(config, saved))
        if device_mesh is not None or device_map is not None:
            from . import distributed

            if device_mesh is not None and device_map is not None:
                raise ValueError("pass device_mesh (many processes) or device_map (one process), not both")
            if device_mesh is not None:
                model = distributed.load_split(cls, config, attn_implementation, tensors, plan, dtype, device_mesh)
            else:
                model = distributed.load_dispatched(cls, config, attn_implementation, tensors, plan, dtype,
                                                    device_map, max_memory, offload_folder)
            return model._loaded_from(path, name_or_path)
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation)
        state = {}
        for spec in table:
            if spec.name in tensors:
                value = tensors.pop(spec.name)
                t = value if isinstance(value, torch.Tensor) else numpy_to_torch(value)
                state[spec.name] = t.to(device=device, dtype=dtype)
        for spec in plan.fresh:  # OPT's initialization, by kind: normal weights, zero biases
            t = torch.zeros(spec.shape, dtype=dtype, device=device)
            state[spec.name] = t.normal_(0.0, config.init_std) if spec.kind is WeightKind.LINEAR_WEIGHT else t
        for n, src in plan.tied.items():
            state[n] = state[src]
        model.load_state_dict(state, strict=True, assign=True)  # its post-hook re-ties and packs
        return model._loaded_from(path, name_or_path)

    def _loaded_from(self, path: str, name_or_path: str):
        """The end of from_pretrained: generation_config.json (generate's defaults) read, the name kept, eval mode."""
        if hasattr(self, "_load_generation_config"):
            self._load_generation_config(path)
        self.name_or_path = name_or_path
        return self.eval()

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> list[str]:
        """Writes config.json and the weights (model.safetensors, or shards with an index; or
        pytorch_model.bin with safe_serialization=False). A tied LM head is not stored twice. A model
        split over processes or dispatched over devices (opt_torch.distributed) writes safetensors,
        gathering one tensor at a time; every rank calls this, rank 0 writes. With PEFT adapters loaded
        (load_adapter), the active adapter alone, as transformers does (opt_torch.adapters)."""
        if getattr(self, "_hf_peft_config_loaded", False):
            return self.save_adapter(path)
        if getattr(self, "device_mesh", None) is not None or getattr(self, "hf_device_map", None) is not None:
            if not safe_serialization:
                raise ValueError("a split or dispatched model saves safetensors (safe_serialization=True)")
            from .distributed import save_split

            return save_split(self, path, max_shard_size)
        path = os.fspath(path)
        state = self.state_dict()
        tied = tied_source(self.config, self.head)
        tensors = {n: t for n, t in state.items() if n not in tied}
        check_weights(tensors, self.config, self.head, where=f"{type(self).__name__}.state_dict()")
        config_dict = self.config.to_saved_dict(type(self).__name__, str(self.dtype).removeprefix("torch."))
        if safe_serialization:
            arrays = {n: torch_to_numpy(t) for n, t in tensors.items()}
            files = spec_io.save_safetensors_dir(path, arrays, config_dict, max_shard_size)
        else:
            files = _save_torch_bin(path, tensors, config_dict, max_shard_size)
        if hasattr(self, "_save_generation_config"):
            self._save_generation_config(path)
        return files


def _save_torch_bin(path: str, tensors: dict[str, torch.Tensor], config_dict: dict,
                    max_shard_size: int | str) -> list[str]:
    sizes = [(n, t.numel() * t.element_size()) for n, t in tensors.items()]
    shards = spec_io.plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        files = {spec_io.TORCH_WEIGHTS_NAME: shards[0]}
    else:
        files = {f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin": s for i, s in enumerate(shards)}
    nbytes = dict(sizes)
    spec_io.check_room_to_save(path, {f: sum(nbytes[n] for n in shard) for f, shard in files.items()})
    stale = spec_io.stale_weight_files(path, keep=[*files, spec_io.TORCH_INDEX_NAME] if len(files) > 1 else files)
    for fname, shard in files.items():
        with spec_io.atomic_path(os.path.join(path, fname)) as tmp:
            torch.save({n: tensors[n].detach().cpu().contiguous() for n in shard}, tmp)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(b for _, b in sizes)},
                 "weight_map": {n: f for f, shard in files.items() for n in shard}}
        spec_io.atomic_write_text(os.path.join(path, spec_io.TORCH_INDEX_NAME), json.dumps(index, indent=2) + "\n")
    spec_io.atomic_write_text(os.path.join(path, spec_io.CONFIG_NAME),
                              json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    for f in stale:
        os.remove(f)
    return [os.path.join(path, f) for f in files]
