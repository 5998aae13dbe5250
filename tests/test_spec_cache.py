"""The cache contract's NumPy reference (opt_spec.cache): what every backend's KVCache is checked against."""

import numpy as np
import pytest

from opt_spec.cache import KVCache, cache_mask_width, check_capacity, pad_slots, refuse_legacy_cache
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


def test_a_cache_fits_the_position_table():
    check_capacity(40, 40)
    check_capacity(np.int64(1), 40)
    with pytest.raises(ValueError, match="cache of 41 tokens is longer than the model's max_position_embeddings=40"):
        check_capacity(41, 40)
    check_capacity(45, 40, pads=5)  # left-padded prompts' pads take slots, not positions
    with pytest.raises(ValueError, match="cache of 46 tokens is longer than the model's max_position_embeddings=40 "
                                         "and 5 pads"):
        check_capacity(46, 40, pads=5)
    assert (pad_slots(30, 10, 40), pad_slots(30, 12, 40), pad_slots(3, 4, 40)) == (0, 2, 0)
    for bad in (0, -3, 2.0, True, "8"):
        with pytest.raises(ValueError, match="capacity must be an int >= 1"):
            check_capacity(bad, 40)


@pytest.mark.parametrize("backend", ["torch", "tf", "flax"])
def test_every_backend_sizes_its_cache_by_the_spec_rule(backend):
    """Each backend's preallocated cache asks check_capacity, so all three refuse alike and in its words."""
    from opt_spec.testing import VARIANTS

    config = VARIANTS["pre_ln"]
    P = config.max_position_embeddings
    if backend == "torch":
        from opt_torch.cache import KVCache as TorchCache

        build = lambda n: TorchCache(config, 1, capacity=n)  # noqa: E731
    elif backend == "tf":
        from opt_tf.modeling import init_cache

        build = lambda n: init_cache(config, 1, n)  # noqa: E731
    else:
        from opt_flax import FlaxOPTForCausalLM

        init = FlaxOPTForCausalLM.from_config(config, seed=0).init_cache
        build = lambda n: init(1, n)  # noqa: E731
    build(P)
    for n, words in ((P + 1, f"cache of {P + 1} tokens is longer"), (0, "capacity must be an int >= 1")):
        with pytest.raises(ValueError, match=words):
            build(n)
