"""The user-facing Flax models: a linen module, its parameters and its config, with Hugging Face's
Flax surface (`from_pretrained`, `save_pretrained`, `model(input_ids, params=...)`, `init_cache`).

Checkpoints are Hugging Face directories read and written through `opt_spec.io` (safetensors, no
torch). A parameter's path is `opt_spec.layouts.native_path(spec, "flax")` of its canonical weight and
its value `to_native(spec, array, "flax")`, so loading and saving are one loop over the weight table.
Loading follows opt_torch's rules: base and head checkpoints load into each other, a head missing
from the checkpoint is freshly initialized with a warning, anything else missing, unexpected or
mis-shaped raises the spec's WeightMismatchError listing every problem.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from opt_spec import Head, OPTConfig, WeightKind, WeightMismatchError, planned_tensors, tied_source, weight_table
from opt_spec import io as spec_io
from opt_spec.cache import cache_mask_width, check_capacity, refuse_legacy_cache
from opt_spec.hub import pretrained_folder
from opt_spec.inputs import (check_attention_mask, check_batch_shape, check_classification_labels,
                             check_inputs_embeds, check_labels, check_position_ids, check_positions, check_seed,
                             check_span_positions, check_token_ids, host_array, is_integer_dtype,
                             not_integers)
from opt_spec.surface import auto_dtype, dtype_argument
from opt_spec.layouts import from_native, native_path, native_shape, to_native
from opt_spec.weights import WeightSpec

from .generation import GenerationMixin
from .hf_compat import FlaxModelMethods
from .modeling import MODULE_CLASSES, KVCache, Numerics, sown_attentions

CONVENTION = "flax"
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def model_dtype(dtype, torch_dtype=None):
    """from_config / from_pretrained's dtype: None is float32; torch_dtype is dtype's older Hugging Face name."""
    dtype = dtype_argument(dtype, torch_dtype)
    return jnp.float32 if dtype is None else dtype


def resolve_dtype(dtype) -> jnp.dtype:
    """jnp.float32 | 'bfloat16' | np.dtype(...) -> a JAX floating dtype (raises on anything else)."""
    if isinstance(dtype, str):
        if dtype.removeprefix("jnp.") not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.removeprefix("jnp.")]
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype={dtype!r}: expected a floating dtype")
    return dt


# ------------------------------------------------------------------------- params <-> canonical
def _params_table(config: OPTConfig, head: Head) -> list[WeightSpec]:
    """The weights that are parameters of the Flax model (a tied head is the embedding, not a param)."""
    tied = tied_source(config, head)
    return [spec for spec in weight_table(config, head) if spec.name not in tied]


def check_params(params: Mapping, config: OPTConfig, head: Head | str) -> dict[str, tuple[WeightSpec, Any]]:
    """{dotted path: (weight spec, leaf)} for a Flax parameter tree, which must hold exactly the
    table's paths with their Flax shapes (else one WeightMismatchError listing every problem)."""
    flat = {".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]}
    by_path = {".".join(native_path(spec, CONVENTION)): spec for spec in _params_table(config, Head(head))}
    missing = sorted(p for p in by_path if p not in flat)
    unexpected = sorted(p for p in flat if p not in by_path)
    mis_shaped = [(p, tuple(flat[p].shape), native_shape(by_path[p], CONVENTION)) for p in sorted(flat)
                  if p in by_path and tuple(flat[p].shape) != native_shape(by_path[p], CONVENTION)]
    if missing or unexpected or mis_shaped:
        raise WeightMismatchError(missing, unexpected, mis_shaped, where="Flax params")
    return {p: (spec, flat[p]) for p, spec in by_path.items()}


def params_to_canonical(params: Mapping, config: OPTConfig, head: Head | str) -> dict[str, np.ndarray]:
    """{canonical name: NumPy array in torch layout} from a Flax parameter tree, in table order."""
    return {spec.name: from_native(spec, np.asarray(jax.device_get(leaf)), CONVENTION)
            for spec, leaf in check_params(params, config, head).values()}


def canonical_to_params(arrays: Mapping[str, Any], config: OPTConfig, head: Head | str,
                        param_dtype=jnp.float32) -> dict:
    """A Flax parameter tree from {canonical name: array} (every non-tied table weight present)."""
    head = Head(head)
    params: dict = {}
    for spec in _params_table(config, head):
        node = params
        *scopes, leaf = native_path(spec, CONVENTION)
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = jnp.asarray(to_native(spec, np.asarray(arrays[spec.name]), CONVENTION), dtype=param_dtype)
    return params


def init_weight(spec: WeightSpec, config: OPTConfig, seed: int = 0, dtype=jnp.float32) -> jax.Array:
    """OPT's initialization of one weight in Flax layout, by kind: normal(0, init_std) for linear and
    embedding weights (the pad row of the token embedding zero), zero biases, unit LayerNorm scales.

    Drawn on the host from (seed, name), so each weight is reproducible on its own and nothing is
    compiled for it.
    """
    shape = native_shape(spec, CONVENTION)
    if spec.kind in (WeightKind.LINEAR_WEIGHT, WeightKind.EMBEDDING):
        rng = np.random.default_rng([check_seed(seed), zlib.crc32(spec.name.encode())])
        w = (config.init_std * rng.standard_normal(shape)).astype(np.float32)
        if spec.name.endswith("embed_tokens.weight") and config.pad_token_id is not None:
            w[config.pad_token_id] = 0.0
        return jnp.asarray(w, dtype)
    if spec.kind is WeightKind.NORM_SCALE:
        return jnp.ones(shape, dtype)
    return jnp.zeros(shape, dtype)


def _set_path(params: dict, path: tuple[str, ...], value) -> None:
    node = params
    for scope in path[:-1]:
        node = node.setdefault(scope, {})
    node[path[-1]] = value


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _dtype(x):
    """An input's dtype (lists and scalars as NumPy reads them)."""
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _host_values(x):
    """An input's values as NumPy for a host check (opt_spec.inputs.host_array), None for a traced one."""
    if _is_tracer(x):
        return None
    return host_array(x)


# ------------------------------------------------------------------------------------- the models
class FlaxOPTPreTrainedModel(FlaxModelMethods):
    """A linen module (`.module`) with its parameters (`.params`, a plain nested dict) and config.

    dtype is the compute dtype (float32, bfloat16 or float16); param_dtype the dtype parameters are
    kept in (float32 unless asked otherwise). The attention softmax is float32 whatever the dtype.
    """

    head: Head = Head.BASE
    sharding = None  # an opt_flax.distributed.MeshPlan when the model is laid out on a mesh

    def __init__(self, config: OPTConfig, params: Mapping | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, seed: int = 0, precision="auto", mesh=None):
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an OPTConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.param_dtype = resolve_dtype(param_dtype)
        if precision == "auto":  # full float32 products for float32 (GPUs would use TF32), default otherwise
            precision = "highest" if self.dtype == jnp.float32 else None
        self.precision = precision
        self.module = MODULE_CLASSES[self.head](config, numerics=Numerics(self.dtype, self.param_dtype, precision))
        if params is None:
            params = self.init_params(seed)
        else:
            check_params(params, config, self.head)
        self.params = params
        if mesh is not None:  # every call, generate and save then runs sharded (opt_flax.distributed)
            from .distributed import shard_model

            shard_model(self, mesh)

    # --------------------------------------------------------------------------- construction
    def init_params(self, seed: int = 0) -> dict:
        """OPT's initialization of every parameter (see `init_weight`)."""
        params: dict = {}
        for spec in _params_table(self.config, self.head):
            _set_path(params, native_path(spec, CONVENTION), init_weight(spec, self.config, seed, self.param_dtype))
        return params

    @classmethod
    def from_config(cls, config: OPTConfig, seed: int = 0, dtype=None, param_dtype=jnp.float32,
                    precision="auto", mesh=None, *, torch_dtype=None):
        """A freshly initialized model: normal(0, init_std) weights, zero biases and pad row, unit LN."""
        dtype = model_dtype(dtype, torch_dtype)
        return cls(config, dtype=dtype, param_dtype=param_dtype, seed=seed, precision=precision, mesh=mesh)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=None, param_dtype=jnp.float32,
                        config: OPTConfig | None = None, seed: int = 0, precision="auto", *,
                        torch_dtype=None, mesh=None,
                        revision: str | None = None, cache_dir=None, local_files_only: bool = False, token=None):
        """Loads a Hugging Face directory (safetensors or pytorch_model.bin, sharded or not); no torch involved.

        dtype is the compute dtype (float32 by default; torch_dtype is its older Hugging Face name);
        parameters are cast to param_dtype (float32 by default). Either may be "auto": config.json's dtype
        (Hugging Face's precedence), else the checkpoint's own.
        A head the checkpoint lacks is initialized from `seed` (with a warning naming it).
        precision goes to every matrix product: "auto" (default) is "highest" for float32 compute, so
        float32 means float32 on GPUs too (matching PyTorch), and JAX's default for half precision;
        None is JAX's default (TF32 products for float32 on recent GPUs, faster and less exact).
        mesh (a jax.sharding.Mesh with axes "fsdp" and "tp", see opt_flax.distributed.make_mesh): every
        device reads only its block of each weight from the memory-mapped file, and `model.bytes_read`
        holds the bytes read per weight over this process's devices.
        `path` may also be a Hugging Face Hub id ("facebook/opt-125m") at `revision`, read from the
        Hugging Face cache (`cache_dir`) or downloaded unless local_files_only / HF_HUB_OFFLINE=1
        (opt_spec.hub.resolve_pretrained); an existing local folder always wins.
        """
        name_or_path, path, config = pretrained_folder(path, config, revision=revision, cache_dir=cache_dir,
                                                       local_files_only=local_files_only, token=token)
        raw = spec_io.load_checkpoint_dir(path)  # safetensors, or pytorch_model.bin read without torch
        plan, tensors = planned_tensors(raw, config, cls.head, cls.__name__, path)
        fresh = {w.name for w in plan.fresh}

        dtype, param_dtype = model_dtype(dtype, torch_dtype), param_dtype
        if "auto" in (dtype, param_dtype):  # config.json's dtype, else the checkpoint's (opt_spec.surface)
            saved = auto_dtype(config, str(np.dtype(next(iter(tensors.values())).dtype)))
            dtype, param_dtype = (saved if d == "auto" else d for d in (dtype, param_dtype))
        param_dtype = resolve_dtype(param_dtype)
        if mesh is not None:
            from .distributed import MeshPlan, load_params

            stats: dict[str, int] = {}
            makers = {w.name: (lambda w=w: init_weight(w, config, seed, param_dtype)) for w in plan.fresh}
            params = load_params(MeshPlan(mesh, config, cls.head), tensors, makers, param_dtype, stats)
            model = cls(config, params, dtype=dtype, param_dtype=param_dtype, precision=precision, mesh=mesh)
            model.bytes_read = stats
            return model._loaded_from(path, name_or_path)
        params: dict = {}
        for spec in _params_table(config, cls.head):
            if spec.name in fresh:
                value = init_weight(spec, config, seed, param_dtype)
            else:
                value = jnp.asarray(to_native(spec, np.asarray(tensors[spec.name]), CONVENTION), dtype=param_dtype)
            _set_path(params, native_path(spec, CONVENTION), value)
        return cls(config, params, dtype=dtype, param_dtype=param_dtype, precision=precision)._loaded_from(
            path, name_or_path)

    def _loaded_from(self, path: str, name_or_path: str):
        """from_pretrained's last step: what the folder's generation_config.json says generate's defaults are,
        and the folder or Hub id it was given (name_or_path)."""
        if hasattr(self, "_load_generation_config"):
            self._load_generation_config(path)
        self.name_or_path = name_or_path
        return self

    def save_pretrained(self, path: str | os.PathLike, params: Mapping | None = None,
                        max_shard_size: int | str = "5GB") -> list[str]:
        """Writes config.json and model.safetensors (or shards with an index) that opt_torch and
        Hugging Face's PyTorch OPT load unchanged; a tied LM head is not stored. A sharded model
        gathers one tensor at a time (opt_flax.distributed.save_pretrained)."""
        if self.sharding is not None:
            from .distributed import save_pretrained

            files = save_pretrained(self, path, params, max_shard_size)  # [] on processes other than 0
        else:
            arrays = params_to_canonical(self.params if params is None else params, self.config, self.head)
            config_dict = self.config.to_saved_dict(type(self).__name__.removeprefix("Flax"),
                                                    str(np.dtype(next(iter(arrays.values())).dtype)))
            files = spec_io.save_safetensors_dir(path, arrays, config_dict, max_shard_size)
        if files and hasattr(self, "_save_generation_config"):
            self._save_generation_config(path)
        return files

    # ---------------------------------------------------------------------------------- running
    def init_cache(self, batch_size: int, max_length: int, pads: int = 0) -> KVCache:
        """An empty KV cache of max_length slots (its capacity) for batch_size rows (compute dtype); pads:
        slots past the position table for left-padded prompts' pads (opt_spec.cache.check_capacity)."""
        check_capacity(max_length, self.config.max_position_embeddings, pads)
        if self.sharding is not None:  # laid out (batch, heads) over the mesh
            from .distributed import zeros_cache

            return zeros_cache(self, batch_size, max_length)
        return KVCache.zeros(self.config, batch_size, max_length, self.dtype)

    def _check_inputs(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds=None,
                      labels=None, spans=None) -> None:
        """Checks with messages naming the problem (opt_spec.inputs): shapes and dtypes always, values eagerly
        (under jit they are traced). labels: the head's (causal LM or classification); spans: QA's
        (start_positions, end_positions)."""
        config = self.config
        if input_ids is not None:
            if not is_integer_dtype(_dtype(input_ids)):
                raise not_integers(_dtype(input_ids))
            check_batch_shape(np.shape(input_ids))
            if not _is_tracer(input_ids):
                check_token_ids(np.asarray(input_ids), config.vocab_size)
        elif inputs_embeds is not None:
            check_inputs_embeds(np.shape(inputs_embeds), _dtype(inputs_embeds), config.word_embed_proj_dim)
        if attention_mask is not None:
            check_attention_mask(_host_values(attention_mask))
        given = input_ids if input_ids is not None else inputs_embeds  # both or neither: the module refuses
        B, T = (None, None) if given is None else np.shape(given)[:2]
        if position_ids is not None:
            check_position_ids(np.shape(position_ids), _dtype(position_ids), B, T, config.max_position_embeddings,
                               _host_values(position_ids))
        if labels is not None and self.head is Head.CAUSAL_LM:
            check_labels(np.shape(labels), _dtype(labels), B, T, config.vocab_size, _host_values(labels))
        elif labels is not None:
            check_classification_labels(np.shape(labels), _dtype(labels), B, config, _host_values(labels))
        if spans is not None and all(given is not None for given in spans):
            for name, given in zip(("start_positions", "end_positions"), spans):
                check_span_positions(name, np.shape(given), _dtype(given), B)
        cache = past_key_values
        if cache is not None:
            refuse_legacy_cache(cache)
            if not isinstance(cache, KVCache):
                raise TypeError(f"past_key_values must be a KVCache from init_cache(), got {type(cache).__name__}")
            if len(cache.keys) != config.num_hidden_layers:
                raise ValueError(f"past_key_values has {len(cache.keys)} layers; the model has "
                                 f"{config.num_hidden_layers}")
        if input_ids is None or _is_tracer(input_ids):
            return
        B, T = np.shape(input_ids)
        past = None
        if cache is not None and not _is_tracer(cache.length):
            past = int(cache.length)
            if cache.batch_size != B:
                raise ValueError(f"past_key_values holds {cache.batch_size} rows; input_ids has {B}")
            width = past + T if attention_mask is None else np.shape(attention_mask)[-1]
            cache_mask_width(width, past, T, cache.capacity)  # the spec's rule: past + new or the capacity
        if attention_mask is not None and not _is_tracer(attention_mask):
            mask_shape = np.shape(attention_mask)
            if cache is None and mask_shape != (B, T):
                raise ValueError(f"attention_mask has shape {mask_shape}; expected (batch, tokens) = ({B}, {T})")
            if cache is not None and (len(mask_shape) != 2 or mask_shape[0] != B):
                raise ValueError(f"attention_mask has shape {mask_shape}; expected ({B}, past + new or the cache's "
                                 f"capacity {cache.capacity})")
        if position_ids is not None:
            return  # checked above
        if (attention_mask is None or not _is_tracer(attention_mask)) and (cache is None or past is not None):
            mask = np.ones((B, (past or 0) + T), np.int64) if attention_mask is None else \
                np.asarray(attention_mask, np.int64)[:, :(past or 0) + T]
            top = int((np.cumsum(mask, axis=1) * mask - 1).max()) if mask.size else -1
        else:
            return
        check_positions(top, config.max_position_embeddings)

    def _apply(self, params, deterministic: bool, dropout_rng, output_attentions: bool = False, return_dict=None,
               **kwargs):
        """module.apply; output_attentions: the sown attention probabilities as `.attentions`; return_dict=False:
        Hugging Face's tuple."""
        if not deterministic and dropout_rng is None and (self.config.dropout or self.config.attention_dropout
                                                          or self.config.layerdrop):
            raise ValueError("deterministic=False needs dropout_rng (a jax.random key) for dropout")
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        if self.sharding is not None:
            if output_attentions:
                raise ValueError("output_attentions is not offered on a model laid out on a mesh")
            from .distributed import apply

            out = apply(self, params, deterministic, rngs, kwargs)
        elif not output_attentions:
            out = self.module.apply({"params": self.params if params is None else params},
                                    deterministic=deterministic, rngs=rngs, **kwargs)
        else:
            out, state = self.module.apply({"params": self.params if params is None else params},
                                           deterministic=deterministic, rngs=rngs, mutable=["intermediates"], **kwargs)
            out = dataclasses.replace(out, attentions=sown_attentions(state["intermediates"]))
        return out.to_tuple() if return_dict is False else out

    def __repr__(self) -> str:
        mesh = "" if self.sharding is None else f", mesh=fsdp {self.sharding.fsdp} x tp {self.sharding.tp}"
        return (f"{type(self).__name__}(layers={self.config.num_hidden_layers}, hidden={self.config.hidden_size}, "
                f"dtype={self.dtype.name}, param_dtype={self.param_dtype.name}{mesh})")


class FlaxOPTModel(FlaxOPTPreTrainedModel):
    """The bare decoder: `.last_hidden_state` (B, T, E)."""

    head = Head.BASE

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, params=None, past_key_values=None,
                 deterministic: bool = True, dropout_rng=None, inputs_embeds=None,
                 output_hidden_states: bool = False, output_attentions: bool = False, return_dict=None):
        self._check_inputs(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds)
        return self._apply(params, deterministic, dropout_rng, output_attentions, return_dict,
                           input_ids=_maybe(input_ids),
                           attention_mask=_maybe(attention_mask), position_ids=_maybe(position_ids),
                           past_key_values=past_key_values, inputs_embeds=_maybe(inputs_embeds),
                           output_hidden_states=output_hidden_states)


class FlaxOPTForCausalLM(GenerationMixin, FlaxOPTPreTrainedModel):
    """Next-token logits (B, T, V); `labels` (B, T) give the shifted mean cross entropy as `.loss`;
    `generate(...)` decodes (opt_flax.generation)."""

    head = Head.CAUSAL_LM

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, params=None, past_key_values=None,
                 deterministic: bool = True, dropout_rng=None, labels=None, inputs_embeds=None,
                 output_hidden_states: bool = False, output_attentions: bool = False, return_dict=None):
        self._check_inputs(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
        return self._apply(params, deterministic, dropout_rng, output_attentions, return_dict,
                           input_ids=_maybe(input_ids),
                           attention_mask=_maybe(attention_mask), position_ids=_maybe(position_ids),
                           past_key_values=past_key_values, inputs_embeds=_maybe(inputs_embeds),
                           labels=_maybe(labels), output_hidden_states=output_hidden_states)


class FlaxOPTForSequenceClassification(FlaxOPTPreTrainedModel):
    """Logits (B, num_labels) of the rightmost non-pad token; `labels` give `.loss` (problem_type)."""

    head = Head.SEQUENCE_CLASSIFICATION
    __call__ = FlaxOPTForCausalLM.__call__  # the same inputs: ids, mask, positions, labels


class FlaxOPTForQuestionAnswering(FlaxOPTPreTrainedModel):
    """Span logits `.start_logits` / `.end_logits` (B, T); start/end positions give `.loss`."""

    head = Head.QUESTION_ANSWERING

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, params=None, past_key_values=None,
                 deterministic: bool = True, dropout_rng=None, start_positions=None, end_positions=None,
                 inputs_embeds=None, output_hidden_states: bool = False, output_attentions: bool = False,
                 return_dict=None):
        self._check_inputs(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                           spans=(start_positions, end_positions))
        return self._apply(params, deterministic, dropout_rng, output_attentions, return_dict,
                           input_ids=_maybe(input_ids),
                           attention_mask=_maybe(attention_mask), position_ids=_maybe(position_ids),
                           past_key_values=past_key_values, inputs_embeds=_maybe(inputs_embeds),
                           start_positions=_maybe(start_positions), end_positions=_maybe(end_positions),
                           output_hidden_states=output_hidden_states)


def _maybe(x):
    """NumPy arrays and lists become JAX arrays; JAX arrays and tracers pass through; None stays None."""
    return x if x is None or isinstance(x, jax.Array) else jnp.asarray(x)


MODEL_CLASSES = {Head.BASE: FlaxOPTModel, Head.CAUSAL_LM: FlaxOPTForCausalLM,
                 Head.SEQUENCE_CLASSIFICATION: FlaxOPTForSequenceClassification,
                 Head.QUESTION_ANSWERING: FlaxOPTForQuestionAnswering}
