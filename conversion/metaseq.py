"""metaseq checkpoints (read only): a consolidated `restored.pt`-style file, or model-parallel parts
`...model_part-K.pt`, each `torch.save({"model": state dict, "args" | "cfg": ...})`.

The naming rule: canonical base names with three decoder-level modules renamed (below, one table
used in both directions) and no `model.` prefix; a layer's q/k/v may be one fused `qkv_proj` whose
rows are K, V, Q (per model-parallel part). `decoder.version` is dropped, and so is
`decoder.output_projection.weight` when it equals the token embedding (OPT ties them).

Model-parallel parts are merged as Megatron split them: the token embedding and column-parallel
linears (q, k, v, fc1: weights and biases) concatenate on dim 0, row-parallel linears (out_proj,
fc2) on dim 1 for weights (their biases are replicated); everything else is replicated.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from typing import Any, Mapping

import numpy as np

from opt_spec import Head, OPTConfig
from opt_spec.io import checkpoint_file, release_pages
from opt_spec.torch_pickle import PickledTensor, TorchZipReader, is_torch_zip
from opt_spec.weights import BASE_PREFIX

from .base import Checkpoint, ConversionError, NativeTensor, bind
from .infer import infer_config

# canonical module -> metaseq module (the reverse direction is derived from the same table)
RENAMES = {"decoder.project_in": "decoder.project_in_dim", "decoder.project_out": "decoder.project_out_dim",
           "decoder.final_layer_norm": "decoder.layer_norm"}
DROPPED = ("decoder.version",)
OUTPUT_PROJECTION = "decoder.output_projection.weight"
VOCAB_PARALLEL = ("embed_tokens",)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "fc1")
ROW_PARALLEL = ("out_proj", "fc2")
FUSED_QKV = "qkv_proj"
FUSED_ORDER = ("k_proj", "v_proj", "q_proj")
_PART = re.compile(r"model_part-(\d+)")


def concat_dim(name: str) -> int | None:
    """How model-parallel parts of a (canonical base) weight combine: the dim to concatenate, or None."""
    module, leaf = name.split(".")[-2:]
    if module in VOCAB_PARALLEL or module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and leaf == "weight":
        return 1
    return None


def to_canonical(name: str) -> str:
    """metaseq name -> canonical base name (unknown names come back unchanged)."""
    module, _, leaf = name.rpartition(".")
    back = {v: k for k, v in RENAMES.items()}
    return f"{back.get(module, module)}.{leaf}"


# ------------------------------------------------------------------------------------- files
@functools.lru_cache(maxsize=16)
def _open(path: str, mtime: float, size: int) -> TorchZipReader:
    return TorchZipReader(path, opaque=True)


def open_pickle(path: str) -> TorchZipReader:
    st = os.stat(path)
    return _open(os.path.abspath(path), st.st_mtime, st.st_size)


def part_files(path: str) -> list[str]:
    """The files of a metaseq checkpoint at `path` (a file, or a directory of parts); every file found
    in a folder is opened by opt_spec.io.checkpoint_file's rule (no symlink out of the folder)."""
    if os.path.isdir(path):
        parts = _parts_in(path)
        if parts:
            groups = {_PART.sub("model_part-#", os.path.basename(p)) for p in parts}
            if len(groups) > 1:
                raise ConversionError(f"{path} holds parts of several checkpoints ({', '.join(sorted(groups))}); "
                                      "pass one part file instead")
            return _ordered_parts(parts)
        singles = sorted(glob.glob(os.path.join(glob.escape(path), "*.pt")))
        if os.path.join(path, "restored.pt") in singles:
            return [checkpoint_file(path, "restored.pt")]
        if len(singles) == 1:
            return [checkpoint_file(path, os.path.basename(singles[0]))]
        raise ConversionError(f"{path}: no metaseq checkpoint (no *model_part-K.pt, restored.pt or single .pt file)")
    match = _PART.search(os.path.basename(path))
    if not match:
        return [path]
    pattern = os.path.join(glob.escape(os.path.dirname(path)), glob.escape(os.path.basename(path)[:match.start()])
                           + "model_part-*" + glob.escape(os.path.basename(path)[match.end():]))
    return _ordered_parts(glob.glob(pattern))


def _parts_in(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*.pt")) if _PART.search(os.path.basename(p)))


def _ordered_parts(paths: list[str]) -> list[str]:
    by_index = {int(_PART.search(os.path.basename(p)).group(1)): p for p in paths}
    if sorted(by_index) != list(range(len(by_index))):
        raise ConversionError(f"{os.path.dirname(paths[0])}: model-parallel parts are not 0..K-1: found parts "
                              f"{sorted(by_index)[:20]}")
    return [checkpoint_file(os.path.dirname(by_index[i]), os.path.basename(by_index[i])) for i in range(len(by_index))]


def looks_like_metaseq(path: str) -> bool:
    """A torch zip holding {"model": state dict, ...}, or a folder of them. A folder of model_part-K files
    whose parts are refused (not 0..K-1, several checkpoints) or a torch zip whose pickle is refused
    raises, so that detect_format can say why."""
    if not os.path.isdir(path):
        files = [path]
    elif _parts_in(path):
        files = part_files(path)
    else:
        try:
            files = part_files(path)  # restored.pt or one .pt file
        except ConversionError:
            return False
    if not (os.path.isfile(files[0]) and is_torch_zip(files[0])):
        return False
    obj = open_pickle(files[0]).obj
    return isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)


def _hints(obj: Mapping) -> dict[str, Any]:
    """Model hyper-parameters from a checkpoint's argparse args or (dict) cfg."""
    hints: dict[str, Any] = {}
    cfg = obj.get("cfg")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        hints.update(cfg["model"])
    args = obj.get("args")
    if isinstance(args, Mapping):
        hints.update(args)
    return hints


# ------------------------------------------------------------------------------------- reading
def read_metaseq(path: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    path = os.fspath(path)
    files = part_files(path)
    readers = [open_pickle(f) for f in files]
    notes: list[str] = []
    models = []
    for f, r in zip(files, readers):
        obj = r.obj
        if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
            raise ConversionError(f"{f}: not a metaseq checkpoint (expected a dict with a 'model' state dict)")
        model = {}
        for key, value in obj["model"].items():
            if not isinstance(value, PickledTensor):
                raise ConversionError(f"{f}: model entry {key!r} is a {type(value).__name__}, not a tensor")
            model[key[len(BASE_PREFIX):] if key.startswith(BASE_PREFIX) else key] = value
        models.append(model)
        if any(n.startswith("decoder.layers.") and "flat_param" in n for n in model) or "flat_param_0" in model:
            raise ConversionError(f"{f}: an FSDP flat-parameter shard; consolidate it first (metaseq's "
                                  "reshard/consolidate scripts)")
    keys = list(models[0])
    for f, m in zip(files[1:], models[1:]):
        if list(m) != keys:
            diff = sorted(set(m) ^ set(keys))
            raise ConversionError(f"{f}: model-parallel parts hold different tensors ({', '.join(diff[:8])})")
    hints = _hints(readers[0].obj)
    mp = hints.get("model_parallel_size")
    if isinstance(mp, int) and mp != len(files):
        raise ConversionError(f"{files[0]}: trained with model_parallel_size={mp} but {len(files)} part file(s) found")
    if len(files) > 1:
        notes.append(f"merged {len(files)} model-parallel parts")
    extra = sorted(str(k) for k in readers[0].obj if k not in ("model", "args", "cfg"))
    if extra:
        notes.append(f"ignored non-model entries: {', '.join(extra)}")
    if readers[0].opaque_names:
        notes.append(f"left unread (not needed): {', '.join(readers[0].opaque_names)}")

    native: dict[str, NativeTensor] = {}
    tied_copy = None
    for key in keys:
        parts = [m[key] for m in models]
        if key in DROPPED:
            notes.append(f"dropped {key}")
            continue
        if key == OUTPUT_PROJECTION:
            tied_copy = parts
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith("." + FUSED_QKV):
            for i, proj in enumerate(FUSED_ORDER):
                name = to_canonical(f"{module[:-len(FUSED_QKV)]}{proj}.{leaf}")
                native[name] = _merged(name, parts, files, key, split=(i, len(FUSED_ORDER)))
            continue
        name = to_canonical(key)
        native[name] = _merged(name, parts, files, key)
    if any(k.endswith(FUSED_QKV + ".weight") for k in keys):
        notes.append("split fused qkv_proj into k_proj, v_proj, q_proj (K, V, Q order per part)")

    shapes = {BASE_PREFIX + n: t.shape for n, t in native.items()}
    if tied_copy is not None:
        embed = native.get("decoder.embed_tokens.weight")
        if embed is not None and _same(tied_copy, [m["decoder.embed_tokens.weight"] for m in models]):
            notes.append(f"dropped {OUTPUT_PROJECTION} (tied: equal to the token embedding)")
        else:
            native["lm_head.weight"] = _merged("decoder.embed_tokens.weight", tied_copy, files, OUTPUT_PROJECTION)
            shapes["lm_head.weight"] = native["lm_head.weight"].shape
            notes.append(f"kept {OUTPUT_PROJECTION} as lm_head.weight: it differs from the token embedding (untied)")
    if config is None:
        config, guessed = infer_config(shapes, hints, config_overrides, where=path)
        notes.extend(guessed)
        source = "shapes + the checkpoint's args" if hints else "shapes"
        if config_overrides:
            source += " + overrides"
    else:
        source = "caller"
    canonical = {(n if n == "lm_head.weight" or not n.startswith("decoder.") else BASE_PREFIX + n): t
                 for n, t in native.items()}
    refs = bind(canonical, config, Head.CAUSAL_LM, lambda spec: [spec.name], "torch", f"metaseq checkpoint {path}",
                notes)
    return Checkpoint("metaseq", path, config, Head.CAUSAL_LM, refs, files, notes, config_source=source)


def _same(a: list[PickledTensor], b: list[PickledTensor]) -> bool:
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.storage is y.storage and x.offset == y.offset and x.stride == y.stride:
            continue
        xa, ya = x.array(), y.array()
        equal = np.array_equal(xa.view(np.uint8) if xa.flags.c_contiguous else xa, ya.view(np.uint8)
                               if ya.flags.c_contiguous else ya)
        release_pages(xa)
        release_pages(ya)
        if not equal:
            return False
    return True


def _merged(name: str, parts: list[PickledTensor], files: list[str], key: str,
            split: tuple[int, int] | None = None) -> NativeTensor:
    """One canonical tensor from its model-parallel parts (and, for fused qkv, one third of each)."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise ConversionError(f"{key}: parts have different dtypes {sorted(map(str, dtypes))}")
    shapes = [p.shape for p in parts]
    if split is not None:
        i, n = split
        if shapes[0][0] % n:
            raise ConversionError(f"{files[0]}:{key}: fused rows {shapes[0][0]} are not divisible by {n}")
        shapes = [(s[0] // n, *s[1:]) for s in shapes]
    dim = concat_dim(name) if len(parts) > 1 else None
    if len(parts) > 1 and dim is None and len(set(shapes)) > 1:
        raise ConversionError(f"{key}: replicated tensor has different shapes across parts: {shapes}")
    if dim is not None:
        if any(len(s) <= dim or s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes):
            raise ConversionError(f"{key}: parts cannot be concatenated on dim {dim}: {shapes}")
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        shape = tuple(shape)
    else:
        shape = shapes[0]

    def piece(p: PickledTensor) -> np.ndarray:
        a = p.array()
        if split is not None:
            rows = a.shape[0] // split[1]
            a = a[split[0] * rows:(split[0] + 1) * rows]
        return a

    def load() -> np.ndarray:
        if dim is None:
            return piece(parts[0])
        pieces = [piece(p) for p in parts]
        out = np.concatenate(pieces, axis=dim)
        for a in pieces:
            release_pages(a)
        return out

    where = f"{files[0]}:{key}" + (f" (+{len(files) - 1} parts)" if len(files) > 1 else "")
    return NativeTensor(shape, next(iter(dtypes)), load, where)
