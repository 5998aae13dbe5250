"""What the Flax backend does only for speed, each with its measured reason and the test that pins it.

opt_flax.modeling holds the plain modules; the programs built on them (generation, the trainer) apply
these rewrites, which keep the math. Each is switched on only where it was measured to help (`enabled()`:
XLA's CPU backend; none was measured on a GPU, where they are off).

- `loop_cache` / `model_cache` (opt_flax.generation's compiled decode loop, batch 1): the KV cache carried
  by the while_loop without its batch axis, (nh, S, hs). XLA's CPU compiler drops a size-1 axis from the
  attention products' operands, so a (1, nh, S, hs) carry gives the cache update two consumers of different
  shapes, and XLA then copied every buffer four times per step (~2 ms of a 125m step). Carried in the
  products' shape, one copy per buffer remains, onto its own storage (the loop's copy time fell from 124 to
  2 ms per 64 tokens). At batch > 1 nothing is copied and the carry keeps the model's shape.
  Re-measured when it moved here (the compiled loop of a tiny pre_ln model, 2 layers, batch 1, jax 0.10.2 on
  the CPU): 4 copies of cache buffers per step squeezed, 16 carried as (1, nh, S, hs), for 4 buffers.
  Pinned by tests/test_flax_generation.py::test_batch_of_one_loop_copies_each_cache_buffer_at_most_once
  (the compiled loop's copies of cache buffers) and ::test_batch_of_one_matches_torch (the tokens).

Training on XLA's CPU backend (opt_flax.training applies these when `enabled()`); each was found by
profiling the 125m train step (bench/bench_train.py: batch 8 x 128, AdamW; a 2-core AMD EPYC with
AVX512-BF16, jax 0.10.2) and measured in CPU seconds of the compiled value_and_grad, the variants
interleaved in one process (the machine was shared, so wall time was not):

- `materialized_layers()`: XLA's CPU fusion copies cheap elementwise producers into every consumer.
  The residual stream and its gradient are chains of adds through all the layers, so every transpose
  in the backward pass (a kernel's gradient contracts over tokens, which XLA's dot library takes only
  after a copy) recomputed the gradient from the top layer down: 157 copy fusions with up to ~200
  inputs, 23% of the op time. Each decoder layer's input now passes through `materialize`, an identity
  as a lax.cond that fusion cannot cross (lax.optimization_barrier is dropped by the CPU pipeline
  before fusion); its gradient is a cond too. float32: 14.7 -> 10.9 CPU s per value_and_grad (the
  results move by float32 rounding only: XLA fuses, so rounds, a little differently around a cond).
- `f32_accumulated_dots(fn)`: a bfloat16 dot_general with a bfloat16 result runs on XLA's generic dot
  (~75 GFLOP per CPU second); the same product accumulated into float32 and then rounded to bfloat16
  runs on the bf16 kernels (~145). `fn`'s jaxpr, backward pass included, is evaluated with every such
  dot rewritten that way (bf16 mixed precision only; a float32 model has none).
- `f32_accumulated(fn)`: the above, and every bfloat16 reduce_sum computed in float32 and rounded once. The
  backward of a bf16 bias add (and LayerNorm's) is a lax.reduce_sum of bf16 values over the tokens, which XLA's
  CPU backend runs as a tree of reduce-windows that round the running sum to bfloat16 after every add: slow
  (234 reduce-window fusions, 4.7-5.4% of the op time of the 125m bf16 step, each 1024-token sum ~20 ms in the
  trace) and inexact (1024 gradients of 3.0 summed to 3744; float32 accumulation gives 3072, as jnp.sum and
  torch do). CPU seconds per step, interleaved, load ~6: 6.74 -> 6.66 (within the noise); kept for the sums.
  Pinned by tests/test_flax_cpu_speed.py (identity and gradients of `materialize`, one cond per layer,
  the loss and gradients unchanged; every bf16 product rewritten, the same results as a float32-accumulated
  product; no bf16 sum left in the bf16 step, a sum exact to one rounding) and tests/test_flax_training.py (the
  trainer's steps).
- `causal_lm_loss(logits, labels)` (the trainer's causal-LM loss): opt_flax.modeling.causal_lm_loss takes
  log_softmax of logits[:, :-1] cast to float32 and picks each target with take_along_axis. In the compiled 125m
  bf16 train step (bench/bench_train.py, batch 8 x 128; jax.profiler trace, 2-core AVX512-BF16 CPU) that costs:
  a float32 copy of the sliced logits (8 x 127 x 50272, 204 MB: `pad_convert_fusion`), and in the backward a
  zero buffer of that size (`wrapped_broadcast`, 2% of the op time by itself) into which the pick's gradient is
  scattered before log_softmax's gradient reads it again. `causal_lm_loss` here computes the same number as
  logsumexp(logits) - logits[target] over all T positions, the target picked by comparison with an iota (a
  select, whose gradient is elementwise), the labels shifted instead of the logits and the last position masked:
  the float32 cast fuses into the reductions and the backward is one elementwise pass producing the bf16
  gradient of the logits.
  Pinned by tests/test_flax_train_speed.py (value and gradient equal the model's loss and the spec's NumPy
  loss, float32 and bf16, ignored labels, 0 with zero gradients over nothing).
- `value_and_grad_lookup_into_head(loss, dtype)` (the trainer's gradients when the head is the token embedding):
  the table gets two gradients, the head's (a product, a fresh 50272 x 768 float32 buffer) and the lookup's
  (a scatter-add). Plain autodiff scatters the lookup's into a zero buffer of the table's size and adds the two:
  in the 125m bf16 step a 154 MB zero fill (`wrapped_broadcast`, 175 ms in a one-core trace, mostly first
  touches of fresh pages: XLA's CPU runtime maps its 1.84 GB of temporaries anew every step, 449k page faults,
  ~1 s of system time) and a pass over three table-sized buffers. Here the lookup reads the table through
  stop_gradient plus a zero (B, T, E) input; that input's gradient is scatter-added into the head's gradient in
  place. CPU s per step, interleaved in one process (load 5-6): 6.49 -> 6.23, page faults 449k -> 412k, wall
  10.09 -> 9.54 s. float32: the same gradients exactly; bf16: the table's gradient is not rounded to bf16
  before its cast to float32 (< 1 bf16 ulp apart).
  Pinned by tests/test_flax_train_speed.py (loss and every gradient equal plain autodiff's, float32 and bf16,
  with pad tokens and repeated tokens; no table-sized zero buffer in its jaxpr).
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Literal
from jax.extend.core.primitives import cond_p, dot_general_p, reduce_sum_p

from opt_spec.numerics import IGNORE_INDEX

from .modeling import Embed, KVCache, OPTDecoderLayer


def enabled() -> bool:
    """These rewrites are for XLA's CPU backend, where they were measured (a GPU would pay a host round trip
    per lax.cond)."""
    return jax.default_backend() == "cpu"


# ------------------------------------------------------------------------ the decode loop's cache
def loop_cache(cache: KVCache) -> KVCache:
    """The cache as the compiled decode loop carries it: at batch 1 on the CPU without the batch axis,
    (nh, S, hs) per buffer; otherwise as it is."""
    if cache.batch_size != 1 or not enabled():
        return cache
    return KVCache([k[0] for k in cache.keys], [v[0] for v in cache.values], cache.length)


def model_cache(cache: KVCache) -> KVCache:
    """The inverse of loop_cache: the model's (B, nh, S, hs) buffers."""
    if cache.keys[0].ndim == 4:
        return cache
    return KVCache([k[None] for k in cache.keys], [v[None] for v in cache.values], cache.length)


# ------------------------------------------------------------------------- materialized layers
def materialize(x: jax.Array) -> jax.Array:
    """x, computed once into its own buffer: an identity that XLA's fusion does not see through.
    Both branches return x exactly (the second, taken only for a NaN first element, as x * 1: with
    two identical branches XLA drops the cond); its derivative is the same kind of cond on the gradient."""
    first = x.reshape(-1)[0]
    return lax.cond(first == first, lambda y: y, lambda y: y * 1, x)


def _materialize_layer_input(next_fun, args, kwargs, context):
    if isinstance(context.module, OPTDecoderLayer) and context.method_name == "__call__" and args:
        args = (materialize(args[0]), *args[1:])
    return next_fun(*args, **kwargs)


def materialized_layers(on: bool = True):
    """A context in which every OPTDecoderLayer's input (B, T, H) is `materialize`d (flax method
    interception: it applies to module.apply calls traced inside it)."""
    return nn.intercept_methods(_materialize_layer_input) if on else contextlib.nullcontext()


# ------------------------------------------------------------------------ f32-accumulated dots
def f32_accumulated_dots(fn, sums: bool = False):
    """`fn` with every bfloat16-result dot_general computed as a float32-accumulated product rounded
    to bfloat16 (for use under jit; the function is traced once per input shapes); with `sums`, every
    bfloat16 reduce_sum too (`f32_accumulated`)."""

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval(closed, jax.tree_util.tree_leaves(args), sums)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return wrapped


def f32_accumulated(fn):
    """`fn` with every bfloat16 product (`f32_accumulated_dots`) and every bfloat16 sum accumulated in
    float32 and rounded once to bfloat16: the bf16 train step's rewrite (see the module docstring)."""
    return f32_accumulated_dots(fn, sums=True)


def _bf16_result(eqn) -> bool:
    return (eqn.primitive is dot_general_p and eqn.outvars[0].aval.dtype == jnp.bfloat16
            and eqn.params.get("preferred_element_type") in (None, jnp.bfloat16))


def _bf16_sum(eqn) -> bool:
    return eqn.primitive is reduce_sum_p and eqn.invars[0].aval.dtype == jnp.bfloat16


def _eval(closed: ClosedJaxpr, args, sums: bool = False) -> list:
    """Evaluate a closed jaxpr, rewriting bf16-result dots (and with `sums` bf16 reduce_sums); calls are
    inlined and cond branches rewritten, so the dots of the backward pass (inside them or not) are reached too."""
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        params = eqn.params
        if _bf16_result(eqn):
            out = dot_general_p.bind(*invals, **dict(params, preferred_element_type=jnp.float32))
            outs = [lax.convert_element_type(out, jnp.bfloat16)]
        elif sums and _bf16_sum(eqn):  # as jnp.sum does: float32 accumulation, one rounding
            out = reduce_sum_p.bind(lax.convert_element_type(invals[0], jnp.float32), **params)
            outs = [lax.convert_element_type(out, jnp.bfloat16)]
        elif eqn.primitive is cond_p:
            index, *operands = invals
            branches = [functools.partial(_eval_branch, b, sums) for b in params["branches"]]
            outs = lax.switch(index, branches, *operands)
        elif (sub := _called_jaxpr(eqn)) is not None:  # jit, custom_jvp_call, closed_call, ...: inlined
            outs = _eval(sub, invals, sums)
        else:
            outs = eqn.primitive.bind(*invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _eval_branch(closed: ClosedJaxpr, sums: bool, *operands):
    return _eval(closed, operands, sums)


_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}


def _called_jaxpr(eqn) -> ClosedJaxpr | None:
    """The jaxpr a call-like equation runs on its operands as they are (None for anything else)."""
    key = _CALLS.get(eqn.primitive.name)
    sub = eqn.params.get(key) if key else None
    if sub is None:
        return None
    return sub if isinstance(sub, ClosedJaxpr) else ClosedJaxpr(sub, ())


# ---------------------------------------------------------------------------- the causal-LM loss
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


# ------------------------------------------------------------------- the tied embedding's gradient
def value_and_grad_lookup_into_head(loss, dtype):
    """jax.value_and_grad(loss) for a model whose token embedding is also its head (tied): loss(params, batch,
    key) -> (value, gradients), the same numbers. The lookup's part of the embedding's gradient is
    scatter-added into the head's part, instead of into a zero buffer the size of the table that is then
    added to it: the lookup reads the table through stop_gradient and adds a zero (B, T, E) input of the
    compute dtype `dtype`, whose gradient is the lookup's cotangent (zero at pad tokens: the model's rule)."""

    def value_and_grad(params, batch, key):
        ids = batch["input_ids"]  # (B, T)
        path = _embed_tokens_path(params)
        table = _at(params, path)["embedding"]  # (V, E) float32

        def lookup(next_fun, args, kwargs, context):
            module = context.module
            if not (isinstance(module, Embed) and module.path == path and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            frozen = lax.stop_gradient(module.embedding).astype(module.dtype)  # nn.Embed's lookup, no gradient
            return jnp.take(frozen, args[0], axis=0) + zero

        def with_zero(params, delta):
            nonlocal zero
            zero = delta
            with nn.intercept_methods(lookup):
                return loss(params, batch, key)

        zero = None
        value, (grads, lookup_grad) = jax.value_and_grad(with_zero, argnums=(0, 1))(
            params, jnp.zeros(ids.shape + table.shape[-1:], dtype))
        rows = lookup_grad.reshape(-1, table.shape[-1]).astype(table.dtype)  # (B * T, E)
        head = _at(grads, path)["embedding"]
        return value, _replace(grads, path, {"embedding": head.at[ids.reshape(-1)].add(rows)})

    return value_and_grad


def _embed_tokens_path(params) -> tuple:
    """The path of the (only) `embed_tokens` module in a parameter tree."""
    found = [tuple(str(getattr(k, "key", k)) for k in keys[:-1])
             for keys, _ in jax.tree_util.tree_leaves_with_path(params) if len(keys) > 1
             and getattr(keys[-2], "key", None) == "embed_tokens" and getattr(keys[-1], "key", None) == "embedding"]
    if len(found) != 1:
        raise ValueError(f"expected one embed_tokens table in the parameters, found {len(found)}")
    return found[0]


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree, path, value):
    """A copy of the nested dict `tree` with tree[path] = value."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}
