"""Hugging Face PyTorch-layout directories: model.safetensors / pytorch_model.bin, single or sharded
with an index, next to config.json. Canonical names are these files' names, so the naming rule is
the identity and the layout is torch's."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec.io import release_pages, write_safetensors_stream
from opt_spec.torch_pickle import TorchZipReader, tensors_of, write_torch_zip

from .base import (ARCHITECTURES, Checkpoint, ConversionError, NativeTensor, TensorRef, bind, canonical_prefixes, cast,
                   detect_head, dtype_name, output_dtype)

DEFAULT_SHARD_SIZE = "5GB"
Tick = Callable[[TensorRef], None]


# ------------------------------------------------------------------------------------------ config
def load_config(directory: str, overrides: Mapping[str, Any] | None = None) -> OPTConfig:
    if not os.path.lexists(os.path.join(directory, spec_io.CONFIG_NAME)):
        raise ConversionError(f"{directory} has no {spec_io.CONFIG_NAME}; it is needed to read this format")
    config = OPTConfig.from_json_file(spec_io.checkpoint_file(directory, spec_io.CONFIG_NAME))
    return apply_overrides(config, overrides)


def apply_overrides(config: OPTConfig, overrides: Mapping[str, Any] | None) -> OPTConfig:
    if not overrides:
        return config
    return OPTConfig.from_dict({**config.to_dict(), **dict(overrides)})


def output_config(ckpt: Checkpoint, dtype: np.dtype | None) -> dict:
    """config.json for the written checkpoint: the source's, with dtype and architecture filled in."""
    dtypes = {dtype_name(output_dtype(r, dtype)) for r in ckpt.tensors.values()}
    architecture = None if ckpt.config.extra.get("architectures") else ARCHITECTURES[ckpt.head]
    return ckpt.config.to_saved_dict(architecture, dtypes.pop() if len(dtypes) == 1 else None)


def write_config(directory: str, config_dict: Mapping) -> str:
    path = os.path.join(directory, spec_io.CONFIG_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------- streamed writing
def produce(ref: TensorRef, dtype: np.dtype | None) -> np.ndarray:
    """The tensor of `ref`, read and cast, with its shape checked against the spec."""
    array = ref.load()
    if tuple(array.shape) != ref.shape:
        raise ConversionError(f"{ref.where}: read a {tuple(array.shape)} tensor for {ref.name}, expected {ref.shape}")
    out = cast(array, output_dtype(ref, dtype))
    if out is not array:
        release_pages(array)
    return out


def _shards(ckpt: Checkpoint, dtype, max_shard_size, single: str, pattern: str) -> dict[str, list[TensorRef]]:
    refs = list(ckpt.tensors.values())
    sizes = [(r.name, r.spec.numel * output_dtype(r, dtype).itemsize) for r in refs]
    plan = spec_io.plan_shards(sizes, max_shard_size)
    by_name = {r.name: r for r in refs}
    if len(plan) == 1:
        return {single: refs}
    return {pattern.format(i + 1, len(plan)): [by_name[n] for n in shard] for i, shard in enumerate(plan)}


def _write_index(directory: str, name: str, files: dict[str, list[TensorRef]], dtype) -> None:
    total = sum(r.spec.numel * output_dtype(r, dtype).itemsize for refs in files.values() for r in refs)
    index = {"metadata": {"total_size": total},
             "weight_map": {r.name: f for f, refs in files.items() for r in refs}}
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------- the formats
def read_hf(directory: str, config_overrides=None, expect: str | None = None, config: OPTConfig | None = None,
            head=None) -> Checkpoint:
    directory = os.fspath(directory)
    fmt, files = spec_io.find_weight_files(directory)
    if expect is not None and fmt != expect:
        raise ConversionError(f"{directory} holds {os.path.basename(files[0])}, not a {expect} checkpoint")
    config = config or load_config(directory, config_overrides)
    native: dict[str, NativeTensor] = {}
    for path in files:
        if fmt == "safetensors":
            st = spec_io.SafetensorsFile(path)
            found = {n: NativeTensor(st.shape(n), st.dtype(n), (lambda st=st, n=n: st[n]), f"{path}:{n}") for n in st}
        else:
            reader = TorchZipReader(path)
            found = {n: NativeTensor(t.shape, t.dtype, t.array, f"{path}:{n}")
                     for n, t in tensors_of(reader.obj, path).items()}
        for name, t in found.items():
            if name in native:
                raise ConversionError(f"tensor {name!r} appears in more than one shard of {directory}")
            native[name] = t
    single, index_name = ((spec_io.SAFE_WEIGHTS_NAME, spec_io.SAFE_INDEX_NAME) if fmt == "safetensors" else
                          (spec_io.TORCH_WEIGHTS_NAME, spec_io.TORCH_INDEX_NAME))
    if files != [os.path.join(directory, single)]:  # read through the index
        listed, _ = spec_io.index_shards(directory, index_name)
        absent = sorted(set(listed) - set(native))
        if absent:
            raise ConversionError(f"{index_name} lists tensors no shard holds: {', '.join(absent)}")
    head = head or detect_head(native)
    notes: list[str] = []
    native = canonical_prefixes(native, head, notes)
    refs = bind(native, config, head, lambda spec: [spec.name], "torch", f"checkpoint {directory}", notes)
    name = "hf-safetensors" if fmt == "safetensors" else "hf-pytorch"
    return Checkpoint(name, directory, config, head, refs, files, notes)


def read_hf_safetensors(path, config_overrides=None, config=None, head=None):
    return read_hf(path, config_overrides, "safetensors", config, head)


def read_hf_pytorch(path, config_overrides=None, config=None, head=None):
    return read_hf(path, config_overrides, "torch", config, head)


def write_hf_safetensors(ckpt: Checkpoint, directory: str, dtype=None, tick: Tick | None = None,
                         max_shard_size=DEFAULT_SHARD_SIZE) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    files = _shards(ckpt, dtype, max_shard_size, spec_io.SAFE_WEIGHTS_NAME, "model-{:05d}-of-{:05d}.safetensors")
    for fname, refs in files.items():
        items = [(r.name, r.shape, output_dtype(r, dtype), (lambda r=r: produce(r, dtype))) for r in refs]
        write_safetensors_stream(os.path.join(directory, fname), items,
                                 on_written=(lambda name, a: tick(ckpt.tensors[name])) if tick else None)
    if len(files) > 1:
        _write_index(directory, spec_io.SAFE_INDEX_NAME, files, dtype)
    write_config(directory, output_config(ckpt, dtype))
    return [os.path.join(directory, f) for f in files]


def write_hf_pytorch(ckpt: Checkpoint, directory: str, dtype=None, tick: Tick | None = None,
                     max_shard_size=DEFAULT_SHARD_SIZE) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    files = _shards(ckpt, dtype, max_shard_size, spec_io.TORCH_WEIGHTS_NAME, "pytorch_model-{:05d}-of-{:05d}.bin")
    for fname, refs in files.items():
        by_name = {r.name: r for r in refs}
        write_torch_zip(os.path.join(directory, fname), [(r.name, r.shape, output_dtype(r, dtype)) for r in refs],
                        lambda n: produce(by_name[n], dtype), archive=os.path.splitext(fname)[0],
                        on_written=(lambda name, a: tick(ckpt.tensors[name])) if tick else None)
    if len(files) > 1:
        _write_index(directory, spec_io.TORCH_INDEX_NAME, files, dtype)
    write_config(directory, output_config(ckpt, dtype))
    return [os.path.join(directory, f) for f in files]


def fsync_tree(path: str) -> None:
    """Flushes every file under path (written without fsync) before the final rename."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
