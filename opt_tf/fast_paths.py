"""What the TensorFlow backend does only for speed, kept out of modeling.py (which stays the plain reference).

Each fast path gives the same numbers as the plain way of writing it, is switched on only where it was
measured to help, and names the test that pins it.

1. The bias added as the subtraction of its negation (`add_bias`), on the CPU only.
   XLA's CPU compiler fuses an addition that follows a matrix-vector product (batch 1 decoding: one new
   token per row) into the product and then runs the fused product on one thread; a subtraction is left
   unfused, so the product stays a standalone, multithreaded dot. y - (-b) equals y + b bit for bit
   (negation is exact). Measured with bench/bench_generate.py (tf, 125m float32, 2-core CPU, batch 1):
   37 -> 54 tok/s when it was introduced; again by bench/bench_tf_fast_paths.py (on and off in one run,
   the shared machine at load ~20): batch 1 7.9 vs 5.5 tok/s (1.43x), batch 8 19.6 vs 22.6 (0.87x); a
   second run at load ~6: batch 1 23.9 vs 25.7 (0.93x), batch 8 80.0 vs 83.1 (0.96x). Two noisy runs that
   disagree: whether it still helps with this TensorFlow is not settled (re-measure on a quiet machine
   before keeping or dropping it). Never measured on a GPU (the GPU machine has no TensorFlow), so it is
   off wherever TensorFlow sees a GPU.
   Pinned by tests/test_tf.py::test_xla_matrix_vector_products_stay_unfused_and_exact (the optimized HLO
   keeps the dot unfused and the result is x @ kernel + bias bit for bit) and
   tests/test_tf.py::test_bias_subtraction_is_gated_and_changes_no_number (on and off give identical
   logits; the gate picks it on the CPU).
"""

from __future__ import annotations

import functools
from typing import Optional

import tensorflow as tf

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
