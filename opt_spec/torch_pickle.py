"""PyTorch's checkpoint files (`torch.save`'s zip format) read and written without importing torch.

Reading: a restricted unpickler that knows how tensors are rebuilt (`torch._utils._rebuild_tensor_v2`
and friends over typed storages) and turns them into memory-mapped NumPy views of the zip records;
dicts, OrderedDicts and `argparse.Namespace` (as a plain dict) are allowed, any other global is
refused (nothing from the file is ever called). In `opaque` mode, used for training checkpoints
whose extra state (optimizer, omegaconf configs) is not needed, other globals become inert
placeholders instead, which fail loudly if they end up where a tensor is expected.

The file may come from a stranger, so reading allocates boundedly and trusts no length in it
(every refusal is a CheckpointError naming the file and the record):
- the zip: at most MAX_RECORDS records and a MAX_DIRECTORY_BYTES directory (checked before zipfile
  parses it), unique names under one archive folder, each record stored uncompressed (as torch.save
  writes them: a compressed one could expand without bound) and lying inside the file, none
  overlapping another;
- data.pkl: at most MAX_PICKLE_BYTES; before the real unpickler runs, `check_pickle` walks its
  opcodes without building anything and refuses lengths beyond the bytes that remain, more than
  MAX_PICKLE_OPS opcodes, memo indices beyond that, nesting deeper than MAX_DEPTH, and a container
  changed after it was put into another (cycles; Python hashes deep tuples by C recursion, so an
  unbounded nesting would crash the process, not raise);
- storages: each record is exactly numel x itemsize bytes, one dtype and size per record;
- tensors: offset, shape and strides non-negative integers, the view inside its storage and no
  larger than it (a tiny file cannot declare a huge broadcast tensor).

Writing: `write_torch_zip` emits the same format (data.pkl + data/<key> records, 64-byte aligned)
one tensor at a time, so `torch.load(..., weights_only=True)` and `mmap=True` read it.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from .errors import CheckpointError
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

# What a file may make the reader allocate: far above any real checkpoint (an OPT-175B model-parallel
# part holds ~1,600 tensors, ~60,000 pickle opcodes), far below what would hurt.
MAX_RECORDS = 100_000            # zip records
MAX_DIRECTORY_BYTES = 16 << 20   # the zip's central directory, which zipfile parses whole (~120 B per record)
MAX_PICKLE_BYTES = 64 << 20      # data.pkl
MAX_PICKLE_OPS = 1_000_000       # its opcodes; each makes at most one object (~200 B)
MAX_DEPTH = 100                  # containers inside containers
MAX_DIMS = 64                    # a tensor's dimensions (torch's own limit)
MAX_OPAQUE_CLASSES = 10_000      # distinct foreign classes in opaque mode (each placeholder class ~1 kB)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


def _shown(text: str) -> str:
    """A name from the file, as it can be shown in a message."""
    return text if text and len(text) <= 80 and text.isprintable() else _short.repr(text)


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """A pickle that names code optkit will not run (any global outside the tensor-rebuilding ones)."""


@dataclass(frozen=True)
class StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle sets the state of storage type {self.name}")


class Storage:
    """A storage record of the zip: a flat, memory-mapped array, touched only when a tensor is read."""

    def __init__(self, reader: "TorchZipReader", key: str, dtype: np.dtype, numel: int):
        self.reader, self.key, self.dtype, self.numel = reader, key, dtype, numel

    def array(self) -> np.ndarray:
        return self.reader.storage_array(self.key, self.dtype, self.numel)

    def __setstate__(self, state):  # BUILD on a storage would change what was checked
        raise UnsafePickleError(f"{self.reader.path}: the pickle sets the state of storage data/{self.key}")


@dataclass
class PickledTensor:
    """A tensor of a torch pickle: a strided view of a storage, checked to lie inside it (see
    `check_view`), not read until `array()`."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def array(self) -> np.ndarray:
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        flat = self.storage.array()
        item = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape, tuple(s * item for s in self.stride),
                                               writeable=False)

    def __setstate__(self, state):  # BUILD on a tensor would change what was checked
        raise UnsafePickleError(f"{self.storage.reader.path}: the pickle sets the state of a tensor of storage "
                                f"data/{self.storage.key}")


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 62


def check_view(where: str, storage: Storage, offset, shape, stride) -> tuple[int, tuple, tuple]:
    """(offset, shape, stride) of a tensor over `storage`, refused unless they are non-negative integers
    (one stride per dimension) and the view lies inside the storage and holds no more elements than it."""
    record = f"{where}: a tensor of storage record data/{storage.key}"
    if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride) <= MAX_DIMS
            and all(map(_index, (offset, *shape, *stride)))):
        raise CheckpointError(f"{record} has offset {_short.repr(offset)}, shape {_short.repr(shape)}, stride "
                              f"{_short.repr(stride)}: expected non-negative integers, one stride per dimension")
    count = math.prod(shape)
    if count == 0:
        if math.prod(max(d, 1) for d in shape) >= 2 ** 62 or offset > storage.numel:
            raise CheckpointError(f"{record} has shape {shape} at offset {offset}: outside its {storage.numel} "
                                  "elements or too large")
        return offset, shape, stride
    last = offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if count > storage.numel or last >= storage.numel:
        raise CheckpointError(f"{record} (offset {offset}, shape {shape}, stride {stride}) reaches element "
                              f"{max(last, count - 1)} of a storage of {storage.numel}")
    return offset, shape, stride


# ---------------------------------------------------------------------- data.pkl, checked first
class _Box:
    """A mutable container as `check_pickle` sees it: how deep it nests, and whether another holds it."""

    __slots__ = ("depth", "held")

    def __init__(self, depth: int):
        self.depth, self.held = depth, False


_PUSH_SCALAR = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
                "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE",
                "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
                "GLOBAL", "PERSID"}
_PUSH_EMPTY = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


class _PickleScan:
    """The stack machine of the unpickler, run over depths instead of objects (see `check_pickle`)."""

    def __init__(self, where: str):
        self.where, self.pos = where, 0
        self.stack: list = []  # int depth of an immutable value, or a _Box
        self.marks: list[int] = []
        self.memo: list = []
        self.memo_len = 0

    def fail(self, why: str):
        raise CheckpointError(f"{self.where}: data.pkl byte {self.pos}: {why}")

    def floor(self) -> int:
        return self.marks[-1] if self.marks else 0

    def top(self):
        if len(self.stack) <= self.floor():
            self.fail("stack underflow")
        return self.stack[-1]

    def pop(self, n: int) -> list:
        if len(self.stack) - n < self.floor():
            self.fail("stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self) -> list:
        if not self.marks:
            self.fail("no MARK to pop to")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def nest(self, items: list) -> int:
        """The depth of a container of `items`, which from now on are held (may not change)."""
        depth = 0
        for v in items:
            if isinstance(v, _Box):
                v.held = True
                v = v.depth
            depth = max(depth, v)
        if depth + 1 > MAX_DEPTH:
            self.fail(f"containers nested deeper than {MAX_DEPTH} levels")
        return depth + 1

    def fill(self, target, items: list):
        if not isinstance(target, _Box):
            self.fail("adds items to a value that is no container")
        if target.held or any(v is target for v in items):
            self.fail("changes a container after putting it into another (cycles are refused)")
        target.depth = max(target.depth, self.nest(items))

    def memo_put(self, index):
        if not isinstance(index, int) or not 0 <= index < MAX_PICKLE_OPS:
            self.fail(f"memo index {_short.repr(index)} out of range")
        if index >= len(self.memo):
            self.memo.extend([None] * (index + 1 - len(self.memo)))
        self.memo_len += self.memo[index] is None
        self.memo[index] = self.top()

    def step(self, name: str, arg, size: int):
        if name in _PUSH_SCALAR:
            self.stack.append(0)
        elif name in _PUSH_EMPTY:
            self.stack.append(_Box(1))
        elif name == "EMPTY_TUPLE":
            self.stack.append(1)
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name in ("TUPLE", "FROZENSET"):
            self.stack.append(self.nest(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            self.stack.append(self.nest(self.pop(int(name[-1]))))
        elif name in ("LIST", "DICT", "INST", "OBJ"):
            self.stack.append(_Box(self.nest(self.pop_mark())))
        elif name in ("APPEND", "BUILD"):
            items = self.pop(1)
            self.fill(self.top(), items)
        elif name == "SETITEM":
            items = self.pop(2)
            self.fill(self.top(), items)
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = self.pop_mark()
            self.fill(self.top(), items)
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):  # a new object, which may keep its arguments
            self.stack.append(_Box(self.nest(self.pop(3 if name == "NEWOBJ_EX" else 2))))
        elif name in ("STACK_GLOBAL", "BINPERSID"):
            self.nest(self.pop(2 if name == "STACK_GLOBAL" else 1))
            self.stack.append(0)
        elif name == "POP":
            if self.marks and self.marks[-1] == len(self.stack):
                self.marks.pop()
            else:
                self.pop(1)
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(self.top())
        elif name in _GETS:
            if not (isinstance(arg, int) and 0 <= arg < len(self.memo)) or self.memo[arg] is None:
                self.fail(f"memo index {_short.repr(arg)} was never set")
            self.stack.append(self.memo[arg])
        elif name in _PUTS:
            self.memo_put(self.memo_len if name == "MEMOIZE" else arg)
        elif name == "PROTO":
            if arg > pickle.HIGHEST_PROTOCOL:
                self.fail(f"pickle protocol {arg}")
        elif name == "FRAME":
            if arg > size - self.pos - 9:
                self.fail(f"a frame of {arg} bytes, {size - self.pos - 9} remain")
        else:  # EXT1/2/4 (the copyreg registry), NEXT_BUFFER, READONLY_BUFFER (out-of-band data)
            self.fail(f"opcode {name} (torch.save does not write it)")


def check_pickle(data: bytes, where: str) -> None:
    """Refuses a pickle the real unpickler could not read boundedly, before it runs: walks the opcodes
    (pickletools checks each length against the bytes that remain, reading nothing it does not have)
    with a stack of nesting depths instead of objects. Refused: more than MAX_PICKLE_OPS opcodes, a memo
    index at or beyond that (the C unpickler sizes its memo table by the index), nesting deeper than
    MAX_DEPTH, a container changed after another holds it (the one way to build a cycle, or a chain
    deeper than its depth says), stack underflows, opcodes torch.save never writes, bytes after STOP."""
    scan = _PickleScan(where)
    ops = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            scan.pos = pos
            ops += 1
            if ops > MAX_PICKLE_OPS:
                scan.fail(f"more than {MAX_PICKLE_OPS} opcodes")
            if op.name == "STOP":
                break
            scan.step(op.name, arg, len(data))
    except CheckpointError:
        raise
    except (ValueError, struct.error, OverflowError, EOFError) as err:  # pickletools: truncated, unknown opcode
        raise CheckpointError(f"{where}: corrupt pickle in data.pkl ({err})") from None
    if len(scan.stack) != 1 or scan.marks:
        scan.fail(f"STOP with {len(scan.stack)} values and {len(scan.marks)} MARKs on the stack, expected one value")
    if pos + 1 != len(data):
        scan.fail(f"{len(data) - pos - 1} bytes after STOP")


# ----------------------------------------------------------------------------- the unpickler
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
    raise UnsafePickleError(f"copyreg._reconstructor of {_short.repr(cls)}")


def _encode(text, encoding="latin1"):  # how protocol 2 pickles bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode of a {type(text).__name__} as {_short.repr(encoding)}")
    return text.encode(encoding)


_SAFE_GLOBALS = {
    ("torch", "Tensor"): object, ("torch.nn.parameter", "Parameter"): object,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): Namespace,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset, ("__builtin__", "slice"): slice,
    ("_codecs", "encode"): _encode,
}
# the functions torch pickles rebuild tensors with, as methods of the unpickler (so errors name the file)
_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor", ("torch._utils", "_rebuild_tensor"): "rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "rebuild_parameter",
    ("torch._tensor", "_rebuild_from_type_v2"): "rebuild_from_type",
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, reader: "TorchZipReader", where: str, opaque: bool = False):
        super().__init__(file)
        self.reader, self.where, self.opaque = reader, where, opaque
        self.opaque_classes: dict[str, type] = {}

    @property
    def opaque_names(self) -> set[str]:
        return set(self.opaque_classes)

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if (module, name) in _REBUILDERS:
            return getattr(self, _REBUILDERS[(module, name)])
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        if module == "torch" and name == "device":
            return str
        if self.opaque:
            qualname = f"{module}.{name}"
            if qualname not in self.opaque_classes:
                if len(self.opaque_classes) >= MAX_OPAQUE_CLASSES:
                    raise CheckpointError(f"{self.where}: more than {MAX_OPAQUE_CLASSES} distinct classes in data.pkl")
                self.opaque_classes[qualname] = type(name, (Opaque,), {"qualname": qualname})
            return self.opaque_classes[qualname]
        raise UnsafePickleError(f"{self.where}: refusing to load {_shown(module + '.' + name)} (only "
                                "tensors, dicts, OrderedDicts and argparse.Namespace are read from PyTorch pickles)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.where}: unknown persistent id {_short.repr(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise UnsafePickleError(f"{self.where}: storage of unknown type {_short.repr(storage_type)}")
        if not isinstance(key, str) or not _index(numel):
            raise CheckpointError(f"{self.where}: storage {_short.repr(key)} of {_short.repr(numel)} elements: "
                                  "expected a string key and a non-negative integer size")
        return self.reader.storage(key, storage_type.dtype, numel)

    def rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        if isinstance(storage, StorageType):
            raise UnsafePickleError(f"{self.where}: tensor without a storage record")
        if not isinstance(storage, Storage):
            raise UnsafePickleError(f"{self.where}: tensor rebuilt from {type(storage).__name__}, not a storage")
        return PickledTensor(storage, *check_view(self.where, storage, storage_offset, size, stride))

    def rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, *state):
        if not isinstance(data, PickledTensor):
            raise UnsafePickleError(f"{self.where}: parameter rebuilt from {type(data).__name__}, not a tensor")
        return data

    def rebuild_from_type(self, func, new_type, args, state):
        if func not in (self.rebuild_tensor, self.rebuild_parameter) or not isinstance(args, tuple):
            raise UnsafePickleError(f"{self.where}: tensor subclass rebuilt by an unknown function")
        return func(*args)


# ------------------------------------------------------------------------------------- the zip
def open_zip(path: str) -> zipfile.ZipFile:
    """zipfile.ZipFile(path), its central directory sized first (zipfile parses it whole)."""
    os.stat(path)  # a missing file is a FileNotFoundError, not a corrupt one
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the end record, found as ZipFile finds it
        if end is None:
            raise zipfile.BadZipFile("no end of central directory record")
        if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_RECORDS or end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
            raise CheckpointError(f"{path}: a zip of {end[zipfile._ECD_ENTRIES_TOTAL]} records in a "
                                  f"{end[zipfile._ECD_SIZE]}-byte directory (at most {MAX_RECORDS} records and "
                                  f"{MAX_DIRECTORY_BYTES} bytes are read)")
        zf = zipfile.ZipFile(path)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError, OverflowError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch zip checkpoint (truncated or corrupt: {err}; the "
                              "legacy pre-1.6 format is not supported)") from None
    if len(zf.infolist()) > MAX_RECORDS:
        zf.close()
        raise CheckpointError(f"{path}: a zip of {len(zf.infolist())} records (at most {MAX_RECORDS} are read)")
    return zf


class TorchZipReader:
    """A `torch.save` zip file: its object (tensors as PickledTensor) and memory-mapped storages."""

    def __init__(self, path: str | os.PathLike, opaque: bool = False):
        self.path = os.fspath(path)
        self._zip = open_zip(self.path)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.prefix = self._archive_folder()
        self._records = self._locate_records()
        order = self._read_record("byteorder", 16).strip() if self.prefix + "byteorder" in self._records else b"little"
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{self.path}: record byteorder says {_short.repr(order)}, not little or big")
        self.byteorder = "<" if order == b"little" else ">"
        self._storages: dict[str, Storage] = {}
        data = self._read_record("data.pkl", MAX_PICKLE_BYTES)
        check_pickle(data, self.path)
        unpickler = RestrictedUnpickler(io.BytesIO(data), self, self.path, opaque)
        try:
            self.obj = unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, ValueError,
                OverflowError, RecursionError) as err:
            raise CheckpointError(f"{self.path}: corrupt pickle in data.pkl ({type(err).__name__}: "
                                  f"{_short.repr(str(err))})") from None
        self.opaque_names = sorted(unpickler.opaque_names)

    def _archive_folder(self) -> str:
        names = [info.filename for info in self._zip.infolist()]
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: a PyTorch zip holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][:-len("data.pkl")]
        twice = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        if twice:
            raise CheckpointError(f"{self.path}: records named twice: {_short.repr(twice)}")
        outside = [n for n in names if not n.startswith(prefix)]
        if outside:
            raise CheckpointError(f"{self.path}: record {_shown(outside[0])} lies outside the archive folder "
                                  f"{prefix!r}")
        return prefix

    def _locate_records(self) -> dict[str, tuple[int, int]]:
        """{name: (first byte, size)} of every record: stored (not compressed, not encrypted), its local
        header agreeing with the directory, its bytes inside the file and overlapping no other record.
        Headers are read with pread, not through the memory map, which would map the pages around each."""
        records, spans = {}, []
        with open(self.path, "rb") as f:
            for info in self._zip.infolist():
                name = info.filename
                if info.flag_bits & 0x1:
                    raise CheckpointError(f"{self.path}: record {name} is encrypted")
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(f"{self.path}: record {name} is compressed (method {info.compress_type}); "
                                          "torch.save stores records uncompressed, and a compressed one could expand "
                                          "without bound")
                if not 0 <= info.header_offset <= self._mm.size - 30:
                    raise CheckpointError(f"{self.path}: corrupt zip directory: record {name} starts at byte "
                                          f"{info.header_offset}, the file has {self._mm.size}")
                head = os.pread(f.fileno(), 30, info.header_offset)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{self.path}: corrupt zip header for record {name}")
                n_name, n_extra = struct.unpack("<HH", head[26:30])
                local_name = os.pread(f.fileno(), n_name, info.header_offset + 30)
                if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
                    raise CheckpointError(f"{self.path}: corrupt zip header for record {name} (it names "
                                          f"{_short.repr(local_name)})")
                start = info.header_offset + 30 + n_name + n_extra
                if start + info.file_size > self._mm.size:
                    raise CheckpointError(f"{self.path}: truncated: record {name} ends at byte "
                                          f"{start + info.file_size}, the file has {self._mm.size}")
                records[name] = (start, info.file_size)
                spans.append((info.header_offset, start + info.file_size, name))
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(f"{self.path}: records {a} and {b} overlap")
        return records

    def _read_record(self, name: str, limit: int) -> bytes:
        """The bytes of a small record (data.pkl, byteorder), CRC-checked."""
        start, size = self._records[self.prefix + name] if self.prefix + name in self._records else (0, -1)
        if size < 0:
            raise CheckpointError(f"{self.path}: record {name} is missing")
        if size > limit:
            raise CheckpointError(f"{self.path}: record {name} is {size} bytes (at most {limit} are read)")
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), size, start)
        if zlib.crc32(data) != self._zip.getinfo(self.prefix + name).CRC:
            raise CheckpointError(f"{self.path}: record {name} is corrupt (its CRC-32 does not match)")
        return data

    def storage(self, key: str, dtype: np.dtype, numel: int) -> Storage:
        """The storage of record data/<key>, which must hold exactly numel x itemsize bytes; every
        reference to it must agree on dtype and size."""
        record = f"{self.path}: storage record data/{_shown(key)}"
        have = self._storages.get(key)
        if have is not None:
            if have.dtype != dtype or have.numel != numel:
                raise CheckpointError(f"{record} is read as {have.numel} x {have.dtype} and as {numel} x {dtype}")
            return have
        if self.prefix + f"data/{key}" not in self._records:
            raise CheckpointError(f"{record} is missing")
        size = self._records[self.prefix + f"data/{key}"][1]
        if numel * dtype.itemsize != size:
            raise CheckpointError(f"{record} holds {size} bytes; its {numel} {dtype} elements need "
                                  f"{numel * dtype.itemsize}")
        self._storages[key] = Storage(self, key, dtype, numel)
        return self._storages[key]

    def storage_array(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        start, size = self._records[f"{self.prefix}data/{key}"]
        dtype = dtype.newbyteorder(self.byteorder) if dtype.itemsize > 1 else dtype
        return self._mm[start:start + size].view(dtype)


def is_torch_zip(path: str) -> bool:
    try:
        with open_zip(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (CheckpointError, OSError):
        return False


def tensors_of(obj: Any, where: str) -> dict[str, PickledTensor]:
    """The {name: tensor} mapping of a state dict; anything else in it is an error naming the key."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, PickledTensor):
            raise CheckpointError(f"{where}: entry {_short.repr(key)} is a {type(value).__name__}, not a tensor")
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
