"""Hugging Face checkpoint directories for the TensorFlow backend, and the one map from Keras
variables to canonical names.

A variable's Keras path below the model (`decoder/layers/0/fc1/kernel`) is
`opt_spec.layouts.native_path(spec, "keras")` of exactly one spec of the weight table, and its value
is `opt_spec.layouts.to_native(spec, canonical array, "keras")`. `variable_map` builds that
correspondence (and fails loudly on anything left over either way); loading and saving go through
it and opt_spec.io only, so neither needs torch.
"""

from __future__ import annotations

import os

import numpy as np

from opt_spec import Head, OPTConfig, WeightKind, WeightSpec, check_weights, planned_tensors, tied_source, weight_table
from opt_spec import io as spec_io
from opt_spec.surface import auto_dtype, dtype_argument
from opt_spec.hub import pretrained_folder
from opt_spec.inputs import seeded_rng
from opt_spec.layouts import from_native, native_path, to_native

CONVENTION = "keras"


def canonical_names(model) -> dict[str, WeightSpec]:
    """{variable path: spec} for every variable of `model` (an OPT Keras model, built).

    Raises when a variable matches no spec or two variables match one, and when a spec of the weight
    table (a tied head aside) has no variable."""
    table = weight_table(model.config, model.head)
    by_path = {"/".join(native_path(spec, CONVENTION)): spec for spec in table}
    prefix = model.path + "/"
    out: dict[str, WeightSpec] = {}
    unknown = []
    for var in model.weights:
        rest = var.path[len(prefix):] if var.path.startswith(prefix) else None
        spec = by_path.get(rest)
        if spec is None:
            unknown.append(var.path)
            continue
        if any(s.name == spec.name for s in out.values()):
            raise RuntimeError(f"two variables map to {spec.name}: {var.path} and another")
        out[var.path] = spec
    tied = tied_source(model.config, model.head)
    missing = sorted({s.name for s in table} - {s.name for s in out.values()} - set(tied))
    if unknown or missing:
        raise RuntimeError(f"{type(model).__name__}: variables without a canonical name: {unknown}; "
                           f"canonical weights without a variable: {missing}")
    return out


def variable_map(model) -> dict[str, tuple[WeightSpec, object]]:
    """{canonical name: (spec, variable)} in weight-table order (a tied head has no entry)."""
    specs = canonical_names(model)
    variables = {v.path: v for v in model.weights}
    pairs = {spec.name: (spec, variables[path]) for path, spec in specs.items()}
    order = [s.name for s in weight_table(model.config, model.head)]
    return {name: pairs[name] for name in order if name in pairs}


def _initial_value(spec: WeightSpec, config: OPTConfig, rng: np.random.Generator) -> np.ndarray:
    """OPT's initialization of one canonical weight (torch layout): normal(0, init_std) linear
    and embedding weights, zero biases, unit LayerNorm scales, zero pad row of the token embedding."""
    if spec.kind in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING):
        x = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(config.init_std)
        if spec.name.endswith("embed_tokens.weight") and config.pad_token_id is not None:
            x[config.pad_token_id] = 0.0
        return x
    if spec.kind is WeightKind.NORM_SCALE:
        return np.ones(spec.shape, np.float32)
    return np.zeros(spec.shape, np.float32)


class TFPretrainedMixin:
    """from_config / from_pretrained / save_pretrained and weight access by canonical name."""

    head: Head

    # ------------------------------------------------------------------------- weights by name
    def init_weights(self, seed: int | None = None, names=None) -> None:
        """OPT's initialization for every weight (or only `names`), from NumPy's generator `seed`."""
        rng = seeded_rng(seed)
        for name, (spec, var) in variable_map(self).items():
            if names is None or name in names:
                value = to_native(spec, _initial_value(spec, self.config, rng), CONVENTION)
                var.assign(value.astype(spec_io.numpy_dtype(var.dtype)))

    def get_weights_dict(self) -> dict[str, np.ndarray]:
        """{canonical name: NumPy array in the canonical (torch) layout}; a tied head is left out."""
        return {name: np.ascontiguousarray(from_native(spec, np.asarray(var.numpy()), CONVENTION))
                for name, (spec, var) in variable_map(self).items()}

    def set_weights_dict(self, weights, where: str = "weights") -> None:
        """Assigns {canonical name: array (torch layout)}; every weight must be given, shapes must match."""
        tied = tied_source(self.config, self.head)
        weights = {n: v for n, v in weights.items() if n not in tied}
        check_weights(weights, self.config, self.head, where=where)
        for name, (spec, var) in variable_map(self).items():
            var.assign(np.asarray(to_native(spec, weights[name], CONVENTION)).astype(spec_io.numpy_dtype(var.dtype)))

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_config(cls, config, seed: int | None = None, dtype=None, torch_dtype=None, **kwargs):
        """A freshly initialized model (OPT's init; `seed` makes it reproducible). Also accepts the
        dict `get_config` returns, so Keras can rebuild the model from its own serialization.
        torch_dtype: dtype's older Hugging Face name."""
        dtype = dtype_argument(dtype, torch_dtype)
        if isinstance(config, dict):
            data = dict(config)
            if "config" in data:
                dtype = dtype if dtype is not None else data.get("dtype")
                kwargs.setdefault("name", data.get("name"))
                data = data["config"]
            config = OPTConfig.from_dict(data)
        return cls(config, dtype=dtype, seed=seed, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=None, config: OPTConfig | None = None, *,
                        revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None,
                        torch_dtype=None, **kwargs):
        """Loads a Hugging Face directory (safetensors or pytorch_model.bin, sharded or not) without torch.

        dtype: None -> float32; 'auto' -> config.json's dtype, else the checkpoint's; or any dtype the
        constructor takes ('bfloat16', 'mixed_bfloat16', ...; torch_dtype is its older Hugging Face name).
        A base checkpoint loads into a head model (the missing head is initialized, with a warning naming
        it) and a head checkpoint into the base model.
        `path` may also be a Hugging Face Hub id ("facebook/opt-125m") at `revision`, read from the
        Hugging Face cache (`cache_dir`) or downloaded unless local_files_only / HF_HUB_OFFLINE=1
        (opt_spec.hub.resolve_pretrained); an existing local folder always wins.
        """
        name_or_path, path, config = pretrained_folder(path, config, revision=revision, cache_dir=cache_dir,
                                                       local_files_only=local_files_only, token=token)
        raw = spec_io.load_checkpoint_dir(path)  # safetensors, or pytorch_model.bin read without torch
        plan, tensors = planned_tensors(raw, config, cls.head, cls.__name__, path)
        dtype = dtype_argument(dtype, torch_dtype)
        if dtype == "auto":
            dtype = auto_dtype(config, str(np.dtype(next(iter(tensors.values())).dtype)))
        model = cls(config, dtype=dtype, _init=False, **kwargs)
        rng = np.random.default_rng()
        for name, (spec, var) in variable_map(model).items():
            value = tensors[name] if name in tensors else _initial_value(spec, config, rng)
            var.assign(np.asarray(to_native(spec, value, CONVENTION)).astype(spec_io.numpy_dtype(var.dtype)))
        if hasattr(model, "_load_generation_config"):
            model._load_generation_config(path)  # generation_config.json: the defaults of generate
        model.name_or_path = name_or_path
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB", saved_model: bool = False,
                        version: int = 1) -> list[str]:
        """Writes config.json and model.safetensors (or shards with an index) in the canonical names
        and layout, which opt_torch and Hugging Face load unchanged. A tied LM head is not stored.
        saved_model=True also writes a TensorFlow SavedModel to path/saved_model/<version> (opt_tf.export)."""
        if saved_model and not (isinstance(version, int) and not isinstance(version, bool) and version >= 0):
            raise ValueError(f"version={version!r:.50}: a SavedModel version is a non-negative integer")
        tensors = self.get_weights_dict()
        check_weights(tensors, self.config, self.head, where=f"{type(self).__name__} weights")
        config_dict = self.config.to_saved_dict(type(self).__name__.removeprefix("TF"),
                                                self.dtype_policy.variable_dtype)
        files = spec_io.save_safetensors_dir(os.fspath(path), tensors, config_dict, max_shard_size)
        if hasattr(self, "_save_generation_config"):
            self._save_generation_config(path)
        if saved_model:
            from .export import export_saved_model

            files.append(export_saved_model(self, os.path.join(os.fspath(path), "saved_model", str(version))))
        return files
