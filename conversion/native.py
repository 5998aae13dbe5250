"""Each backend's own checkpoint form, read and written without the backend's framework.

- torch-state-dict: `torch.save(model.state_dict())` of an optkit (or Hugging Face) PyTorch model:
  canonical names, torch layout, the tied LM head stored as a view of the embedding's storage (so
  `model.load_state_dict(torch.load(f))` is strict-clean).
- keras-weights: the Keras 3 `.weights.h5` file of an optkit TFOPT* model (`model.save_weights`).
- flax-params: `flax.serialization.to_bytes(model.params)` of an optkit Flax model.

Each is either a bare file (DST ending in .pt/.pth, .weights.h5, .msgpack), or a directory holding
config.json and the file. A bare file carries no config: it comes from a config.json next to it,
else is inferred from the shapes (conversion.infer), and `config_overrides` can correct it.
"""

from __future__ import annotations

import os
from typing import Mapping

from opt_spec import OPTConfig, tied_source
from opt_spec import io as spec_io
from opt_spec.torch_pickle import PickledTensor, TorchZipReader, is_torch_zip, write_torch_zip

from .base import Checkpoint, ConversionError, NativeTensor, bind, canonical_prefixes, detect_head, output_dtype
from .hf import apply_overrides, output_config, produce, write_config
from .infer import infer_config

TORCH_FILE = "model_state_dict.pt"
KERAS_FILE = "model.weights.h5"
FLAX_FILE = "flax_params.msgpack"
_SUFFIXES = ((".weights.h5", "keras-weights"), (".pt", "torch-state-dict"), (".pth", "torch-state-dict"),
             (".msgpack", "flax-params"))


def format_for_suffix(path: str) -> str | None:
    """The native format a destination's file name asks for (None: a directory)."""
    name = os.path.basename(os.fspath(path)).lower()
    return next((fmt for suffix, fmt in _SUFFIXES if name.endswith(suffix)), None)


def _weights_file(path: str, filename: str) -> str:
    """The weights file of a native checkpoint: the file itself, or `filename` in a folder (by
    opt_spec.io.checkpoint_file's rule once it exists)."""
    if not os.path.isdir(path):
        return path
    if os.path.lexists(os.path.join(path, filename)):
        return spec_io.checkpoint_file(path, filename)
    return os.path.join(path, filename)


def native_config(path: str, shapes: Mapping[str, tuple], overrides, config: OPTConfig | None,
                  where: str, hints=None) -> tuple[OPTConfig, list[str], str]:
    """The config of a native checkpoint: given, from a config.json beside it, or inferred."""
    if config is not None:
        return config, [], "caller"
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.lexists(os.path.join(folder, spec_io.CONFIG_NAME)):
        cfg_path = spec_io.checkpoint_file(folder, spec_io.CONFIG_NAME)
        return apply_overrides(OPTConfig.from_json_file(cfg_path), overrides), [], cfg_path
    config, notes = infer_config(shapes, hints, overrides, where=where)
    return config, notes, "shapes" + (" + overrides" if overrides else "")


def _write_layout(ckpt: Checkpoint, target: str, filename: str, as_file: bool, dtype) -> str:
    """Where the weights file goes: the target itself, or target/filename next to a config.json."""
    if as_file:
        return target
    os.makedirs(target, exist_ok=True)
    write_config(target, output_config(ckpt, dtype))
    return os.path.join(target, filename)


# ------------------------------------------------------------------------------------------ torch
def _torch_state_dict(path: str) -> dict[str, PickledTensor] | None:
    """The state dict of a PyTorch zip, None for anything else; a PyTorch zip that is refused (an unsafe
    pickle, a corrupt record) raises, so that detect_format can say why."""
    if not (os.path.isfile(path) and is_torch_zip(path)):
        return None
    obj = TorchZipReader(path).obj
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, PickledTensor)
                                                for k, v in obj.items()):
        return dict(obj)
    return None


def looks_like_torch_state_dict(path: str) -> bool:
    state = _torch_state_dict(_weights_file(path, TORCH_FILE))
    return state is not None and any(k.endswith("embed_tokens.weight") for k in state)


def read_torch_state_dict(path: str, config_overrides=None, config: OPTConfig | None = None,
                          head=None) -> Checkpoint:
    path = os.fspath(path)
    file = _weights_file(path, TORCH_FILE)
    if not os.path.isfile(file):
        raise ConversionError(f"{path}: no {TORCH_FILE}")
    reader = TorchZipReader(file)
    obj = reader.obj
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    native = {}
    for key, value in obj.items():
        if not isinstance(value, PickledTensor):
            raise ConversionError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor")
        native[key] = NativeTensor(value.shape, value.dtype, value.array, f"{file}:{key}")
    head_t, embed_t = obj.get("lm_head.weight"), obj.get("model.decoder.embed_tokens.weight")
    tied = (head_t is not None and embed_t is not None and head_t.storage is embed_t.storage
            and (head_t.offset, head_t.shape, head_t.stride) == (embed_t.offset, embed_t.shape, embed_t.stride))
    config, notes, source = native_config(path, {k: t.shape for k, t in native.items()}, config_overrides,
                                          config, file, {"tie_word_embeddings": True} if tied else None)
    head = head or detect_head(native)
    native = canonical_prefixes(native, head, notes)
    refs = bind(native, config, head, lambda spec: [spec.name], "torch", f"state dict {file}", notes)
    return Checkpoint("torch-state-dict", path, config, head, refs, [file], notes, config_source=source)


def write_torch_state_dict(ckpt: Checkpoint, target: str, dtype=None, tick=None, as_file: bool = False) -> list[str]:
    file = _write_layout(ckpt, target, TORCH_FILE, as_file, dtype)
    refs = ckpt.tensors
    entries = [(r.name, r.shape, output_dtype(r, dtype)) for r in refs.values()]
    shared = {}
    for name, src in tied_source(ckpt.config, ckpt.head).items():  # a module's state_dict holds the tied head
        entries.append((name, refs[src].shape, output_dtype(refs[src], dtype)))
        shared[name] = src
    write_torch_zip(file, entries, lambda n: produce(refs[n], dtype), shared=shared, archive="model_state_dict",
                    on_written=(lambda n, a: tick(refs[n])) if tick else None)
    return [file]


# ------------------------------------------------------------------------------------------ keras
def looks_like_keras_weights(path: str) -> bool:
    from . import native_keras

    return native_keras.looks_like(_weights_file(path, KERAS_FILE))


def read_keras_weights(path: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    from . import native_keras

    return native_keras.read(os.fspath(path), _weights_file(os.fspath(path), KERAS_FILE), config_overrides,
                             config, head)


def write_keras_weights(ckpt: Checkpoint, target: str, dtype=None, tick=None, as_file: bool = False) -> list[str]:
    from . import native_keras

    file = _write_layout(ckpt, target, KERAS_FILE, as_file, dtype)
    native_keras.write(ckpt, file, dtype, tick)
    return [file]


# ------------------------------------------------------------------------------------------- flax
def looks_like_flax_params(path: str) -> bool:
    from . import native_flax

    return native_flax.looks_like(_weights_file(path, FLAX_FILE))


def read_flax_params(path: str, config_overrides=None, config: OPTConfig | None = None, head=None) -> Checkpoint:
    from . import native_flax

    return native_flax.read(os.fspath(path), _weights_file(os.fspath(path), FLAX_FILE), config_overrides,
                            config, head)


def write_flax_params(ckpt: Checkpoint, target: str, dtype=None, tick=None, as_file: bool = False) -> list[str]:
    from . import native_flax

    file = _write_layout(ckpt, target, FLAX_FILE, as_file, dtype)
    native_flax.write(ckpt, file, dtype, tick)
    return [file]
