"""The Flax backend: parameter paths, parity with opt_torch (eager and jit), the KV cache, checkpoints,
dtypes, dropout, losses, input errors, import isolation, and Hugging Face's FlaxOPTForCausalLM.

Every test here runs with jax_numpy_dtype_promotion="strict" (no silent dtype promotion).
"""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from opt_flax import (FlaxOPTForCausalLM, FlaxOPTForQuestionAnswering, FlaxOPTForSequenceClassification, FlaxOPTModel,
                      KVCache, canonical_to_params, params_to_canonical)
from opt_flax.modeling import MODULE_CLASSES
from opt_flax.pretrained import MODEL_CLASSES as FLAX_CLASSES
from opt_spec import WeightMismatchError, tied_source, weight_table
from opt_spec import io as spec_io
from opt_spec.layouts import native_path, native_shape
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch.modeling import MODEL_CLASSES as TORCH_CLASSES

from .conftest import HEADS, max_abs_diff

TOL = 1e-5  # float32 parity with opt_torch and Hugging Face


@pytest.fixture(autouse=True)
def strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def test_dtype_promotion_is_strict():
    with pytest.raises(jax.errors.JaxTypeError if hasattr(jax.errors, "JaxTypeError") else Exception):
        jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.bfloat16)


def write_checkpoint(path, config, head="causal_lm", seed=0):
    spec_io.save_safetensors_dir(path, random_weights(config, head, seed), config.to_dict())
    return path


def main_output(out):
    for field in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, field, None)
        if value is not None:
            return np.asarray(value.detach() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
    raise AssertionError(f"no output in {out!r}")


def real_positions(output, mask):
    """The mask when the output is per token (B, T, ...), else None (pooled outputs)."""
    return mask if output.ndim >= 2 and output.shape[:2] == mask.shape else None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight Hugging Face directory per (variant, head), written once."""
    made = {}

    def get(name, head="causal_lm"):
        if (name, head) not in made:
            made[name, head] = write_checkpoint(tmp_path_factory.mktemp(f"{name}-{head}"), VARIANTS[name], head)
        return made[name, head]

    return get


# ----------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_param_paths_are_native_paths(name, head):
    config = VARIANTS[name]
    module = MODULE_CLASSES[head](config)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)["params"]  # allocates nothing
    got = {".".join(k.key for k in path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    tied = tied_source(config, head)
    want = {".".join(native_path(s, "flax")): native_shape(s, "flax")
            for s in weight_table(config, head) if s.name not in tied}
    assert got == want


def test_from_config_initializes_like_opt():
    config = VARIANTS["pre_ln"].replace(init_std=0.05)
    model = FlaxOPTForCausalLM.from_config(config, seed=0)
    dec = model.params["model"]["decoder"]
    emb = np.asarray(dec["embed_tokens"]["embedding"])
    assert np.all(emb[config.pad_token_id] == 0)
    assert abs(float(emb.std()) - 0.05) < 0.01
    layer = dec["layers"]["0"]
    assert np.all(np.asarray(layer["fc1"]["bias"]) == 0)
    assert np.all(np.asarray(layer["self_attn_layer_norm"]["scale"]) == 1)
    assert abs(float(np.asarray(layer["fc1"]["kernel"]).std()) - 0.05) < 0.01
    assert "lm_head" not in model.params  # tied: the logits use the embedding
    again = FlaxOPTForCausalLM.from_config(config, seed=0)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                         model.params, again.params))


# ------------------------------------------------------------------------------ parity with torch
@pytest.fixture(scope="module")
def torch_reference(checkpoint):
    """opt_torch's main output on the left-padded batch of 3, per (variant, head), computed once."""
    done = {}

    def get(name, head):
        if (name, head) not in done:
            ids, mask = random_batch(VARIANTS[name])
            model = TORCH_CLASSES[head].from_pretrained(checkpoint(name, head))
            with torch.no_grad():
                done[name, head] = main_output(model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()))
        return done[name, head]

    return get


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_matches_torch_eager(checkpoint, torch_reference, name, head):
    ids, mask = random_batch(VARIANTS[name])  # left-padded batch of 3
    expected = torch_reference(name, head)
    model = FLAX_CLASSES[head].from_pretrained(checkpoint(name, head))
    assert max_abs_diff(main_output(model(ids, mask)), expected, real_positions(expected, mask)) <= TOL


# Compiling costs ~2 s a model on this machine: every variant with the LM head and every head on the
# 350m-like variant by default, the rest of the matrix with the slow tests.
JIT_BY_DEFAULT = {(n, "causal_lm") for n in VARIANTS} | {("post_ln_proj", h) for h in HEADS}


@pytest.mark.parametrize("name, head", [
    pytest.param(n, h, marks=() if (n, h) in JIT_BY_DEFAULT else pytest.mark.slow)
    for h in HEADS for n in sorted(VARIANTS)])
def test_matches_torch_under_jit(checkpoint, torch_reference, name, head):
    ids, mask = random_batch(VARIANTS[name])
    expected = torch_reference(name, head)
    model = FLAX_CLASSES[head].from_pretrained(checkpoint(name, head))
    forward = jax.jit(lambda p, i, m: model(i, m, params=p))
    got = main_output(forward(model.params, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_abs_diff(got, expected, real_positions(expected, mask)) <= TOL


def test_module_apply_under_jit_equals_wrapper(checkpoint):
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj"))
    ids, mask = random_batch(model.config)
    apply = jax.jit(lambda p, i, m: model.module.apply({"params": p}, i, m).logits)
    assert max_abs_diff(apply(model.params, ids, mask), model(ids, mask).logits) <= TOL  # XLA fuses: not bitwise


def test_left_padding_leaves_real_tokens_unchanged(checkpoint):
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj"))
    ids, mask = random_batch(model.config, left_pad=(0, 3, 5))
    padded = np.asarray(model(ids, mask).logits)
    for row, pads in ((1, 3), (2, 5)):
        alone = np.asarray(model(ids[row:row + 1, pads:]).logits)
        assert max_abs_diff(padded[row:row + 1, pads:], alone) <= TOL


# -------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("pre_ln", "post_ln_proj", "no_bias")
                                                else pytest.mark.slow) for n in sorted(VARIANTS)])
def test_cached_decoding_equals_full_forward(checkpoint, name):
    config = VARIANTS[name]
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint(name))
    ids, mask = random_batch(config, length=10)
    full = np.asarray(model(ids, mask).logits)
    max_length = 12  # two slots never used: the mask's zero tail must not matter
    cache = model.init_cache(3, max_length)
    assert isinstance(cache, KVCache) and cache.keys[0].shape == (3, config.num_attention_heads, 12, config.head_dim)
    full_mask = np.zeros((3, max_length), np.int32)
    full_mask[:, :10] = mask
    out = model(ids[:, :6], full_mask, past_key_values=cache)  # prompt, eager, mask (B, max_length)
    assert int(cache.length) == 0 and int(out.past_key_values.length) == 6  # the given cache is left as it was
    steps = [np.asarray(out.logits)]
    traces = []
    step = jax.jit(lambda p, i, m, c: traces.append(1) or model(i, m, params=p, past_key_values=c))
    cache = out.past_key_values
    for t in range(6, 10):  # one token at a time under jit: one compilation for every step
        out = step(model.params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(full_mask), cache)
        steps.append(np.asarray(out.logits))
        cache = out.past_key_values
    assert int(cache.length) == 10 and len(traces) == 1
    assert max_abs_diff(np.concatenate(steps, 1), full, mask) <= TOL
    # a short mask (past + new) is accepted eagerly and gives the same answer
    short = model(ids[:, 6:8], mask[:, :8], past_key_values=model(ids[:, :6], mask[:, :6],
                  past_key_values=model.init_cache(3, max_length)).past_key_values)
    assert max_abs_diff(np.asarray(short.logits), full[:, 6:8], mask[:, 6:8]) <= TOL


def test_cache_overflow_and_mismatch_are_errors():
    config = VARIANTS["pre_ln"]
    model = FlaxOPTForCausalLM.from_config(config)
    ids, mask = random_batch(config, length=6)
    cache = model.init_cache(3, 8)
    cache = model(ids, past_key_values=cache).past_key_values
    with pytest.raises(ValueError, match="the cache holds 8 tokens: 6 written and 3 new do not fit"):
        model(ids[:, :3], past_key_values=cache)
    with pytest.raises(ValueError, match="past_key_values holds 3 rows; input_ids has 1"):
        model(ids[:1, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="cache of 41 tokens is longer than the model.s max_position_embeddings=40"):
        model.init_cache(1, 41)


def test_cache_mask_width_and_format_follow_the_spec(checkpoint):
    """The mask given with a cache covers past + new or the capacity (opt_spec.cache.cache_mask_width):
    any other width is refused in words, eagerly, from the module and under jit; a tuple cache is refused."""
    config = VARIANTS["pre_ln"]
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint("pre_ln"))
    ids, mask = random_batch(config, length=6)
    cache = model(ids[:, :4], mask[:, :4], past_key_values=model.init_cache(3, 8)).past_key_values
    for width in (5, 7):  # past + new is 6, the capacity 8
        bad = np.pad(mask, ((0, 0), (0, 2)))[:, :width]
        with pytest.raises(ValueError, match=rf"attention_mask covers {width} positions; with a cache it must cover "
                                             r"6 \(past 4 \+ new 2\) or 8 \(the cache's capacity\)"):
            model(ids[:, 4:], bad, past_key_values=cache)
        with pytest.raises(ValueError, match=f"attention_mask covers {width} positions"):  # the module's own check
            model.module.apply({"params": model.params}, jnp.asarray(ids[:, 4:]), jnp.asarray(bad),
                               past_key_values=cache)
    step = jax.jit(lambda i, m, c: model(i, m, past_key_values=c).logits)
    with pytest.raises(ValueError, match="the cache's length is traced .* so the mask must cover the "
                                         "cache's capacity 8"):
        step(jnp.asarray(ids[:, 4:]), jnp.asarray(mask), cache)
    wide = np.zeros((3, 8), np.int32)
    wide[:, :6] = mask
    assert max_abs_diff(np.asarray(step(jnp.asarray(ids[:, 4:]), jnp.asarray(wide), cache)),
                        np.asarray(model(ids[:, 4:], mask, past_key_values=cache).logits), mask[:, 4:]) <= TOL
    legacy = tuple((k, v) for k, v in zip(cache.keys, cache.values))
    for call in (lambda: model(ids[:, 4:], mask, past_key_values=legacy),
                 lambda: model.module.apply({"params": model.params}, jnp.asarray(ids[:, 4:]), jnp.asarray(mask),
                                            past_key_values=legacy)):
        with pytest.raises(TypeError, match="not a tuple of \\(keys, values\\) per layer"):
            call()


def test_cache_update_equals_the_spec_reference():
    """KVCache.update / advance against opt_spec.cache.KVCache (capacity slots): the same buffers returned."""
    from opt_spec.cache import KVCache as Reference

    config = VARIANTS["pre_ln"]
    rng = np.random.default_rng(0)
    ours, ref = KVCache.zeros(config, 2, 7), Reference(config.num_hidden_layers, capacity=7)
    for T in (3, 1, 2):
        for layer in range(config.num_hidden_layers):
            k, v = (rng.standard_normal((2, config.num_attention_heads, T, config.head_dim)).astype(np.float32)
                    for _ in range(2))
            got, want = ours.update(layer, jnp.asarray(k), jnp.asarray(v)), ref.update(layer, k, v)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), b)
        ours.advance(T)
        ref.advance(T)
        assert int(ours.length) == ref.length


@pytest.mark.parametrize("query_start", [None, 0, 2, 5])
def test_attention_allowed_equals_the_spec(query_start):
    from opt_flax.modeling import attention_allowed
    from opt_spec.numerics import attention_allowed as reference

    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    T = 3
    start = mask.shape[1] - T if query_start is None else query_start
    np.testing.assert_array_equal(np.asarray(attention_allowed(jnp.asarray(mask), T, start))[:, 0],
                                  reference(mask, T, query_start))


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_round_trip_bit_exact(checkpoint, tmp_path, name):
    config = VARIANTS[name]
    src = checkpoint(name)
    original = spec_io.load_safetensors_dir(src)
    model = FlaxOPTForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "flax")
    saved = spec_io.load_safetensors_dir(tmp_path / "flax")
    assert sorted(saved) == sorted(original)  # the tied head is not stored; an untied one is
    for k in original:
        np.testing.assert_array_equal(saved[k], original[k], err_msg=k)
    torch_model = TORCH_CLASSES["causal_lm"].from_pretrained(tmp_path / "flax")  # opt_torch, unchanged
    for k, v in torch_model.state_dict().items():
        if k not in tied_source(config, "causal_lm"):
            np.testing.assert_array_equal(v.numpy(), original[k], err_msg=k)
    again = FlaxOPTForCausalLM.from_pretrained(tmp_path / "flax")
    assert again.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.params, again.params)
    rebuilt = canonical_to_params(params_to_canonical(model.params, config, "causal_lm"), config, "causal_lm")
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.params, rebuilt)


def test_sharded_save_and_torch_to_flax(tmp_path):
    config = VARIANTS["untied_head"]
    torch_model = TORCH_CLASSES["causal_lm"].from_config(config, seed=1)
    torch_model.save_pretrained(tmp_path / "torch")
    model = FlaxOPTForCausalLM.from_pretrained(tmp_path / "torch")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert (tmp_path / "sharded" / spec_io.SAFE_INDEX_NAME).exists()
    back = TORCH_CLASSES["causal_lm"].from_pretrained(tmp_path / "sharded")
    for (k1, v1), (k2, v2) in zip(torch_model.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    import json
    saved = json.loads((tmp_path / "sharded" / "config.json").read_text())
    assert saved["architectures"] == ["OPTForCausalLM"] and saved["torch_dtype"] == "float32"


def test_base_checkpoint_into_head_models_and_back(tmp_path):
    config = VARIANTS["pre_ln"]
    base = FlaxOPTModel.from_config(config, seed=3)
    base.save_pretrained(tmp_path / "base")
    assert all(k.startswith("decoder.") for k in spec_io.load_safetensors_dir(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tied head is the embedding: nothing is missing
        lm = FlaxOPTForCausalLM.from_pretrained(tmp_path / "base")
    np.testing.assert_array_equal(lm.params["model"]["decoder"]["layers"]["1"]["fc2"]["kernel"],
                                  base.params["decoder"]["layers"]["1"]["fc2"]["kernel"])
    with pytest.warns(UserWarning, match="score.weight not in"):
        cls = FlaxOPTForSequenceClassification.from_pretrained(tmp_path / "base")
    assert float(jnp.std(cls.params["score"]["kernel"])) > 0
    with pytest.warns(UserWarning, match="qa_outputs.weight, qa_outputs.bias not in"):
        qa = FlaxOPTForQuestionAnswering.from_pretrained(tmp_path / "base")
    assert np.all(np.asarray(qa.params["qa_outputs"]["bias"]) == 0)
    lm.save_pretrained(tmp_path / "lm")
    back = FlaxOPTModel.from_pretrained(tmp_path / "lm")
    ids, mask = random_batch(config)
    np.testing.assert_array_equal(np.asarray(back(ids, mask).last_hidden_state),
                                  np.asarray(base(ids, mask).last_hidden_state))
    # a classifier checkpoint loads into the LM (its score is not ours) and into the base model
    cls.save_pretrained(tmp_path / "cls")
    FlaxOPTForCausalLM.from_pretrained(tmp_path / "cls")
    FlaxOPTModel.from_pretrained(tmp_path / "cls")


def test_untied_head_missing_is_an_error(tmp_path):
    write_checkpoint(tmp_path, VARIANTS["pre_ln"])  # tied checkpoint without lm_head.weight
    config = VARIANTS["untied_head"]
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(WeightMismatchError, match="missing \\(1\\): lm_head.weight"):
        FlaxOPTForCausalLM.from_pretrained(tmp_path)
    FlaxOPTModel.from_config(config).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="lm_head.weight not in"):
        lm = FlaxOPTForCausalLM.from_pretrained(tmp_path / "base")
    assert lm.params["lm_head"]["kernel"].shape == (config.word_embed_proj_dim, config.vocab_size)


def test_bad_checkpoints_list_every_problem(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = random_weights(config)
    del weights["model.decoder.layers.0.fc1.bias"]
    weights["model.decoder.layers.1.fc2.weight"] = weights["model.decoder.layers.1.fc2.weight"].T.copy()
    weights["model.decoder.extra.weight"] = np.zeros(2, np.float32)
    spec_io.save_safetensors_dir(tmp_path, weights, config.to_dict())
    with pytest.raises(WeightMismatchError) as err:
        FlaxOPTForCausalLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing (1): model.decoder.layers.0.fc1.bias" in msg
    assert "unexpected (1): model.decoder.extra.weight" in msg
    assert "wrong shape: model.decoder.layers.1.fc2.weight is (48, 32), expected (32, 48)" in msg
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        FlaxOPTForCausalLM.from_pretrained(tmp_path / "nope")


def test_bad_params_tree_is_an_error():
    config = VARIANTS["pre_ln"]
    params = FlaxOPTForCausalLM.from_config(config).params
    params["model"]["decoder"]["layers"]["0"]["fc1"]["kernel"] = jnp.zeros((48, 32))
    params["lm_head"] = {"kernel": jnp.zeros((32, 96))}  # a tied model has no lm_head parameter
    with pytest.raises(WeightMismatchError) as err:
        FlaxOPTForCausalLM(config, params)
    assert "unexpected (1): lm_head.kernel" in str(err.value)
    assert "wrong shape: model.decoder.layers.0.fc1.kernel is (48, 32), expected (32, 48)" in str(err.value)


def test_pytorch_pickles_load_without_torch_equal_to_safetensors(tmp_path):
    config = VARIANTS["pre_ln"]
    model = TORCH_CLASSES["causal_lm"].from_config(config, seed=0)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "st")
    from_bin = FlaxOPTForCausalLM.from_pretrained(tmp_path / "bin").params
    from_st = FlaxOPTForCausalLM.from_pretrained(tmp_path / "st").params
    pairs = zip(jax.tree_util.tree_leaves_with_path(from_bin), jax.tree_util.tree_leaves_with_path(from_st))
    assert all(pa == pb and np.array_equal(a, b) for (pa, a), (pb, b) in pairs)


# -------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_left_padded_has_no_nan(checkpoint, dtype):
    path = checkpoint("post_ln_proj")
    model = FlaxOPTForCausalLM.from_pretrained(path, dtype=dtype)
    ref = FlaxOPTForCausalLM.from_pretrained(path)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda p: p.dtype == jnp.float32, model.params))
    ids, mask = random_batch(model.config)
    logits = model(ids, mask).logits
    assert logits.dtype == dtype and bool(jnp.isfinite(logits).all())
    expected = np.asarray(ref(ids, mask).logits)
    assert max_abs_diff(np.asarray(logits, np.float32), expected, mask) < 0.15 * float(np.abs(expected).max())
    cache = model.init_cache(3, 10)
    assert cache.keys[0].dtype == dtype
    out = model(ids, mask, past_key_values=cache)
    assert bool(jnp.isfinite(out.logits).all())


def test_bfloat16_params(tmp_path, checkpoint):
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint("pre_ln"), dtype="bfloat16", param_dtype="bfloat16")
    assert model.params["model"]["decoder"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    model.save_pretrained(tmp_path)
    assert spec_io.SafetensorsFile(tmp_path / "model.safetensors").dtype("model.decoder.embed_tokens.weight") \
        == np.dtype(jnp.bfloat16)
    assert TORCH_CLASSES["causal_lm"].from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float8'"):
        FlaxOPTForCausalLM.from_config(VARIANTS["pre_ln"], dtype="float8")


# ------------------------------------------------------------------------------ dropout, losses
def test_dropout_needs_an_explicit_rng():
    config = VARIANTS["pre_ln"].replace(dropout=0.3, attention_dropout=0.2, layerdrop=0.1)
    model = FlaxOPTForCausalLM.from_config(config, seed=0)
    ids, mask = random_batch(config)
    a, b = model(ids, mask).logits, model(ids, mask).logits
    np.testing.assert_array_equal(a, b)  # deterministic by default
    with pytest.raises(ValueError, match="deterministic=False needs dropout_rng"):
        model(ids, mask, deterministic=False)
    key = jax.random.PRNGKey(1)
    c = model(ids, mask, deterministic=False, dropout_rng=key).logits
    d = model(ids, mask, deterministic=False, dropout_rng=key).logits
    e = model(ids, mask, deterministic=False, dropout_rng=jax.random.PRNGKey(2)).logits
    np.testing.assert_array_equal(c, d)
    assert not np.array_equal(c, a) and not np.array_equal(c, e)


def test_gradients_flow_to_every_parameter():
    config = VARIANTS["untied_head"]
    model = FlaxOPTForCausalLM.from_config(config, seed=0)
    ids, mask = random_batch(config)
    grads = jax.jit(jax.grad(lambda p: model(ids, mask, params=p, labels=ids).loss))(model.params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_inputs_embeds_equals_input_ids(checkpoint):
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj"))
    ids, mask = random_batch(model.config)
    embeds = model.params["model"]["decoder"]["embed_tokens"]["embedding"][ids]
    np.testing.assert_array_equal(model(ids, mask).logits, model(inputs_embeds=embeds, attention_mask=mask).logits)


def test_bad_inputs_get_clear_errors():
    config = VARIANTS["pre_ln"]
    model = FlaxOPTForCausalLM.from_config(config)
    ids, mask = random_batch(config)
    with pytest.raises(ValueError, match="attention_mask has shape \\(3, 5\\)"):
        model(ids, mask[:, :5])
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model(np.full((1, config.max_position_embeddings + 1), 5))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


def test_output_access_like_hugging_face():
    config = VARIANTS["pre_ln"]
    model = FlaxOPTForCausalLM.from_config(config)
    ids, _ = random_batch(config)
    out = model(ids)
    assert out[0] is out.logits and out["logits"] is out.logits and out.keys() == ["logits"]
    assert out.logits.shape == (3, 9, config.vocab_size)
    hidden = model(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == config.num_hidden_layers + 1


def test_opt_flax_imports_no_other_framework():
    code = ("import sys, opt_flax; opt_flax.FlaxOPTForCausalLM;"
            "print([m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------ Hugging Face Flax
# Hugging Face's Flax OPT ignores enable_bias and layer_norm_elementwise_affine: those variants are left out.
HF_VARIANTS = sorted(n for n, c in VARIANTS.items() if c.enable_bias and c.layer_norm_elementwise_affine)


@pytest.fixture(scope="module")
def hf_flax():
    transformers = pytest.importorskip("transformers")
    return transformers


@pytest.mark.parametrize("name", HF_VARIANTS)
def test_matches_hugging_face_flax(hf_flax, checkpoint, name):
    config = VARIANTS[name]
    model = FlaxOPTForCausalLM.from_pretrained(checkpoint(name))
    hf_config = hf_flax.OPTConfig.from_dict(config.to_dict())
    ids, mask = random_batch(config)
    with jax.numpy_dtype_promotion("standard"):  # Hugging Face's code relies on implicit promotion
        hf = hf_flax.FlaxOPTForCausalLM(hf_config, _do_init=False)  # same parameter tree: ours as is
        expected = np.asarray(hf(ids, attention_mask=mask, params=model.params).logits)
    assert max_abs_diff(np.asarray(model(ids, mask).logits), expected, mask) <= TOL


@pytest.mark.parametrize("name", ["pre_ln", "post_ln_proj"])
def test_jax_export_serializes_the_forward_for_any_batch_and_length(tmp_path, name):
    """jax.export of the jitted forward with symbolic batch and length: the serialized program, read back,
    gives the model's logits at other shapes than any traced one, left padding included."""
    from jax import export

    config = VARIANTS[name]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, "causal_lm", seed=5), config.to_dict())
    model = FlaxOPTForCausalLM.from_pretrained(tmp_path)
    forward = jax.jit(lambda params, ids, mask: model(ids, attention_mask=mask, params=params).logits)
    batch, length = export.symbolic_shape("batch, length")
    spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    blob = export.export(forward)(model.params, spec, spec).serialize()
    program = export.deserialize(blob)
    for ids, mask in (random_batch(config, seed=1), random_batch(config, 2, 13, seed=2, left_pad=(0, 4))):
        ids, mask = ids.astype(np.int32), mask.astype(np.int32)
        got, want = program.call(model.params, ids, mask), forward(model.params, ids, mask)
        assert got.shape == want.shape and max_abs_diff(np.asarray(got), np.asarray(want), mask) <= 1e-5


def test_param_dtype_casts_are_hugging_faces(hf_flax, checkpoint):
    """to_bf16 / to_fp16 / to_fp32 (with and without a mask) give Hugging Face Flax's trees, and a model on the
    cast tree gives the logits of one loaded in that param_dtype."""
    from flax import traverse_util

    path = checkpoint("pre_ln")
    model = FlaxOPTForCausalLM.from_pretrained(path)
    with jax.numpy_dtype_promotion("standard"):  # Hugging Face's code relies on implicit promotion
        hf = hf_flax.FlaxOPTForCausalLM(hf_flax.OPTConfig.from_dict(VARIANTS["pre_ln"].to_dict()), _do_init=False)
    flat = traverse_util.flatten_dict(model.params)
    no_norms = traverse_util.unflatten_dict({p: not any("layer_norm" in k for k in p) for p in flat})
    for cast in ("to_bf16", "to_fp16", "to_fp32"):
        for mask in (None, no_norms):
            ours = traverse_util.flatten_dict(getattr(model, cast)(model.params, mask))
            theirs = traverse_util.flatten_dict(getattr(hf, cast)(model.params, mask))
            assert ours.keys() == theirs.keys()
            for p in ours:
                assert ours[p].dtype == theirs[p].dtype and np.array_equal(np.asarray(ours[p], np.float32),
                                                                           np.asarray(theirs[p], np.float32)), p
    kept = traverse_util.flatten_dict(model.to_bf16(model.params, no_norms))
    assert {str(x.dtype) for p, x in kept.items() if "layer_norm" in "".join(p)} == {"float32"}
    assert {str(x.dtype) for p, x in kept.items() if "layer_norm" not in "".join(p)} == {"bfloat16"}
    ids, mask = random_batch(VARIANTS["pre_ln"])
    half = FlaxOPTForCausalLM.from_pretrained(path, param_dtype=jnp.bfloat16)
    assert np.array_equal(np.asarray(model(ids, mask, params=model.to_bf16(model.params)).logits),
                          np.asarray(half(ids, mask).logits))
    assert model.get_memory_footprint() == 2 * FlaxOPTForCausalLM(model.config, half.params).get_memory_footprint()
    with pytest.raises(ValueError, match=r"missing \['model.decoder.embed_tokens.embedding'\]"):
        model.to_bf16(model.params, {k: v for k, v in no_norms.items() if k != "model"} | {"model": {
            **no_norms["model"], "decoder": {k: v for k, v in no_norms["model"]["decoder"].items()
                                             if k != "embed_tokens"}}})
