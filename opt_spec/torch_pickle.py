"""PyTorch's checkpoint files (`torch.save`'s zip format) read and written without importing torch.

Reading: a restricted unpickler that knows how tensors are rebuilt (`torch._utils._rebuild_tensor_v2`
and friends over typed storages) and turns them into memory-mapped NumPy views of the zip records;
dicts, OrderedDicts and `argparse.Namespace` (as a plain dict) are allowed, any other global is
refused (nothing from the file is ever called). In `opaque` mode, used for training checkpoints
whose extra state (optimizer, omegaconf configs) is not needed, other globals become inert
placeholders instead, which fail loudly if they end up where a tensor is expected.

Writing: `write_torch_zip` emits the same format (data.pkl + data/<key> records, 64-byte aligned)
one tensor at a time, so `torch.load(..., weights_only=True)` and `mmap=True` read it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from .io import release_pages, row_blocks

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items() if name != "UntypedStorage"}
# torch dtypes pickled as globals (torch.float16 ...) are read as their names
_TORCH_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_ALIGN = 64


class UnsafePickleError(pickle.UnpicklingError):
    pass


@dataclass(frozen=True)
class StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


class Storage:
    """A storage record of the zip: a flat, memory-mapped array, touched only when a tensor is read."""

    def __init__(self, reader: "TorchZipReader", key: str, dtype: np.dtype, numel: int):
        self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel

    def array(self) -> np.ndarray:
        return self.reader.storage_array(self.key, self.dtype, self.numel)


@dataclass
class PickledTensor:
    """A tensor of a torch pickle: a strided view of a storage, not read until `array()`."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def array(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.shape:
            return flat[self.offset:self.offset + 1].reshape(())
        if any(d == 0 for d in self.shape):
            return np.zeros(self.shape, self.dtype)
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        if self.offset < 0 or last >= flat.size or min(self.stride) < 0:
            raise ValueError(f"tensor of shape {self.shape} (offset {self.offset}, stride {self.stride}) does not "
                             f"fit its storage {self.storage.key!r} of {flat.size} elements")
        item = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape, tuple(s * item for s in self.stride),
                                               writeable=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if isinstance(storage, StorageType):
        raise UnsafePickleError("tensor without a storage record")
    if not isinstance(storage, Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return PickledTensor(storage, int(storage_offset), tuple(int(d) for d in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _rebuild_from_type(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise UnsafePickleError("tensor subclass rebuilt by an unknown function")
    return func(*args)


class Namespace(dict):
    """argparse.Namespace read back as a dict (its attributes are the items)."""

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slots state)
            state = state[0] or {}
        self.update(state)


class Opaque:
    """A placeholder for an object of a class we refuse to import (opaque mode only)."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<unread {self.qualname}>"


def _reconstructor(cls, base, state=None):
    if isinstance(cls, type) and issubclass(cls, (Namespace, Opaque)):
        return cls.__new__(cls)
    raise UnsafePickleError(f"copyreg._reconstructor of {cls!r}")


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): object, ("torch.nn.parameter", "Parameter"): object,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): Namespace,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, reader: "TorchZipReader", where: str, opaque: bool = False):
        super().__init__(file)
        self.reader, self.where, self.opaque = reader, where, opaque
        self.opaque_names: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        if module == "torch" and name == "device":
            return str
        if self.opaque:
            self.opaque_names.add(f"{module}.{name}")
            return type(name, (Opaque,), {"qualname": f"{module}.{name}"})
        raise UnsafePickleError(f"{self.where}: refusing to load {module}.{name} (only tensors, dicts, OrderedDicts "
                                "and argparse.Namespace are read from PyTorch pickles)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.where}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(f"{self.where}: storage of unknown type {storage_type!r}")
        dtype = storage_type.dtype
        if storage_type.name == "UntypedStorage":
            numel = int(numel)  # bytes
        return self.reader.storage(str(key), dtype, int(numel))


class TorchZipReader:
    """A `torch.save` zip file: its object (tensors as PickledTensor) and memory-mapped storages."""

    def __init__(self, path: str | os.PathLike, opaque: bool = False):
        self.path = os.fspath(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path}: not a readable PyTorch zip checkpoint (truncated or corrupt; "
                             "the legacy pre-1.6 format is not supported)") from None
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{self.path}: a PyTorch zip holds one data.pkl, found {len(pickles)}")
        self.prefix = pickles[0][:-len("data.pkl")]
        order = self._read_record("byteorder") if self.prefix + "byteorder" in names else b"little"
        self.byteorder = "<" if order.strip() == b"little" else ">"
        self._storages: dict[str, Storage] = {}
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if os.path.getsize(self.path) else None
        unpickler = RestrictedUnpickler(io.BytesIO(self._read_record("data.pkl")), self, self.path, opaque)
        try:
            self.obj = unpickler.load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, ValueError) as err:
            raise ValueError(f"{self.path}: corrupt pickle in data.pkl ({type(err).__name__}: {err})") from None
        self.opaque_names = sorted(unpickler.opaque_names)

    def _read_record(self, name: str) -> bytes:
        try:
            return self._zip.read(self.prefix + name)
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
            raise ValueError(f"{self.path}: cannot read record {name!r} ({err})") from None

    def storage(self, key: str, dtype: np.dtype, numel: int) -> Storage:
        if key not in self._storages:
            self._storages[key] = Storage(self, key, dtype, numel)
        return self._storages[key]

    def storage_array(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self.prefix}data/{key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ValueError(f"{self.path}: storage record data/{key} is missing") from None
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise ValueError(f"{self.path}: storage data/{key} has {info.file_size} bytes, needs {nbytes}")
        dtype = dtype.newbyteorder(self.byteorder) if dtype.itemsize > 1 else dtype
        if info.compress_type != zipfile.ZIP_STORED or self._mm is None:
            return np.frombuffer(self._read_record(f"data/{key}"), dtype=dtype, count=numel)
        head = bytes(self._mm[info.header_offset:info.header_offset + 30])
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt zip header for data/{key}")
        n_name, n_extra = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + n_name + n_extra
        if start + nbytes > self._mm.size:
            raise ValueError(f"{self.path}: truncated: storage data/{key} ends at byte {start + nbytes} "
                             f"but the file has {self._mm.size}")
        return self._mm[start:start + nbytes].view(dtype)


def is_torch_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def tensors_of(obj: Any, where: str) -> dict[str, PickledTensor]:
    """The {name: tensor} mapping of a state dict; anything else in it is an error naming the key."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, PickledTensor):
            raise ValueError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------- writing
class _Pickle:
    """Just enough of pickle protocol 2 to write a {name: tensor} dict the way torch.save does."""

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(b"\x80\x02")

    def op(self, code: bytes):
        self.out.write(code)

    def str(self, s: str):
        data = s.encode("utf-8")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def int(self, n: int):
        if 0 <= n < 256:
            self.out.write(b"K" + struct.pack("<B", n))
        elif 0 <= n < 65536:
            self.out.write(b"M" + struct.pack("<H", n))
        elif -2**31 <= n < 2**31:
            self.out.write(b"J" + struct.pack("<i", n))
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + struct.pack("<B", len(data)) + data)

    def tuple_of_ints(self, values):
        self.op(b"(")
        for v in values:
            self.int(int(v))
        self.op(b"t")

    def glob(self, module: str, name: str):
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")


def _state_dict_pickle(entries: list[tuple[str, tuple, np.dtype, str]]) -> bytes:
    p = _Pickle()
    p.op(b"}")
    p.op(b"(")
    for name, shape, dtype, key in entries:
        p.str(name)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.op(b"(")
        p.op(b"(")  # persistent id: ('storage', storage type, key, location, numel)
        p.str("storage")
        p.glob("torch", _STORAGE_NAMES[np.dtype(dtype).newbyteorder("=")])
        p.str(key)
        p.str("cpu")
        p.int(int(np.prod(shape, dtype=np.int64)))
        p.op(b"t")
        p.op(b"Q")
        p.int(0)
        p.tuple_of_ints(shape)
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        p.tuple_of_ints(strides)
        p.op(b"\x89")  # requires_grad False
        p.glob("collections", "OrderedDict")
        p.op(b")R")
        p.op(b"t")
        p.op(b"R")
    p.op(b"u")
    p.op(b".")
    return p.out.getvalue()


def write_torch_zip(path: str, entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray], shared: Mapping[str, str] | None = None,
                    archive: str = "archive", on_written: Callable[[str, np.ndarray], None] | None = None) -> int:
    """Writes {name: tensor} in torch.save's zip format, producing one tensor at a time.

    entries: (name, shape, dtype) in order; produce(name) returns the array (any layout).
    shared: {name: other name} for tensors that share the other's storage (a tied head).
    Returns the bytes written.
    """
    entries = list(entries)
    shared = dict(shared or {})
    keys: dict[str, str] = {}
    table = []
    for name, shape, dtype in entries:
        if np.dtype(dtype).newbyteorder("=") not in _STORAGE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} has no PyTorch storage type")
        if name in shared:
            keys[name] = keys[shared[name]]
        else:
            keys[name] = str(len([k for k in keys if k not in shared]))
        table.append((name, tuple(shape), np.dtype(dtype), keys[name]))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        def record(name: str, chunks: Iterable[bytes | memoryview], nbytes: int):
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            zip64 = nbytes > 0.9 * zipfile.ZIP64_LIMIT
            header = 30 + len(info.filename.encode("utf-8")) + (20 if zip64 else 0)
            pad = (-(zf.start_dir + header + 4)) % _ALIGN
            info.extra = struct.pack("<HH", 0x4650, pad) + b"Z" * pad
            with zf.open(info, "w", force_zip64=zip64) as w:
                for chunk in chunks:
                    w.write(chunk)

        record("data.pkl", [_state_dict_pickle(table)], 0)
        record("byteorder", [b"little"], 0)
        record(".format_version", [b"1"], 0)
        record(".storage_alignment", [b"64"], 0)
        for name, shape, dtype, key in table:
            if name in shared:
                continue
            array = produce(name)
            if tuple(array.shape) != shape or array.dtype != dtype:
                raise ValueError(f"tensor {name!r} is {array.shape} {array.dtype}, expected {shape} {dtype}")
            array = array.astype(dtype.newbyteorder("<"), copy=False)
            nbytes = array.size * dtype.itemsize
            record(f"data/{key}", (memoryview(b.reshape(-1).view(np.uint8)) for _, b in row_blocks(array)), nbytes)
            release_pages(array)
            if on_written is not None:
                on_written(name, array)
        record("version", [b"3\n"], 0)
        record(".data/serialization_id", [b"optkit0000000000000000000000000000000000"], 0)
    return os.path.getsize(path)
