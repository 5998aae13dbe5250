"""The TensorFlow backend against the PyTorch backend (the reference), itself and Hugging Face's TF port.

Every variant and head: random varied weights saved as a Hugging Face directory, a left-padded batch
of 3, logits compared at real positions, eagerly and under XLA.
"""

import functools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

import opt_tf  # noqa: E402
import opt_torch  # noqa: E402
from opt_spec import WeightMismatchError, tied_source, weight_table  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.layouts import native_path, native_shape  # noqa: E402
from opt_spec.testing import VARIANTS, random_batch, random_weights  # noqa: E402
from opt_tf.modeling import MODEL_CLASSES as TF_CLASSES  # noqa: E402
from opt_torch.modeling import MODEL_CLASSES as TORCH_CLASSES  # noqa: E402

from .conftest import HEADS, max_abs_diff  # noqa: E402
from .hf_reference import hf_tf_causal_lm  # noqa: E402

TOL = 1e-5
OUTPUT_KEY = {"base": "last_hidden_state", "causal_lm": "logits", "sequence_classification": "logits",
              "question_answering": "start_logits"}
MEASURED: dict = {}  # (variant, head, what) -> max |difference|, printed by test_zz_report with -s


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tf_ckpts")


@pytest.fixture(scope="module")
def checkpoint(ckpt_root):
    """checkpoint(variant, head) -> a Hugging Face directory with random varied weights (made once)."""

    @functools.lru_cache(maxsize=None)
    def make(variant: str, head: str) -> str:
        config = VARIANTS[variant]
        path = os.path.join(ckpt_root, f"{variant}-{head}")
        spec_io.save_safetensors_dir(path, random_weights(config, head, seed=1), config.to_dict())
        return path

    return make


@functools.lru_cache(maxsize=None)
def torch_outputs(path: str, head: str, variant: str) -> dict:
    """The PyTorch backend's outputs (NumPy) on the left-padded batch, from the same directory."""
    ids, mask = random_batch(VARIANTS[variant])
    model = TORCH_CLASSES[head].from_pretrained(path)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    return {k: out[k].numpy() for k in ("last_hidden_state", "logits", "start_logits", "end_logits")
            if k in out.keys()}


def compare(a: dict, b: dict, head: str, mask: np.ndarray) -> float:
    """max |a - b| over the head's outputs at real positions (pooled logits have no positions)."""
    diffs = []
    for key in b:
        x = np.asarray(tf.cast(a[key], tf.float32)) if not isinstance(a[key], np.ndarray) else a[key]
        diffs.append(max_abs_diff(x, b[key], None if head == "sequence_classification" else mask))
    return max(diffs)


def tf_outputs(out) -> dict:
    return {k: np.asarray(out[k]) for k in ("last_hidden_state", "logits", "start_logits", "end_logits")
            if k in out.keys()}


# ------------------------------------------------------------------------------ weight mapping
@pytest.mark.parametrize("head", HEADS)
def test_every_weight_maps_exactly_once(variant, head):
    name, config = variant
    model = TF_CLASSES[head](config, seed=0)
    specs = opt_tf.canonical_names(model)
    tied = tied_source(config, head)
    table = {s.name: s for s in weight_table(config, head)}
    mapped = [s.name for s in specs.values()]
    assert len(mapped) == len(set(mapped)) == len(model.weights)
    assert set(mapped) == set(table) - set(tied)
    by_path = {v.path: v for v in model.weights}
    for path, spec in specs.items():
        assert tuple(by_path[path].shape) == native_shape(spec, "keras"), path
        assert path == model.path + "/" + "/".join(native_path(spec, "keras")), (path, spec.name)
    # the map is the only way names are decided: a second model of the same class agrees
    other = TF_CLASSES[head](config, seed=0)
    assert sorted(s.name for s in opt_tf.canonical_names(other).values()) == sorted(mapped)


def test_from_config_initializes_like_opt():
    config = VARIANTS["post_ln_proj"].replace(vocab_size=512, hidden_size=64, ffn_dim=96, init_std=0.02)
    a = opt_tf.TFOPTForCausalLM.from_config(config, seed=3).get_weights_dict()
    b = opt_tf.TFOPTForCausalLM.from_config(config, seed=3).get_weights_dict()
    c = opt_tf.TFOPTForCausalLM.from_config(config, seed=4).get_weights_dict()
    assert all(np.array_equal(a[n], b[n]) for n in a)
    emb = a["model.decoder.embed_tokens.weight"]
    assert not np.array_equal(emb, c["model.decoder.embed_tokens.weight"])
    assert np.all(emb[config.pad_token_id] == 0)
    assert abs(float(emb.std()) - 0.02) < 0.002
    for n, arr in a.items():
        if n.endswith("layer_norm.weight"):
            assert np.all(arr == 1), n
        elif n.endswith(".bias"):
            assert np.all(arr == 0), n


# ---------------------------------------------------------------------------- parity with torch
def test_parity_with_torch_eager_and_xla(variant, checkpoint):
    """All four heads of one variant; one XLA program runs the four models (one compile, not four)."""
    name, config = variant
    ids, mask = random_batch(config)
    models = {head: TF_CLASSES[head].from_pretrained(checkpoint(name, head)) for head in HEADS}
    refs = {head: torch_outputs(checkpoint(name, head), head, name) for head in HEADS}
    xla = tf.function(lambda i, m: {h: model(i, attention_mask=m) for h, model in models.items()}, jit_compile=True)
    compiled = xla(tf.constant(ids), tf.constant(mask))
    for head, model in models.items():
        eager = tf_outputs(model(ids, attention_mask=mask))
        d_eager = compare(eager, refs[head], head, mask)
        d_xla = compare(tf_outputs(compiled[head]), refs[head], head, mask)
        MEASURED[(name, head, "torch eager")] = d_eager
        MEASURED[(name, head, "torch xla")] = d_xla
        assert d_eager <= TOL, (head, d_eager)
        assert d_xla <= TOL, (head, d_xla)
        assert compare(tf_outputs(compiled[head]), eager, head, mask) <= TOL


# -------------------------------------------------------------------------------- KV caching
def _decode(step, model, ids, mask, L, prefill):
    """Prefill `prefill` tokens then one token at a time through a preallocated cache of length L."""
    B, T = ids.shape
    full_mask = tf.constant(np.concatenate([mask, np.ones((B, L - T), np.int32)], axis=1))  # (B, L)
    cache = model.init_cache(B, L)
    logits = []
    bounds = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
    for s, e in bounds:
        out = step(tf.constant(ids[:, s:e]), full_mask, cache)
        cache = out.past_key_values
        logits.append(np.asarray(out.logits))
    assert int(cache.length) == T
    return np.concatenate(logits, axis=1)


def test_cached_decoding_matches_full_forward(variant, checkpoint):
    name, config = variant
    ids, mask = random_batch(config)
    model = opt_tf.TFOPTForCausalLM.from_pretrained(checkpoint(name, "causal_lm"))
    full = np.asarray(model(ids, attention_mask=mask).logits)

    def eager(i, m, c):
        return model(i, attention_mask=m, past_key_values=c)

    xla = tf.function(eager, jit_compile=True)
    d_eager = max_abs_diff(_decode(eager, model, ids, mask, L=12, prefill=5), full, mask)
    # under XLA one token at a time from the start: a single program serves every step
    d_xla = max_abs_diff(_decode(xla, model, ids, mask, L=12, prefill=1), full, mask)
    assert xla.experimental_get_tracing_count() == 1
    # the dynamic cache a forward starts with use_cache=True, eagerly
    out = model(ids[:, :4], attention_mask=mask[:, :4])
    logits, past = [np.asarray(out.logits)], out.past_key_values
    assert isinstance(past, opt_tf.KVCache) and past.capacity is None and int(past.length) == 4
    for t in range(4, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past)
        logits.append(np.asarray(out.logits))
        past = out.past_key_values
    d_growing = max_abs_diff(np.concatenate(logits, axis=1), full, mask)
    MEASURED[(name, "causal_lm", "cache eager")] = d_eager
    MEASURED[(name, "causal_lm", "cache xla")] = d_xla
    assert d_eager <= TOL and d_xla <= TOL and d_growing <= TOL, (d_eager, d_xla, d_growing)


def test_xla_prefill_then_single_steps(checkpoint):
    """A multi-token prefill and single-token steps under XLA: two programs, same logits."""
    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config)
    model = opt_tf.TFOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj", "causal_lm"))
    full = np.asarray(model(ids, attention_mask=mask).logits)
    xla = tf.function(lambda i, m, c: model(i, attention_mask=m, past_key_values=c), jit_compile=True)
    assert max_abs_diff(_decode(xla, model, ids, mask, L=12, prefill=5), full, mask) <= TOL
    assert xla.experimental_get_tracing_count() == 2


def test_xla_matrix_vector_products_stay_unfused_and_exact():
    """At batch 1 a decode step's products are matrix-vector products. XLA's CPU compiler fuses a
    following addition into them and then runs them on one thread; Linear adds its bias so that
    they stay standalone (multithreaded). The result must equal x @ kernel + bias bit for bit."""
    layer = opt_tf.modeling.Linear(64, 48, True)
    layer.build()
    rng = np.random.default_rng(0)
    layer.kernel.assign(rng.standard_normal((64, 48)).astype(np.float32))
    layer.bias.assign(rng.standard_normal(48).astype(np.float32))
    x = tf.constant(rng.standard_normal((1, 1, 64)).astype(np.float32))
    step = tf.function(layer.call, jit_compile=True)
    hlo = step.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    assert "dot(" in hlo and "kind=kOutput" not in hlo, hlo
    product = tf.function(lambda x: tf.matmul(x, layer.kernel), jit_compile=True)(x).numpy()
    np.testing.assert_array_equal(step(x).numpy(), product + layer.bias.numpy())


def test_bias_subtraction_is_gated_and_changes_no_number(checkpoint, monkeypatch):
    """opt_tf.fast_paths: the gate turns the bias subtraction on where TensorFlow sees no GPU (this
    machine); forced off, XLA fuses the addition into the batch-1 product (what the trick avoids); on and
    off give the same logits bit for bit, eagerly and under XLA."""
    from opt_tf import fast_paths

    gpus = tf.config.list_logical_devices("GPU")
    assert fast_paths.bias_as_subtraction() == (not gpus)
    if not gpus:
        assert fast_paths.bias_as_subtraction()
    layer = opt_tf.modeling.Linear(64, 48, True)
    layer.build()
    x = tf.ones((1, 1, 64))
    monkeypatch.setattr(fast_paths, "BIAS_AS_SUBTRACTION", False)
    if not gpus:
        hlo = tf.function(layer.call, jit_compile=True).experimental_get_compiler_ir(x)(stage="optimized_hlo")
        assert "kind=kOutput" in hlo, hlo
    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config)
    model = opt_tf.TFOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj", "causal_lm"))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(fast_paths, "BIAS_AS_SUBTRACTION", on)
        xla = tf.function(lambda i, m: model(i, attention_mask=m).logits, jit_compile=True)
        runs[on] = (model(ids, attention_mask=mask).logits.numpy(), xla(ids, mask).numpy(),
                    model.generate(ids[:1], max_new_tokens=4).numpy())
        model._forget_traces()  # generate's compiled loop keeps the choice it was traced with
    for off, on in zip(runs[False], runs[True]):
        np.testing.assert_array_equal(off, on)


def test_cache_rejects_overflow_bad_mask_and_tuples():
    config = VARIANTS["pre_ln"]
    model = opt_tf.TFOPTForCausalLM.from_config(config, seed=0)
    ids, mask = random_batch(config)
    cache = model.init_cache(3, 10)
    full = opt_tf.KVCache(cache.keys, cache.values, 8, capacity=10)
    with pytest.raises(ValueError, match="the cache holds 10 tokens: 8 written and 5 new do not fit"):
        model(ids[:, :5], attention_mask=np.ones((3, 10)), past_key_values=full)
    with pytest.raises(ValueError, match="covers 5 positions; with a cache it must cover 9 .* or 10"):
        model(ids, attention_mask=mask[:, :5], past_key_values=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.init_cache(3, config.max_position_embeddings + 1)
    past = model(ids[:, :4], attention_mask=mask[:, :4]).past_key_values
    legacy = tuple(zip(past.keys, past.values))
    with pytest.raises(TypeError, match="not a tuple of"):
        model(ids[:, 4:5], attention_mask=mask[:, :5], past_key_values=legacy)
    with pytest.raises(ValueError, match="covers 4 positions; with a cache it must cover 5"):
        model(ids[:, 4:5], attention_mask=mask[:, :4], past_key_values=past)
    # traced with the cache as an input, the write position is known only at run time: capacity-wide masks
    xla = tf.function(lambda i, m, c: model(i, attention_mask=m, past_key_values=c), jit_compile=True)
    with pytest.raises(ValueError, match="must cover the cache's capacity 10"):
        xla(ids[:, :5], mask[:, :5], cache)


def test_cache_update_follows_the_spec_reference():
    """KVCache.update/advance against opt_spec.cache's NumPy reference, preallocated and dynamic: the
    returned keys and values, the write position, and the mask widened to the keys (unwritten slots 0)."""
    from opt_spec.cache import KVCache as Reference

    rng = np.random.default_rng(0)
    mask = np.array([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    for capacity in (None, 9):
        ours, ref = opt_tf.KVCache.dynamic(2), Reference(2, capacity)
        if capacity is not None:
            zeros = tf.zeros((2, 3, capacity, 4))
            ours = opt_tf.KVCache((zeros, zeros), (zeros, zeros), 0, capacity=capacity)
        for T in (3, 1, 2):
            past = ref.length
            for layer in (0, 1):
                k, v = (rng.standard_normal((2, 3, T, 4)).astype(np.float32) for _ in range(2))
                got, want = ours.update(layer, tf.constant(k), tf.constant(v)), ref.update(layer, k, v)
                np.testing.assert_array_equal(got[0].numpy(), want[0])
                np.testing.assert_array_equal(got[1].numpy(), want[1])
            np.testing.assert_array_equal(ours.attention_mask(mask[:, :past + T], 2, T).numpy(),
                                          ref.attention_mask(mask[:, :past + T], T))
            ours.advance(T)
            ref.advance(T)
            assert int(ours.length) == ref.length


def test_a_mask_over_past_and_new_equals_one_over_the_capacity(checkpoint):
    """With a preallocated cache the mask may cover past + new tokens (Hugging Face's way) or the capacity:
    the same logits, bit for bit, eagerly."""
    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config)
    model = opt_tf.TFOPTForCausalLM.from_pretrained(checkpoint("post_ln_proj", "causal_lm"))
    B, T = ids.shape
    wide = np.concatenate([mask, np.ones((B, 12 - T), np.int32)], axis=1)
    runs = []
    for grow in (False, True):
        cache, logits = model.init_cache(B, 12), []
        for s, e in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
            out = model(ids[:, s:e], attention_mask=mask[:, :e] if grow else wide, past_key_values=cache)
            cache = out.past_key_values
            logits.append(out.logits.numpy())
        runs.append(np.concatenate(logits, axis=1))
    np.testing.assert_array_equal(runs[0], runs[1])


# ------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
def test_save_load_round_trip_bit_exact(variant, head, checkpoint, tmp_path):
    name, config = variant
    weights = spec_io.load_safetensors_dir(checkpoint(name, head))
    model = TF_CLASSES[head].from_pretrained(checkpoint(name, head))
    model.save_pretrained(tmp_path / "tf")
    saved = spec_io.load_safetensors_dir(tmp_path / "tf")
    assert set(saved) == set(weights)  # a tied lm_head is not stored
    assert all(np.array_equal(saved[n], weights[n]) and saved[n].dtype == weights[n].dtype for n in weights)
    # opt_torch loads it unchanged
    state = TORCH_CLASSES[head].from_pretrained(tmp_path / "tf").state_dict()
    assert all(np.array_equal(state[n].numpy(), weights[n]) for n in weights)
    for tied, source in tied_source(config, head).items():
        assert np.array_equal(state[tied].numpy(), weights[source])
    # TF -> TF
    again = TF_CLASSES[head].from_pretrained(tmp_path / "tf").get_weights_dict()
    assert set(again) == set(weights) and all(np.array_equal(again[n], weights[n]) for n in weights)


def test_torch_save_loads_in_tf_with_same_outputs(checkpoint, tmp_path):
    config = VARIANTS["untied_head"]
    ids, mask = random_batch(config)
    torch_model = opt_torch.OPTForCausalLM.from_pretrained(checkpoint("untied_head", "causal_lm"))
    torch_model.save_pretrained(tmp_path / "pt")
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = opt_tf.TFOPTForCausalLM.from_pretrained(tmp_path / "pt")(ids, attention_mask=mask).logits
    assert max_abs_diff(got, ref, mask) <= TOL


def test_base_and_head_checkpoints_load_into_each_other(checkpoint, tmp_path):
    config = VARIANTS["pre_ln"]
    base_dir, lm_dir, qa_dir = (checkpoint("pre_ln", h) for h in ("base", "causal_lm", "question_answering"))
    base_w = spec_io.load_safetensors_dir(base_dir)
    # base -> causal LM: the tied head is the embedding, nothing is missing, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = opt_tf.TFOPTForCausalLM.from_pretrained(base_dir)
    got = lm.get_weights_dict()
    assert all(np.array_equal(got["model." + n], base_w[n]) for n in base_w)
    # base -> sequence classification: score.weight freshly initialized, with a warning naming it
    with pytest.warns(UserWarning, match="score.weight"):
        cls = opt_tf.TFOPTForSequenceClassification.from_pretrained(base_dir)
    score = cls.get_weights_dict()["score.weight"]
    assert score.shape == (config.num_labels, config.word_embed_proj_dim) and np.std(score) > 0
    # question answering -> sequence classification: qa_outputs dropped, score initialized
    with pytest.warns(UserWarning, match="score.weight"):
        opt_tf.TFOPTForSequenceClassification.from_pretrained(qa_dir)
    # causal LM -> base: the head is dropped, the rest loads
    base = opt_tf.TFOPTModel.from_pretrained(lm_dir)
    lm_w = spec_io.load_safetensors_dir(lm_dir)
    assert all(np.array_equal(v, lm_w["model." + n]) for n, v in base.get_weights_dict().items())
    # an untied LM without its head, a wrong shape, an unknown key: the spec's error
    bad = dict(base_w)
    bad["decoder.layers.0.fc1.weight"] = bad["decoder.layers.0.fc1.weight"][:, :-1]
    bad["decoder.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    spec_io.save_safetensors_dir(tmp_path / "bad", bad, config.to_dict())
    with pytest.raises(WeightMismatchError, match="mystery") as err:
        opt_tf.TFOPTModel.from_pretrained(tmp_path / "bad")
    assert "decoder.layers.0.fc1.weight" in str(err.value)
    untied = VARIANTS["untied_head"]
    spec_io.save_safetensors_dir(tmp_path / "untied", random_weights(untied, "base"), untied.to_dict())
    with pytest.warns(UserWarning, match="lm_head.weight not in"):
        opt_tf.TFOPTForCausalLM.from_pretrained(tmp_path / "untied")
    # a causal-LM checkpoint (model.*) of an untied config without its head is broken, as in every backend
    lm = {k: v for k, v in random_weights(untied, "causal_lm").items() if k != "lm_head.weight"}
    spec_io.save_safetensors_dir(tmp_path / "headless", lm, untied.to_dict())
    with pytest.raises(WeightMismatchError, match="missing \\(1\\): lm_head.weight"):
        opt_tf.TFOPTForCausalLM.from_pretrained(tmp_path / "headless")


# ------------------------------------------------------------------------------- losses, fit


def test_fit_lowers_the_loss():
    config = VARIANTS["pre_ln"]
    ids, mask = random_batch(config)
    labels = np.where(mask == 1, ids, -100)
    model = opt_tf.TFOPTForCausalLM.from_config(config, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2))
    history = model.fit({"input_ids": ids, "attention_mask": mask}, labels, epochs=2, batch_size=3, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and np.isfinite(losses).all() and losses[1] < losses[0], losses
    after = float(model(ids, attention_mask=mask, labels=labels).loss)
    assert after < losses[0]


@pytest.mark.slow
def test_fit_under_xla_with_mixed_bfloat16():
    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config)
    labels = np.where(mask == 1, ids, -100)
    model = opt_tf.TFOPTForCausalLM.from_config(config, seed=0, dtype="mixed_bfloat16")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2), jit_compile=True)
    losses = model.fit({"input_ids": ids, "attention_mask": mask}, labels, epochs=3, batch_size=3,
                       verbose=0).history["loss"]
    assert model.jit_compile and losses[2] < losses[1] < losses[0], losses
    assert model.weights[0].dtype == "float32"


def test_outputs_are_spec_records_usable_in_tf_function():
    from opt_spec import outputs as spec_outputs

    config = VARIANTS["pre_ln"]
    model = opt_tf.TFOPTForQuestionAnswering.from_config(config, seed=0)
    ids, mask = random_batch(config)
    out = tf.function(lambda i, m: model(i, attention_mask=m, use_cache=False))(ids, mask)
    assert isinstance(out, spec_outputs.QuestionAnsweringModelOutput)
    assert out.keys() == ["start_logits", "end_logits"] and out[0] is out.start_logits
    assert out.start_logits.shape == (3, 9)


# ---------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mixed_bfloat16", "mixed_float16"])
def test_half_precision_left_padded_batch(dtype, checkpoint):
    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config)
    path = checkpoint("post_ln_proj", "causal_lm")
    ref = torch_outputs(path, "causal_lm", "post_ln_proj")["logits"]
    model = opt_tf.TFOPTForCausalLM.from_pretrained(path, dtype=dtype)
    assert model.compute_dtype == dtype.removeprefix("mixed_")
    assert model.weights[0].dtype == ("float32" if dtype.startswith("mixed") else dtype)
    logits = np.asarray(tf.cast(model(ids, attention_mask=mask).logits, tf.float32))
    assert np.isfinite(logits).all()  # pads included: no NaN anywhere
    scale = np.abs(ref).max()
    tol = 0.05 if "bfloat16" in dtype else 0.01
    assert max_abs_diff(logits, ref, mask) <= tol * scale


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_are_named():
    config = VARIANTS["pre_ln"]
    model = opt_tf.TFOPTModel.from_config(config, seed=0)
    ids, mask = random_batch(config)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids[:, :4], attention_mask=mask)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.ones((1, config.max_position_embeddings + 1), np.int32))
    with pytest.raises(ValueError, match="dtype="):
        opt_tf.TFOPTModel(config, dtype="int8")


# ----------------------------------------------------------------------------- import isolation
def test_import_does_not_pull_torch_or_jax():
    code = (
        "import sys\n"
        "import tensorflow\n"
        "before = set(sys.modules)\n"
        "import opt_tf\n"
        "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'jax', 'jaxlib', 'flax'))\n"
        "assert not new, new\n"
        "assert 'torch' not in sys.modules and 'flax' not in sys.modules\n"
        "print('jax' in sys.modules)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # TensorFlow itself imports jax when it is installed (tensorflow.lite.python.util); not our doing.


# ------------------------------------------------------------------------ Hugging Face TF port
HF_UNSUPPORTED = {"untied_head": "Hugging Face's TFOPTForCausalLM always ties lm_head to the token embedding "
                                  "(it has no lm_head variable), so an untied head cannot be expressed"}


def _hf_tf_model(config, weights):
    pytest.importorskip("transformers")
    pytest.importorskip("tf_keras")
    return hf_tf_causal_lm(config, weights)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parity_with_hugging_face_tf(name, checkpoint):
    if name in HF_UNSUPPORTED:
        pytest.skip(HF_UNSUPPORTED[name])
    config = VARIANTS[name]
    path = checkpoint(name, "causal_lm")
    weights = spec_io.load_safetensors_dir(path)
    hf = _hf_tf_model(config, weights)
    ids, mask = random_batch(config)
    ref = hf(tf.constant(ids), attention_mask=tf.constant(mask)).logits.numpy()
    ours = opt_tf.TFOPTForCausalLM.from_pretrained(path)(ids, attention_mask=mask).logits
    d = max_abs_diff(ours, ref, mask)
    MEASURED[(name, "causal_lm", "hf tf")] = d
    assert d <= TOL, d


def test_zz_report():
    """Prints the measured differences (run with -s)."""
    for key in sorted(MEASURED):
        print(f"{' / '.join(key):55s} {MEASURED[key]:.3e}")
