"""OPT in Flax (linen), read top to bottom: cache, attention, layer, decoder, base model, heads, losses.

Submodule names are the scopes of the canonical checkpoint names and leaves are Flax's own
(`kernel` (in, out), `bias`, `embedding`, `scale`), so a parameter's tree path joined by dots is
`opt_spec.layouts.native_path` of its weight: loading is a transpose of linear weights and nothing else.
Dimension letters: B batch, T new tokens, S keys (cache length, or T without a cache), H hidden,
nh heads, hs head size, E embedding width, F ffn width, V vocabulary.

`dtype` is the compute dtype, `param_dtype` the dtype parameters are created in; the attention
softmax always runs in float32. Each attention sows its probabilities (B, nh, T, S) into the
"intermediates" collection (kept only when the caller makes it mutable: `output_attentions`), and
`remat=True` recomputes every decoder layer in the backward pass (gradient checkpointing, nn.remat).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
from jax import lax

from opt_spec import Head, OPTConfig
from opt_spec.numerics import (IGNORE_INDEX, LAYER_NORM_EPS, POSITION_OFFSET, SOFTMAX_DTYPE, attention_scale,
                               mask_value, problem_type)
from opt_spec.outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                              SequenceClassifierOutputWithPast)

Dtype = Any
Precision = Any  # None (JAX's default for the device) or a jax.lax.Precision / "highest"


def _register_output_pytrees() -> None:
    """The spec's output records become pytrees, so a jitted function may return them."""
    import dataclasses

    for cls in (BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast,
                QuestionAnsweringModelOutput):
        try:
            jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in dataclasses.fields(cls)],
                                             meta_fields=[])
        except ValueError:  # already registered (module reloaded)
            pass


_register_output_pytrees()


# ------------------------------------------------------------------------------------- KV cache
@flax.struct.dataclass
class KVCache:
    """A preallocated key/value cache: per layer a key and a value buffer of shape (B, nh, S, hs),
    S = max_length, and `index`, the number of positions already written (an int32 scalar).

    A forward pass over T new tokens writes their keys and values at [index, index + T) and returns
    a cache whose index is index + T; shapes never change, so one jitted step serves every position.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: jax.Array

    @classmethod
    def zeros(cls, config: OPTConfig, batch_size: int, max_length: int, dtype: Dtype = jnp.float32) -> "KVCache":
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # (B, nh, S, hs)
        L = config.num_hidden_layers
        return cls(keys=tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   values=tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


def activation_fn(formula: str):
    return {
        "relu": jax.nn.relu,
        "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "silu": jax.nn.silu,
    }[formula]


def attention_allowed(attention_mask: jax.Array, q_start: jax.Array | int, T: int) -> jax.Array:
    """(B, S) mask -> (B, 1, T, S) bool for queries at positions q_start .. q_start + T - 1:
    causal, mask kept, and a query always sees itself (opt_spec.numerics.attention_allowed)."""
    S = attention_mask.shape[1]
    q_pos = (q_start + jnp.arange(T, dtype=jnp.int32))[:, None]  # (T, 1)
    k_pos = jnp.arange(S, dtype=jnp.int32)[None, :]              # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.astype(bool)[:, None, :]  # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]


def _dense(features: int, config: OPTConfig, dtype, param_dtype, use_bias: bool, name: str,
           precision: Precision = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                    kernel_init=jax.nn.initializers.normal(config.init_std), name=name)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics and affine in float32, the result in `dtype`.

    (flax.linen.LayerNorm promotes half precision to float32 implicitly, which strict dtype
    promotion forbids; this one casts explicitly.) Parameters: `scale` and `bias`, when affine.
    """

    affine: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        H = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + LAYER_NORM_EPS)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (H,), self.param_dtype).astype(jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (H,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


def _layer_norm(config: OPTConfig, dtype, param_dtype, name: str) -> LayerNorm:
    return LayerNorm(config.layer_norm_elementwise_affine, dtype, param_dtype, name=name)


# ------------------------------------------------------------------------------------ attention
class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, allowed, cache_kv=None, cache_index=None, deterministic: bool = True):
        config = self.config
        B, T, H = x.shape
        nh, hs = config.num_attention_heads, config.head_dim
        k_proj, v_proj, q_proj, out_proj = (
            _dense(H, config, self.dtype, self.param_dtype, config.enable_bias, name, self.precision)
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"))

        q = (q_proj(x) * attention_scale(hs)).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = k_proj(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
        v = v_proj(x).reshape(B, T, nh, hs).transpose(0, 2, 1, 3)                           # (B, nh, T, hs)
        if cache_kv is not None:  # write the new keys/values at cache_index; attend over the whole buffer
            k_buf, v_buf = cache_kv
            start = (0, 0, cache_index, 0)
            k = lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), start)  # (B, nh, S, hs)
            v = lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), start)
            new_kv = (k, v)
        else:
            new_kv = None

        scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32, precision=self.precision)  # (B, nh, T, S), f32
        scores = jnp.where(allowed, scores, mask_value(SOFTMAX_DTYPE))
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(config.attention_dropout)(probs, deterministic=deterministic)
        self.sow("intermediates", "attention_probs", probs)  # after dropout, as Hugging Face returns them
        y = jnp.einsum("bhts,bhsd->bthd", probs, v.astype(self.dtype), precision=self.precision)  # (B, T, nh, hs)
        y = y.reshape(B, T, H)
        return out_proj(y), new_kv


# ---------------------------------------------------------------------------------------- layer
class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x, allowed, cache_kv=None, cache_index=None, deterministic: bool = True):
        config = self.config
        H, F_, bias, pre_ln = config.hidden_size, config.ffn_dim, config.enable_bias, config.do_layer_norm_before
        self_attn = OPTAttention(config, self.dtype, self.param_dtype, self.precision, name="self_attn")
        self_attn_layer_norm = _layer_norm(config, self.dtype, self.param_dtype, "self_attn_layer_norm")
        fc1 = _dense(F_, config, self.dtype, self.param_dtype, bias, "fc1", self.precision)
        fc2 = _dense(H, config, self.dtype, self.param_dtype, bias, "fc2", self.precision)
        final_layer_norm = _layer_norm(config, self.dtype, self.param_dtype, "final_layer_norm")
        dropout = nn.Dropout(config.dropout)
        act = activation_fn(config.activation)

        h = self_attn_layer_norm(x) if pre_ln else x
        h, new_kv = self_attn(h, allowed, cache_kv, cache_index, deterministic)
        x = x + dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = self_attn_layer_norm(x)
        h = final_layer_norm(x) if pre_ln else x
        h = fc2(act(fc1(h)))
        x = x + dropout(h, deterministic=deterministic)
        if not pre_ln:
            x = final_layer_norm(x)
        return x, new_kv


class OPTDecoderLayers(nn.Module):
    """The stack of layers, named "0", "1", ... so that paths read `layers.{i}.*` as in the checkpoint.
    remat: each layer's activations are recomputed in the backward pass (the same dropout keys)."""

    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    remat: bool = False

    @nn.compact
    def __call__(self, x, allowed, cache: Optional[KVCache] = None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        config = self.config
        hidden_states = []
        keys, values = [], []
        for i in range(config.num_hidden_layers):
            if output_hidden_states:
                hidden_states.append(x)
            layer_class = nn.remat(OPTDecoderLayer, static_argnums=(5,)) if self.remat else OPTDecoderLayer
            layer = layer_class(config, self.dtype, self.param_dtype, self.precision, name=str(i))
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            y, new_kv = layer(x, allowed, kv, cache.index if cache is not None else None, deterministic)
            if not deterministic and config.layerdrop > 0:  # LayerDrop: skip the whole layer at random
                skip = jax.random.bernoulli(self.make_rng("dropout"), config.layerdrop)
                y = jnp.where(skip, x, y)
                if new_kv is not None:
                    new_kv = tuple(jnp.where(skip, old, new) for old, new in zip(kv, new_kv))
            x = y
            if new_kv is not None:
                keys.append(new_kv[0])
                values.append(new_kv[1])
        return x, (tuple(keys), tuple(values)), hidden_states


# -------------------------------------------------------------------------------------- decoder
class OPTDecoder(nn.Module):
    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                 inputs_embeds=None, deterministic: bool = True, output_hidden_states: bool = False):
        config = self.config
        V, E, H, P = (config.vocab_size, config.word_embed_proj_dim, config.hidden_size,
                      config.max_position_embeddings)
        normal = jax.nn.initializers.normal(config.init_std)
        embed_tokens = nn.Embed(V, E, dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=normal,
                                name="embed_tokens")
        embed_positions = nn.Embed(P + POSITION_OFFSET, H, dtype=self.dtype, param_dtype=self.param_dtype,
                                   embedding_init=normal, name="embed_positions")
        project_out = _dense(E, config, self.dtype, self.param_dtype, False, "project_out", self.precision) \
            if config.has_projections else None
        project_in = _dense(H, config, self.dtype, self.param_dtype, False, "project_in", self.precision) \
            if config.has_projections else None
        final_layer_norm = _layer_norm(config, self.dtype, self.param_dtype, "final_layer_norm") \
            if config.has_final_layer_norm else None
        layers = OPTDecoderLayers(config, self.dtype, self.param_dtype, self.precision, self.remat, name="layers")

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = embed_tokens(input_ids)  # (B, T, E)
            if config.pad_token_id is not None:  # as torch's padding_idx: lookups of the pad row get no gradient
                is_pad = (input_ids == config.pad_token_id)[..., None]  # (B, T, 1)
                inputs_embeds = jnp.where(is_pad, jax.lax.stop_gradient(inputs_embeds), inputs_embeds)
        else:
            inputs_embeds = inputs_embeds.astype(self.dtype)
        B, T = inputs_embeds.shape[:2]
        # Without a cache the keys are the T new tokens; with one they are the S cache slots and the
        # new tokens sit at [index, index + T). The mask covers the keys (a shorter one is padded).
        S = cache.max_length if cache is not None else T
        q_start = cache.index if cache is not None else 0
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if attention_mask.shape[1] < S and cache is not None:
            attention_mask = jnp.pad(attention_mask, ((0, 0), (0, S - attention_mask.shape[1])))
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected ({B}, {S})"
                             + (" (batch, cache max_length)" if cache is not None else " (batch, tokens)"))
        if position_ids is None:
            positions = jnp.cumsum(attention_mask, axis=1) * attention_mask - 1  # (B, S), pads -1
            position_ids = lax.dynamic_slice_in_dim(positions, q_start, T, axis=1)  # (B, T)
        allowed = attention_allowed(attention_mask, q_start, T)  # (B, 1, T, S)

        x = project_in(inputs_embeds) if project_in is not None else inputs_embeds  # (B, T, H)
        x = x + embed_positions(position_ids.astype(jnp.int32) + POSITION_OFFSET)
        x, (keys, values), hidden_states = layers(x, allowed, cache, deterministic, output_hidden_states)
        if final_layer_norm is not None:
            x = final_layer_norm(x)
        if project_out is not None:
            x = project_out(x)  # (B, T, E)
        if output_hidden_states:
            hidden_states.append(x)
        new_cache = KVCache(keys, values, cache.index + T) if cache is not None else None
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=new_cache,
                                       hidden_states=tuple(hidden_states) if output_hidden_states else None)


# ----------------------------------------------------------------------------------- base model
class OPTModule(nn.Module):
    """The base model: the decoder under `decoder` (checkpoint names `decoder.*`)."""

    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    remat: bool = False
    head = Head.BASE

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, deterministic: bool = True, output_hidden_states: bool = False):
        decoder = OPTDecoder(self.config, self.dtype, self.param_dtype, self.precision, self.remat, name="decoder")
        return decoder(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
                       output_hidden_states)


class _HeadModule(nn.Module):
    """Shared by the head models: the base model under `model`."""

    config: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Precision = None
    remat: bool = False

    def base(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
             output_hidden_states) -> BaseModelOutputWithPast:
        model = OPTModule(self.config, self.dtype, self.param_dtype, self.precision, self.remat, name="model")
        return model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
                     output_hidden_states)


class OPTForCausalLMModule(_HeadModule):
    head = Head.CAUSAL_LM

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, deterministic: bool = True, output_hidden_states: bool = False):
        config = self.config
        out = self.base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
                        output_hidden_states)
        x = out.last_hidden_state  # (B, T, E)
        if config.tie_word_embeddings:  # the head is the token embedding: logits = x @ embedding^T
            embedding = self.variables["params"]["model"]["decoder"]["embed_tokens"]["embedding"]  # (V, E)
            logits = jnp.einsum("bte,ve->btv", x, embedding.astype(self.dtype),
                                precision=self.precision)  # (B, T, V)
        else:
            lm_head = _dense(config.vocab_size, config, self.dtype, self.param_dtype, False, "lm_head", self.precision)
            logits = lm_head(x)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)


class OPTForSequenceClassificationModule(_HeadModule):
    head = Head.SEQUENCE_CLASSIFICATION

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, labels=None, deterministic: bool = True, output_hidden_states: bool = False):
        config = self.config
        out = self.base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
                        output_hidden_states)
        logits = _dense(config.num_labels, config, self.dtype, self.param_dtype, False, "score", self.precision)(
            out.last_hidden_state)  # (B, T, num_labels)
        B, T = logits.shape[:2]
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
        out = self.base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, deterministic,
                        output_hidden_states)
        logits = _dense(2, config, self.dtype, self.param_dtype, True, "qa_outputs", self.precision)(
            out.last_hidden_state)  # (B, T, 2)
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
