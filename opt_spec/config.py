"""`OPTConfig`: the model's hyper-parameters, read from and written to Hugging Face `config.json`.

The config is a frozen dataclass. Derived quantities (head size, whether project_in/out exist, whether
the decoder has a final LayerNorm) are properties, so nothing needs to be recomputed or kept in sync.
Keys of a `config.json` that optkit does not model (`architectures`, `torch_dtype`, ...) are kept in
`extra` and written back unchanged.

Every field is checked when a config is made (a config.json comes from strangers too): ints are ints
(not bools), bools are bools, rates are finite numbers in [0, 1), and every size is at most its MAX_SIZES
entry, with the whole model at most MAX_PARAMETERS. The maxima are far above any real OPT (175b: 96
layers, hidden 12288, ffn 49152, 96 heads, vocab 50272, 2048 positions, 1.75e11 parameters) and exist so
that `num_hidden_layers: 1000000000` is refused at once instead of growing a weight table until memory
runs out. A field out of range raises ConfigError (a CheckpointError) naming the field and the value,
and the file when it came from one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from .errors import ConfigError

# Activation names accepted in `activation_function`, mapped to the formula every backend implements.
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu_erf",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}

PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# The largest value each size may take (see the module docstring); 175b's value in the comment.
MAX_SIZES = {
    "vocab_size": 1 << 20,                 # 50272
    "hidden_size": 1 << 16,                # 12288
    "num_hidden_layers": 1024,             # 96
    "ffn_dim": 1 << 18,                    # 49152
    "max_position_embeddings": 1 << 20,    # 2048
    "word_embed_proj_dim": 1 << 16,        # 12288
    "num_attention_heads": 1024,           # 96
    "num_labels": 1 << 16,                 # 2 (a head the checkpoint lacks is allocated from this)
}
MAX_PARAMETERS = 2 * 10**12                # 1.75e11


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    model_type = "opt"  # a class attribute, as on Hugging Face configs (PEFT reads it); not a field
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None  # None: equal to hidden_size (resolved at creation)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    # Heads: the classification head's width and loss (Hugging Face keeps these in every config).
    num_labels: int = 2
    problem_type: str | None = None
    # Every other key of config.json, written back as it was read.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        object.__setattr__(self, "extra", dict(self.extra))
        self._validate()

    # ----------------------------------------------------------------------------------- validation
    def _validate(self) -> None:
        def fail(field: str, value: Any, why: str) -> None:
            raise ConfigError(f"OPTConfig.{field}={value!r:.200}: {why}")

        for name, most in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, value, f"must be an int, got {type(value).__name__}")
            if value <= 0:
                fail(name, value, "must be positive")
            if value > most:
                fail(name, value, f"is more than optkit's maximum {most:,} (opt_spec.config.MAX_SIZES)")
        bools = ("do_layer_norm_before", "_remove_final_layer_norm", "use_cache", "enable_bias",
                 "layer_norm_elementwise_affine", "tie_word_embeddings")
        for name in bools:
            value = getattr(self, name)
            if not isinstance(value, bool):
                fail(name, value, f"must be a bool, got {type(value).__name__}")
        for name in ("dropout", "attention_dropout", "layerdrop", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, value, f"must be a number, got {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                fail(name, value, "must be a finite number")
        for name in ("dropout", "attention_dropout", "layerdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, getattr(self, name), "must be in [0, 1)")
        if not 0 <= self.init_std <= 1e3:
            fail("init_std", self.init_std, "must be a non-negative number (at most 1000)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, value, f"must be an int or None, got {type(value).__name__}")
            if not 0 <= value < self.vocab_size:
                fail(name, value, f"must be a token id in [0, vocab_size={self.vocab_size})")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", self.hidden_size,
                 f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            fail("activation_function", self.activation_function,
                 f"unknown activation; known: {', '.join(sorted(ACTIVATIONS))}")
        if not (self.problem_type is None or isinstance(self.problem_type, str)) or \
                self.problem_type not in PROBLEM_TYPES:
            fail("problem_type", self.problem_type, f"must be one of {PROBLEM_TYPES}")
        if self.max_parameters > MAX_PARAMETERS:
            raise ConfigError(f"OPTConfig: {self.num_hidden_layers} layers of hidden_size {self.hidden_size} and "
                              f"ffn_dim {self.ffn_dim}, vocab_size {self.vocab_size}, max_position_embeddings "
                              f"{self.max_position_embeddings} make up to {self.max_parameters:.3g} parameters, more "
                              f"than optkit's maximum {MAX_PARAMETERS:.0e} (opt_spec.config.MAX_PARAMETERS)")

    # ------------------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """project_in / project_out exist when the embedding width differs from the hidden width."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    @property
    def max_parameters(self) -> int:
        """An upper bound of the parameter count (every head, bias and LayerNorm counted), from the
        sizes alone: what MAX_PARAMETERS bounds before any weight table is built."""
        H, E, F, L = self.hidden_size, self.word_embed_proj_dim, self.ffn_dim, self.num_hidden_layers
        layer = 4 * (H * H + H) + 2 * H * F + F + H + 4 * H
        embeddings = self.vocab_size * E + (self.max_position_embeddings + 2) * H + 2 * E * H
        heads = self.vocab_size * E + (self.num_labels + 2) * (H + 1)
        return L * layer + embeddings + heads + 2 * H

    @property
    def activation(self) -> str:
        """The activation's formula: one of relu, gelu_erf, gelu_tanh, silu."""
        return ACTIVATIONS[self.activation_function]

    # ---------------------------------------------------------------- Hugging Face's config surface
    def __iter__(self):
        """The keys of to_dict(), as iterating a transformers PretrainedConfig gives its attribute names:
        `"hidden_size" in config` works as in code written for Hugging Face's configs (PEFT's)."""
        return iter(self.to_dict())

    def get_text_config(self, decoder=None, encoder=None) -> "OPTConfig":
        """The text model's config (transformers' PretrainedConfig method): OPT is one, so itself."""
        return self

    # What transformers' pipelines read off a model's config: the Hub revision it was downloaded at (transformers
    # records it while loading; optkit does not), and config.json's legacy per-task generation settings.
    _commit_hash = None

    @property
    def task_specific_params(self) -> dict | None:
        return self.extra.get("task_specific_params")

    @property
    def id2label(self) -> dict[int, str]:
        """The classes' names by index (config.json's id2label with integer keys, as transformers gives them;
        LABEL_i when it names none for these labels). Its text-classification pipeline reads them."""
        labels = self._id2label()
        try:
            return {int(k): str(v) for k, v in labels.items()}
        except ValueError:
            raise ConfigError(f"id2label's keys must be class indices, got {sorted(labels)[:5]!r:.100}") from None

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label.items()}

    # ---------------------------------------------------------------------------- construction
    def replace(self, **changes: Any) -> "OPTConfig":
        """A copy with some fields changed (the config itself never changes)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "OPTConfig":
        from .presets import PRESETS

        key = name.lower().removeprefix("facebook/").removeprefix("opt-")
        if key not in PRESETS:
            raise ValueError(f"unknown OPT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OPTConfig":
        data = dict(data)
        if data.get("model_type", "opt") != "opt":
            raise ConfigError(f"config.json has model_type={data['model_type']!r:.200}, expected 'opt'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "num_labels"}
        kwargs = {k: data.pop(k) for k in list(data) if k in names}
        # Hugging Face stores the label count as id2label (and accepts num_labels as an argument).
        if "num_labels" in data:
            kwargs["num_labels"] = data.pop("num_labels")
        elif isinstance(data.get("id2label"), Mapping):
            kwargs["num_labels"] = len(data["id2label"])
        return cls(**kwargs, extra=data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "OPTConfig":
        """Reads a config.json (bounded size and depth: opt_spec.io.load_json); errors name the file."""
        from .io import json_object

        data = json_object(path)
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{os.fspath(path)}: {err}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> "OPTConfig":
        """Reads `config.json` from a checkpoint directory (or the file itself), or of a Hugging Face Hub
        id ("facebook/opt-125m", at `revision`) through opt_spec.hub (cache first; only the small files
        are fetched). Inside a directory it is opened by opt_spec.io.checkpoint_file's rule (no symlink
        out of the folder)."""
        from .hub import ADAPTER_CONFIG_FILES, resolve_pretrained
        from .io import checkpoint_file

        path = resolve_pretrained(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token, weights=False)
        if os.path.isdir(path):
            if not os.path.lexists(os.path.join(path, "config.json")):
                adapter = any(os.path.lexists(os.path.join(path, f)) for f in ADAPTER_CONFIG_FILES)
                raise FileNotFoundError(f"no config.json at {os.path.join(path, 'config.json')}" + (
                    ": this is a PEFT adapter's folder; load its base model, then model.load_adapter(folder) "
                    "(PyTorch)" if adapter else ""))
            path = checkpoint_file(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_json_file(path)

    # ------------------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "opt"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "num_labels"):
                out[f.name] = getattr(self, f.name)
        if self._id2label() is not self.extra.get("id2label"):
            out["id2label"] = self._id2label()
            out["label2id"] = {name: int(i) for i, name in out["id2label"].items()}
        return out

    def _id2label(self) -> Mapping:
        """config.json's id2label when it names num_labels classes, else LABEL_i for each (string keys, as saved)."""
        labels = self.extra.get("id2label")
        if isinstance(labels, Mapping) and len(labels) == self.num_labels:
            return labels
        return {str(i): f"LABEL_{i}" for i in range(self.num_labels)}

    def to_saved_dict(self, architecture: str | None, dtype: str | None) -> dict[str, Any]:
        """config.json of a saved checkpoint: to_dict() with `architecture` (None keeps the config's own)
        and the weights' dtype name under both keys Hugging Face reads: "dtype" (written since transformers
        4.56, and preferred when both are present) and "torch_dtype". A key carried over from the source
        must never contradict the weights; dtype=None (mixed dtypes) drops both."""
        out = self.to_dict()
        if architecture is not None:
            out["architectures"] = [architecture]
        for key in ("dtype", "torch_dtype"):
            if dtype is None:
                out.pop(key, None)
            else:
                out[key] = dtype
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_json_string())
