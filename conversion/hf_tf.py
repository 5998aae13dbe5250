"""Hugging Face TensorFlow directories (tf_model.h5, Keras 2 HDF5 weights), read and written with
h5py alone (no TensorFlow).

The naming rule, as Hugging Face's TF port saved OPT: `<model scope>/` + the weight's Keras path
(opt_spec.layouts, convention "keras": kernel (in, out), embeddings, gamma/beta) with the layer index
kept in its scope name (`layers.3`), the base model always under `model/`, the shared token embedding
stored as `weight`, and a `:0` suffix. Datasets live under a group per top-level Keras layer, whose
`weight_names` attribute lists them; large attribute lists are split into `weight_names0`,
`weight_names1`, ... (HDF5 limits an object header to 64 KiB). Sharded checkpoints
(tf_model-0000K-of-0000N.h5 + tf_model.h5.index.json) keep one dataset per weight at the root.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np

from opt_spec import Head, OPTConfig, WeightSpec, layouts
from opt_spec import io as spec_io
from opt_spec.io import release_pages, row_blocks

from .base import Checkpoint, ConversionError, NativeTensor, bind, dtype_name, output_dtype
from .hf import load_config, output_config, produce, write_config

TF_WEIGHTS_NAME = "tf_model.h5"
TF_INDEX_NAME = "tf_model.h5.index.json"
MODEL_SCOPES = {Head.BASE: "tfopt_model", Head.CAUSAL_LM: "tfopt_for_causal_lm",
                Head.SEQUENCE_CLASSIFICATION: "tfopt_for_sequence_classification",
                Head.QUESTION_ANSWERING: "tfopt_for_question_answering"}
KERAS_VERSION = "2.21.0"
_HEADER_LIMIT = 64512  # bytes an HDF5 attribute may take (Keras' HDF5_OBJECT_HEADER_LIMIT)


def has_any(names: list[str]) -> Callable[[str], bool]:
    """A detector: a directory holding any of `names`."""
    return lambda path: os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading or writing HDF5 (.h5) checkpoints needs h5py: pip install h5py") from None
    return h5py


# -------------------------------------------------------------------------------------- naming
def keras_scopes(spec: WeightSpec, convention: str = "keras") -> list[str]:
    """The Keras path of a weight below the model scope, with layer indices joined to their scope."""
    path = list(layouts.native_path(spec, convention))
    if path[0] == "decoder":  # a base model's names: Keras nests the decoder under the main layer `model`
        path.insert(0, "model")
    out: list[str] = []
    for part in path:
        if part.isdigit() and out and out[-1] == "layers":
            out[-1] = f"layers.{part}"
        else:
            out.append(part)
    return out


def tf_names(spec: WeightSpec) -> list[str]:
    """HF TF names of a weight without the model scope: the written one first, accepted aliases next."""
    scopes = keras_scopes(spec)
    names = ["/".join(scopes) + ":0"]
    if scopes[-2] == "embed_tokens":  # HF's TF port keeps the shared token embedding as `weight`
        names.insert(0, "/".join(scopes[:-1] + ["weight"]) + ":0")
    return names


def _strip_scope(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _head_from_scope(names: list[str], config: OPTConfig) -> Head:
    scopes = {n.split("/", 1)[0].rstrip("_0123456789") for n in names if "/" in n}
    for head, scope in MODEL_SCOPES.items():
        if scope in scopes:
            return head
    stripped = [_strip_scope(n) for n in names]
    if any(n.startswith("lm_head/") for n in stripped):
        return Head.CAUSAL_LM
    if any(n.startswith("score/") for n in stripped):
        return Head.SEQUENCE_CLASSIFICATION
    if any(n.startswith("qa_outputs/") for n in stripped):
        return Head.QUESTION_ANSWERING
    return Head.CAUSAL_LM


# ---------------------------------------------------------------------------- HDF5 attributes
def read_attr_list(group, name: str) -> list[str]:
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def write_attr_list(group, name: str, values: list[str]) -> None:
    data = np.asarray([v.encode("utf8") for v in values])
    if not len(values):
        group.attrs[name] = np.asarray([], dtype=np.float64)
        return
    big = [v for v in values if len(v.encode("utf8")) > _HEADER_LIMIT]
    if big:
        raise ConversionError(f"HDF5 attribute {name}: entry longer than {_HEADER_LIMIT} bytes: {big[0][:80]}...")
    chunks = max(1, math.ceil(data.nbytes / _HEADER_LIMIT))
    parts = np.array_split(data, chunks)
    while any(p.nbytes > _HEADER_LIMIT for p in parts):
        chunks += 1
        parts = np.array_split(data, chunks)
    if chunks == 1:
        group.attrs[name] = data
    else:
        for i, part in enumerate(parts):
            group.attrs[f"{name}{i}"] = part


# ------------------------------------------------------------------------------------- reading
def h5_dataset_tensor(path: str, dset, where: str) -> NativeTensor:
    """A dataset as a lazy tensor: memory-mapped when stored contiguously, else read by h5py."""
    shape, dtype = tuple(int(d) for d in dset.shape), np.dtype(dset.dtype)
    offset = dset.id.get_offset() if dset.chunks is None and dset.compression is None else None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset is not None:
        size = os.path.getsize(path)
        if offset + nbytes > size:
            raise ConversionError(f"{path}: truncated: {where} ends at byte {offset + nbytes} but the file has {size}")

        def load():
            if nbytes == 0:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    else:
        name = dset.name

        def load():
            with _h5py().File(path, "r") as f:
                return f[name][()]
    return NativeTensor(shape, dtype, load, f"{path}:{where}")


def _open_h5(path: str):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ConversionError(f"{path}: not a readable HDF5 file (truncated or corrupt: {err})") from None


def read_keras2_h5(path: str) -> dict[str, NativeTensor]:
    """{full weight name: tensor} of a Keras 2 HDF5 weights file (layer groups with weight_names)."""
    out: dict[str, NativeTensor] = {}
    with _open_h5(path) as f:
        layers = read_attr_list(f, "layer_names")
        if not layers:
            raise ConversionError(f"{path}: no 'layer_names' attribute: not a Keras 2 HDF5 weights file")
        for layer in layers:
            if layer not in f:
                raise ConversionError(f"{path}: layer group {layer!r} is listed but missing")
            group = f[layer]
            for name in read_attr_list(group, "weight_names"):
                if name not in group:
                    raise ConversionError(f"{path}: weight {name!r} of layer {layer!r} is listed but missing")
                out[name] = h5_dataset_tensor(path, group[name], name)
    return out


def _read_sharded(directory: str) -> tuple[dict[str, NativeTensor], list[str]]:
    weight_map = spec_io.read_index(os.path.join(directory, TF_INDEX_NAME))
    files = sorted(set(weight_map.values()))
    out: dict[str, NativeTensor] = {}
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise ConversionError(f"{TF_INDEX_NAME} names a shard that is missing: {path}")
        with _open_h5(path) as f:
            for name in read_attr_list(f, "layer_names"):
                if name not in f:
                    raise ConversionError(f"{path}: weight {name!r} is listed but missing")
                out[name] = h5_dataset_tensor(path, f[name], name)
    scope = next((n.split("/", 1)[0] for n in weight_map if "/" in n), "")
    return {f"{scope}/{n}": t for n, t in out.items()}, [os.path.join(directory, f) for f in files]


def read_hf_tf(directory: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    directory = os.fspath(directory)
    config = config or load_config(directory, config_overrides)
    single = os.path.join(directory, TF_WEIGHTS_NAME)
    if os.path.isfile(single):
        full, files = read_keras2_h5(single), [single]
    elif os.path.isfile(os.path.join(directory, TF_INDEX_NAME)):
        full, files = _read_sharded(directory)
    else:
        raise ConversionError(f"{directory} holds no {TF_WEIGHTS_NAME} or {TF_INDEX_NAME}")
    head = head or _head_from_scope(list(full), config)
    native: dict[str, NativeTensor] = {}
    for name, t in full.items():
        key = _strip_scope(name)
        if key in native:
            raise ConversionError(f"{directory}: weight {key!r} is stored twice")
        native[key] = t
    notes: list[str] = []
    refs = bind(native, config, head, tf_names, "keras", f"checkpoint {directory}", notes)
    return Checkpoint("hf-tf", directory, config, head, refs, files, notes)


# ------------------------------------------------------------------------------------- writing
def write_dataset(group, name: str, array: np.ndarray, chunk_bytes: int = 64 << 20):
    """Creates a contiguous dataset and fills it in row blocks (a lazy view is copied piecewise)."""
    if dtype_name(array.dtype) == "bfloat16":
        raise ConversionError(f"{name}: HDF5 has no bfloat16; convert with --dtype float32 or float16")
    dset = group.create_dataset(name, shape=array.shape, dtype=array.dtype.newbyteorder("<"))
    if array.ndim == 0:
        dset[()] = array
    elif array.size:
        for i, block in row_blocks(array, chunk_bytes):
            dset[i:i + len(block)] = block
    release_pages(array)


def write_keras2_h5(path: str, layers: dict[str, list[tuple[str, Callable[[], np.ndarray]]]],
                    on_written: Callable[[str], None] | None = None) -> None:
    """A Keras 2 HDF5 weights file: {layer name: [(full weight name, make array)]}."""
    h5py = _h5py()
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = KERAS_VERSION.encode()
        write_attr_list(f, "layer_names", list(layers))
        for layer, weights in layers.items():
            group = f.create_group(layer)
            write_attr_list(group, "weight_names", [n for n, _ in weights])
            for name, make in weights:
                write_dataset(group, name, make())
                if on_written is not None:
                    on_written(name)
        top = f.create_group("top_level_model_weights")
        write_attr_list(top, "weight_names", [])


def write_hf_tf(ckpt: Checkpoint, directory: str, dtype=None, tick=None, max_shard_size="10GB") -> list[str]:
    os.makedirs(directory, exist_ok=True)
    scope = MODEL_SCOPES[ckpt.head]
    refs = list(ckpt.tensors.values())
    make = {r.name: (lambda r=r: layouts.to_native(r.spec, produce(r, dtype), "keras")) for r in refs}
    names = {r.name: f"{scope}/{tf_names(r.spec)[0]}" for r in refs}
    sizes = [(r.name, r.spec.numel * output_dtype(r, dtype).itemsize) for r in refs]
    shards = spec_io.plan_shards(sizes, max_shard_size)
    by_name = {r.name: r for r in refs}
    done = (lambda n: tick(by_name[n])) if tick else None
    if len(shards) == 1:
        layers: dict[str, list] = {}
        for r in refs:
            layer = _strip_scope(names[r.name]).split("/", 1)[0]
            layers.setdefault(layer, []).append((names[r.name], make[r.name]))
        path = os.path.join(directory, TF_WEIGHTS_NAME)
        canonical = {full: n for n, full in names.items()}
        write_keras2_h5(path, layers, on_written=(lambda full: done(canonical[full])) if done else None)
        files = [path]
    else:
        h5py = _h5py()
        files, weight_map = [], {}
        for i, shard in enumerate(shards):
            fname = f"tf_model-{i + 1:05d}-of-{len(shards):05d}.h5"
            with h5py.File(os.path.join(directory, fname), "w") as f:
                for n in shard:
                    write_dataset(f, _strip_scope(names[n]), make[n]())
                    weight_map[names[n]] = fname
                    if done:
                        done(n)
                write_attr_list(f, "layer_names", [_strip_scope(names[n]) for n in shard])
            files.append(os.path.join(directory, fname))
        index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": weight_map}
        with open(os.path.join(directory, TF_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2) + "\n")
    write_config(directory, output_config(ckpt, dtype))
    return files
