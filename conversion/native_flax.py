"""Flax checkpoints of an optkit Flax model's `.params` (`flax.serialization.to_bytes(model.params)`),
read and written without JAX.

opt_flax's parameter tree is the Flax naming rule itself: a weight's path is
opt_spec.layouts.native_path(spec, "flax") (kernel (in, out), embedding, scale/bias), a base model's
tree starts at `decoder`, a head model's at `model`, and a tied LM head is no parameter. That is also
Hugging Face's flax_model.msgpack tree, so the bytes are read and written by the same code as hf-flax.
"""

from __future__ import annotations

import os

from opt_spec import OPTConfig

from .base import Checkpoint, ConversionError, bind
from .hf_flax import flax_names, head_from_paths, read_msgpack_tensors, write_msgpack_tensors

READY = True
_LEAVES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}


def looks_like(file: str) -> bool:
    if not os.path.isfile(file):
        return False
    with open(file, "rb") as f:
        first = f.read(1)
    if not first or not (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF)):  # a msgpack map
        return False
    try:
        names = read_msgpack_tensors(file)
    except ConversionError:
        if file.endswith(".msgpack"):  # a msgpack checkpoint that is refused: detect_format says why
            raise
        return False
    return any(n.endswith("embed_tokens/embedding") for n in names)


def _canonical_shapes(native) -> dict[str, tuple]:
    out = {}
    for name, t in native.items():
        *scopes, leaf = name.split("/")
        shape = t.shape[::-1] if leaf == "kernel" else t.shape
        out[".".join(scopes + [_LEAVES.get(leaf, leaf)])] = shape
    return out


def read(path: str, file: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    from .native import native_config

    if not os.path.isfile(file):
        raise ConversionError(f"{path}: no Flax params file")
    native = read_msgpack_tensors(file)
    config, notes, source = native_config(path, _canonical_shapes(native), config_overrides, config, file)
    head = head or head_from_paths(native)
    refs = bind(native, config, head, flax_names, "flax", f"Flax params {file}", notes)
    return Checkpoint("flax-params", path, config, head, refs, [file], notes, config_source=source)


def write(ckpt: Checkpoint, file: str, dtype=None, tick=None) -> None:
    write_msgpack_tensors(file, ckpt, list(ckpt.tensors.values()), dtype, tick)
