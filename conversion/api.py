"""The format table, format detection and `convert`.

Every format is one row of FORMATS: how to recognize it, how to read it into a `Checkpoint` (lazy
canonical tensors) and how to write a `Checkpoint` out. `convert` reads, writes into a temporary
sibling of the destination, re-reads what it wrote and checks it against the spec, and only then
renames it into place.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from opt_spec import OPTConfig, check_weights
from opt_spec import io as spec_io
from opt_spec.errors import CheckpointError

from . import hf, hf_flax, hf_tf, metaseq, native
from .base import OUTPUT_DTYPES, Checkpoint, ConversionError, output_dtype


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[str], bool]
    read: Callable[..., Checkpoint]
    write: Callable[..., list[str]] | None  # None: read-only
    single_file: bool = False               # written as one file rather than a directory


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("hf-safetensors", "Hugging Face directory: config.json + model.safetensors (sharded with an index "
           "when large)", hf_tf.has_any([spec_io.SAFE_WEIGHTS_NAME, spec_io.SAFE_INDEX_NAME]),
           hf.read_hf_safetensors, hf.write_hf_safetensors),
    Format("hf-pytorch", "Hugging Face directory: config.json + pytorch_model.bin (sharded with an index when large)",
           hf_tf.has_any([spec_io.TORCH_WEIGHTS_NAME, spec_io.TORCH_INDEX_NAME]),
           hf.read_hf_pytorch, hf.write_hf_pytorch),
    Format("hf-tf", "Hugging Face TensorFlow directory: config.json + tf_model.h5 (Keras 2 HDF5 weights)",
           hf_tf.has_any([hf_tf.TF_WEIGHTS_NAME, hf_tf.TF_INDEX_NAME]), hf_tf.read_hf_tf, hf_tf.write_hf_tf),
    Format("hf-flax", "Hugging Face Flax directory: config.json + flax_model.msgpack",
           hf_tf.has_any([hf_flax.FLAX_WEIGHTS_NAME, hf_flax.FLAX_INDEX_NAME]), hf_flax.read_hf_flax,
           hf_flax.write_hf_flax),
    Format("metaseq", "metaseq checkpoint: restored.pt-style consolidated file, or reshard-model_part-K.pt "
           "model-parallel parts (read only)", metaseq.looks_like_metaseq, metaseq.read_metaseq, None),
    Format("torch-state-dict", "PyTorch state_dict file (torch.save of {canonical name: tensor}; "
           f"a directory holds config.json + {native.TORCH_FILE})", native.looks_like_torch_state_dict,
           native.read_torch_state_dict, native.write_torch_state_dict),
    Format("keras-weights", "Keras 3 weights file of an optkit TFOPT* model (.weights.h5; "
           f"a directory holds config.json + {native.KERAS_FILE})", native.looks_like_keras_weights,
           native.read_keras_weights, native.write_keras_weights),
    Format("flax-params", "Flax checkpoint of an optkit Flax model's .params (flax.serialization msgpack; "
           f"a directory holds config.json + {native.FLAX_FILE})", native.looks_like_flax_params,
           native.read_flax_params, native.write_flax_params),
)}
ALIASES = {"hf": "hf-safetensors", "safetensors": "hf-safetensors", "pytorch": "hf-pytorch", "bin": "hf-pytorch",
           "tf": "hf-tf", "h5": "hf-tf", "flax": "hf-flax", "msgpack": "hf-flax", "torch": "torch-state-dict",
           "state-dict": "torch-state-dict", "keras": "keras-weights", "params": "flax-params"}
DEFAULT_TARGET = "hf-safetensors"
HDF5_FORMATS = ("hf-tf", "keras-weights")  # written with h5py


def format_names() -> list[str]:
    return list(FORMATS)


def resolve_format(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise ConversionError(f"unknown format {name!r}; known: {', '.join(FORMATS)} "
                              f"(aliases: {', '.join(sorted(ALIASES))})")
    return key


def detect_format(path: str | os.PathLike) -> str:
    """The name of the format at `path`. A detector that recognizes its format but refuses the file (an
    unsafe pickle, model-parallel parts not 0..K-1, a symlink out of the folder) raises; when no format
    matches, the first such reason is raised, else a ConversionError listing what was seen."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    refused: list[Exception] = []
    for fmt in FORMATS.values():
        try:
            if fmt.detect(path):
                return fmt.name
        except (CheckpointError, pickle.UnpicklingError) as err:
            refused.append(err)
    if refused:
        raise refused[0]
    if os.path.isdir(path):
        seen = ", ".join(sorted(os.listdir(path))) or "an empty directory"
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        seen = f"a {os.path.getsize(path)}-byte file starting with {head!r}"
    raise ConversionError(f"{path} matches no known checkpoint layout; found {seen}.\nKnown layouts:\n"
                          + "\n".join(f"  {f.name}: {f.description}" for f in FORMATS.values()))


def target_format(to: str | None, dst: str) -> str:
    if to:
        return resolve_format(to)
    return native.format_for_suffix(dst) or DEFAULT_TARGET


# ------------------------------------------------------------------------------------------ convert
@dataclass
class Summary:
    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int
    parameters: int
    bytes: int
    seconds: float
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: str = ""

    def __str__(self) -> str:
        rate = self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")
        return (f"wrote {self.dst_format} to {self.dst}: {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 1e6:,.1f} MB in {self.seconds:.2f} s ({rate:,.0f} MB/s); names, count and "
                "shapes verified")


def read_checkpoint(path: str | os.PathLike, format: str | None = None,
                    config_overrides: Mapping[str, Any] | None = None) -> Checkpoint:
    """Opens any known checkpoint as lazy canonical tensors (nothing is read until a tensor loads)."""
    path = os.fspath(path)
    name = resolve_format(format) if format else detect_format(path)
    return FORMATS[name].read(path, config_overrides)


def _same_or_nested(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None, dtype: str | None = None,
            force: bool = False, progress: bool = True, config_overrides: Mapping[str, Any] | None = None,
            src_format: str | None = None, max_shard_size: int | str = hf.DEFAULT_SHARD_SIZE,
            log: Callable[[str], None] | None = None) -> Summary:
    """Converts the checkpoint at `src` into format `to` (default: from dst's suffix, else hf-safetensors).

    Streams one tensor at a time; writes into a temporary sibling of `dst` that is renamed into place
    only after the result has been re-read and checked against the spec, so a failure or Ctrl-C leaves
    `dst` as it was. An existing `dst` is replaced only with force=True.
    """
    start = time.perf_counter()
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} does not exist")
    if _same_or_nested(src, dst):
        raise ConversionError(f"destination {dst} is, contains or lies inside the source {src}")
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass force=True (--force) to replace it")
    out_dtype = None
    if dtype is not None:
        if str(dtype) not in OUTPUT_DTYPES:
            raise ConversionError(f"dtype {dtype!r}: expected one of {', '.join(OUTPUT_DTYPES)}")
        out_dtype = spec_io.numpy_dtype(str(dtype))
    in_name = resolve_format(src_format) if src_format else detect_format(src)
    out_name = target_format(to, dst)
    writer = FORMATS[out_name]
    if writer.write is None:
        raise ConversionError(f"{out_name} is read-only; write one of "
                              f"{', '.join(n for n, f in FORMATS.items() if f.write)}")
    ckpt = FORMATS[in_name].read(src, config_overrides)
    for ref in ckpt.tensors.values():
        ref.load = _reading(ref)
    found = f"found {ckpt.describe()}"
    log(found)
    for note in ckpt.notes:
        log(f"  note: {note}")

    # dst is replaced only once the new one is complete: both are on the disk at the end
    spec_io.check_free_space(dst, sum(t.spec.numel * output_dtype(t, out_dtype).itemsize
                                      for t in ckpt.tensors.values()))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(ckpt.tensors), unit="tensor", desc=f"{in_name} -> {out_name}", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        with spec_io.atomic_path(dst, overwrite=force) as tmp:
            if writer.name.startswith("hf-"):
                kwargs = {"max_shard_size": max_shard_size}
            else:
                kwargs = {"as_file": native.format_for_suffix(dst) is not None}
            try:
                files = writer.write(ckpt, tmp, out_dtype, lambda ref: bar.update(1), **kwargs)
                files += copy_side_files(src, tmp)
                hf.fsync_tree(tmp)
            except _ReadFailed as err:  # the source's disk (a network mount gone, a bad sector): said of src
                raise OSError(f"{err.where}: reading failed, nothing was written to {dst} ({err.cause})") from None
            except OSError as err:  # a full disk, a size limit, a quota: said of dst, not of a temporary file
                raise OSError(f"{dst}: writing failed, nothing was written ({err})") from None
            except RuntimeError as err:  # h5py reports a failed HDF5 write (errno inside) as a RuntimeError
                if writer.name not in HDF5_FORMATS:
                    raise
                raise OSError(f"{dst}: writing failed, nothing was written (HDF5: {err})") from None
            verify(tmp, out_name, ckpt, out_dtype)
            nbytes = _size(tmp)
            files = [os.path.join(dst, os.path.relpath(f, tmp)) if f != tmp else dst for f in files]
    finally:
        bar.close()
    summary = Summary(src, dst, in_name, out_name, len(ckpt.tensors), ckpt.parameters, nbytes,
                      time.perf_counter() - start, files, list(ckpt.notes), found)
    return summary


class _ReadFailed(OSError):
    """An OSError while reading a source tensor, told apart from the writing's own (both happen inside the
    write, which reads each tensor as it goes)."""

    def __init__(self, where: str, cause: OSError):
        super().__init__(f"{where}: {cause}")
        self.where, self.cause = where, cause


def _reading(ref) -> Callable[[], np.ndarray]:
    """ref.load, its OSError a _ReadFailed naming the tensor's file."""
    load = ref.load

    def read() -> np.ndarray:
        try:
            return load()
        except OSError as err:
            raise _ReadFailed(ref.where, err) from None
    return read


# What a folder holds besides weights and config.json that a converted folder keeps: generation defaults and
# the tokenizer, so that `optkit generate` and from_pretrained find them in the result as in the source.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json")
MAX_SIDE_FILE_BYTES = 256 << 20


def copy_side_files(src: str, dst: str) -> list[str]:
    """Copies SIDE_FILES from a source folder into a written folder (both directories); returns the paths
    written. Bytes are copied, never parsed; a side file follows the weights' rule (a regular file inside the
    folder, checked by opt_spec.io.checkpoint_file) and is at most MAX_SIDE_FILE_BYTES."""
    if not (os.path.isdir(src) and os.path.isdir(dst)):
        return []
    written = []
    for name in SIDE_FILES:
        if not os.path.lexists(os.path.join(src, name)) or os.path.lexists(os.path.join(dst, name)):
            continue
        path = spec_io.checkpoint_file(src, name)
        size = os.path.getsize(path)
        if size > MAX_SIDE_FILE_BYTES:
            raise ConversionError(f"{path}: {size:,} bytes; optkit copies side files of at most "
                                  f"{MAX_SIDE_FILE_BYTES:,}")
        shutil.copyfile(path, os.path.join(dst, name))
        written.append(os.path.join(dst, name))
    return written


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def verify(path: str, fmt: str, source: Checkpoint, dtype: np.dtype | None) -> None:
    """Re-reads a written checkpoint's names, shapes and dtypes and checks them against the spec and
    against what was meant to be written."""
    config = source.config
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, spec_io.CONFIG_NAME)):
        config = OPTConfig.from_pretrained(path)
        if config != source.config:
            raise ConversionError(f"written config.json differs from the source's config: {config} != {source.config}")
    written = FORMATS[fmt].read(path, None, config=config, head=source.head)
    check_weights({n: r.shape for n, r in written.tensors.items()}, written.config, written.head,
                  where=f"written {fmt} checkpoint")
    if set(written.tensors) != set(source.tensors):
        missing = sorted(set(source.tensors) - set(written.tensors))
        extra = sorted(set(written.tensors) - set(source.tensors))
        raise ConversionError(f"written {fmt} checkpoint differs from the source: missing {missing}, extra {extra}")
    for name, ref in source.tensors.items():
        got, want = written.tensors[name], output_dtype(ref, dtype)
        if got.shape != ref.shape or got.dtype != want:
            raise ConversionError(f"written {fmt} checkpoint: {name} is {got.shape} {got.dtype}, "
                                  f"expected {ref.shape} {want}")
