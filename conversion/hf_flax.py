"""Hugging Face Flax directories (flax_model.msgpack, or shards with an index), without JAX.

The naming rule: a weight's Flax path (opt_spec.layouts, convention "flax": kernel (in, out),
embedding, scale/bias) as nested dict keys; a base model's tree starts at `decoder`, a head model's
at `model`. Sharded checkpoints split the same tree across files (each a nested dict of its part).
"""

from __future__ import annotations

import json
import os

from opt_spec import Head, OPTConfig, WeightSpec, layouts
from opt_spec import io as spec_io
from opt_spec.io import write_array

from .base import Checkpoint, ConversionError, NativeTensor, bind, output_dtype
from .hf import load_config, output_config, produce, write_config
from .msgpack_tree import ChunkedLeaf, Leaf, LeafSpec, MsgpackError, flatten, read_tree, write_tree

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_INDEX_NAME = "flax_model.msgpack.index.json"
HEAD_SCOPES = {"lm_head": Head.CAUSAL_LM, "score": Head.SEQUENCE_CLASSIFICATION,
               "qa_outputs": Head.QUESTION_ANSWERING}


def flax_names(spec: WeightSpec) -> list[str]:
    return ["/".join(layouts.native_path(spec, "flax"))]


def head_from_paths(paths) -> Head:
    tops = {p.split("/", 1)[0] for p in paths}
    for scope, head in HEAD_SCOPES.items():
        if scope in tops:
            return head
    return Head.CAUSAL_LM if "model" in tops else Head.BASE


def read_msgpack_tensors(path: str) -> dict[str, NativeTensor]:
    """{'a/b/c': tensor} of a Flax msgpack file; anything that is not an array is an error."""
    try:
        leaves = flatten(read_tree(path))
    except MsgpackError as err:
        raise ConversionError(str(err)) from None
    out = {}
    for keys, leaf in leaves.items():
        name = "/".join(keys)
        if not isinstance(leaf, (Leaf, ChunkedLeaf)):
            raise ConversionError(f"{path}: entry {name!r} is a {type(leaf).__name__}, not an array")
        out[name] = NativeTensor(leaf.shape, leaf.dtype, leaf.array, f"{path}:{name}")
    return out


def read_hf_flax(directory: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    directory = os.fspath(directory)
    config = config or load_config(directory, config_overrides)
    if os.path.lexists(os.path.join(directory, FLAX_WEIGHTS_NAME)):
        files = [spec_io.checkpoint_file(directory, FLAX_WEIGHTS_NAME)]
    elif os.path.lexists(os.path.join(directory, FLAX_INDEX_NAME)):
        files = spec_io.index_shards(directory, FLAX_INDEX_NAME)[1]
    else:
        raise ConversionError(f"{directory} holds no {FLAX_WEIGHTS_NAME} or {FLAX_INDEX_NAME}")
    native: dict[str, NativeTensor] = {}
    for path in files:
        for name, t in read_msgpack_tensors(path).items():
            if name in native:
                raise ConversionError(f"{directory}: {name!r} appears in more than one shard")
            native[name] = t
    head = head or head_from_paths(native)
    notes: list[str] = []
    refs = bind(native, config, head, flax_names, "flax", f"checkpoint {directory}", notes)
    return Checkpoint("hf-flax", directory, config, head, refs, files, notes)


def write_msgpack_tensors(path: str, ckpt: Checkpoint, refs, dtype, tick, names=flax_names,
                          convention: str = "flax") -> None:
    leaves = [(tuple(names(r.spec)[0].split("/")),
               LeafSpec(layouts.native_shape(r.spec, convention), output_dtype(r, dtype),
                        (lambda r=r: layouts.to_native(r.spec, produce(r, dtype), convention))))
              for r in refs]
    by_path = {leaf[0]: r for leaf, r in zip(leaves, refs)}
    write_tree(path, leaves, write_array, on_written=(lambda p, a: tick(by_path[p])) if tick else None)


def write_hf_flax(ckpt: Checkpoint, directory: str, dtype=None, tick=None, max_shard_size="10GB") -> list[str]:
    os.makedirs(directory, exist_ok=True)
    refs = list(ckpt.tensors.values())
    sizes = [(r.name, r.spec.numel * output_dtype(r, dtype).itemsize) for r in refs]
    shards = spec_io.plan_shards(sizes, max_shard_size)
    if len(shards) == 1:
        path = os.path.join(directory, FLAX_WEIGHTS_NAME)
        write_msgpack_tensors(path, ckpt, refs, dtype, tick)
        files = [path]
    else:
        files, weight_map = [], {}
        for i, shard in enumerate(shards):
            fname = f"flax_model-{i + 1:05d}-of-{len(shards):05d}.msgpack"
            part = [ckpt.tensors[n] for n in shard]
            write_msgpack_tensors(os.path.join(directory, fname), ckpt, part, dtype, tick)
            weight_map.update({flax_names(r.spec)[0]: fname for r in part})
            files.append(os.path.join(directory, fname))
        index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": weight_map}
        with open(os.path.join(directory, FLAX_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2) + "\n")
    write_config(directory, output_config(ckpt, dtype))
    return files
