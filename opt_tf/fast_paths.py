"""What the TensorFlow backend does only for speed, kept out of modeling.py (which stays the plain reference).

Each fast path gives the same numbers as the plain way of writing it, is switched on only where it was
measured to help, and names the test that pins it.

1. The bias added as the subtraction of its negation (`add_bias`), on the CPU only.
   XLA's CPU compiler fuses an addition that follows a matrix-vector product (batch 1 decoding: one new
   token per row) into the product and then runs the fused product on one thread; a subtraction is left
   unfused, so the product stays a standalone, multithreaded dot. y - (-b) equals y + b bit for bit
   (negation is exact). Measured with bench/bench_generate.py (tf, 125m float32, 2-core CPU, batch 1):
   37 -> 54 tok/s when it was introduced; again with bench/bench_tf_fast_paths.py (on and off in one run,
   TF 2.21, a quiet machine): batch 1 54.3 vs 46.2 tok/s (1.17x), batch 8 217.1 vs 216.5 (1.00x). Never
   measured on a GPU (the GPU machine has no TensorFlow), so it is off wherever TensorFlow sees a GPU.
   Pinned by tests/test_tf.py::test_xla_matrix_vector_products_stay_unfused_and_exact (the optimized HLO
   keeps the dot unfused and the result is x @ kernel + bias bit for bit) and
   tests/test_tf.py::test_bias_subtraction_is_gated_and_changes_no_number (on and off give identical
   logits; the gate picks it on the CPU).
2. Training in bf16 on XLA's CPU backend (`f32_accumulated_dots`): the model's matrix products accumulated
   in float32. The math is the model's; only the XLA program that computes it changes.

   opt_tf.training applies this to the model it trains (`f32_accumulated_dots(model)`) when the train step
   is XLA-compiled on the CPU in bf16; the model file (opt_tf.modeling) is untouched. Found by timing the
   products of the 125m train step (batch 8 x 128) on a 2-core AMD EPYC with AVX512-BF16, TF 2.21, in CPU
   seconds (the machine was shared, so wall time was not):

   - A bfloat16 x bfloat16 -> bfloat16 product (what `tf.matmul` on bfloat16 tensors gives) is not one of
     XLA's CPU bf16 kernels: the compiler converts both operands to float32, multiplies in float32
     (~90 GFLOP per CPU second) and rounds the result to bfloat16. The same product asked for with a float32
     result (BatchMatMulV3 with Tout=float32, an HLO dot with bf16 operands and an f32 result) runs on the
     bf16 kernels: ~170 GFLOP per CPU second, the same numbers (products of bfloat16 values are exact in
     float32, and both accumulate in float32), then rounded to bfloat16 as before.
   - That kernel takes only products whose left operand contracts its last (contiguous) axis. A weight's
     gradient x^T @ dy contracts over the tokens, the first axis of x: XLA folds any transpose written
     before it back into the product, which then falls to the float32 path again. `materialize`d first (a
     cond that XLA's simplifier does not see through, as opt_flax.fast_paths does), x^T is a real
     (in, tokens) buffer (a bf16 copy of 1.5-6 MB per weight gradient) and the product runs on the bf16 kernel:
     90 -> 163 GFLOP per CPU second.

   A bias's gradient is the column sums of dy over the tokens (8 x 128). XLA's CPU backend rewrites that sum
   into a reduce-window over (8, 128, out) windows of 8 x 32 that it runs slowly when the bias is wide: in the
   step's profile fc1's (out 3072) took 2.3% of the op time (12.3 CPU ms each in isolation, 1.9 for the same sum
   over a 2-D (1024, 3072) operand, which XLA's simplifier folds back into the 3-D one). For a Linear wider
   than its input (fc1) the sums are one more row of the weight gradient's product instead,
   [x^T; 1] @ dy (in + 1, out), materialized with x^T: +0.5 CPU ms on the product instead of +11.5 for the
   sum. For the others the sum is cheap (768 wide: ~1 ms) and the extra row costs more (3072 -> 3073 rows:
   +3 ms), so they keep it. In the step's profile the fc1 sums' 2.3% became 0.2% (the materialized [x^T; 1]
   copy). Pinned with the rest by
   tests/test_tf_cpu_speed.py::test_f32_accumulated_products_give_the_models_forward_and_gradients (every
   variable's gradient, fc1's bias included).

   Every product of a Linear layer and of the tied LM head (forward, input gradient, weight gradient) is
   computed this way: inside `f32_accumulated_dots(model)`, which the trainer enters around its compiled
   step, `Linear.call` and `lm_logits` of that model instance are `linear` / `tied_logits` below. So are
   attention's own products (`TFOPTAttention.scores` q.k and `.mix` p.v: `attention_scores` / `attention_mix`),
   their gradients' transposed left operands (ds^T, p^T per head) materialized: micro-benchmark of one 125m
   layer's attention (8 x 12 heads x 128 x 64, forward + backward, softmax included) 46 -> 19 CPU ms; in the
   step's profile attention's products went from 3.6% of the op time to 1.3%. All of them compute what the
   model computes (results rounded to the compute dtype where the model rounds them; a weight's gradient
   rounded to bfloat16, as the gradient of the model's bf16 product is, then handed to the float32 master
   weight). 125m bf16 train step: 11.7 -> 6.7 CPU s. What remained then (an XLA profile of that step): the
   products ~64% of the op time, dropout's random bits ~8%, reductions ~5%, casts ~5%, the materializing
   conds and copies ~4%, attention's own (bf16-result) products ~4%. After the hashed dropout (3.), fc1's bias
   and attention's products (thunk profile, a machine at load ~4.5): the linear products 59%, the tied head's
   13%, casts of the float32 weights and logits 7%, materializing copies 6.5% (the tied head's float32
   (768, 50272) gradient transposed alone 1.2%), the optimizer and the global norm ~5%, the loss's softmax and
   its reduce-windows ~4%, dropout 0.4%.
3. Dropout masks from a counter hash (`dropout`), in the trainer's XLA-compiled step on the CPU (float32 and bf16).
   tf.nn.experimental.stateless_dropout draws its uniforms with Philox, which XLA's CPU backend runs as a
   called computation writing a uint32 buffer that a second pass turns into the mask: in an XLA profile of the
   125m bf16 train step (batch 8 x 128, 2-core AMD EPYC, TF 2.21) those two took 7.9% of the op time (36
   dropouts). Here each element's 32 random bits are a hash of its flat index keyed by the dropout's seed (two
   rounds of MurmurHash3's 32-bit finalizer), written as elementwise integer ops that XLA fuses into the
   multiplication by the mask: no buffer, no extra pass. Micro-benchmark (forward + backward, jit, same machine):
   an (8, 128, 768) bf16 dropout 349 -> 2.3 CPU ms, an (8, 12, 128, 128) float32 one 657 -> 4.0 CPU ms.
   An element is dropped when its bits are below round(rate * 2^32): the probability is the rate to 2^-33
   (stateless_dropout's uniforms have the mantissa of the input's dtype: 8 bits for bf16). The kept elements are
   scaled by 1 / (1 - rate) in the input's dtype, as stateless_dropout does. The masks are a function of (seed,
   shape), so a resumed run or a recomputed layer (gradient checkpointing) draws the same ones. They are not
   stateless_dropout's masks: the trainer enters `hashed_dropout()` around its compiled step only, so a model
   called outside it draws TF's. Pinned by tests/test_tf_cpu_speed.py::test_hashed_dropout_masks_are_random_and_exact
   (keep fraction, scale, independence across elements and seeds, same seed same mask, gradient is the mask) and
   ::test_the_trainer_draws_hashed_masks_in_its_compiled_step.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Optional

import keras
import tensorflow as tf

# True inside `hashed_dropout()`: `dropout` draws hashed masks. Read when a function is traced.
HASHED_DROPOUT = False

# None: decided by the device (bias_as_subtraction); True / False force it (tests, benchmarks). Read when a
# function is traced, so compiled functions keep the choice they were traced with.
BIAS_AS_SUBTRACTION: Optional[bool] = None


@functools.lru_cache(maxsize=None)
def _cpu_only() -> bool:
    """True when TensorFlow sees no GPU, so that it places every op on the CPU."""
    return not tf.config.list_logical_devices("GPU")


def bias_as_subtraction() -> bool:
    """Whether `add_bias` subtracts the negated bias: forced by BIAS_AS_SUBTRACTION, else on the CPU only."""
    return _cpu_only() if BIAS_AS_SUBTRACTION is None else BIAS_AS_SUBTRACTION


def add_bias(y: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """y + bias, as y - (-bias) where that keeps XLA's CPU products multithreaded (see the module docstring)."""
    if bias_as_subtraction():
        return y - tf.negative(bias)
    return y + bias


# ------------------------------------------------- bf16 training: products accumulated in float32
def enabled() -> bool:
    """These rewrites are for XLA's CPU backend (no GPU visible to TensorFlow)."""
    return not tf.config.list_physical_devices("GPU")


def materialize(x: tf.Tensor) -> tf.Tensor:
    """x computed into a buffer of its own: an identity that XLA's simplifier cannot fold into the product
    that reads it (both branches return x exactly; the second, taken only for a NaN first element, as x * 1:
    with two identical branches XLA drops the cond)."""
    first = tf.reshape(x, [-1])[0]
    return tf.cond(first == first, lambda: tf.identity(x), lambda: x * 1)


def _dot(a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
    """a (M, K) @ b (K, N) (or b (N, K) transposed) of bfloat16 operands, accumulated and returned in float32."""
    return tf.raw_ops.BatchMatMulV3(x=a, y=b, adj_y=transpose_b, Tout=tf.float32)


def _weight_gradient(x: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    """x (N, in), dy (N, out) -> x^T @ dy (in, out) float32, with x^T materialized (see the module docstring)."""
    return _dot(materialize(tf.transpose(x)), dy)


@tf.custom_gradient
def _product(x: tf.Tensor, kernel: tf.Tensor):
    """x (N, in) bfloat16 @ kernel (in, out) float32 -> (N, out) bfloat16, the kernel rounded to bfloat16 as
    the model's `tf.cast` does; products accumulated in float32."""
    w = tf.cast(kernel, x.dtype)
    y = tf.cast(_dot(x, w), x.dtype)

    def grad(dy):
        dx = tf.cast(_dot(dy, w, transpose_b=True), x.dtype)                          # (N, in)
        dw = tf.cast(tf.cast(_weight_gradient(x, dy), x.dtype), tf.float32)           # (in, out)
        return dx, dw

    return y, grad


@tf.custom_gradient
def _product_transposed(x: tf.Tensor, table: tf.Tensor):
    """x (N, E) bfloat16 @ table (V, E) float32, transposed -> (N, V) bfloat16 (the tied LM head)."""
    w = tf.cast(table, x.dtype)
    y = tf.cast(_dot(x, w, transpose_b=True), x.dtype)

    def grad(dy):
        dx = tf.cast(_dot(dy, w), x.dtype)                                            # (N, E)
        # table's gradient dy^T @ x (V, E), computed as (x^T @ dy)^T: x^T is the small buffer to materialize.
        dw = tf.transpose(tf.cast(tf.cast(_weight_gradient(x, dy), x.dtype), tf.float32))
        return dx, dw

    return y, grad


@tf.custom_gradient
def _product_and_bias(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor):
    """`_product` plus the bias (rounded to bfloat16 as the model's `tf.cast` does), whose gradient, the column
    sums of dy, is one more row of the weight gradient's product: [x^T; 1] @ dy (see the module docstring)."""
    w = tf.cast(kernel, x.dtype)
    y = add_bias(tf.cast(_dot(x, w), x.dtype), tf.cast(bias, x.dtype))

    def grad(dy):
        dx = tf.cast(_dot(dy, w, transpose_b=True), x.dtype)                          # (N, in)
        ones = tf.ones([1, tf.shape(x)[0]], x.dtype)
        both = _dot(materialize(tf.concat([tf.transpose(x), ones], 0)), dy)           # (in + 1, out)
        both = tf.cast(tf.cast(both, x.dtype), tf.float32)
        return dx, both[:-1], both[-1]

    return y, grad


def _swap_last(x: tf.Tensor) -> tf.Tensor:
    """(B, nh, M, N) -> (B, nh, N, M), materialized (the left operand of a gradient's product)."""
    return materialize(tf.transpose(x, (0, 1, 3, 2)))


@tf.custom_gradient
def _scores_product(q: tf.Tensor, k: tf.Tensor):
    """q (B, nh, T, hs) . k (B, nh, S, hs) -> (B, nh, T, S) bfloat16, accumulated in float32."""
    y = tf.cast(_dot(q, k, transpose_b=True), q.dtype)

    def grad(ds):                                                                     # ds (B, nh, T, S)
        return tf.cast(_dot(ds, k), q.dtype), tf.cast(_dot(_swap_last(ds), q), k.dtype)

    return y, grad


@tf.custom_gradient
def _mix_product(p: tf.Tensor, v: tf.Tensor):
    """p (B, nh, T, S) @ v (B, nh, S, hs) -> (B, nh, T, hs) bfloat16, accumulated in float32."""
    y = tf.cast(_dot(p, v), p.dtype)

    def grad(dy):                                                                     # dy (B, nh, T, hs)
        return tf.cast(_dot(dy, v, transpose_b=True), p.dtype), tf.cast(_dot(_swap_last(p), dy), v.dtype)

    return y, grad


def attention_scores(attention: "modeling.TFOPTAttention", q: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """`TFOPTAttention.scores` with the product accumulated in float32 (bfloat16 compute only)."""
    if q.dtype != tf.bfloat16:
        return type(attention).scores(attention, q, k)
    return tf.cast(_scores_product(q, tf.cast(k, q.dtype)), tf.float32)


def attention_mix(attention: "modeling.TFOPTAttention", probs: tf.Tensor, v: tf.Tensor, dtype) -> tf.Tensor:
    """`TFOPTAttention.mix` with the product accumulated in float32 (bfloat16 compute only)."""
    if dtype != tf.bfloat16:
        return type(attention).mix(attention, probs, v, dtype)
    return _mix_product(tf.cast(probs, dtype), tf.cast(v, dtype))


def _rows(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """x (..., K) -> (x as (N, K), the leading shape)."""
    lead = tf.shape(x)[:-1]
    return tf.reshape(x, [-1, x.shape[-1]]), lead


def linear(layer: "modeling.Linear", x: tf.Tensor) -> tf.Tensor:
    """`modeling.Linear.call` with the product accumulated in float32 (bfloat16 compute only)."""
    from . import modeling  # the model file imports this one

    if x.dtype != tf.bfloat16:
        return modeling.Linear.call(layer, x)
    rows, lead = _rows(x)
    shape = tf.concat([lead, [layer.out_dim]], 0)
    if layer.bias is not None and layer.out_dim > layer.in_dim:  # fc1: the bias's gradient from the product
        return tf.reshape(_product_and_bias(rows, layer.kernel, layer.bias), shape)
    y = tf.reshape(_product(rows, layer.kernel), shape)
    if layer.bias is None:
        return y
    return add_bias(y, tf.cast(layer.bias, layer.compute_dtype))  # as Linear.call


def tied_logits(model, h: tf.Tensor) -> tf.Tensor:
    """`TFOPTForCausalLM.lm_logits` of a tied head with the product accumulated in float32."""
    if h.dtype != tf.bfloat16:
        return type(model).lm_logits(model, h)
    rows, lead = _rows(h)
    table = model.model.decoder.embed_tokens.embeddings
    return tf.reshape(_product_transposed(rows, table), tf.concat([lead, [table.shape[0]]], 0))


@contextlib.contextmanager
def f32_accumulated_dots(model: keras.Model):
    """A context in which `model`'s Linear layers (and its tied LM head) call `linear` / `tied_logits`: on this
    instance only, for the functions traced inside it. Meant for XLA-compiled functions on the CPU (a bf16
    product with a float32 result, BatchMatMulV3, has no plain TensorFlow CPU kernel), so the trainer enters
    it around its compiled train step only; outside it the model is unchanged."""
    from . import modeling  # the model file imports this one

    sublayers = list(model._flatten_layers(include_self=False))
    layers = [layer for layer in sublayers if isinstance(layer, modeling.Linear)]
    attentions = [layer for layer in sublayers if isinstance(layer, modeling.TFOPTAttention)]
    tied = isinstance(model, modeling.TFOPTForCausalLM) and model.lm_head is None
    for layer in layers:
        layer.call = types.MethodType(linear, layer)
    for layer in attentions:
        layer.scores, layer.mix = types.MethodType(attention_scores, layer), types.MethodType(attention_mix, layer)
    if tied:
        model.lm_logits = types.MethodType(tied_logits, model)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.call
        for layer in attentions:
            del layer.scores, layer.mix
        if tied:
            del model.lm_logits


# ------------------------------------------------- dropout masks from a counter hash
def _mix(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection of uint32 whose every output bit depends on every input bit)."""
    def xorshift(h, k):
        return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(k, tf.uint32)))

    h = xorshift(h, 16) * tf.constant(0x85EBCA6B, tf.uint32)
    h = xorshift(h, 13) * tf.constant(0xC2B2AE35, tf.uint32)
    return xorshift(h, 16)


def hashed_bits(shape, seed: tf.Tensor) -> tf.Tensor:
    """uint32 random bits of `shape`: each element's flat index hashed with the 64-bit key folded from `seed`
    (the int64 pair stateless ops take)."""
    words = tf.reshape(tf.bitcast(tf.cast(seed, tf.int64), tf.uint32), [4])  # two int64 -> four uint32
    key0 = tf.bitwise.bitwise_xor(words[0], words[2])
    key1 = tf.bitwise.bitwise_xor(words[1], words[3])
    index = tf.bitcast(tf.range(tf.reduce_prod(shape), dtype=tf.int32), tf.uint32)
    bits = _mix(tf.bitwise.bitwise_xor(_mix(tf.bitwise.bitwise_xor(index, key0)), key1))
    return tf.reshape(bits, shape)


def dropout(x: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """tf.nn.experimental.stateless_dropout(x, rate, seed); inside `hashed_dropout()` with a hashed mask
    (see the module docstring)."""
    size = x.shape.num_elements()  # None for a dynamic shape (Keras fit): int32 indices reach 2^31 elements
    if not HASHED_DROPOUT or size is not None and size >= 2**31:
        return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)
    drop_below = tf.constant(min(round(rate * 2**32), 2**32 - 1), tf.uint32)
    keep = hashed_bits(tf.shape(x), seed) >= drop_below
    return tf.where(keep, x * tf.constant(1 / (1 - rate), x.dtype), tf.zeros_like(x))


@contextlib.contextmanager
def hashed_dropout():
    """A context in which the model's dropouts (functions traced inside it) draw hashed masks (`dropout`)."""
    global HASHED_DROPOUT
    before, HASHED_DROPOUT = HASHED_DROPOUT, True
    try:
        yield
    finally:
        HASHED_DROPOUT = before


@contextlib.contextmanager
def xla_cpu_training(model: keras.Model, bf16: bool):
    """What opt_tf.training enters around its XLA-compiled train step on the CPU: hashed dropout masks and, in
    bf16, the products accumulated in float32."""
    with hashed_dropout(), f32_accumulated_dots(model) if bf16 else contextlib.nullcontext():
        yield model
