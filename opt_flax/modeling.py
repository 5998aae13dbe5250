"""OPT in Flax (linen), read top to bottom: cache, attention, layer, decoder, base model, heads, losses.

Submodule names are the scopes of the canonical checkpoint names and leaves are Flax's own
(`kernel` (in, out), `bias`, `embedding`, `scale`), so a parameter's tree path joined by dots is
`opt_spec.layouts.native_path` of its weight: loading is a transpose of linear weights and nothing else.
Dimension letters: B batch, T new tokens, S keys (the cache's capacity, or T without a cache), H hidden,
nh heads, hs head size, E embedding width, F ffn width, V vocabulary.

How the modules compute is one attribute, `numerics` (a `Numerics`: `dtype` the compute dtype,
`param_dtype` the dtype parameters are created in, `precision` every matrix product's); the attention
softmax always runs in float32. Calls from one module to the next pass everything after the first
input by keyword. Each attention sows its probabilities (B, nh, T, S) into the
"intermediates" collection (kept only when the caller makes it mutable: `output_attentions`), and
`remat=True` recomputes every decoder layer in the backward pass (gradient checkpointing, nn.remat).
This file holds the plain modules only; what exists for speed is in opt_flax/fast_paths.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
from jax import lax

from opt_spec import Head, OPTConfig
from opt_spec.cache import cache_mask_width, refuse_legacy_cache
from opt_spec.inputs import check_pooling
from opt_spec.numerics import (IGNORE_INDEX, LAYER_NORM_EPS, POSITION_OFFSET, SOFTMAX_DTYPE, attention_scale,
                               mask_value, problem_type)
from opt_spec.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                              SequenceClassifierOutputWithPast)

Dtype = Any
Precision = Any  # None (JAX's default for the device) or a jax.lax.Precision / "highest"


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How every module of a model computes (one attribute instead of three threaded through each module).

    dtype: the compute dtype; param_dtype: the dtype parameters are created in; precision: the precision of
    every matrix product (None: JAX's default for the device; "highest": full float32 on GPUs too).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None


def _register_output_pytrees() -> None:
    """The spec's output records become pytrees, so a jitted function may return them."""
    for cls in (BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast,
                QuestionAnsweringModelOutput):
        try:
            jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                             meta_fields=[])
        except ValueError:  # already registered (module reloaded)
            pass


_register_output_pytrees()


# ------------------------------------------------------------------------------------- KV cache
@jax.tree_util.register_pytree_node_class
class KVCache:
    """opt_spec.cache's contract, preallocated: per layer a key and a value buffer (B, nh, S, hs) of
    S = capacity slots, and `length`, the tokens written so far (an int32 scalar: traced under jit, so one
    compiled step serves every position; the shapes never change).

    `update(layer, k, v)` writes T new tokens' keys and values at [length, length + T) and returns the
    layer's whole buffers; the decoder calls `advance(T)` after its last layer. JAX arrays are values, so
    update replaces a buffer of this object; the model works on a `copy()` of the cache it is given and
    returns that copy, which leaves the caller's cache as it was, eagerly and under jit alike. A pytree:
    it goes in and out of jit, loop carries and shardings.
    """

    def __init__(self, keys, values, length):
        self.keys, self.values, self.length = list(keys), list(values), length

    @classmethod
    def zeros(cls, config: OPTConfig, batch_size: int, capacity: int, dtype: Dtype = jnp.float32) -> "KVCache":
        shape = (batch_size, config.num_attention_heads, capacity, config.head_dim)  # (B, nh, S, hs)
        L = config.num_hidden_layers
        return cls(keys=[jnp.zeros(shape, dtype) for _ in range(L)], values=[jnp.zeros(shape, dtype) for _ in range(L)],
                   length=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def copy(self) -> "KVCache":
        """A new cache object holding the same (immutable) arrays."""
        return KVCache(self.keys, self.values, self.length)

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """k, v (B, nh, T, hs) written at the write position -> the layer's keys and values (B, nh, S, hs)."""
        start = (0, 0, self.length, 0)
        self.keys[layer] = lax.dynamic_update_slice(self.keys[layer], k.astype(self.keys[layer].dtype), start)
        self.values[layer] = lax.dynamic_update_slice(self.values[layer], v.astype(self.values[layer].dtype), start)
        return self.keys[layer], self.values[layer]

    def advance(self, new: int) -> None:
        self.length = self.length + new

    def attention_mask(self, attention_mask: Optional[jax.Array], new: int) -> jax.Array:
        """The mask given with this cache widened to its S slots (B, capacity), int32; unwritten slots 0.

        The given mask covers past + new or the capacity (opt_spec.cache.cache_mask_width, anything else
        refused in words). Under jit the write position is traced, so only the capacity can be checked: a
        narrower mask is refused there (widen it before the jit, as the compiled decode loops do)."""
        B, S = self.batch_size, self.capacity
        if attention_mask is None:  # every slot: the causal rule hides the ones not written yet
            return jnp.ones((B, S), jnp.int32)
        width = attention_mask.shape[1]
        past = None if isinstance(self.length, jax.core.Tracer) else int(self.length)  # traced under jit
        S = cache_mask_width(width, past, new, S)
        return jnp.pad(attention_mask.astype(jnp.int32), ((0, 0), (0, S - width)))

    def tree_flatten(self):
        return (tuple(self.keys), tuple(self.values), self.length), None

    @classmethod
    def tree_unflatten(cls, aux, children) -> "KVCache":
        return cls(*children)


def activation_fn(formula: str):
    return {
        "relu": jax.nn.relu,
        "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }[formula]


def attention_allowed(attention_mask: jax.Array, query_length: int, query_start: jax.Array | int) -> jax.Array:
    """(B, S) mask -> (B, 1, T, S) bool for the T = query_length queries at positions query_start ..
    query_start + T - 1: causal, mask kept, and a query that would see nothing sees itself
    (opt_spec.numerics.attention_allowed)."""
    S, T = attention_mask.shape[1], query_length
    q_pos = (query_start + jnp.arange(T, dtype=jnp.int32))[:, None]  # (T, 1)
    k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]              # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.astype(bool)[:, None, :]  # (B, T, S)
    alone = ~allowed.any(-1, keepdims=True)                                # (B, T, 1)
    return (allowed | (alone & (k_pos == q_pos)))[:, None]


def _dense(features: int, config: OPTConfig, numerics: Numerics, use_bias: bool, name: str | None = None) -> nn.Dense:
    """A linear layer (name None inside setup, where the attribute names it)."""
    return nn.Dense(features, use_bias=use_bias, dtype=numerics.dtype, param_dtype=numerics.param_dtype,
                    precision=numerics.precision, kernel_init=jax.nn.initializers.normal(config.init_std), name=name)


class Embed(nn.Embed):
    """nn.Embed whose `attend` (a tied LM head: logits = x @ embedding^T) runs at the model's matrix-product
    precision like every other product (flax's own attend takes none: TF32 for float32 on recent GPUs)."""

    precision: Precision = None

    def attend(self, query: jax.Array) -> jax.Array:
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        return jnp.einsum("...e,ve->...v", query, embedding, precision=self.precision)  # (..., V)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics and affine in float32, the result in `numerics.dtype`.

    (flax.linen.LayerNorm promotes half precision to float32 implicitly, which strict dtype
    promotion forbids; this one casts explicitly.) Parameters: `scale` and `bias`, when affine.
    """

    affine: bool = True
    numerics: Numerics = Numerics()

    @nn.compact
    def __call__(self, x):
        H = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + LAYER_NORM_EPS)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (H,), self.numerics.param_dtype).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (H,), self.numerics.param_dtype).astype(jnp.float32)
        return y.astype(self.numerics.dtype)


def _layer_norm(config: OPTConfig, numerics: Numerics, name: str | None = None) -> LayerNorm:
    return LayerNorm(config.layer_norm_elementwise_affine, numerics, name=name)


# ------------------------------------------------------------------------------------ attention
class OPTAttention(nn.Module):
    config: OPTConfig
    numerics: Numerics = Numerics()
    layer_idx: int = 0  # which of the cache's layers this attention writes

    @nn.compact
    def __call__(self, x, *, allowed, cache: Optional[KVCache] = None, deterministic: bool = True):
        config, numerics = self.config, self.numerics
        B, T, H = x.shape
        nh, hs = config.num_attention_heads, config.head_dim
        k_proj, v_proj, q_proj, out_proj = (_dense(H, config, numerics, config.enable_bias, name)
                                            for name in ("k_proj", "v_proj", "q_proj", "out_proj"))

        q = (q_proj(x) * attention_scale(hs)).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = k_proj(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
        v = v_proj(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
        if cache is not None:  # the cache writes the new keys/values at its length; attend over all its slots
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs)

        scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32, precision=numerics.precision)  # (B, nh, T, S), f32
        scores = jnp.where(allowed, scores, mask_value(SOFTMAX_DTYPE))
        probs = jax.nn.softmax(scores, axis=-1).astype(numerics.dtype)
        probs = nn.Dropout(config.attention_dropout)(probs, deterministic=deterministic)
        self.sow("intermediates", "attention_probs", probs)  # after dropout, as Hugging Face returns them
        y = jnp.einsum("bhts,bhsd->bthd", probs, v.astype(numerics.dtype),
                       precision=numerics.precision)  # (B, T, nh, hs)
        y = y.reshape(B, T, H)
        return out_proj(y)


# ---------------------------------------------------------------------------------------- layer
class OPTDecoderLayer(nn.Module):
    """One layer. `deterministic` is an attribute, not a call argument: nn.remat traces every argument of
    the call it recomputes, and dropout needs to know it while tracing."""

    config: OPTConfig
    numerics: Numerics = Numerics()
    layer_idx: int = 0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, *, allowed, cache: Optional[KVCache] = None):
        config, numerics, deterministic = self.config, self.numerics, self.deterministic
        H, F_, bias, pre_ln = config.hidden_size, config.ffn_dim, config.enable_bias, config.do_layer_norm_before
        self_attn = OPTAttention(config, numerics, self.layer_idx, name="self_attn")
        self_attn_layer_norm = _layer_norm(config, numerics, "self_attn_layer_norm")
        fc1 = _dense(F_, config, numerics, bias, "fc1")
        fc2 = _dense(H, config, numerics, bias, "fc2")
        final_layer_norm = _layer_norm(config, numerics, "final_layer_norm")
        dropout = nn.Dropout(config.dropout)
        act = activation_fn(config.activation)

        h = self_attn_layer_norm(x) if pre_ln else x
        h = self_attn(h, allowed=allowed, cache=cache, deterministic=deterministic)
        x = x + dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = self_attn_layer_norm(x)
        h = final_layer_norm(x) if pre_ln else x
        h = fc2(act(fc1(h)))
        x = x + dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = final_layer_norm(x)
        return x


class OPTDecoderLayers(nn.Module):
    """The stack of layers, named "0", "1", ... so that paths read `layers.{i}.*` as in the checkpoint (this
    module is the `layers` scope of those paths, so it stays a module rather than a list attribute, whose
    entries Flax would name `layers_{i}`). remat: each layer's activations are recomputed in the backward
    pass (the same dropout keys); not with a cache, which is inference and whose update jax.checkpoint's
    trace would keep to itself."""

    config: OPTConfig
    numerics: Numerics = Numerics()
    remat: bool = False

    @nn.compact
    def __call__(self, x, *, allowed, cache: Optional[KVCache] = None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        config = self.config
        hidden_states = []
        layer_class = nn.remat(OPTDecoderLayer) if self.remat and cache is None else OPTDecoderLayer
        for i in range(config.num_hidden_layers):
            if output_hidden_states:
                hidden_states.append(x)
            layer = layer_class(config, self.numerics, layer_idx=i, deterministic=deterministic, name=str(i))
            before = (cache.keys[i], cache.values[i]) if cache is not None else None
            y = layer(x, allowed=allowed, cache=cache)
            if not deterministic and config.layerdrop > 0:  # LayerDrop: skip the whole layer at random
                skip = jax.random.bernoulli(self.make_rng("dropout"), config.layerdrop)
                y = jnp.where(skip, x, y)
                if cache is not None:  # a skipped layer writes nothing either
                    cache.keys[i], cache.values[i] = (jnp.where(skip, old, new) for old, new in
                                                      zip(before, (cache.keys[i], cache.values[i])))
            x = y
        return x, hidden_states


# -------------------------------------------------------------------------------------- decoder
class OPTDecoder(nn.Module):
    """Embeddings, the layers and what follows them. Submodules are made in setup, so that the causal-LM
    head can reach `embed_tokens` (its tied weight, nn.Embed.attend)."""

    config: OPTConfig
    numerics: Numerics = Numerics()
    remat: bool = False

    def setup(self):
        config, numerics = self.config, self.numerics
        V, E, H, P = (config.vocab_size, config.word_embed_proj_dim, config.hidden_size,
                      config.max_position_embeddings)
        normal = jax.nn.initializers.normal(config.init_std)
        self.embed_tokens = Embed(V, E, dtype=numerics.dtype, param_dtype=numerics.param_dtype,
                                  embedding_init=normal, precision=numerics.precision)
        self.embed_positions = nn.Embed(P + POSITION_OFFSET, H, dtype=numerics.dtype,
                                        param_dtype=numerics.param_dtype, embedding_init=normal)
        self.project_out = _dense(E, config, numerics, False) if config.has_projections else None
        self.project_in = _dense(H, config, numerics, False) if config.has_projections else None
        self.final_layer_norm = _layer_norm(config, numerics) if config.has_final_layer_norm else None
        self.layers = OPTDecoderLayers(config, numerics, self.remat)

    def __call__(self, input_ids=None, *, attention_mask=None, position_ids=None,
                 past_key_values: Optional[KVCache] = None, inputs_embeds=None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        config, numerics = self.config, self.numerics
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, E)
            if config.pad_token_id is not None:  # as torch's padding_idx: lookups of the pad row get no gradient
                is_pad = (input_ids == config.pad_token_id)[..., None]  # (B, T, 1)
                inputs_embeds = jnp.where(is_pad, jax.lax.stop_gradient(inputs_embeds), inputs_embeds)
        else:
            inputs_embeds = inputs_embeds.astype(numerics.dtype)
        B, T = inputs_embeds.shape[:2]
        # Without a cache the keys are the T new tokens; with one they are the S cache slots and the new
        # tokens sit at [length, length + T). The mask covers the keys (the cache widens a past + new one).
        cache = None
        if past_key_values is not None:
            refuse_legacy_cache(past_key_values)
            if not isinstance(past_key_values, KVCache):
                raise TypeError(f"past_key_values must be a KVCache, got {type(past_key_values).__name__}")
            cache = past_key_values.copy()  # the returned cache; the given one stays as it was
        if cache is not None:
            if attention_mask is not None and attention_mask.shape[0] != B or cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} rows and attention_mask "
                                 f"{None if attention_mask is None else attention_mask.shape[0]}; the inputs have {B}")
            attention_mask = cache.attention_mask(attention_mask, T)  # (B, S)
            query_start = cache.length
        else:
            if attention_mask is None:
                attention_mask = jnp.ones((B, T), jnp.int32)
            attention_mask = attention_mask.astype(jnp.int32)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected ({B}, {T}) "
                                 "(batch, tokens)")
            query_start = 0
        if position_ids is None:
            positions = jnp.cumsum(attention_mask, axis=1) * attention_mask - 1  # (B, S), pads -1
            position_ids = lax.dynamic_slice_in_dim(positions, query_start, T, axis=1)  # (B, T)
        allowed = attention_allowed(attention_mask, T, query_start)  # (B, 1, T, S)

        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds  # (B, T, H)
        x = x + self.embed_positions(position_ids.astype(jnp.int32) + POSITION_OFFSET)
        x, hidden_states = self.layers(x, allowed=allowed, cache=cache, deterministic=deterministic,
                                       output_hidden_states=output_hidden_states)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, E)
        if output_hidden_states:
            hidden_states.append(x)
        if cache is not None:
            cache.advance(T)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache,
                                       hidden_states=tuple(hidden_states) if output_hidden_states else None)


# ----------------------------------------------------------------------------------- base model
class OPTModule(nn.Module):
    """The base model: the decoder under `decoder` (checkpoint names `decoder.*`)."""

    config: OPTConfig
    numerics: Numerics = Numerics()
    remat: bool = False
    head = Head.BASE

    def setup(self):
        self.decoder = OPTDecoder(self.config, self.numerics, self.remat)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, deterministic: bool = True, output_hidden_states: bool = False):
        return self.decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                            deterministic=deterministic, output_hidden_states=output_hidden_states)


class _HeadModule(nn.Module):
    """Shared by the head models: the base model under `model`."""

    config: OPTConfig
    numerics: Numerics = Numerics()
    remat: bool = False

    def setup(self):
        self.model = OPTModule(self.config, self.numerics, self.remat)


class OPTForCausalLMModule(_HeadModule):
    head = Head.CAUSAL_LM

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, deterministic: bool = True, output_hidden_states: bool = False):
        config, numerics = self.config, self.numerics
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, deterministic=deterministic,
                         output_hidden_states=output_hidden_states)
        x = out.last_hidden_state  # (B, T, E)
        if config.tie_word_embeddings:  # the head is the token embedding: logits = x @ embedding^T
            logits = self.model.decoder.embed_tokens.attend(x)  # (B, T, V)
        else:
            logits = _dense(config.vocab_size, config, numerics, False, "lm_head")(x)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)


class OPTForSequenceClassificationModule(_HeadModule):
    head = Head.SEQUENCE_CLASSIFICATION

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, deterministic: bool = True, output_hidden_states: bool = False):
        config = self.config
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, deterministic=deterministic,
                         output_hidden_states=output_hidden_states)
        logits = _dense(config.num_labels, config, self.numerics, False, "score")(
            out.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
        check_pooling(B, config.pad_token_id)
        if input_ids is not None and config.pad_token_id is not None:
            # the rightmost token that is not a pad (left or right padding alike)
            not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
            last = jnp.argmax(jnp.arange(T, dtype=jnp.int32) * not_pad, axis=-1)  # (B,)
        else:
            last = jnp.full((B,), T - 1, jnp.int32)
        pooled = logits[jnp.arange(B), last]  # (B, num_labels)
        loss = sequence_classification_loss(pooled, labels, config) if labels is not None else None
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                hidden_states=out.hidden_states)


class OPTForQuestionAnsweringModule(_HeadModule):
    head = Head.QUESTION_ANSWERING

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, start_positions=None, end_positions=None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        config = self.config
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, deterministic=deterministic,
                         output_hidden_states=output_hidden_states)
        logits = _dense(2, config, self.numerics, True, "qa_outputs")(out.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                            past_key_values=out.past_key_values, hidden_states=out.hidden_states)


def sown_attentions(intermediates) -> tuple:
    """The per-layer attention probabilities a call sowed (apply with mutable=["intermediates"]), in layer order."""
    found = {}
    for path, value in flax.traverse_util.flatten_dict(intermediates).items():
        if path[-1] == "attention_probs":
            found[int(path[path.index("layers") + 1])] = value[0]
    return tuple(found[i] for i in sorted(found))


# ----------------------------------------------------------------------------------------- losses
# opt_spec.numerics defines each loss (and its NumPy reference): means over what counts, 0 over nothing.
def _cross_entropy(logits: jax.Array, target: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean over kept rows of -log softmax(logits)[target], in float32; 0, with zero gradients, when
    nothing is kept."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    kept = keep.astype(jnp.float32)
    return -(picked * kept).sum() / jnp.maximum(kept.sum(), 1.0)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross entropy (float32) of logits[:, t] against labels[:, t + 1], skipping IGNORE_INDEX."""
    target = labels[:, 1:].astype(jnp.int32)
    return _cross_entropy(logits[:, :-1], target, target != IGNORE_INDEX)


def sequence_classification_loss(pooled: jax.Array, labels: jax.Array, config: OPTConfig) -> jax.Array:
    problem = problem_type(config, jnp.issubdtype(labels.dtype, jnp.integer))
    pooled = pooled.astype(jnp.float32)
    if problem == "regression":
        target = labels.astype(jnp.float32)
        if config.num_labels == 1:
            return jnp.mean((pooled.squeeze() - target.squeeze()) ** 2)
        return jnp.mean((pooled - target) ** 2)
    if problem == "single_label_classification":
        target = labels.reshape(-1).astype(jnp.int32)
        return _cross_entropy(pooled.reshape(-1, config.num_labels), target, target != IGNORE_INDEX)
    target = labels.astype(jnp.float32)  # multi-label: binary cross entropy on logits
    return jnp.mean(jnp.maximum(pooled, 0) - pooled * target + jnp.log1p(jnp.exp(-jnp.abs(pooled))))


def question_answering_loss(start_logits, end_logits, start_positions, end_positions) -> jax.Array:
    """Mean of start and end cross entropy; positions outside [0, T) are clamped to T and ignored."""
    T = start_logits.shape[1]
    start = jnp.clip(start_positions.reshape(-1).astype(jnp.int32), 0, T)
    end = jnp.clip(end_positions.reshape(-1).astype(jnp.int32), 0, T)
    return (_cross_entropy(start_logits, start, start != T) + _cross_entropy(end_logits, end, end != T)) / 2


MODULE_CLASSES = {Head.BASE: OPTModule, Head.CAUSAL_LM: OPTForCausalLMModule,
                  Head.SEQUENCE_CLASSIFICATION: OPTForSequenceClassificationModule,
                  Head.QUESTION_ANSWERING: OPTForQuestionAnsweringModule}
