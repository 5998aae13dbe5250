"""What every format shares: lazy tensors keyed by canonical name, binding a file's own names to the
spec's weight table, dtype casts, and releasing memory-mapped pages once a tensor is written.

A reader turns a checkpoint into a `Checkpoint`: its config, its head, and one `TensorRef` per
canonical weight whose `load()` returns the tensor in canonical (PyTorch) layout, read from disk only
when called. A writer walks those refs in table order, one tensor at a time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from opt_spec import (Head, OPTConfig, WeightMismatchError, WeightSpec, layouts, normalize_names, tied_source,
                      weight_table)
from opt_spec.errors import CheckpointError
from opt_spec.weights import BASE_PREFIX, HEAD_WEIGHTS, optional_weights

ARCHITECTURES = {Head.BASE: "OPTModel", Head.CAUSAL_LM: "OPTForCausalLM",
                 Head.SEQUENCE_CLASSIFICATION: "OPTForSequenceClassification",
                 Head.QUESTION_ANSWERING: "OPTForQuestionAnswering"}


class ConversionError(CheckpointError):
    """A checkpoint that cannot be read or written as asked; the message names the problem. A
    CheckpointError, so a caller catches every refused input with one class."""


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


def _load_native(tensor: "NativeTensor", spec: WeightSpec, convention: str) -> np.ndarray:
    return layouts.from_native(spec, tensor.load(), convention)


def bind(native: Mapping[str, NativeTensor], config: OPTConfig, head: Head,
         naming: Callable[[WeightSpec], Sequence[str]], convention: str, where: str,
         notes: list[str] | None = None) -> dict[str, TensorRef]:
    """Matches a file's tensors to the weight table through the format's naming rule.

    naming(spec) gives the names a weight may have in the file (the first is what writers use).
    Layout follows `convention` (opt_spec.layouts). Unknown names, missing weights and wrong shapes
    raise one WeightMismatchError listing all of them; a stored copy of a tied head is dropped. Every
    OPT weight is floating point: an integer or boolean tensor in its place is refused, naming it.
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
        if not is_float(t.dtype):
            raise ConversionError(f"{t.where}: {spec.name} is stored as {np.dtype(t.dtype)}; OPT weights are "
                                  f"floating point ({', '.join(_DTYPE_NAMES.values())})")
        want = layouts.native_shape(spec, convention)
        if tuple(t.shape) != want:
            mis_shaped.append((name, tuple(t.shape), want))
            continue
        if spec.name in refs:
            raise ConversionError(f"{where}: {spec.name} is stored twice (as {refs[spec.name].where} and {t.where})")
        if convention == "torch":
            loader = t.load
        else:
            loader = functools.partial(_load_native, t, spec, convention)
        refs[spec.name] = TensorRef(spec, np.dtype(t.dtype), loader, t.where)
    may_miss = optional_weights(config, head) | set(tied)
    missing = [naming(s)[0] for s in table if s.name not in refs and s.name not in may_miss
               and not any(n in native for n in naming(s))]
    if missing or unexpected or mis_shaped:
        raise WeightMismatchError(sorted(missing), sorted(unexpected), mis_shaped, where)
    return {s.name: refs[s.name] for s in table if s.name in refs}
