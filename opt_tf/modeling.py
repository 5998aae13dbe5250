"""OPT in TensorFlow (Keras 3 layers, TensorFlow ops), read top to bottom: linear, layer norm,
embedding, attention, layer, decoder, base model, heads.

Layer names are the canonical checkpoint names split on dots, so a variable's Keras path below the
model is `opt_spec.layouts.native_path(spec, "keras")` (`decoder/layers/0/fc1/kernel`); kernels are
(in, out). Dimension letters: B batch, T new tokens, S keys (past + new, or the cache length L),
H hidden, nh heads, hs head size, E embedding width, F ffn width, V vocabulary.

Every layer is built when the model is constructed (shapes come from the config, not from a first
call) and casts its variables to the compute dtype itself (Keras autocasting is off), so a
`mixed_bfloat16` policy keeps float32 variables and computes in bfloat16, while LayerNorm statistics
and the attention softmax always run in float32.

KV cache for incremental decoding (works eagerly and under `tf.function(jit_compile=True)`), the
contract of opt_spec.cache:

    cache = model.init_cache(batch_size=B, max_length=L)     # KVCache, length 0, capacity L
    mask = tf.constant(...)                                   # (B, L): 1 = real token, 0 = pad
    out = model(prompt_ids, attention_mask=mask, past_key_values=cache)   # prompt (B, T0)
    cache = out.past_key_values                               # length T0
    out = model(next_ids, attention_mask=mask, past_key_values=cache)     # (B, 1), length T0 + 1

A KVCache holds per layer the keys and values (B, nh, S, hs) and its write position `length`, an int32
scalar. Each attention layer calls `cache.update(layer, k, v)`, which writes the T new tokens at the
write position and returns the keys and values to attend to; the decoder calls `cache.advance(T)` after
the last layer. `init_cache` preallocates L slots: the new tokens are scattered into them, so shapes
never change and XLA compiles one program per T for every step. A call with `use_cache=True` (the
config's default) and no cache starts a dynamic one (capacity None), whose keys grow by concatenation.
TensorFlow's tensors are immutable: `update` replaces the cache's tensors, the model updates a copy of
the cache it is given and returns that copy (the given one is unchanged, as a tf.function requires).

The mask given with a cache covers the past and the new tokens (B, length + T) or, preallocated, the
whole capacity (B, L) (opt_spec.cache.cache_mask_width; anything else is an error), so one mask can be
built up front and reused for every step; slots not yet written are masked. Inside a tf.function that
takes the cache as an input the write position is only known when the program runs, so there the mask
must cover the capacity. Without a mask every token counts as real. Positions come from the mask's
cumulative sum: left-padded prompts work as in the full forward (pads get position -1 and real tokens
never see them). Per-layer (keys, values) tuples are refused (opt_spec.cache.refuse_legacy_cache).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from opt_spec import Head, OPTConfig
from opt_spec.cache import cache_mask_width, check_capacity, refuse_legacy_cache
from opt_spec.inputs import (check_attention_mask, check_batch_shape, check_classification_labels, check_pooling,
                             check_inputs_embeds, check_labels, check_position_ids, check_positions, check_seed,
                             check_span_positions, check_token_ids, host_array, not_integers)
from opt_spec.numerics import (IGNORE_INDEX, LAYER_NORM_EPS, POSITION_OFFSET, SOFTMAX_DTYPE, attention_scale,
                               mask_value, problem_type)
from opt_spec.training import TASK_HEADS, TASK_INPUTS

from . import fast_paths
from .checkpoint import TFPretrainedMixin
from .generation import TFGenerationMixin
from .hf_compat import TFModelMethods
from .outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                      SequenceClassifierOutputWithPast)

F32_MIN = mask_value(SOFTMAX_DTYPE)  # masked attention scores are replaced by this (float32 softmax)
DTYPES = ("float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16", "float64")


def resolve_policy(dtype) -> keras.DTypePolicy:
    """None | 'float32' | 'float16' | 'bfloat16' | 'mixed_float16' | 'mixed_bfloat16' | DTypePolicy."""
    if dtype is None:
        return keras.DTypePolicy("float32")
    if isinstance(dtype, keras.DTypePolicy):
        return dtype
    name = dtype.name if isinstance(dtype, tf.DType) else str(np.dtype(dtype)) if not isinstance(dtype, str) \
        else dtype.removeprefix("tf.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)} or a keras.DTypePolicy")
    return keras.DTypePolicy(name)


def _dim(x: tf.Tensor, axis: int):
    """A static dimension when known, else the dynamic one (a scalar tensor)."""
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


# ------------------------------------------------------------------------------------------ parts
class Linear(keras.layers.Layer):
    """y = x @ kernel + bias, kernel (in, out): the spec's (out, in) linear weight, transposed."""

    def __init__(self, in_dim: int, out_dim: int, use_bias: bool, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.in_dim, self.out_dim, self.use_bias = in_dim, out_dim, use_bias

    def build(self, input_shape=None):
        self.kernel = self.add_weight(shape=(self.in_dim, self.out_dim), initializer="zeros", name="kernel")
        self.bias = self.add_weight(shape=(self.out_dim,), initializer="zeros", name="bias") if self.use_bias \
            else None

    def call(self, x):
        y = tf.matmul(x, tf.cast(self.kernel, self.compute_dtype))  # (..., in) @ (in, out)
        if self.bias is None:
            return y
        return fast_paths.add_bias(y, tf.cast(self.bias, self.compute_dtype))  # y + bias


class LayerNorm(keras.layers.Layer):
    """LayerNorm over the last axis with eps 1e-5, statistics in float32; gamma/beta iff affine."""

    def __init__(self, dim: int, affine: bool, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.dim, self.affine = dim, affine

    def build(self, input_shape=None):
        self.gamma = self.add_weight(shape=(self.dim,), initializer="ones", name="gamma") if self.affine else None
        self.beta = self.add_weight(shape=(self.dim,), initializer="zeros", name="beta") if self.affine else None

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
        y = centered * tf.math.rsqrt(var + LAYER_NORM_EPS)
        if self.affine:
            y = y * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(y, self.compute_dtype)


class Embedding(keras.layers.Layer):
    """Row lookup in `embeddings` (rows, dim)."""

    def __init__(self, rows: int, dim: int, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.rows, self.dim = rows, dim

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(shape=(self.rows, self.dim), initializer="zeros", name="embeddings")

    def call(self, ids):
        return tf.cast(tf.gather(self.embeddings, ids), self.compute_dtype)


ACTIVATIONS = {
    "relu": tf.nn.relu,
    "gelu_erf": lambda x: tf.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "silu": tf.nn.silu,
}


def _dropout(x: tf.Tensor, rate: float, training, seeds=None) -> tf.Tensor:
    """Masks drawn from TF's global tf.random.Generator, whose state is one variable: a trainer can
    seed it, save it and restore it, so a resumed run draws the same masks (opt_tf.training). `seeds`:
    an iterator over seeds drawn ahead (TFOPTDecoderLayer.dropout_seeds), taken in order instead."""
    if not (training and rate > 0):
        return x
    seed = next(seeds) if seeds is not None else _draw_seed()
    return fast_paths.dropout(x, rate, seed)  # tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)


def _draw_seed() -> tf.Tensor:
    return tf.random.get_global_generator().make_seeds(1)[:, 0]


# ------------------------------------------------------------------------------------- attention
class KVCache:
    """Keys and values of every layer and the write position (opt_spec.cache's contract; see the module
    docstring). Preallocated: `capacity` slots per layer (init_cache); dynamic: capacity None, each
    layer's keys start as None and grow. `length` is an int32 scalar tensor: under XLA one compiled
    program serves every write position."""

    def __init__(self, keys, values, length=0, capacity: Optional[int] = None):
        self.keys, self.values = tuple(keys), tuple(values)  # per layer (B, nh, S, hs), or None
        self.length = tf.constant(length, tf.int32) if isinstance(length, int) else length
        self.capacity = capacity

    @classmethod
    def dynamic(cls, num_layers: int) -> "KVCache":
        return cls((None,) * num_layers, (None,) * num_layers)

    def update(self, layer: int, k: tf.Tensor, v: tf.Tensor) -> tuple:
        """k, v (B, nh, T, hs) of `layer` written at the write position -> this layer's keys and values
        (B, nh, S, hs): the whole buffer (S = capacity) or past + new (S = length + T)."""
        old_k, old_v = self.keys[layer], self.values[layer]
        if self.capacity is not None:
            k, v = write_cache(old_k, k, self.length), write_cache(old_v, v, self.length)
        elif old_k is not None:
            k = tf.concat([tf.cast(old_k, k.dtype), k], axis=2)
            v = tf.concat([tf.cast(old_v, v.dtype), v], axis=2)
        self.keys = self.keys[:layer] + (k,) + self.keys[layer + 1:]
        self.values = self.values[:layer] + (v,) + self.values[layer + 1:]
        return k, v

    def advance(self, new) -> None:
        """The write position moves on by the `new` tokens every layer has written (once per forward)."""
        self.length = self.length + new

    def written(self) -> Optional[int]:
        """The write position as a Python int where it is known before running (eagerly; a dynamic cache's
        keys' static length under tracing), else None."""
        past = tf.get_static_value(self.length)
        if past is None and self.capacity is None and self.keys[0] is not None:
            past = self.keys[0].shape[2]
        return None if past is None else int(past)

    def attention_mask(self, attention_mask: Optional[tf.Tensor], B, T) -> tf.Tensor:
        """The mask given with this cache (None: every token real) widened to the keys' S, (B, S) int32;
        slots not written yet are 0, which the mask rule hides. Its length follows
        opt_spec.cache.cache_mask_width, checked here."""
        past = self.written()
        if attention_mask is None:
            S = self.capacity if self.capacity is not None else self.length + T
            if past is not None and isinstance(T, int):
                cache_mask_width(past + T, past, T, self.capacity)  # the new tokens must fit
            return tf.ones((B, S), tf.int32)
        mask = tf.cast(attention_mask, tf.int32)
        if mask.shape.rank != 2:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected (batch, past + new) or "
                             "(batch, the cache's capacity)")
        width = mask.shape[1]
        if width is None:  # a length unknown when tracing (a tf.function's input signature)
            if self.capacity is None:
                return mask  # a dynamic cache takes it as past + new
            raise ValueError("attention_mask's length is unknown when tracing; with a preallocated cache it must be "
                             f"the cache's capacity {self.capacity}")
        known = past is not None and isinstance(T, int)  # else traced, inside a tf.function taking the cache
        S = cache_mask_width(width, past if known else None, T if known else None, self.capacity)
        return tf.pad(mask, [[0, 0], [0, S - width]]) if S > width else mask

    def copy(self) -> "KVCache":
        """A new KVCache holding the same tensors (the model updates a copy, never the cache it is given)."""
        return KVCache(self.keys, self.values, self.length, self.capacity)

    # tf.nest / tf.function / tf.while_loop: the tensors are the components, the capacity is static
    def __tf_flatten__(self):
        return (self.capacity,), (self.keys, self.values, self.length)

    @classmethod
    def __tf_unflatten__(cls, metadata, components):
        return cls(*components, capacity=metadata[0])


def init_cache(config: OPTConfig, batch_size: int, max_length: int, dtype="float32", pads: int = 0) -> KVCache:
    """An empty preallocated KVCache (zeros, length 0, capacity max_length) for `batch_size` rows; pads:
    slots past the position table for left-padded prompts' pads (opt_spec.cache.check_capacity)."""
    check_capacity(max_length, config.max_position_embeddings, pads)
    shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # (B, nh, L, hs)
    zeros = lambda: tf.zeros(shape, dtype)  # noqa: E731
    n = config.num_hidden_layers
    return KVCache(tuple(zeros() for _ in range(n)), tuple(zeros() for _ in range(n)), 0, capacity=max_length)


def write_cache(buffer: tf.Tensor, new: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """buffer (B, nh, L, hs) with new (B, nh, T, hs) written at slots [index, index + T)."""
    B, nh, T = _dim(new, 0), _dim(new, 1), _dim(new, 2)
    b, h, t = tf.meshgrid(tf.range(B), tf.range(nh), index + tf.range(T), indexing="ij")  # (B, nh, T) each
    return tf.tensor_scatter_nd_update(buffer, tf.stack([b, h, t], axis=-1), tf.cast(new, buffer.dtype))


def attention_allowed(attention_mask: tf.Tensor, query_length, query_start=None) -> tf.Tensor:
    """(B, S) mask -> (B, T, S) bool for the T queries at positions query_start .. query_start + T - 1 (by
    default the last T of the S): causal, mask kept, and a query that would see nothing sees itself
    (opt_spec.numerics.attention_allowed)."""
    S = _dim(attention_mask, 1)
    start = S - query_length if query_start is None else query_start
    q_pos = (start + tf.range(query_length))[:, None]  # (T, 1)
    k_pos = tf.range(S)[None, :]                        # (1, S)
    allowed = (k_pos <= q_pos)[None] & tf.cast(attention_mask, tf.bool)[:, None, :]  # (B, T, S)
    alone = ~tf.reduce_any(allowed, axis=-1, keepdims=True)                            # (B, T, 1)
    return allowed | (alone & (k_pos == q_pos)[None])


class TFOPTAttention(keras.layers.Layer):
    def __init__(self, config: OPTConfig, layer_index: int, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.layer_index = layer_index  # this layer's keys and values in a KVCache
        H, bias, policy = config.hidden_size, config.enable_bias, self.dtype_policy
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = attention_scale(config.head_dim)
        self.dropout = config.attention_dropout
        self.k_proj = Linear(H, H, bias, name="k_proj", dtype=policy)
        self.v_proj = Linear(H, H, bias, name="v_proj", dtype=policy)
        self.q_proj = Linear(H, H, bias, name="q_proj", dtype=policy)
        self.out_proj = Linear(H, H, bias, name="out_proj", dtype=policy)

    def build(self, input_shape=None):
        for proj in (self.k_proj, self.v_proj, self.q_proj, self.out_proj):
            proj.build()

    def _heads(self, x: tf.Tensor) -> tf.Tensor:
        B, T = _dim(x, 0), _dim(x, 1)
        x = tf.reshape(x, (B, T, self.num_heads, self.head_dim))  # (B, T, nh, hs)
        return tf.transpose(x, (0, 2, 1, 3))                     # (B, nh, T, hs)

    def call(self, x, *, allowed, cache: Optional[KVCache] = None, training=False, seeds=None):
        """-> output, attention probabilities (B, nh, T, S) (after dropout, as Hugging Face)."""
        B, T, H = _dim(x, 0), _dim(x, 1), x.shape[-1]
        q = self._heads(self.q_proj(x) * tf.cast(self.scaling, x.dtype))  # (B, nh, T, hs)
        k = self._heads(self.k_proj(x))                                   # (B, nh, T, hs)
        v = self._heads(self.v_proj(x))                                   # (B, nh, T, hs)
        if cache is not None:  # the new keys written, all S the queries attend to returned
            k, v = cache.update(self.layer_index, k, v)                   # (B, nh, S, hs)
        scores = tf.where(allowed[:, None], self.scores(q, k), F32_MIN)  # (B, nh, T, S)
        probs = _dropout(tf.nn.softmax(scores, axis=-1), self.dropout, training, seeds)
        y = self.mix(probs, v, x.dtype)                                # (B, nh, T, hs)
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), (B, T, H))     # (B, T, H)
        return self.out_proj(y), probs

    def scores(self, q: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
        """q (B, nh, T, hs) . k (B, nh, S, hs) -> (B, nh, T, S) float32, the product in q's dtype."""
        return tf.cast(tf.matmul(q, tf.cast(k, q.dtype), transpose_b=True), tf.float32)

    def mix(self, probs: tf.Tensor, v: tf.Tensor, dtype) -> tf.Tensor:
        """probs (B, nh, T, S) @ v (B, nh, S, hs) -> (B, nh, T, hs) in `dtype`."""
        return tf.matmul(tf.cast(probs, dtype), tf.cast(v, dtype))


# ----------------------------------------------------------------------------------------- layers
class TFOPTDecoderLayer(keras.layers.Layer):
    def __init__(self, config: OPTConfig, layer_index: int, **kwargs):
        super().__init__(autocast=False, **kwargs)
        H, F, bias, affine, policy = (config.hidden_size, config.ffn_dim, config.enable_bias,
                                      config.layer_norm_elementwise_affine, self.dtype_policy)
        self.pre_ln = config.do_layer_norm_before
        self.dropout = config.dropout
        self.act = ACTIVATIONS[config.activation]
        self.self_attn = TFOPTAttention(config, layer_index, name="self_attn", dtype=policy)
        self.self_attn_layer_norm = LayerNorm(H, affine, name="self_attn_layer_norm", dtype=policy)
        self.fc1 = Linear(H, F, bias, name="fc1", dtype=policy)
        self.fc2 = Linear(F, H, bias, name="fc2", dtype=policy)
        self.final_layer_norm = LayerNorm(H, affine, name="final_layer_norm", dtype=policy)

    def build(self, input_shape=None):
        for sub in (self.self_attn, self.self_attn_layer_norm, self.fc1, self.fc2, self.final_layer_norm):
            sub.build()

    def dropout_seeds(self, training) -> list:
        """The seeds this layer's dropouts draw in a call, drawn now: a call given them (`seeds`) draws the
        same masks however often it is repeated (a recomputation in backward: gradient checkpointing)."""
        rates = (self.self_attn.dropout, self.dropout, self.dropout)  # attention, then the two residual branches
        return [_draw_seed() for rate in rates if training and rate > 0]

    def call(self, x, *, allowed, cache: Optional[KVCache] = None, training=False, seeds=None):
        seeds = iter(seeds) if seeds is not None else None
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, probs = self.self_attn(h, allowed=allowed, cache=cache, training=training, seeds=seeds)
        x = x + _dropout(h, self.dropout, training, seeds)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = self.fc2(self.act(self.fc1(h)))  # (B, T, F) -> (B, T, H)
        x = x + _dropout(h, self.dropout, training, seeds)
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x, probs


class TFOPTDecoder(keras.layers.Layer):
    def __init__(self, config: OPTConfig, **kwargs):
        super().__init__(autocast=False, **kwargs)
        V, E, H, P, policy = (config.vocab_size, config.word_embed_proj_dim, config.hidden_size,
                              config.max_position_embeddings, self.dtype_policy)
        affine = config.layer_norm_elementwise_affine
        self.config = config
        self.embed_tokens = Embedding(V, E, name="embed_tokens", dtype=policy)
        self.embed_positions = Embedding(P + POSITION_OFFSET, H, name="embed_positions", dtype=policy)
        self.project_out = Linear(H, E, False, name="project_out", dtype=policy) if config.has_projections else None
        self.project_in = Linear(E, H, False, name="project_in", dtype=policy) if config.has_projections else None
        self.final_layer_norm = (LayerNorm(H, affine, name="final_layer_norm", dtype=policy)
                                 if config.has_final_layer_norm else None)
        # named "0", "1", ... and built under the scope "layers": paths decoder/layers/{i}/.... Stored as
        # `blocks`: Keras's .weights.h5 files name the group after the attribute (decoder/blocks/...), so
        # that name stays for files saved before; `layers` is the name to use.
        self.blocks = [TFOPTDecoderLayer(config, i, name=str(i), dtype=policy)
                       for i in range(config.num_hidden_layers)]
        self.gradient_checkpointing = False  # recompute each layer in backward (training, no cache)

    @property
    def layers(self) -> list:
        """The decoder layers, in order."""
        return self.blocks

    def build(self, input_shape=None):
        for sub in (self.embed_tokens, self.embed_positions, self.project_out, self.project_in,
                    self.final_layer_norm):
            if sub is not None:
                sub.build()
        with keras.name_scope("layers"):
            for layer in self.layers:
                layer.build()

    def call(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, use_cache=False, output_hidden_states=False, training=False,
             output_attentions=False):
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            input_ids = tf.convert_to_tensor(input_ids)
            _check_token_ids(input_ids, config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, E)
            if config.pad_token_id is not None:  # as torch's padding_idx: lookups of the pad row get no gradient
                is_pad = tf.equal(tf.cast(input_ids, tf.int32), config.pad_token_id)[..., None]  # (B, T, 1)
                inputs_embeds = tf.where(is_pad, tf.stop_gradient(inputs_embeds), inputs_embeds)
        else:
            inputs_embeds = tf.convert_to_tensor(inputs_embeds)
            check_inputs_embeds(tuple(inputs_embeds.shape), inputs_embeds.dtype, config.word_embed_proj_dim)
            inputs_embeds = tf.cast(inputs_embeds, self.compute_dtype)
        B, T = _dim(inputs_embeds, 0), _dim(inputs_embeds, 1)
        if attention_mask is not None:
            check_attention_mask(_host_values(attention_mask))

        checkpointing = self.gradient_checkpointing and training and past_key_values is None
        cache = _check_cache(past_key_values, config, inputs_embeds)
        if cache is None:  # the mask covers the new tokens; use_cache starts a dynamic cache holding them
            q_start = 0
            mask = tf.ones((B, T), tf.int32) if attention_mask is None else tf.cast(attention_mask, tf.int32)
            _check_mask(mask, B, T)
            if use_cache and not checkpointing:
                cache = KVCache.dynamic(config.num_hidden_layers)
        else:  # (B, S): over the cache's keys
            q_start, mask = cache.length, cache.attention_mask(attention_mask, B, T)
            _check_mask(mask, B, None)
        if position_ids is None:
            pos = tf.cumsum(mask, axis=1) * mask - 1                     # (B, S), pads -1
            position_ids = tf.gather(pos, q_start + tf.range(T), axis=1)  # (B, T); a gather, not a slice:
            # XLA would treat a slice's start as a compile-time constant and recompile every step
            _check_positions(position_ids, config.max_position_embeddings)
        else:
            position_ids = tf.convert_to_tensor(position_ids)
            check_position_ids(tuple(position_ids.shape), position_ids.dtype, *_static(B, T),
                               config.max_position_embeddings, _host_values(position_ids))
            position_ids = tf.cast(position_ids, tf.int32)
        allowed = attention_allowed(mask, T, query_start=q_start)  # (B, T, S)

        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds  # (B, T, H)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        hidden_states = [] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            if checkpointing:  # the layer runs again in backward, replaying its dropout seeds
                y, probs = _recomputed(layer, x, allowed=allowed, seeds=layer.dropout_seeds(training))
            else:
                y, probs = layer(x, allowed=allowed, cache=cache, training=training)
            if attentions is not None:
                attentions.append(probs)
            if training and config.layerdrop > 0:  # LayerDrop: skip the whole layer with this probability
                y = tf.where(tf.random.uniform([]) < config.layerdrop, x, y)
            x = y
        if cache is not None:
            cache.advance(T)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, E)
        if hidden_states is not None:
            hidden_states.append(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache,
                                       hidden_states=tuple(hidden_states) if hidden_states is not None else None,
                                       attentions=tuple(attentions) if attentions is not None else None)


def _recomputed(layer: TFOPTDecoderLayer, x: tf.Tensor, *, allowed: tf.Tensor, seeds: list):
    """layer(x) in training whose activations are not kept but recomputed in the backward pass
    (tf.recompute_grad), with the same dropout seeds. -> (y, probs) like the layer."""
    def run(h):
        return layer(h, allowed=allowed, training=True, seeds=seeds)

    y, probs = tf.recompute_grad(run)(x)
    return y, probs


# ------------------------------------------------------------------------------------ input checks
def _check_token_ids(input_ids: tf.Tensor, vocab_size: int) -> None:
    """opt_spec.inputs' rule, on eager values (a traced call checks the dtype only)."""
    if input_ids.dtype.is_floating:
        raise not_integers(input_ids.dtype.name)
    check_batch_shape(tuple(input_ids.shape))
    if tf.executing_eagerly():
        check_token_ids(input_ids.numpy(), vocab_size)


def _host_values(x) -> Optional[np.ndarray]:
    """x as NumPy for a host check when its values are known (eagerly), else None (traced)."""
    if isinstance(x, tf.Tensor) and not tf.executing_eagerly():
        return None
    return host_array(x)


def _static(*dims) -> tuple:
    """Python ints for dimensions known before running, None for the others."""
    return tuple(d if isinstance(d, int) else None for d in dims)


def _check_mask(mask: tf.Tensor, B, T) -> None:
    """mask (B, T) as given without a cache (T None: the batch only)."""
    if mask.shape.rank != 2:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected (batch, length)")
    got = tuple(int(d) for d in tf.shape(mask)) if tf.executing_eagerly() else tuple(mask.shape)
    for g, e in zip(got, (B, T)):
        if isinstance(g, int) and isinstance(e, int) and g != e:
            raise ValueError(f"attention_mask has shape {got}; expected (batch, length) = ({B}, {T})")


def _check_cache(cache, config: OPTConfig, x: tf.Tensor) -> Optional[KVCache]:
    """The KVCache given as past_key_values, a copy the forward may update (None without one)."""
    if cache is None:
        return None
    refuse_legacy_cache(cache)
    if not isinstance(cache, KVCache):
        raise TypeError(f"past_key_values must be a KVCache (model.init_cache or a previous output's "
                        f"past_key_values), got {type(cache).__name__}")
    if len(cache.keys) != config.num_hidden_layers or len(cache.values) != config.num_hidden_layers:
        raise ValueError(f"KVCache has {len(cache.keys)} layers; the model has {config.num_hidden_layers}")
    k, B = cache.keys[0], x.shape[0]
    if k is not None and (k.shape.rank != 4 or k.shape[1] != config.num_attention_heads or
                          k.shape[3] != config.head_dim or (B is not None and k.shape[0] not in (None, B))):
        raise ValueError(f"KVCache keys have shape {tuple(k.shape)}; expected "
                         f"({B}, {config.num_attention_heads}, length, {config.head_dim})")
    return cache.copy()


def _check_positions(position_ids: tf.Tensor, max_positions: int) -> None:
    if tf.executing_eagerly() and tf.size(position_ids) > 0:
        check_positions(int(tf.reduce_max(position_ids)), max_positions)


# ----------------------------------------------------------------------------------------- models
def _refuse_keras_distribution() -> None:
    """Keras applies `keras.distribution` (DataParallel, ModelParallel's LayoutMap) under its JAX backend
    only; under TensorFlow it is ignored and the model would run whole on one device, unsharded, while
    the user believes otherwise. So building an opt_tf model under one is an error that says what works."""
    distribution = keras.distribution.distribution()
    if distribution is not None:
        raise RuntimeError(
            f"keras.distribution is set ({type(distribution).__name__}), but Keras implements it for the JAX "
            "backend only: an opt_tf model would silently ignore it. For data parallelism use a tf.distribute "
            "strategy (opt_tf.training.TFTrainer(..., strategy=...), or `optkit train --backend tf --replicas N`); "
            "for a model larger than one device use opt_torch or opt_flax (the weights convert losslessly). "
            "keras.distribution.set_distribution(None) clears it.")


class TFOPTPreTrainedModel(TFModelMethods, TFPretrainedMixin, keras.Model):
    """Shared construction: config, dtype policy, building every variable up front, OPT's init.

    `dtype`: 'float32' (default), 'float16', 'bfloat16' (variables and compute in that dtype),
    'mixed_float16' / 'mixed_bfloat16' (float32 variables, half-precision compute) or a DTypePolicy.
    """

    head: Head = Head.BASE

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        self._build_now = kwargs.pop("_build", True)  # False: a head model builds us inside its scope
        self._init_now = kwargs.pop("_init", True)    # False: from_pretrained assigns every weight
        if not isinstance(config, OPTConfig):
            raise TypeError(f"config must be an OPTConfig, got {type(config).__name__}")
        _refuse_keras_distribution()
        super().__init__(dtype=resolve_policy(dtype), **kwargs)
        self._convert_input_args = False  # our call casts what it needs (masks, labels stay as given)
        self._allow_non_tensor_positional_args = True  # NumPy ids, or a dict of inputs from `fit`
        self.config = config
        self._seed = None if seed is None else check_seed(seed)

    def _finish(self) -> None:
        """Builds every variable under this model's name scope and initializes them."""
        if self._build_now:
            self.build()
            if self._init_now:
                self.init_weights(self._seed)

    def get_config(self) -> dict:
        return {"config": self.config.to_dict(), "dtype": self.dtype_policy.name, "name": self.name}

    def init_cache(self, batch_size: int, max_length: int, pads: int = 0) -> KVCache:
        """An empty KVCache in the model's compute dtype (see the module docstring)."""
        return init_cache(self.config, batch_size, max_length, self.compute_dtype, pads)

    @staticmethod
    def _unpack(input_ids, kwargs: dict):
        """Keras passes `x` whole: a dict of inputs is spread over the keyword arguments."""
        if isinstance(input_ids, Mapping):
            inputs = dict(input_ids)
            for key in list(inputs):
                if key != "input_ids" and kwargs.get(key) is None:
                    kwargs[key] = inputs.pop(key)
            input_ids = inputs.get("input_ids")
        return input_ids


class TFOPTModel(TFOPTPreTrainedModel):
    head = Head.BASE

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        super().__init__(config, dtype, seed, **kwargs)
        self.decoder = TFOPTDecoder(config, name="decoder", dtype=self.dtype_policy)
        self._finish()

    def build(self, input_shape=None):
        self.decoder.build()

    def get_input_embeddings(self) -> Embedding:
        return self.decoder.embed_tokens

    def call(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, use_cache=None, output_hidden_states=False, training=False,
             output_attentions=False, return_dict=None):
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  inputs_embeds=inputs_embeds, output_attentions=output_attentions)
        input_ids = self._unpack(input_ids, kw)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return returned(self.decoder(input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                                     training=training, **kw), return_dict)


class _TFOPTWithHead(TFOPTPreTrainedModel):
    """A head model: the base model under `model`, a head on its last hidden state."""

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        super().__init__(config, dtype, seed, **kwargs)
        self.model = TFOPTModel(config, dtype=self.dtype_policy, name="model", _build=False)

    def build(self, input_shape=None):
        self.model.build()
        for layer in self._head_layers():
            layer.build()

    def _head_layers(self) -> list:
        return []

    def get_input_embeddings(self) -> Embedding:
        return self.model.decoder.embed_tokens

    def _base(self, input_ids, *, use_cache, output_hidden_states, training, **kwargs):
        return self.model(input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                          training=training, **kwargs)

    # ------------------------------------------------------------------------- Keras fit / evaluate
    def loss_terms(self, outputs, *targets) -> list:
        """The head's loss on `outputs` as (total, count) terms (see the losses below)."""
        raise NotImplementedError

    @property
    def loss_inputs(self) -> tuple[str, ...]:
        """The inputs the head's loss reads (opt_spec.training.TASK_INPUTS)."""
        return next(TASK_INPUTS[task] for task, head in TASK_HEADS.items() if head == self.head)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras `fit` / `evaluate` / `train_on_batch`: the head's own loss, no `loss` in `compile` needed.

        Right under any tf.distribute strategy: each replica returns its share of the global batch's loss
        (`replica_share`), so N replicas take exactly one device's step on the whole batch. The targets
        come as `y` ((inputs, targets) data: a tensor, a tuple in `loss_inputs` order or a dict) or in
        a dict `x` of inputs."""
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__}: sample_weight is not supported; the loss weights every "
                             "target the head's rule counts alike")
        loss = replica_share(self.loss_terms(y_pred, *self._targets(x, y)))
        if self.losses:  # add_loss terms are whole-batch values on every replica: each adds 1/N of them
            ctx = tf.distribute.get_replica_context()
            loss = loss + tf.add_n(self.losses) / (ctx.num_replicas_in_sync if ctx is not None else 1)
        return loss

    def _targets(self, x, y) -> list:
        names = self.loss_inputs
        where = "y"
        if y is None:
            y, where = x, "x"
            if not isinstance(x, Mapping):
                raise ValueError(f"{type(self).__name__} needs its targets to learn: pass (inputs, targets) data "
                                 f"or a dict of inputs with {', '.join(names)}")
        if isinstance(y, Mapping):
            missing = [n for n in names if y.get(n) is None]
            if missing:
                raise ValueError(f"{type(self).__name__}: the data's {where} has no {', '.join(missing)} "
                                 f"(the loss reads {', '.join(names)})")
            return [y[n] for n in names]
        targets = list(y) if isinstance(y, (tuple, list)) else [y]
        if len(targets) != len(names):
            raise ValueError(f"{type(self).__name__}: {len(targets)} targets in y; the loss reads "
                             f"{len(names)} ({', '.join(names)})")
        return targets


class TFOPTForCausalLM(TFGenerationMixin, _TFOPTWithHead):
    head = Head.CAUSAL_LM

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        super().__init__(config, dtype, seed, **kwargs)
        # A tied head is the token embedding itself (no variable of its own).
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.word_embed_proj_dim, config.vocab_size, False, name="lm_head", dtype=self.dtype_policy)
        self._finish()

    def _head_layers(self) -> list:
        return [self.lm_head] if self.lm_head is not None else []

    def lm_logits(self, h: tf.Tensor) -> tf.Tensor:
        """The head on hidden states (..., E) -> (..., V); a tied head is the token embedding."""
        if self.lm_head is not None:
            return self.lm_head(h)
        embeddings = tf.cast(self.model.decoder.embed_tokens.embeddings, h.dtype)  # (V, E)
        return tf.matmul(h, embeddings, transpose_b=True)

    def call(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False, training=False,
             output_attentions=False, return_dict=None):
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions)
        input_ids = self._unpack(input_ids, kw)
        labels = kw.pop("labels")
        out = self._base(input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         training=training, **kw)
        logits = self.lm_logits(out.last_hidden_state)  # (B, T, E) -> (B, T, V)
        loss = None
        if labels is not None:
            labels = tf.convert_to_tensor(labels)
            B, T, V = _static(_dim(logits, 0), _dim(logits, 1), logits.shape[-1])
            check_labels(tuple(labels.shape), labels.dtype, B, T, V, _host_values(labels))
            loss = causal_lm_loss(logits, labels)
        return returned(CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                               hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)

    def loss_terms(self, outputs: CausalLMOutputWithPast, labels) -> list:
        return causal_lm_loss_terms(outputs.logits, labels)


class TFOPTForSequenceClassification(_TFOPTWithHead):
    head = Head.SEQUENCE_CLASSIFICATION

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        super().__init__(config, dtype, seed, **kwargs)
        self.num_labels = config.num_labels
        self.score = Linear(config.word_embed_proj_dim, config.num_labels, False, name="score",
                            dtype=self.dtype_policy)
        self._finish()

    def _head_layers(self) -> list:
        return [self.score]

    def call(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=False, training=False,
             output_attentions=False, return_dict=None):
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  inputs_embeds=inputs_embeds, labels=labels, output_attentions=output_attentions)
        input_ids = self._unpack(input_ids, kw)
        labels = kw.pop("labels")
        out = self._base(input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         training=training, **kw)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B, T = _dim(logits, 0), _dim(logits, 1)
        check_pooling(*_static(B), self.config.pad_token_id)
        if input_ids is not None and self.config.pad_token_id is not None:
            # the rightmost token that is not a pad (left or right padding alike)
            not_pad = tf.cast(tf.not_equal(tf.cast(input_ids, tf.int32), self.config.pad_token_id), tf.int32)
            last = tf.argmax(tf.range(T)[None, :] * not_pad, axis=-1, output_type=tf.int32)  # (B,)
        else:
            last = tf.fill([B], T - 1)
        pooled = tf.gather(logits, last, batch_dims=1)  # (B, num_labels)
        loss = None
        if labels is not None:
            labels = tf.convert_to_tensor(labels)
            check_classification_labels(tuple(labels.shape), labels.dtype, *_static(B), self.config,
                                        _host_values(labels))
            loss = sequence_classification_loss(pooled, labels, self.config)
        return returned(SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                         hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)

    def loss_terms(self, outputs: SequenceClassifierOutputWithPast, labels) -> list:
        return sequence_classification_loss_terms(outputs.logits, labels, self.config)


class TFOPTForQuestionAnswering(_TFOPTWithHead):
    head = Head.QUESTION_ANSWERING

    def __init__(self, config: OPTConfig, dtype=None, seed: int | None = None, **kwargs):
        super().__init__(config, dtype, seed, **kwargs)
        self.qa_outputs = Linear(config.word_embed_proj_dim, 2, True, name="qa_outputs", dtype=self.dtype_policy)
        self._finish()

    def _head_layers(self) -> list:
        return [self.qa_outputs]

    def call(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
             inputs_embeds=None, start_positions=None, end_positions=None, use_cache=None,
             output_hidden_states=False, training=False, output_attentions=False, return_dict=None):
        kw = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  inputs_embeds=inputs_embeds, start_positions=start_positions, end_positions=end_positions,
                  output_attentions=output_attentions)
        input_ids = self._unpack(input_ids, kw)
        start_positions, end_positions = kw.pop("start_positions"), kw.pop("end_positions")
        out = self._base(input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         training=training, **kw)
        logits = self.qa_outputs(out.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            start_positions, end_positions = tf.convert_to_tensor(start_positions), tf.convert_to_tensor(end_positions)
            for name, given in (("start_positions", start_positions), ("end_positions", end_positions)):
                check_span_positions(name, tuple(given.shape), given.dtype, *_static(_dim(logits, 0)))
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return returned(QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                     past_key_values=out.past_key_values,
                                                     hidden_states=out.hidden_states, attentions=out.attentions),
                        return_dict)

    def loss_terms(self, outputs: QuestionAnsweringModelOutput, start_positions, end_positions) -> list:
        return question_answering_loss_terms(outputs.start_logits, outputs.end_logits, start_positions,
                                             end_positions)


def returned(out, return_dict):
    """The output record, or with return_dict=False Hugging Face's tuple of its fields that are set."""
    return out.to_tuple() if return_dict is False else out


# ----------------------------------------------------------------------------------------- losses
# Every head's loss is a sum of means, and each mean is kept as its two parts, a term (total, count):
# the summed per-token (per-example, per-element) losses and how many there are. One batch's loss is
# sum(total / count) (`batch_mean`). Under a tf.distribute strategy each replica holds part of the global
# batch, and a mean of replica means is not the global mean when the replicas hold different numbers of
# real tokens; so in Keras `fit` each replica divides its own totals by the counts summed over every
# replica (`replica_share`). The shares add up to the global batch's loss, and Keras sums the replicas'
# gradients, so N replicas compute exactly the update one device computes on the whole batch.

def batch_mean(terms: list) -> tf.Tensor:
    """sum of total / max(count, 1) over (total, count) terms: the batch's loss (0 when nothing counts)."""
    return tf.add_n([total / tf.maximum(count, 1.0) for total, count in terms])


def replica_share(terms: list) -> tf.Tensor:
    """This replica's share of the global batch's loss: its totals over the counts of all replicas
    (the batch's own loss outside a strategy's replica context)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        counts = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [count for _, count in terms])
        terms = [(total, count) for (total, _), count in zip(terms, counts)]
    return batch_mean(terms)


def _cross_entropy(logits: tf.Tensor, target: tf.Tensor, keep: tf.Tensor) -> tuple:
    """(total, count) of float32 cross entropy of (N, C) logits against (N,) targets over rows where keep."""
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.where(keep, target, 0),
                                                        logits=tf.cast(logits, tf.float32))
    keep = tf.cast(keep, tf.float32)
    return tf.reduce_sum(ce * keep), tf.reduce_sum(keep)


def _elementwise(values: tf.Tensor) -> tuple:
    """(total, count) of a mean over every element."""
    return tf.reduce_sum(values), tf.cast(tf.size(values), tf.float32)


def causal_lm_loss_terms(logits: tf.Tensor, labels) -> list:
    """Cross entropy (float32) of logits[:, t] against labels[:, t + 1] over labels != IGNORE_INDEX."""
    V = logits.shape[-1]
    target = tf.reshape(tf.cast(labels, tf.int32)[:, 1:], [-1])
    return [_cross_entropy(tf.reshape(logits[:, :-1], [-1, V]), target, target != IGNORE_INDEX)]


def sequence_classification_loss_terms(pooled: tf.Tensor, labels, config: OPTConfig) -> list:
    """Mean squared error (regression), cross entropy per example (single label) or binary cross entropy
    per element (multi label), in float32."""
    labels = tf.convert_to_tensor(labels)
    problem = problem_type(config, labels.dtype.is_integer)
    pooled = tf.cast(pooled, tf.float32)  # (B, num_labels)
    if problem == "regression":
        if config.num_labels == 1:
            pooled, labels = tf.reshape(pooled, [-1]), tf.reshape(labels, [-1])
        return [_elementwise(tf.square(pooled - tf.cast(labels, tf.float32)))]
    if problem == "single_label_classification":
        target = tf.reshape(tf.cast(labels, tf.int32), [-1])
        return [_cross_entropy(tf.reshape(pooled, [-1, config.num_labels]), target, target != IGNORE_INDEX)]
    return [_elementwise(tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=pooled))]


def question_answering_loss_terms(start_logits, end_logits, start_positions, end_positions) -> list:
    """Half the start cross entropy plus half the end one; positions outside [0, T) are clamped to T
    and left out."""
    T = _dim(start_logits, 1)

    def half(logits, positions):
        positions = tf.clip_by_value(tf.reshape(tf.cast(positions, tf.int32), [-1]), 0, T)
        total, count = _cross_entropy(logits, positions, positions != T)
        return 0.5 * total, count  # halving is exact in float32: the same loss as (start + end) / 2

    return [half(start_logits, start_positions), half(end_logits, end_positions)]


def causal_lm_loss(logits: tf.Tensor, labels) -> tf.Tensor:
    return batch_mean(causal_lm_loss_terms(logits, labels))


def sequence_classification_loss(pooled: tf.Tensor, labels, config: OPTConfig) -> tf.Tensor:
    return batch_mean(sequence_classification_loss_terms(pooled, labels, config))


def question_answering_loss(start_logits, end_logits, start_positions, end_positions) -> tf.Tensor:
    return batch_mean(question_answering_loss_terms(start_logits, end_logits, start_positions, end_positions))


MODEL_CLASSES = {Head.BASE: TFOPTModel, Head.CAUSAL_LM: TFOPTForCausalLM,
                 Head.SEQUENCE_CLASSIFICATION: TFOPTForSequenceClassification,
                 Head.QUESTION_ANSWERING: TFOPTForQuestionAnswering}
