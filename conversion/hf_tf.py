"""Hugging Face TensorFlow directories (tf_model.h5, Keras 2 HDF5 weights), read and written with
h5py alone (no TensorFlow).

The naming rule, as Hugging Face's TF port saved OPT: `<model scope>/` + the weight's Keras path
(opt_spec.layouts, convention "keras": kernel (in, out), embeddings, gamma/beta) with the layer index
kept in its scope name (`layers.3`), the base model always under `model/`, the shared token embedding
stored as `weight`, and a `:0` suffix. Datasets live under a group per top-level Keras layer, whose
`weight_names` attribute lists them; large attribute lists are split into `weight_names0`,
`weight_names1`, ... (HDF5 limits an object header to 64 KiB). Sharded checkpoints
(tf_model-0000K-of-0000N.h5 + tf_model.h5.index.json) keep one dataset per weight at the root.

An HDF5 file can point outside itself, so only what is stored inside it is read (the rule of
`h5_dataset_tensor` and `h5_get`, shared by the Keras 3 reader): datasets reached through hard links
only (a soft link or an external link into another file is refused), laid out contiguously, chunked or
compact with known filters, never virtual (made of other files' datasets) nor with external raw storage
(bytes kept in another file), of a numeric dtype; a contiguous dataset is memory-mapped only after its
offset and size are checked to lie inside the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable

import numpy as np

from opt_spec import Head, OPTConfig, WeightSpec, layouts
from opt_spec import io as spec_io
from opt_spec.errors import CheckpointError
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
    """A list of names kept in an attribute (or split over name0, name1, ...); refused unless strings."""
    if name in group.attrs:
        keys = [name]
    else:
        keys = []
        while f"{name}{len(keys)}" in group.attrs:
            keys.append(f"{name}{len(keys)}")
    values = []
    for key in keys:
        try:
            part = np.asarray(group.attrs[key])
            if part.size == 0:  # an empty list is written as an empty float array
                continue
            if part.ndim != 1 or part.dtype.kind not in "OSU":
                raise ValueError(f"a {part.dtype} array of shape {part.shape}, not a list of strings")
            values += [v.decode("utf8") if isinstance(v, bytes) else v for v in part.tolist()]
        except (OSError, TypeError, ValueError) as err:
            raise ConversionError(f"{group.file.filename}: attribute {key!r} of {group.name!r} is unreadable "
                                  f"({err})") from None
    if not all(isinstance(v, str) for v in values):
        raise ConversionError(f"{group.file.filename}: attribute {name!r} of {group.name!r} holds non-strings")
    return values


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
# HDF5 filters a stored dataset may use: deflate (gzip), shuffle, fletcher32 and h5py's lzf.
KNOWN_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
_MIN_CHUNK_BYTES = 1 << 20


def h5_get(group, name: str, path: str):
    """group[name] following hard links only, or None when absent: a soft link (an alias that can
    point anywhere in the file, or nowhere) or an external link (into another file) is refused."""
    h5py = _h5py()
    node = group
    for part in (p for p in name.split("/") if p):
        link = node.get(part, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            kind = {"SoftLink": "a soft link", "ExternalLink": "an external link"}.get(type(link).__name__, "a link")
            raise ConversionError(f"{path}: {name!r} goes through {kind} ({type(link).__name__} "
                                  f"{_describe_link(link)}); only data stored in the file itself is read")
        node = node[part]
    return node


def _describe_link(link) -> str:
    target = getattr(link, "path", "")
    return f"to {link.filename}:{target}" if getattr(link, "filename", None) else f"to {target}"


def h5_dataset_tensor(path: str, dset, where: str, opaque: np.dtype | None = None) -> NativeTensor:
    """A dataset as a lazy tensor, refused unless its bytes are stored inside this file (see the module
    docstring): memory-mapped when contiguous and unfiltered, else read by h5py. `opaque`: the dtype an
    opaque (HDF5 has no bfloat16) dataset holds, given by the caller from the dataset's attributes."""
    h5py = _h5py()
    if not isinstance(dset, h5py.Dataset):
        raise ConversionError(f"{path}: {where!r} is a {type(dset).__name__}, not a dataset")
    plist = dset.id.get_create_plist()
    layout = plist.get_layout()
    if dset.is_virtual or layout == h5py.h5d.VIRTUAL:
        raise ConversionError(f"{path}: dataset {where!r} is virtual (mapped from other datasets or files); "
                              "only data stored in the file itself is read")
    if plist.get_external_count():
        raise ConversionError(f"{path}: dataset {where!r} keeps its bytes in an external file "
                              f"({plist.get_external(0)[0].decode(errors='replace')!r}); only data stored in the "
                              "file itself is read")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        raise ConversionError(f"{path}: dataset {where!r} has an unknown storage layout ({layout})")
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    unknown = [f for f in filters if f not in KNOWN_FILTERS]
    if unknown:
        raise ConversionError(f"{path}: dataset {where!r} uses HDF5 filter {unknown[0]}; optkit reads only "
                              f"{', '.join(KNOWN_FILTERS.values())}")
    dtype = np.dtype(dset.dtype)
    if opaque is not None and dtype.kind == "V" and dtype.names is None and dtype.itemsize == np.dtype(opaque).itemsize:
        dtype = np.dtype(opaque)
    elif dtype.kind not in "fiub" or dtype.names is not None or dtype.subdtype is not None:
        raise ConversionError(f"{path}: dataset {where!r} has dtype {dtype}, not a number type")
    shape = tuple(int(d) for d in dset.shape)
    if len(shape) > spec_io.MAX_TENSOR_DIMS:
        raise ConversionError(f"{path}: dataset {where!r} has {len(shape)} dimensions")
    nbytes = math.prod(shape) * dtype.itemsize
    if layout == h5py.h5d.CHUNKED and math.prod(dset.chunks) * dtype.itemsize > max(nbytes, _MIN_CHUNK_BYTES):
        raise ConversionError(f"{path}: dataset {where!r} of shape {shape} has chunks of shape {dset.chunks}, "
                              "larger than itself")
    offset = dset.id.get_offset() if layout == h5py.h5d.CONTIGUOUS and not filters else None
    if offset is not None:  # None: never written (reads as its fill value)
        size = os.path.getsize(path)
        if offset < 0 or offset + nbytes > size:
            raise ConversionError(f"{path}: truncated: {where} ends at byte {offset + nbytes} but the file has {size}")

        def load():
            if nbytes == 0:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    else:
        name = dset.name

        def load():
            with _open_h5(path) as f:  # a corrupt chunk or filter stream is refused naming the file
                array = f[name][()]
            if array.shape != shape:
                raise ConversionError(f"{path}: dataset {where!r} read as {array.shape}, declared {shape}")
            return array.view(dtype) if array.dtype != dtype else array
    return NativeTensor(shape, dtype, load, f"{path}:{where}")


# What h5py raises for a damaged file: libhdf5's errors come out as these built-in classes ("bad heap free
# list", "addr overflow", "wrong B-tree signature", ...). Inside an open HDF5 file they mean a corrupt file.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


@contextlib.contextmanager
def _open_h5(path: str):
    """An HDF5 file opened for reading; what libhdf5 reports about a damaged file while the block runs
    becomes a ConversionError naming the file (a refusal, never a bare RuntimeError or KeyError)."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except _H5_ERRORS as err:
        raise ConversionError(f"{path}: not a readable HDF5 file (truncated or corrupt: {err})") from None
    try:
        with f:
            yield f
    except CheckpointError:
        raise
    except _H5_ERRORS as err:
        raise ConversionError(f"{path}: corrupt HDF5 file ({type(err).__name__}: {err})") from None


def read_keras2_h5(path: str) -> dict[str, NativeTensor]:
    """{full weight name: tensor} of a Keras 2 HDF5 weights file (layer groups with weight_names)."""
    out: dict[str, NativeTensor] = {}
    with _open_h5(path) as f:
        layers = read_attr_list(f, "layer_names")
        if not layers:
            raise ConversionError(f"{path}: no 'layer_names' attribute: not a Keras 2 HDF5 weights file")
        for layer in layers:
            group = h5_get(f, layer, path)
            if group is None:
                raise ConversionError(f"{path}: layer group {layer!r} is listed but missing")
            for name in read_attr_list(group, "weight_names"):
                dset = h5_get(group, name, path)
                if dset is None:
                    raise ConversionError(f"{path}: weight {name!r} of layer {layer!r} is listed but missing")
                out[name] = h5_dataset_tensor(path, dset, name)
    return out


def _read_sharded(directory: str) -> tuple[dict[str, NativeTensor], list[str]]:
    weight_map, files = spec_io.index_shards(directory, TF_INDEX_NAME)
    out: dict[str, NativeTensor] = {}
    for path in files:
        with _open_h5(path) as f:
            for name in read_attr_list(f, "layer_names"):
                dset = h5_get(f, name, path)
                if dset is None:
                    raise ConversionError(f"{path}: weight {name!r} is listed but missing")
                out[name] = h5_dataset_tensor(path, dset, name)
    scope = next((n.split("/", 1)[0] for n in weight_map if "/" in n), "")
    return {f"{scope}/{n}": t for n, t in out.items()}, files


def read_hf_tf(directory: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    directory = os.fspath(directory)
    config = config or load_config(directory, config_overrides)
    if os.path.lexists(os.path.join(directory, TF_WEIGHTS_NAME)):
        single = spec_io.checkpoint_file(directory, TF_WEIGHTS_NAME)
        full, files = read_keras2_h5(single), [single]
    elif os.path.lexists(os.path.join(directory, TF_INDEX_NAME)):
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
