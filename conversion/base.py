"""What every format shares: lazy tensors keyed by canonical name, binding a file's own names to the
spec's weight table, dtype casts, and releasing memory-mapped pages once a tensor is written.

A reader turns a checkpoint into a `Checkpoint`: its config, its head, and one `TensorRef` per
canonical weight whose `load()` returns the tensor in canonical (PyTorch) layout, read from disk only
when called. A writer walks those refs in table order, one tensor at a time.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from opt_spec import Head, OPTConfig, WeightMismatchError, WeightSpec, normalize_names, tied_source, weight_table
from opt_spec import layouts
from opt_spec.weights import BASE_PREFIX, HEAD_WEIGHTS, optional_weights

ARCHITECTURES = {Head.BASE: "OPTModel", Head.CAUSAL_LM: "OPTForCausalLM",
                 Head.SEQUENCE_CLASSIFICATION: "OPTForSequenceClassification",
                 Head.QUESTION_ANSWERING: "OPTForQuestionAnswering"}


class ConversionError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the problem."""


@dataclass
class TensorRef:
    """One canonical weight of a checkpoint, not yet read."""

    spec: WeightSpec
    dtype: np.dtype
    load: Callable[[], np.ndarray]  # -> the array in canonical layout (possibly a memory-mapped view)
    where: str                      # file and the name the tensor has there, for messages

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def nbytes(self) -> int:
        return self.spec.numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A checkpoint opened by a reader: config, head and lazy tensors in weight-table order."""

    format: str
    path: str
    config: OPTConfig
    head: Head
    tensors: dict[str, TensorRef]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_source: str = "config.json"

    @property
    def parameters(self) -> int:
        return sum(t.spec.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> list[str]:
        return sorted({dtype_name(t.dtype) for t in self.tensors.values()})

    def describe(self) -> str:
        c = self.config
        shape = (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
                 f"ffn {c.ffn_dim}, vocab {c.vocab_size}")
        if c.has_projections:
            shape += f", embeddings {c.word_embed_proj_dim}"
        files = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        return (f"{self.format} ({files}): {ARCHITECTURES[self.head]}, {shape}; {len(self.tensors)} tensors, "
                f"{self.parameters:,} parameters, {'/'.join(self.dtypes())}; config from {self.config_source}")


# --------------------------------------------------------------------------------------- dtypes
_DTYPE_NAMES = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32",
                np.dtype(np.float16): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16"}
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    return _DTYPE_NAMES.get(dtype, dtype.name)


def is_float(dtype) -> bool:
    return np.dtype(dtype) in _DTYPE_NAMES


def output_dtype(ref: TensorRef, dtype: np.dtype | None) -> np.dtype:
    return np.dtype(dtype) if dtype is not None and is_float(ref.dtype) else ref.dtype


def cast(array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Casts floating tensors to `dtype` (None: unchanged); never copies when nothing changes."""
    if dtype is None or array.dtype == dtype or not is_float(array.dtype):
        return array
    return array.astype(dtype)


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


# ------------------------------------------------------------------------------ names and heads
def detect_head(names: Iterable[str]) -> Head:
    """The head a checkpoint was saved from, from its canonical (or canonical-like) names."""
    names = list(names)
    for head in (Head.CAUSAL_LM, Head.SEQUENCE_CLASSIFICATION, Head.QUESTION_ANSWERING):
        if any(n in HEAD_WEIGHTS[head] for n in names):
            return head
    if any(n.startswith(BASE_PREFIX) for n in names):
        return Head.CAUSAL_LM  # a causal LM whose tied head was not stored
    return Head.BASE


def canonical_prefixes(native: dict, head: Head, notes: list[str]) -> dict:
    """A head checkpoint whose base weights lack the `model.` prefix (facebook/opt-* on the Hub were
    saved from the base model) gets it, as every loader accepts either spelling."""
    if head is Head.BASE:
        return native
    mapping = normalize_names(native, head)
    renamed = [k for k, v in mapping.items() if k != v]
    if not renamed:
        return native
    notes.append(f"renamed {len(renamed)} base-model names decoder.* to model.decoder.* (a {head.value} checkpoint)")
    return {mapping[k]: v for k, v in native.items()}


@dataclass
class NativeTensor:
    """A tensor as a file stores it: its own name, shape and dtype, and how to read it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]
    where: str


def bind(native: Mapping[str, NativeTensor], config: OPTConfig, head: Head,
         naming: Callable[[WeightSpec], Sequence[str]], convention: str, where: str,
         notes: list[str] | None = None) -> dict[str, TensorRef]:
    """Matches a file's tensors to the weight table through the format's naming rule.

    naming(spec) gives the names a weight may have in the file (the first is what writers use).
    Layout follows `convention` (opt_spec.layouts). Unknown names, missing weights and wrong shapes
    raise one WeightMismatchError listing all of them; a stored copy of a tied head is dropped.
    """
    table = weight_table(config, head)
    tied = tied_source(config, head)
    lookup: dict[str, WeightSpec] = {}
    for spec in table:
        for name in naming(spec):
            lookup.setdefault(name, spec)
    refs: dict[str, TensorRef] = {}
    unexpected, mis_shaped = [], []
    for name, t in native.items():
        spec = lookup.get(name)
        if spec is None:
            unexpected.append(name)
            continue
        if spec.name in tied:
            if notes is not None:
                notes.append(f"dropped {name}: the tied LM head is the token embedding")
            continue
        want = layouts.native_shape(spec, convention)
        if tuple(t.shape) != want:
            mis_shaped.append((name, tuple(t.shape), want))
            continue
        if spec.name in refs:
            raise ConversionError(f"{where}: {spec.name} is stored twice (as {refs[spec.name].where} and {t.where})")
        if convention == "torch":
            loader = t.load
        else:
            loader = (lambda t=t, spec=spec: layouts.from_native(spec, t.load(), convention))
        refs[spec.name] = TensorRef(spec, np.dtype(t.dtype), loader, t.where)
    may_miss = optional_weights(config, head) | set(tied)
    missing = [naming(s)[0] for s in table if s.name not in refs and s.name not in may_miss
               and not any(n in native for n in naming(s))]
    if missing or unexpected or mis_shaped:
        raise WeightMismatchError(sorted(missing), sorted(unexpected), mis_shaped, where)
    return {s.name: refs[s.name] for s in table if s.name in refs}
