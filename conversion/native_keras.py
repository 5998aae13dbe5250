"""Keras 3 weights files (`model.save_weights("x.weights.h5")`) of optkit's TFOPT* models, with h5py.

Keras 3 stores each layer's own variables as datasets `0, 1, ...` (creation order) of a `vars` group
whose attribute `name` is the layer's name, under a path of Keras's object keys. For opt_tf's models
that path is, per canonical module (the naming rule, one table for both directions):

    base model       decoder/...                     head model   layers/tfopt_model/decoder/...
    layer i          decoder/blocks/tfopt_decoder_layer[_i]/...   (Keras uniquifies list items)
    a head (lm_head, score, qa_outputs)   layers/linear

and a module's variables, in order, are its weights in weight-table order (kernel then bias, gamma
then beta), each in Keras layout (opt_spec.layouts, convention "keras"). bfloat16 is stored as Keras
does: 2-byte opaque data with the attribute dtype="bfloat16".
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from opt_spec import Head, OPTConfig, WeightSpec, layouts, weight_table
from opt_spec.weights import BASE_PREFIX

from .base import Checkpoint, ConversionError, NativeTensor, bind, dtype_name
from .hf import produce
from .hf_tf import _h5py, _open_h5, h5_dataset_tensor, h5_get

MODEL_NAMES = {Head.BASE: "tfopt_model", Head.CAUSAL_LM: "tfopt_for_causal_lm",
               Head.SEQUENCE_CLASSIFICATION: "tfopt_for_sequence_classification",
               Head.QUESTION_ANSWERING: "tfopt_for_question_answering"}
BASE_SCOPE = "layers/tfopt_model"   # where a head model keeps its base model
BLOCKS = "blocks"
BLOCK_CLASS = "tfopt_decoder_layer"
HEAD_CLASS = "linear"
READY = True


def module_group(module: str) -> str:
    """Canonical module name ('model.decoder.layers.3.fc1', 'decoder.embed_tokens', 'lm_head') ->
    the Keras object path of its layer."""
    parts = module.split(".")
    if parts[0] == "model":
        prefix, parts = [BASE_SCOPE], parts[1:]
    elif parts[0] == "decoder":
        prefix = []
    else:
        return f"{BASE_SCOPE.split('/')[0]}/{HEAD_CLASS}"
    out = list(prefix)
    i = 0
    while i < len(parts):
        if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
            n = int(parts[i + 1])
            out += [BLOCKS, BLOCK_CLASS if n == 0 else f"{BLOCK_CLASS}_{n}"]
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return "/".join(out)


def dataset_names(config: OPTConfig, head: Head) -> dict[str, str]:
    """{canonical name: h5 dataset path} for every weight of the table."""
    by_module: dict[str, list[WeightSpec]] = {}
    for spec in weight_table(config, head):
        by_module.setdefault(spec.name.rsplit(".", 1)[0], []).append(spec)
    return {spec.name: f"{module_group(module)}/vars/{i}"
            for module, specs in by_module.items() for i, spec in enumerate(specs)}


def _read_datasets(file: str) -> dict[str, NativeTensor]:
    """Every dataset of the file by path, stored inside it (hf_tf.h5_dataset_tensor's rule); any link that
    is not a hard link (a soft link, or an external link into another file) is refused by name."""
    h5py = _h5py()
    out = {}
    with _open_h5(file) as f:
        # the first link that is not a hard link (returning it stops the walk; raising inside h5py's callback
        # would not come out cleanly), then h5_get refuses it by name
        other = f.visititems_links(lambda name, link: None if isinstance(link, h5py.HardLink) else name)
        if other is not None:
            h5_get(f, other, file)
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            dset = f[name]
            bfloat16 = dset.attrs.get("dtype") in ("bfloat16", b"bfloat16")
            out[name] = h5_dataset_tensor(file, dset, name, opaque=ml_dtypes.bfloat16 if bfloat16 else None)
    return out


def looks_like(file: str) -> bool:
    """An HDF5 file with Keras 3's top-level keys; an HDF5 file that cannot be opened is refused (the
    reason is kept by detect_format). Links are looked at, never followed."""
    if not (os.path.isfile(file) and _is_h5(file)):
        return False
    with _open_h5(file) as f:
        return "layer_names" not in f.attrs and any(f.get(k, getlink=True) is not None for k in ("decoder", "layers"))


def _is_h5(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def read(path: str, file: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    from .native import native_config

    if not os.path.isfile(file):
        raise ConversionError(f"{path}: no Keras weights file")
    native = _read_datasets(file)
    head = head or _head_of(native)
    shapes = _canonical_shapes(native, head)
    config, notes, source = native_config(path, shapes, config_overrides, config, file)
    names = dataset_names(config, head)
    refs = bind(native, config, head, lambda spec: [names[spec.name]], "keras", f"Keras weights {file}", notes)
    return Checkpoint("keras-weights", path, config, head, refs, [file], notes, config_source=source)


def _head_of(native) -> Head:
    """A base model has no `layers/tfopt_model`; a head model's head is told by its one head Linear
    (Keras keys all three alike): QA has a bias, the LM head is as wide as the vocabulary, a
    classifier has num_labels outputs, and a tied LM head has no variable."""
    if not any(n.startswith(BASE_SCOPE + "/") for n in native):
        return Head.BASE
    kernel = native.get(f"layers/{HEAD_CLASS}/vars/0")
    if kernel is None:
        return Head.CAUSAL_LM  # tied LM head: no variable
    if f"layers/{HEAD_CLASS}/vars/1" in native:
        return Head.QUESTION_ANSWERING
    vocab = next((t.shape[0] for n, t in native.items() if n.endswith("embed_tokens/vars/0")), None)
    return Head.CAUSAL_LM if kernel.shape[-1] == vocab else Head.SEQUENCE_CLASSIFICATION


def _canonical_shapes(native, head: Head) -> dict[str, tuple]:
    """Canonical {name: shape} of the tensors, for config inference (layout undone by kind)."""
    base_prefix = BASE_SCOPE + "/" if head is not Head.BASE else ""
    out = {}
    for name, t in native.items():
        if not name.startswith(base_prefix + "decoder/"):
            continue
        module = name[len(base_prefix):].rsplit("/vars/", 1)[0]
        parts, canon, i = module.split("/"), [], 0
        while i < len(parts):
            if parts[i] == BLOCKS:
                key = parts[i + 1]
                canon += ["layers", "0" if key == BLOCK_CLASS else key.rsplit("_", 1)[1]]
                i += 2
            else:
                canon.append(parts[i])
                i += 1
        index = int(name.rsplit("/", 1)[1])
        leaf = "weight" if index == 0 else "bias"
        is_kernel = len(t.shape) == 2 and parts[-1] not in ("embed_tokens", "embed_positions")
        out[(BASE_PREFIX if head is not Head.BASE else "") + ".".join(canon) + "." + leaf] = \
            t.shape[::-1] if is_kernel else t.shape
    kernel = native.get(f"layers/{HEAD_CLASS}/vars/0")
    if kernel is not None and head is not Head.BASE:
        out[{Head.CAUSAL_LM: "lm_head.weight", Head.SEQUENCE_CLASSIFICATION: "score.weight",
             Head.QUESTION_ANSWERING: "qa_outputs.weight"}[head]] = kernel.shape[::-1]
    return out


def write(ckpt: Checkpoint, file: str, dtype=None, tick=None) -> None:
    h5py = _h5py()
    names = dataset_names(ckpt.config, ckpt.head)
    with h5py.File(file, "w") as f:
        f.create_group("vars").attrs["name"] = MODEL_NAMES[ckpt.head]
        groups = {}
        for ref in ckpt.tensors.values():
            path = names[ref.name]
            group_path = path.rsplit("/", 1)[0]
            group = groups.get(group_path)
            if group is None:
                group = groups[group_path] = f.require_group(group_path)
                group.attrs["name"] = ref.name.rsplit(".", 2)[-2]
                _container_groups(f, group_path)
            array = layouts.to_native(ref.spec, produce(ref, dtype), "keras")
            _write(group, path.rsplit("/", 1)[1], array)
            if tick:
                tick(ref)


def _container_groups(f, vars_path: str) -> None:
    """Empty `vars` groups of the container layers above a module, named as Keras names them."""
    parts = vars_path.split("/")[:-2]
    for depth in range(1, len(parts) + 1):
        key = parts[depth - 1]
        if key in ("layers", BLOCKS):
            continue
        path = "/".join(parts[:depth]) + "/vars"
        if path not in f:
            name = {"tfopt_model": "model"}.get(key, key)
            if key.startswith(BLOCK_CLASS):
                name = "0" if key == BLOCK_CLASS else key.rsplit("_", 1)[1]
            f.require_group(path).attrs["name"] = name


def _write(group, name: str, array: np.ndarray) -> None:
    from .hf_tf import write_dataset

    if dtype_name(array.dtype) == "bfloat16":
        dset = group.create_dataset(name, data=np.ascontiguousarray(array))
        dset.attrs["dtype"] = "bfloat16"
    else:
        write_dataset(group, name, array)
