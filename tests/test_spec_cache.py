"""The cache contract's NumPy reference (opt_spec.cache): what every backend's KVCache is checked against."""

import numpy as np
import pytest

from opt_spec.cache import KVCache, cache_mask_width, refuse_legacy_cache
from opt_spec.numerics import attention_allowed


def test_dynamic_and_preallocated_caches_attend_alike():
    """Step by step, the preallocated cache's keys/values and allowed pattern equal the dynamic cache's on the
    written slots, and no query sees an unwritten slot."""
    rng = np.random.default_rng(0)
    dynamic, fixed = KVCache(2), KVCache(2, capacity=9)
    for T in (4, 1, 3):
        k, v = rng.normal(size=(2, 3, T, 5)), rng.normal(size=(2, 3, T, 5))
        mask = (rng.random((2, dynamic.length + T)) > 0.2).astype(np.int64)
        for layer in range(2):
            kd, vd = dynamic.update(layer, k, v)
            kf, vf = fixed.update(layer, k, v)
            n = dynamic.length + T
            assert kd.shape[2] == n and kf.shape[2] == 9
            np.testing.assert_array_equal(kf[:, :, :n], kd)
            np.testing.assert_array_equal(vf[:, :, :n], vd)
        seen_d = attention_allowed(dynamic.attention_mask(mask, T), T)
        seen_f = attention_allowed(fixed.attention_mask(mask, T), T, query_start=fixed.length)
        np.testing.assert_array_equal(seen_f[..., :n], seen_d)
        assert not seen_f[..., n:].any()
        dynamic.advance(T)
        fixed.advance(T)
    assert dynamic.length == fixed.length == 8


def test_mask_width_rule_refuses_in_words():
    assert cache_mask_width(6, 4, 2, None) == 6
    assert cache_mask_width(6, 4, 2, 8) == 8 and cache_mask_width(8, 4, 2, 8) == 8
    with pytest.raises(ValueError, match=r"covers 5 positions; with a cache it must cover 6 \(past 4 \+ new 2\)"):
        cache_mask_width(5, 4, 2, 8)
    with pytest.raises(ValueError, match="holds 8 tokens: 7 written and 2 new do not fit"):
        cache_mask_width(9, 7, 2, 8)
    # a traced write position (jit, tf.function): only the capacity can be checked; a dynamic cache's mask is
    # taken as past + new
    assert cache_mask_width(8, None, None, 8) == 8 and cache_mask_width(5, None, None, None) == 5
    with pytest.raises(ValueError, match="length is traced .* must cover the cache's capacity 8"):
        cache_mask_width(6, None, None, 8)
    with pytest.raises(TypeError, match="not a tuple of"):
        refuse_legacy_cache(((np.zeros(1), np.zeros(1)),))
