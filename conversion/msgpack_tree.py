"""Flax's msgpack checkpoints (flax.serialization) read and written without JAX, Flax or msgpack.

The format: a msgpack map of maps whose leaves are ext type 1 (ndarray) or 3 (NumPy scalar), each
holding the msgpack triple (shape, dtype name, raw C-order bytes). Arrays above 2**30 bytes are
stored as {'__msgpack_chunked_array__': True, 'shape': {'0': d0, ...}, 'chunks': {'0': flat part, ...}}.

Reading parses only the structure of a memory-mapped file and returns each leaf as a lazy,
memory-mapped array; writing emits the structure and streams one array at a time.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from opt_spec.errors import CheckpointError

EXT_NDARRAY, EXT_NPSCALAR = 1, 3
MAX_CHUNK_SIZE = 2 ** 30
CHUNKED = "__msgpack_chunked_array__"
# What a file may make the reader build: far above a real tree (an OPT model's is 7 levels deep with a
# few thousand entries; its strings are names), far below what would hurt.
MAX_DEPTH = 100             # maps and arrays inside each other
MAX_ITEMS = 1_000_000       # map entries and array elements, all together
MAX_STRING = 1 << 20        # bytes of one str or bin value outside an array
MAX_DIMS = 64
DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
          "float64", "bfloat16", "complex64", "complex128"}


class MsgpackError(CheckpointError):
    """A msgpack file that is refused; the message names the file, the byte or the entry."""


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 62


@dataclass
class Leaf:
    """An array stored in the file, not yet read."""

    mm: np.ndarray
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def array(self) -> np.ndarray:
        n = math.prod(self.shape)
        return self.mm[self.offset:self.offset + n * self.dtype.itemsize].view(self.dtype).reshape(self.shape)


@dataclass
class ChunkedLeaf:
    shape: tuple[int, ...]
    chunks: list[Leaf]

    @property
    def dtype(self) -> np.dtype:
        return self.chunks[0].dtype

    def array(self) -> np.ndarray:
        return np.concatenate([c.array().reshape(-1) for c in self.chunks]).reshape(self.shape)


class _Parser:
    """Reads one msgpack value at a time, checking every claimed length against the bytes that remain
    (of the file, or of the ext value being read) before it reads or allocates anything."""

    def __init__(self, mm: np.ndarray, where: str):
        self.mm, self.pos, self.where = mm, 0, where
        self.end = mm.size
        self.items = 0

    def fail(self, why: str, at: int | None = None):
        raise MsgpackError(f"{self.where}: byte {self.pos if at is None else at}: {why}")

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            self.fail(f"truncated: needs {n} bytes, {self.end - self.pos} remain")
        out = bytes(self.mm[self.pos:self.pos + n])
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def count(self, n: int) -> int:
        """A map's or array's claimed size, which the remaining bytes must be able to hold."""
        if n > self.end - self.pos:
            self.fail(f"a container of {n} items, only {self.end - self.pos} bytes remain")
        self.items += n
        if self.items > MAX_ITEMS:
            self.fail(f"more than {MAX_ITEMS} map entries and array elements")
        return n

    def text(self, n: int) -> str:
        data = self.string(n)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a string that is not UTF-8", self.pos - n)

    def string(self, n: int) -> bytes:
        if MAX_STRING < n <= self.end - self.pos:
            self.fail(f"a string of {n} bytes (at most {MAX_STRING} are read outside arrays)")
        return self.take(n)

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            self.fail(f"maps and arrays nested deeper than {MAX_DEPTH} levels")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(self.count(b & 0x0F), depth + 1)
        if 0x90 <= b <= 0x9F:
            return [self.value(depth + 1) for _ in range(self.count(b & 0x0F))]
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b in (0xC4, 0xC5, 0xC6):
            return self.string(self.uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b]))
        if b in (0xC7, 0xC8, 0xC9):
            n = self.uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
            return self.ext(self.take(1)[0], n, depth + 1)
        if b in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8):
            n = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}[b]
            return self.ext(self.take(1)[0], n, depth + 1)
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            return int.from_bytes(self.take(n), "big", signed=True)
        if b in (0xD9, 0xDA, 0xDB):
            return self.text(self.uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[b]))
        if b in (0xDC, 0xDD):
            return [self.value(depth + 1) for _ in range(self.count(self.uint(2 if b == 0xDC else 4)))]
        if b in (0xDE, 0xDF):
            return self.map(self.count(self.uint(2 if b == 0xDE else 4)), depth + 1)
        self.fail(f"invalid msgpack byte 0x{b:02x}", self.pos - 1)

    def map(self, n: int, depth: int) -> dict:
        out = {}
        for _ in range(n):
            at = self.pos
            key = self.value(depth)
            if isinstance(key, bytes):
                try:
                    key = key.decode("utf-8")
                except UnicodeDecodeError:
                    self.fail("a map key that is not UTF-8", at)
            if not isinstance(key, str):
                self.fail(f"a map key that is a {type(key).__name__}, not a string", at)
            if key in out:
                self.fail(f"map key {key[:80]!r} appears twice", at)
            out[key] = self.value(depth)
        return out

    def ext(self, code: int, n: int, depth: int) -> Leaf:
        """An ndarray (type 1) or NumPy scalar (type 3): the triple (shape, dtype name, raw bytes),
        read within the ext's own n bytes; its data stays in the file."""
        start = self.pos
        if code not in (EXT_NDARRAY, EXT_NPSCALAR):
            self.fail(f"unsupported msgpack extension type {code}", start - 1)
        if n > self.end - start:
            self.fail(f"truncated: an array of {n} bytes, {self.end - start} remain", start)
        outer, self.end = self.end, start + n
        try:
            if self.take(1)[0] != 0x93:
                self.fail("corrupt array header", start)
            shape = self.value(depth)
            dtype_name = self.value(depth)
            b = self.take(1)[0]
            if b not in (0xC4, 0xC5, 0xC6):
                self.fail("corrupt array data", start)
            nbytes = self.uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[b])
        finally:
            self.end = outer
        offset = self.pos
        if isinstance(dtype_name, bytes):
            dtype_name = dtype_name.decode("utf-8", "replace")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(map(_index, shape))):
            self.fail(f"an array of shape {str(shape)[:80]}: expected up to {MAX_DIMS} non-negative integers", start)
        if dtype_name not in DTYPES:
            self.fail(f"an array of dtype {str(dtype_name)[:80]!r}: expected one of {', '.join(sorted(DTYPES))}",
                      start)
        dtype = _dtype(dtype_name)
        if math.prod(shape) * dtype.itemsize != nbytes or offset + nbytes != start + n:
            self.fail(f"an array of shape {shape} {dtype_name} with {nbytes} bytes in an ext of {n}", start)
        self.pos = start + n
        return Leaf(self.mm, offset, tuple(shape), dtype)


def _chunked(node: dict, where: str) -> ChunkedLeaf:
    shape, chunks = node.get("shape"), node.get("chunks")
    if not (isinstance(shape, dict) and isinstance(chunks, dict) and set(node) == {CHUNKED, "shape", "chunks"}):
        raise MsgpackError(f"{where}: a chunked array without its shape and chunks")
    dims = [shape.get(str(i)) for i in range(len(shape))]
    parts = [chunks.get(str(i)) for i in range(len(chunks))]
    if not (len(dims) <= MAX_DIMS and all(map(_index, dims)) and parts
            and all(isinstance(c, Leaf) and len(c.shape) == 1 and c.dtype == parts[0].dtype for c in parts)
            and sum(c.shape[0] for c in parts) == math.prod(dims)):
        raise MsgpackError(f"{where}: a corrupt chunked array (shape {str(shape)[:80]}, {len(parts)} chunks)")
    return ChunkedLeaf(tuple(dims), parts)


def _unchunk(tree, where: str):
    if isinstance(tree, dict):
        if CHUNKED in tree:
            return _chunked(tree, where)
        return {k: _unchunk(v, f"{where}/{k}") for k, v in tree.items()}
    return tree


def read_tree(path: str | os.PathLike) -> dict:
    """The nested dict of a Flax msgpack file, leaves as lazy memory-mapped `Leaf`s. Bounded by
    MAX_DEPTH, MAX_ITEMS, MAX_STRING; anything else is a MsgpackError naming the file and byte."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        raise MsgpackError(f"{path}: empty file")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    parser = _Parser(mm, path)
    tree = parser.value()
    if parser.pos != size:
        raise MsgpackError(f"{path}: {size - parser.pos} trailing bytes after the msgpack object (corrupt)")
    if not isinstance(tree, dict):
        raise MsgpackError(f"{path}: holds a msgpack {type(tree).__name__}, not a map of arrays")
    return {k: _unchunk(v, f"{path}: entry {k}") for k, v in tree.items()}


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


# ------------------------------------------------------------------------------------- writing
def _uint_header(n: int, small: tuple[int, int] | None, codes: tuple[int, int, int]) -> bytes:
    if small is not None and n < small[1]:
        return bytes([small[0] | n])
    if n < 256 and codes[0] is not None:
        return bytes([codes[0], n])
    if n < 65536:
        return bytes([codes[1]]) + n.to_bytes(2, "big")
    return bytes([codes[2]]) + n.to_bytes(4, "big")


def pack_str(s: str) -> bytes:
    data = s.encode("utf-8")
    return _uint_header(len(data), (0xA0, 32), (0xD9, 0xDA, 0xDB)) + data


def pack_int(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative sizes do not occur here")
    if n < 128:
        return bytes([n])
    for code, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise ValueError(n)


def map_header(n: int) -> bytes:
    return _uint_header(n, (0x80, 16), (None, 0xDE, 0xDF))


def array_header(n: int) -> bytes:
    return _uint_header(n, (0x90, 16), (None, 0xDC, 0xDD))


def ext_header(code: int, n: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n < 256:
        return bytes([0xC7, n, code])
    if n < 65536:
        return bytes([0xC8]) + n.to_bytes(2, "big") + bytes([code])
    return bytes([0xC9]) + n.to_bytes(4, "big") + bytes([code])


def bin_header(n: int) -> bytes:
    return _uint_header(n, None, (0xC4, 0xC5, 0xC6))


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else dtype.name


def _write_ndarray(f, array: np.ndarray, write_bytes: Callable) -> None:
    nbytes = array.size * array.dtype.itemsize
    inner = b"\x93" + array_header(array.ndim) + b"".join(pack_int(int(d)) for d in array.shape)
    inner += pack_str(_dtype_name(array.dtype)) + bin_header(nbytes)
    f.write(ext_header(EXT_NDARRAY, len(inner) + nbytes) + inner)
    write_bytes(f, array)


@dataclass
class LeafSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]


def write_tree(path: str, leaves: Iterable[tuple[tuple[str, ...], LeafSpec]], write_bytes: Callable,
               on_written: Callable[[tuple[str, ...], np.ndarray], None] | None = None) -> None:
    """Writes {path: leaf} as a nested msgpack map, making and writing one array at a time."""
    tree: dict = {}
    for keys, leaf in leaves:
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'/'.join(keys)} nests below an array")
        node[keys[-1]] = leaf

    def emit(f, node, prefix):
        f.write(map_header(len(node)))
        for key, value in node.items():
            f.write(pack_str(key))
            if isinstance(value, dict):
                emit(f, value, (*prefix, key))
                continue
            array = value.make()
            if tuple(array.shape) != tuple(value.shape) or array.dtype != value.dtype:
                raise ValueError(f"{'/'.join((*prefix, key))} is {array.shape} {array.dtype}, "
                                 f"expected {value.shape} {value.dtype}")
            array = array if array.dtype.byteorder != ">" else array.astype(array.dtype.newbyteorder("<"))
            if array.size * array.dtype.itemsize > MAX_CHUNK_SIZE:
                flat = array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)
                step = max(1, MAX_CHUNK_SIZE // array.dtype.itemsize)
                parts = [flat[i:i + step] for i in range(0, flat.size, step)]
                f.write(map_header(3) + pack_str(CHUNKED) + b"\xc3")
                f.write(pack_str("shape") + map_header(array.ndim))
                for i, d in enumerate(array.shape):
                    f.write(pack_str(str(i)) + pack_int(int(d)))
                f.write(pack_str("chunks") + map_header(len(parts)))
                for i, part in enumerate(parts):
                    f.write(pack_str(str(i)))
                    _write_ndarray(f, part, write_bytes)
            else:
                _write_ndarray(f, array, write_bytes)
            if on_written is not None:
                on_written((*prefix, key), array)

    with open(path, "wb") as f:
        emit(f, tree, ())
