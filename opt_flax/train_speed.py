"""Training speed, Flax: the causal-LM loss of the train step in a form XLA's CPU backend runs in fewer passes.

opt_flax.modeling.causal_lm_loss takes log_softmax of logits[:, :-1] cast to float32 and picks each
target with take_along_axis. In the compiled 125m bf16 train step (bench/bench_train.py, batch 8 x
128; jax.profiler trace, 2-core AVX512-BF16 CPU) that costs: a float32 copy of the sliced logits
(8 x 127 x 50272, 204 MB: `pad_convert_fusion`), and in the backward a zero buffer of that size
(`wrapped_broadcast`, 2% of the op time by itself) into which the pick's gradient is scattered before
log_softmax's gradient reads it again. `causal_lm_loss` here computes the same number as
logsumexp(logits) - logits[target] over all T positions, the target picked by comparison with an
iota (a select, whose gradient is elementwise), the labels shifted instead of the logits and the
last position masked: the float32 cast fuses into the reductions and the backward is one
elementwise pass producing the bf16 gradient of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from opt_spec.numerics import IGNORE_INDEX


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean float32 cross entropy of logits[:, t] (B, T, V) against labels[:, t + 1] (B, T), skipping
    IGNORE_INDEX: opt_flax.modeling.causal_lm_loss's value (0, with zero gradients, when nothing is kept:
    opt_spec.numerics's rule)."""
    B, T, V = logits.shape
    target = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    target = target.astype(jnp.int32)  # (B, T): the next token, IGNORE_INDEX after the last
    kept = (target != IGNORE_INDEX).astype(jnp.float32)
    x = logits.astype(jnp.float32)
    top = lax.stop_gradient(x.max(axis=-1, keepdims=True))  # (B, T, 1)
    lse = jnp.log(jnp.exp(x - top).sum(axis=-1)) + top[..., 0]  # (B, T)
    vocab = lax.broadcasted_iota(jnp.int32, (1, 1, V), 2)
    picked = jnp.where(vocab == target[..., None], x, 0.0).sum(axis=-1)  # (B, T): logits[target], 0 if ignored
    return ((lse - picked) * kept).sum() / jnp.maximum(kept.sum(), 1.0)
