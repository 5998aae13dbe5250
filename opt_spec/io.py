"""Framework-free checkpoint files: safetensors read (memory-mapped) and written with NumPy alone,
Hugging Face directory layouts (single file or sharded with an index), and atomic writes.

Every backend reads and writes Hugging Face directories through this module, so a checkpoint written
by one backend is byte-for-byte the format the others read, and none of them needs torch for it.

It is also where a checkpoint from a stranger is kept in its place, once for every backend and the CLI:
`checkpoint_file` is the one rule for which files a folder may name (nothing outside it), `load_json`
the one JSON reader (bounded size and depth), and `SafetensorsFile` checks a header by the safetensors
library's own rules before anything is mapped. Everything refused raises opt_spec.errors.CheckpointError
naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from .errors import CheckpointError

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
# Bounds on what a checkpoint may make us parse. JSON of N bytes can become ~30 N bytes of Python objects
# (measured: 16 MiB of `[[]],` is 500 MiB), so 8 MiB keeps the worst case near 250 MiB; real files are far
# smaller (OPT-175b's sharded index is ~100 KB, a safetensors header of its ~1,550 tensors ~200 KB).
MAX_JSON_BYTES = 8 << 20
MAX_JSON_DEPTH = 64      # HF configs nest ~3 deep, safetensors headers 3, indexes 2
MAX_TENSOR_DIMS = 32     # NumPy holds at most 64; OPT's tensors have 1 or 2
_INT64_MAX = 2**63 - 1


def numpy_dtype(name: str | np.dtype) -> np.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a NumPy dtype) -> NumPy dtype (bfloat16 via ml_dtypes)."""
    if isinstance(name, str):
        if name not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[name]
    return np.dtype(name)


# ----------------------------------------------------------------------------------- atomic writes
# A writer's temporary sibling of PATH is named .NAME.HOST-PID.RANDOM.tmp (and .tmp.old for the content it
# replaces, between two renames), so that the next write of PATH can tell the leftovers of a writer that was
# killed (SIGKILL, power loss: no `finally` ran) from those of one still running, and clean them up.
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename if hasattr(os, "uname") else "host") or "host"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process, alive
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _clean_leftovers(path: str) -> None:
    """Removes the temporary siblings of `path` that a writer on this machine left when it was killed (its
    process is gone). Content a killed writer had moved aside (.tmp.old) and not yet replaced comes back
    to `path` when `path` is missing, so nothing is lost; a running writer's files are left alone."""
    parent, prefix = os.path.dirname(path), f".{os.path.basename(path)}.{_HOST}-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names, key=lambda n: not n.endswith(".old")):  # a moved-aside original first
        match = re.fullmatch(r"(\d+)\.[A-Za-z0-9_]+\.tmp(\.old)?", name[len(prefix):]) \
            if name.startswith(prefix) else None
        if match is None or _running(int(match[1])):
            continue
        leftover = os.path.join(parent, name)
        if match[2] and not os.path.lexists(path):
            os.replace(leftover, path)  # killed between moving the old content aside and the new one in
        else:
            _remove(leftover)


def check_free_space(path: str | os.PathLike, nbytes: int, what: str = "the weights") -> None:
    """Refuses, before anything is written, a write of `nbytes` to `path` that cannot fit on its file system:
    finding out at the last shard costs the whole write (hours for 175b), and HDF5 may crash the process on
    a full disk. A lower bound of the need is enough: the file formats add little to the tensors' bytes."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # not knowable here (a special file system): the write itself will tell
        return
    if nbytes > free:
        raise OSError(f"{os.fspath(path)}: {what} need {nbytes / 1e9:,.2f} GB and {folder} has "
                      f"{free / 1e9:,.2f} GB free; nothing was written")


def _move_in_new(target: str, path: str) -> None:
    """Renames `target` onto `path` only if nothing is there, in one step, so that a writer that started
    before this one and finished first is not replaced (the check at the start cannot see it): link() refuses
    an existing name for a file, rename() a non-empty folder or a file for a folder."""
    try:
        if os.path.isdir(target):
            os.rename(target, path)
        else:
            os.link(target, path)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as err:
        raise FileExistsError(f"{path} exists; refusing to overwrite it") from err
    except OSError as err:
        if err.errno == errno.ENOTEMPTY:
            raise FileExistsError(f"{path} exists; refusing to overwrite it") from err
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK) or os.path.lexists(path):
            raise
        os.replace(target, path)  # a file system without hard links: checked just before, not in one step


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary sibling of `path` (file or directory) to write; on success it is renamed
    onto `path`, on any error (Ctrl-C included) it is removed and `path` is untouched, and so are the
    parent folders this call created (those that existed before are never touched). With `overwrite`,
    an existing `path` of either kind (a file, a folder, a symlink: replaced itself, not followed) is
    replaced. What a killed writer left next to `path` is cleaned up here first (_clean_leftovers)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    created = []  # the missing ancestors, deepest first
    folder = parent
    while not os.path.lexists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
    if not created:
        _clean_leftovers(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    done = False
    try:
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{_HOST}-{os.getpid()}.", suffix=".tmp",
                                   dir=parent)
        except PermissionError as err:  # named by the destination, not by the temporary name it failed on
            where = os.path.dirname(err.filename) if err.filename else parent
            raise PermissionError(f"cannot write {path}: no permission to create files in {where}") from None
        target = os.path.join(tmp, "out")
        try:
            yield target
            # rename() replaces a file by a file; anything else (a folder, a file by a folder, a symlink by
            # a folder) is moved aside first and removed once the new content is in place.
            replaced_whole = os.path.isdir(target) or (os.path.isdir(path) and not os.path.islink(path))
            if not overwrite:
                _move_in_new(target, path)
            elif os.path.lexists(path) and replaced_whole:
                old = tmp + ".old"
                os.replace(path, old)
                try:
                    os.replace(target, path)
                except BaseException:  # Ctrl-C included: `path` keeps its old content, as on any other error
                    os.replace(old, path)
                    raise
                _remove(old)
            else:
                os.replace(target, path)
            done = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not done:
            for folder in created:  # rmdir removes only an empty folder: nothing anyone put there is lost
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


# ------------------------------------------------------------------------------------------- JSON
class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def load_json(path: str | os.PathLike, data: bytes | None = None, where: str | None = None) -> object:
    """The JSON value of a file a checkpoint carries (config.json, an index, tokenizer or generation
    settings), or of `data` read from `path` (a safetensors header).

    Refused with a CheckpointError naming `path`: more than MAX_JSON_BYTES (memory stays bounded), not
    UTF-8 JSON, a key given twice in one object (two readers could pick different values), or nesting
    deeper than MAX_JSON_DEPTH. Python's C parser recurses per level and raises RecursionError near
    1000 levels, so 100,000 nested brackets fail fast in the parser and anything shallower is measured
    after it. `where` replaces the path at the start of messages.
    """
    where = where or os.fspath(path)
    if data is None:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{where}: {size:,} bytes of JSON; optkit reads at most {MAX_JSON_BYTES:,}")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{where}: {len(data):,} bytes of JSON; optkit reads at most {MAX_JSON_BYTES:,}")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except _DuplicateKey as err:
        raise CheckpointError(f"{where}: a JSON object has the key {err.args[0]!r:.200} twice") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise CheckpointError(f"{where}: not valid JSON ({err})") from None
    stack = [(value, 1)]
    while stack:  # iterative: a deep value must not recurse here either
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return value


def json_object(path: str | os.PathLike, data: bytes | None = None, where: str | None = None) -> dict:
    """load_json's value, refused unless it is a JSON object (every file optkit reads holds one)."""
    value = load_json(path, data, where)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where or os.fspath(path)}: expected a JSON object, got a JSON {_json_kind(value)}")
    return value


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


# ------------------------------------------------------------------------------ NumPy .npy / .npz
ArraySpec = tuple[tuple[int, ...], np.dtype]  # the shape and dtype a stored array must have


def _read_npy(f, nbytes: int, expected: ArraySpec, where: str) -> np.ndarray:
    """One .npy stream of `nbytes` bytes that must hold exactly an array of `expected` shape and dtype.
    NumPy's header parser is literal-only and bounded (10,000 bytes); the payload is checked against the
    stream's size before it is read, so a header claiming a huge shape allocates nothing."""
    from numpy.lib import format as npy

    shape, dtype = tuple(expected[0]), np.dtype(expected[1])
    try:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(f)
    except (ValueError, OSError, SyntaxError, TypeError) as err:
        raise CheckpointError(f"{where}: not a NumPy array file ({err})") from None
    if got_dtype.hasobject or got_dtype != dtype or tuple(got_shape) != shape:
        raise CheckpointError(f"{where}: holds {tuple(got_shape)} {got_dtype}; expected {shape} {dtype}")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes - f.tell() != size:
        raise CheckpointError(f"{where}: {nbytes - f.tell():,} bytes of data for {shape} {dtype} ({size:,} bytes)")
    data = f.read(size)
    if len(data) != size:
        raise CheckpointError(f"{where}: truncated ({len(data):,} of {size:,} bytes)")
    array = np.frombuffer(data, dtype).reshape(shape[::-1] if fortran else shape)
    return (array.T if fortran else array).copy()


def read_npy(path: str | os.PathLike, expected: ArraySpec) -> np.ndarray:
    """A .npy file (np.save) that must hold an array of `expected` (shape, dtype); no pickles, bounded."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _read_npy(f, os.fstat(f.fileno()).st_size, expected, path)


def read_npz(path: str | os.PathLike, expected: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """An .npz archive (np.savez) that must hold exactly the arrays `expected` names, each of its (shape,
    dtype). Refused with a CheckpointError: other or missing names, a compressed member (np.savez stores
    them; inflating one could take any amount of memory), an array of another shape or dtype, pickles."""
    import zipfile

    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not an .npz archive ({err})") from None
    with archive:
        infos = archive.infolist()
        names = [info.filename.removesuffix(".npy") for info in infos]
        if sorted(names) != sorted(expected) or len(set(names)) != len(names):
            unexpected = sorted(set(names) - set(expected))[:5]
            missing = sorted(set(expected) - set(names))[:5]
            raise CheckpointError(f"{path}: holds {len(names)} arrays where {len(expected)} are expected "
                                  f"(unexpected: {unexpected or 'none'}; missing: {missing or 'none'})")
        out = {}
        for info, name in zip(infos, names):
            where = f"{path}: array {name!r}"
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{where} is compressed (method {info.compress_type}); np.savez stores "
                                      "arrays uncompressed, and inflating one could take any amount of memory")
            try:
                with archive.open(info) as f:
                    out[name] = _read_npy(f, info.file_size, expected[name], where)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointError(f"{where}: corrupt archive ({err})") from None
        return out


# ------------------------------------------------------------------------------------ safetensors
def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A safetensors file as a read-only mapping of memory-mapped NumPy arrays (nothing is read
    until a tensor is touched, so peak memory stays near the tensors actually in use).

    The header is checked by the safetensors library's rules before anything is mapped: a JSON object
    (at most MAX_JSON_BYTES) of {name: {dtype, shape, data_offsets}} and an optional str -> str
    `__metadata__`; non-negative shapes whose byte count is the entry's; the entries, sorted by offset,
    tile the data section exactly (first at 0, each where the previous ended: no overlap, no gap) and
    the data section ends where the file ends. Anything else is a CheckpointError naming the tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_JSON_BYTES, size - 8):
                raise CheckpointError(f"{self.path}: corrupt safetensors header (length {n:,}, file {size:,} bytes; "
                                      f"optkit reads headers of at most {MAX_JSON_BYTES:,})")
            blob = f.read(n)
        header = json_object(self.path, blob, where=f"{self.path}: corrupt safetensors header")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and
                                         all(isinstance(v, str) for v in metadata.values())):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
        self.metadata = metadata or {}
        self._offset = 8 + n
        data_size = size - self._offset
        self._entries = {}
        for name, entry in header.items():
            self._entries[name] = self._entry(name, entry, data_size)
        end = 0
        for name, (_, _, start, stop) in sorted(self._entries.items(), key=lambda kv: kv[1][2:]):
            if start != end:
                what = "overlaps the tensor before it" if start < end else f"leaves bytes {end}..{start} unused"
                raise CheckpointError(f"{self.path}: tensor {name!r} starts at data offset {start}, but the tensors "
                                      f"before it end at {end}: it {what} (safetensors InvalidOffset)")
            end = stop
        if end != data_size:
            raise CheckpointError(f"{self.path}: the tensors cover {end:,} bytes of a {data_size:,}-byte data section "
                                  "(safetensors MetadataIncompleteBuffer)")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._offset else None

    def _entry(self, name: str, entry, data_size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: tensor {name!r}: {why}")

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(f"bad header entry {entry!r:.200} (needs dtype, shape and data_offsets)")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
            raise bad(f"dtype {code!r:.40} is not one of {', '.join(_SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(_int(d) for d in shape)):
            raise bad(f"shape {shape!r:.200} is not a list of at most {MAX_TENSOR_DIMS} integers")
        if any(d < 0 for d in shape):
            raise bad(f"shape {shape!r:.200} has a negative dimension")
        dtype = _SAFETENSORS_DTYPES[code]
        numel, bound = 1, dtype.itemsize
        for d in shape:  # Python ints: a product past int64 is seen, not wrapped. A 0 hides no huge dim: NumPy
            numel, bound = numel * d, bound * max(d, 1)  # refuses even an empty (0, 2**62) float32 array
            if bound > _INT64_MAX:
                raise bad(f"shape {shape!r:.200} of {code} takes more bytes than an int64 can count")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(x) for x in offsets)):
            raise bad(f"data_offsets {offsets!r:.200} is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end:
            raise bad(f"data_offsets {offsets} are not 0 <= begin <= end")
        if end - start != dtype.itemsize * numel:
            raise bad(f"has {end - start} bytes for shape {tuple(shape)} {code} ({dtype.itemsize * numel} needed)")
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {self._offset + end} but "
                                  f"the file has {self._offset + data_size}")
        return dtype, tuple(shape), start, end

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


# A checkpoint folder names its files (index weight_maps name shards). The rule for every name, checked by
# checkpoint_file before anything is opened:
#   1. the name is a plain relative path: '/'-separated parts, none empty, '.' or '..', no backslash or NUL,
#      not absolute. It is joined to the folder lexically, so it cannot climb out of it by its spelling;
#   2. symlinks are followed (a Hugging Face hub cache snapshot is a folder of symlinks), but the file they
#      end at must lie inside the folder itself, or inside the `blobs` folder of the hub cache repository
#      the folder is a snapshot of (<cache>/models--org--name/snapshots/<rev>/ -> ../../blobs/<hash>).
#      A symlink anywhere else (a cloned repository can hold `model.safetensors -> ~/.ssh/id_rsa`) is refused;
#   3. it is a regular file (not a FIFO, device or folder).
def _plain_name(name: str) -> bool:
    """Rule 1: '/'-separated parts, none empty, '.' or '..', no backslash or NUL (so not absolute either)."""
    return bool(name) and "\\" not in name and "\0" not in name and \
        all(p not in ("", ".", "..") for p in name.split("/"))


def _allowed_roots(directory: str) -> list[str]:
    real = os.path.realpath(directory)
    roots = [real]
    snapshots, repo = os.path.dirname(real), os.path.dirname(os.path.dirname(real))
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        blobs = os.path.join(repo, "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def checkpoint_file(directory: str | os.PathLike, name: str, entry: str | None = None) -> str:
    """The path of the file `name` inside the checkpoint folder `directory`, checked by the rule above.

    `entry` says who named the file (e.g. "model.safetensors.index.json: weight_map['lm_head.weight']"),
    for the message. A CheckpointError refuses a name breaking the rule or naming a missing file.
    """
    directory = os.fspath(directory)
    entry = entry or f"{directory}: {name!r:.200}"
    if not isinstance(name, str):
        raise CheckpointError(f"{entry} is {name!r:.200} (a {type(name).__name__}), not a file name")
    if not _plain_name(name):
        raise CheckpointError(f"{entry} = {name!r:.200}: a file name must be a plain relative path inside the "
                              "checkpoint folder (no '..', no absolute path)")
    path = os.path.join(directory, *name.split("/"))
    if not os.path.lexists(path):
        raise CheckpointError(f"{entry} names {path}, which is missing")
    real = os.path.realpath(path)
    if not any(os.path.commonpath([root, real]) == root for root in _allowed_roots(directory)):
        raise CheckpointError(f"{entry} = {name!r:.200} is a symlink to {real}, outside the checkpoint folder "
                              f"{directory}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{entry} names {path}, which is not a regular file")
    return path


MAX_STATE_FILES = 100_000  # Orbax / DCP write a few files per device and array
STATE_METADATA_BYTES = 64 << 20  # an engine's metadata and manifests, next to the arrays' own bytes


def state_folder_limit(state_bytes: int) -> int:
    """The most bytes a trainer-state folder may hold for a state of `state_bytes` (for `state_folder`):
    twice the state (an engine may keep a copy per write) plus the engine's metadata."""
    return 2 * state_bytes + STATE_METADATA_BYTES


def state_folder(directory: str | os.PathLike, name: str, max_bytes: int, entry: str | None = None) -> str:
    """The path of the folder `name` inside `directory` that an engine (Orbax, torch.distributed.checkpoint)
    is about to read a trainer's state from, checked first because the folder may come from anyone: a plain
    relative name (as checkpoint_file's rule 1), a real folder inside `directory` (no symlink), and inside it
    only regular files and folders, no symlink at any depth (the engine would follow it out of the folder),
    at most MAX_STATE_FILES files of at most `max_bytes` together (what this trainer's state can take; the
    engine reads the files, so a larger folder is refused before it starts). CheckpointError otherwise."""
    directory = os.fspath(directory)
    entry = entry or f"{directory}: {name!r:.200}"
    if not isinstance(name, str) or not _plain_name(name):
        raise CheckpointError(f"{entry}: the trainer state must be a folder inside the checkpoint, named by a "
                              f"plain relative path (got {name!r:.200})")
    path = os.path.join(directory, *name.split("/"))
    if os.path.islink(path) or not os.path.isdir(path):
        raise CheckpointError(f"{entry}: {path} is missing or not a folder of its own (a symlink is refused)")
    files, total = 0, 0
    for root, dirs, names in os.walk(path):
        for n in dirs + names:
            item = os.path.join(root, n)
            if os.path.islink(item):
                raise CheckpointError(f"{item}: a symlink inside the trainer state; refused (it could point "
                                      "outside the checkpoint)")
            st = os.lstat(item)
            if n in names and not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{item}: not a regular file")
            if n in names:
                files, total = files + 1, total + st.st_size
        if files > MAX_STATE_FILES or total > max_bytes:
            raise CheckpointError(f"{path}: {files:,} files of {total:,} bytes so far, more than this trainer's "
                                  f"state can take ({MAX_STATE_FILES:,} files, {max_bytes:,} bytes)")
    return path


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The weight_map {tensor name: shard file name} of an index (*.index.json), every value a string."""
    path = os.fspath(path)
    weight_map = json_object(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: no 'weight_map' object")
    if not weight_map:
        raise CheckpointError(f"{path}: the weight_map lists no tensors")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: weight_map[{name!r:.200}] is {file!r:.200} (a {type(file).__name__}), "
                                  "not a file name")
    return weight_map


def index_shards(directory: str | os.PathLike, index_name: str) -> tuple[dict[str, str], list[str]]:
    """(weight_map, [shard paths]) of the index `index_name` in a checkpoint folder, each shard name
    checked by checkpoint_file: the one reader of every *.index.json (safetensors, PyTorch, TF, Flax)."""
    directory = os.fspath(directory)
    index_path = checkpoint_file(directory, index_name)
    weight_map = read_index(index_path)
    first: dict[str, str] = {}  # shard file -> the first tensor naming it, to name in messages
    for tensor, file in weight_map.items():
        first.setdefault(file, tensor)
    paths = [checkpoint_file(directory, file, f"{index_path}: weight_map[{first[file]!r:.200}]")
             for file in sorted(first)]
    return weight_map, paths


def find_weight_files(directory: str | os.PathLike) -> tuple[str, list[str]]:
    """('safetensors' | 'torch', [files]) for a Hugging Face checkpoint directory, safetensors first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    for fmt, single, index in (("safetensors", SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME),
                               ("torch", TORCH_WEIGHTS_NAME, TORCH_INDEX_NAME)):
        if os.path.lexists(os.path.join(directory, single)):
            return fmt, [checkpoint_file(directory, single)]
        if os.path.lexists(os.path.join(directory, index)):
            return fmt, index_shards(directory, index)[1]
    seen = ", ".join(sorted(os.listdir(directory))) or "nothing"
    raise FileNotFoundError(f"{directory} holds no {SAFE_WEIGHTS_NAME}, {SAFE_INDEX_NAME}, "
                            f"{TORCH_WEIGHTS_NAME} or {TORCH_INDEX_NAME} (found: {seen})")


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
                raise CheckpointError(f"tensor {name!r} appears in more than one shard of {directory}")
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
                raise CheckpointError(f"tensor {name!r} appears in more than one shard of {directory}")
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


def check_room_to_save(directory: str | os.PathLike, sizes: Mapping[str, int]) -> None:
    """check_free_space for a save that writes the files {name: bytes} of `directory` in this order, each into
    a temporary sibling renamed onto the earlier save's file of that name: that old file's space is free only
    after the rename, so the need is the peak, over the files, of what the save has added while writing one."""
    need = added = 0
    for name, nbytes in sizes.items():
        need = max(need, added + nbytes)
        old = os.path.join(directory, name)  # a symlink's target (a hub blob) is not freed by replacing it
        added += nbytes - (os.path.getsize(old) if os.path.isfile(old) and not os.path.islink(old) else 0)
    check_free_space(directory, need)


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
    entries = [(n, tuple(a.shape), np.dtype(a.dtype), (lambda a=a: a)) for n, a in tensors.items()]
    return save_safetensors_entries(directory, entries, config_dict, max_shard_size)


def save_safetensors_entries(directory: str | os.PathLike, entries: Iterable[TensorEntry],
                             config_dict: Mapping | None = None, max_shard_size: int | str = "5GB") -> list[str]:
    """save_safetensors_dir for tensors made on demand, (name, shape, dtype, make) in order: each is
    made, written and dropped before the next, so a model held elsewhere (on accelerators, split over
    many) is written with one tensor in host memory at a time."""
    directory = os.fspath(directory)
    entries = {e[0]: e for e in entries}
    sizes = [(n, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
             for n, (_, shape, dtype, _) in entries.items()]
    shards = plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        files = {SAFE_WEIGHTS_NAME: shards[0]}
    else:
        files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    nbytes = dict(sizes)
    check_room_to_save(directory, {f: sum(nbytes[n] for n in shard) for f, shard in files.items()})
    stale = stale_weight_files(directory, keep=[*files, SAFE_INDEX_NAME] if len(files) > 1 else files)
    for fname, shard in files.items():
        with atomic_path(os.path.join(directory, fname)) as tmp:
            write_safetensors_stream(tmp, [entries[n] for n in shard])
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
