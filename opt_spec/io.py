"""Framework-free checkpoint files: safetensors read (memory-mapped) and written with NumPy alone,
Hugging Face directory layouts (single file or sharded with an index), and atomic writes.

Every backend reads and writes Hugging Face directories through this module, so a checkpoint written
by one backend is byte-for-byte the format the others read, and none of them needs torch for it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16), "float64": np.dtype(np.float64)}
_MAX_HEADER = 100 * 1024 * 1024


def numpy_dtype(name: str | np.dtype) -> np.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a NumPy dtype) -> NumPy dtype (bfloat16 via ml_dtypes)."""
    if isinstance(name, str):
        if name not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[name]
    return np.dtype(name)


# ----------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary sibling of `path` (file or directory) to write; on success it is renamed
    onto `path`, on any error (Ctrl-C included) it is removed and `path` is untouched."""
    path = os.path.abspath(os.fspath(path))
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    target = os.path.join(tmp, "out")
    try:
        yield target
        if os.path.isdir(path) and not os.path.islink(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


# ------------------------------------------------------------------------------------ safetensors
class SafetensorsFile(Mapping[str, np.ndarray]):
    """A safetensors file as a read-only mapping of memory-mapped NumPy arrays (nothing is read
    until a tensor is touched, so peak memory stays near the tensors actually in use)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: corrupt safetensors header (length {n}, file {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path}: corrupt safetensors header ({err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._offset = 8 + n
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                start, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: bad header entry for {name!r}: {entry!r}") from None
            if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or start < 0:
                raise ValueError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {shape} "
                                 f"{entry['dtype']}")
            if self._offset + end > size:
                raise ValueError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._offset + end} "
                                 f"but the file has {size}")
            self._entries[name] = (dtype, shape, start, end)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._offset else None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if start == end:
            return np.zeros(shape, dtype)
        flat = self._mmap[self._offset + start:self._offset + end]
        return flat.view(dtype).reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]


TensorEntry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]  # name, shape, dtype, make


def write_safetensors_stream(path: str | os.PathLike, entries: Iterable[TensorEntry],
                             metadata: Mapping[str, str] | None = None,
                             on_written: Callable[[str, np.ndarray], None] | None = None) -> int:
    """Writes a safetensors file (not atomically: callers write into a temporary place) whose header
    is known up front, making and writing one tensor at a time, so at most one tensor (plus one
    block of a transposed copy) is in memory. Returns the bytes written."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        code = _DTYPE_CODES.get(np.dtype(dtype))
        if code is None:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in entries:
            array = make()
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r} is {tuple(array.shape)} {array.dtype}, expected {tuple(shape)} "
                                 f"{np.dtype(dtype)}")
            write_array(f, array)
            if on_written is not None:
                on_written(name, array)
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Writes tensors (a mapping, or (name, array) pairs) atomically; returns the bytes written.

    Arrays may be lazy (memory-mapped): each is written straight through, one at a time.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    entries = [(name, tuple(a.shape), np.dtype(a.dtype), (lambda a=a: a)) for name, a in items]
    with atomic_path(path) as tmp:
        return write_safetensors_stream(tmp, entries, metadata)


def write_array(f, array: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Writes an array's bytes (C order, little-endian) block by block, then drops its mapped pages."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    for _, block in row_blocks(array, chunk_bytes):
        f.write(memoryview(block.reshape(-1).view(np.uint8)))
    release_pages(array)


# ------------------------------------------------------------------------------- memory-mapped pages
_PAGE = mmap.PAGESIZE


def _find_mmap(array: np.ndarray):
    obj = array
    while obj is not None:
        mm = getattr(obj, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        if isinstance(obj, mmap.mmap):
            return obj
        obj = getattr(obj, "base", None)
    return None


def release_pages(array: np.ndarray) -> None:
    """Drops the pages of a memory-mapped tensor from this process once it has been consumed.

    A file mapping's touched pages count in the process's resident memory until unmapped; dropping
    them (they stay in the OS page cache) keeps peak memory near one tensor when a whole checkpoint
    is streamed through a mapping. A no-op for arrays that are not memory-mapped.
    """
    if not hasattr(mmap, "MADV_DONTNEED") or not isinstance(array, np.ndarray) or array.size == 0:
        return
    mm = _find_mmap(array)
    if mm is None or mm.closed:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (TypeError, ValueError):
        return
    low, high = np.lib.array_utils.byte_bounds(array)
    start = max(0, (low - base) // _PAGE * _PAGE)
    stop = min(len(mm), high - base)
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def row_blocks(array: np.ndarray, chunk_bytes: int = 64 << 20, tile: int = 256):
    """Yields (first row, C-contiguous block of rows) covering `array` in order.

    A C-contiguous array is yielded as views (no copy); any other layout (a transposed kernel) is
    copied one block at a time, tile by tile, so a transpose runs at memory speed rather than at the
    speed of a strided gather, and never needs a second copy of the whole tensor.
    """
    if array.ndim == 0:
        yield 0, np.ascontiguousarray(array).reshape(1)
        return
    row_bytes = max(1, array[0].nbytes if array.shape[0] else 1)
    rows = max(1, chunk_bytes // row_bytes)
    if array.flags.c_contiguous:
        for i in range(0, array.shape[0], rows):
            yield i, array[i:i + rows]
        return
    for i in range(0, array.shape[0], rows):
        part = array[i:i + rows]
        if part.ndim != 2:
            yield i, np.ascontiguousarray(part)
            continue
        out = np.empty(part.shape, part.dtype)
        for r in range(0, part.shape[0], tile):
            for c in range(0, part.shape[1], tile):
                out[r:r + tile, c:c + tile] = part[r:r + tile, c:c + tile]
        yield i, out



# ------------------------------------------------------------------------ Hugging Face directories
def parse_size(size: int | str) -> int:
    """'5GB' | '500MB' | '10KiB' | 1234 -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read {size!r} as a size (try '2GB' or '500MB')")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def find_weight_files(directory: str | os.PathLike) -> tuple[str, list[str]]:
    """('safetensors' | 'torch', [files]) for a Hugging Face checkpoint directory, safetensors first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    for fmt, single, index in (("safetensors", SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME),
                               ("torch", TORCH_WEIGHTS_NAME, TORCH_INDEX_NAME)):
        if os.path.isfile(os.path.join(directory, single)):
            return fmt, [os.path.join(directory, single)]
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            files = sorted(set(read_index(index_path).values()))
            paths = [os.path.join(directory, f) for f in files]
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                raise FileNotFoundError(f"{index_path} names shards that are missing: {', '.join(absent)}")
            return fmt, paths
    seen = ", ".join(sorted(os.listdir(directory))) or "nothing"
    raise FileNotFoundError(f"{directory} holds no {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME}, "
                            f"{TORCH_WEIGHTS_NAME} or {TORCH_INDEX_NAME} (found: {seen})")


def read_index(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: no 'weight_map' object")
    return weight_map


def load_safetensors_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: memory-mapped array} over every safetensors file of a directory."""
    fmt, files = find_weight_files(directory)
    if fmt != "safetensors":
        raise ValueError(f"{directory} holds PyTorch pickles ({os.path.basename(files[0])}), not safetensors")
    out: dict[str, np.ndarray] = {}
    for path in files:
        st = SafetensorsFile(path)
        for name in st:
            if name in out:
                raise ValueError(f"tensor {name!r} appears in more than one shard of {directory}")
            out[name] = st[name]
    return out


def load_checkpoint_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: memory-mapped array} for every tensor of a Hugging Face directory: safetensors, or
    PyTorch pickles (pytorch_model.bin, sharded or not) read without torch by a restricted unpickler."""
    fmt, files = find_weight_files(directory)
    if fmt == "safetensors":
        return load_safetensors_dir(directory)
    from .torch_pickle import TorchZipReader, tensors_of

    out: dict[str, np.ndarray] = {}
    for path in files:
        for name, tensor in tensors_of(TorchZipReader(path).obj, path).items():
            if name in out:
                raise ValueError(f"tensor {name!r} appears in more than one shard of {directory}")
            out[name] = tensor.array()
    return out


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int | str) -> list[list[str]]:
    """Greedy in-order split of (name, bytes) into shards of at most max_shard_size bytes each
    (a tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


_WEIGHT_FILE = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)"
                          r"(\.index\.json)?|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json")


def stale_weight_files(directory: str, keep: Iterable[str]) -> list[str]:
    """Weight files of an earlier save in `directory` that a new save (writing `keep`) replaces.
    Called before writing, and the files removed after, so a failed save loses nothing."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    keep = set(keep)
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if f not in keep and _WEIGHT_FILE.fullmatch(f)]


def save_safetensors_dir(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                         config_dict: Mapping | None = None, max_shard_size: int | str = "5GB") -> list[str]:
    """Writes a Hugging Face directory: model.safetensors, or shards with an index when the tensors
    exceed max_shard_size. Stale weight files from an earlier save are removed. Returns the files."""
    directory = os.fspath(directory)
    names = list(tensors)
    sizes = [(n, int(np.prod(tensors[n].shape, dtype=np.int64)) * np.dtype(tensors[n].dtype).itemsize)
             for n in names]
    shards = plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        files = {SAFE_WEIGHTS_NAME: shards[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    stale = stale_weight_files(directory, keep=[*files, SAFE_INDEX_NAME] if len(files) > 1 else files)
    for fname, shard in files.items():
        write_safetensors(os.path.join(directory, fname), ((n, tensors[n]) for n in shard))
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(b for _, b in sizes)},
                 "weight_map": {n: f for f, shard in files.items() for n in shard}}
        atomic_write_text(os.path.join(directory, SAFE_INDEX_NAME), json.dumps(index, indent=2) + "\n")
    if config_dict is not None:
        atomic_write_text(os.path.join(directory, CONFIG_NAME),
                          json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
    for f in stale:
        os.remove(f)
    return [os.path.join(directory, f) for f in files]
