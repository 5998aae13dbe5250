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
  Measured: bench/bench_generate.py-shaped run (125m float32, 16-token prompt, 64 new tokens, batch 1),
  MEASURED_SQUEEZE.
  Pinned by tests/test_flax_generation.py::test_batch_of_one_loop_copies_each_cache_buffer_at_most_once
  (the compiled loop's copies of cache buffers) and ::test_batch_of_one_matches_torch (the tokens).
"""

from __future__ import annotations

import jax

from .modeling import KVCache


def enabled() -> bool:
    """These rewrites are for XLA's CPU backend (a GPU would pay a host round trip per lax.cond)."""
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
