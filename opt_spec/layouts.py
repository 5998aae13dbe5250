"""How canonical (PyTorch-layout) weights are named and laid out in Flax and Keras.

Decided once, here, by a weight's kind: a framework's parameter path is the canonical name split on
dots with its last part renamed, and a linear weight is transposed from (out, in) to (in, out).
Nothing else differs between the formats, so every conversion is `to_native` / `from_native`.
"""

from __future__ import annotations

import numpy as np

from .weights import WeightKind, WeightSpec

K = WeightKind
LEAF_NAMES = {
    "torch": {K.EMBEDDING: "weight", K.LINEAR_WEIGHT: "weight", K.LINEAR_BIAS: "bias",
              K.NORM_SCALE: "weight", K.NORM_BIAS: "bias"},
    "flax": {K.EMBEDDING: "embedding", K.LINEAR_WEIGHT: "kernel", K.LINEAR_BIAS: "bias",
             K.NORM_SCALE: "scale", K.NORM_BIAS: "bias"},
    "keras": {K.EMBEDDING: "embeddings", K.LINEAR_WEIGHT: "kernel", K.LINEAR_BIAS: "bias",
              K.NORM_SCALE: "gamma", K.NORM_BIAS: "beta"},
}
CONVENTIONS = tuple(LEAF_NAMES)


def is_transposed(kind: WeightKind, convention: str) -> bool:
    """Flax and Keras kernels are (in, out); torch linear weights are (out, in)."""
    return convention != "torch" and kind is WeightKind.LINEAR_WEIGHT


def native_path(spec: WeightSpec, convention: str) -> tuple[str, ...]:
    """'model.decoder.layers.0.fc1.weight' -> ('model', 'decoder', 'layers', '0', 'fc1', 'kernel')."""
    *scopes, _ = spec.name.split(".")
    return (*scopes, LEAF_NAMES[convention][spec.kind])


def native_shape(spec: WeightSpec, convention: str) -> tuple[int, ...]:
    return spec.shape[::-1] if is_transposed(spec.kind, convention) else spec.shape


def to_native(spec: WeightSpec, array: np.ndarray, convention: str) -> np.ndarray:
    """Canonical array -> the framework's layout (a view where possible; never mutates the input)."""
    return array.T if is_transposed(spec.kind, convention) else array


def from_native(spec: WeightSpec, array: np.ndarray, convention: str) -> np.ndarray:
    """The framework's layout -> canonical array."""
    return array.T if is_transposed(spec.kind, convention) else array
