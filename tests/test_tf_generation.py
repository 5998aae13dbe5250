"""Generation in the TensorFlow backend: the opt_spec semantics under one XLA program, token parity with
the PyTorch backend (greedy, beam search, repetition penalty), no retracing, Hugging Face TF parity; the
rest of Hugging Face's rules compiled by XLA against opt_spec's references, and the host loops' output
records against the fast path's (tests/test_generation_surface.py compares them with Hugging Face).

XLA compiles dominate the time, so one model serves every test and each generation setting is compiled
(and run) once: `run(**kwargs)` memoizes its output.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch

from opt_spec import generation as gen
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_tf import TFOPTForCausalLM
from opt_tf.generation import filter_for_sampling
from opt_torch import OPTForCausalLM

from .conftest import beam_samples_reference
from .hf_reference import hf_tf_causal_lm

CONFIG = VARIANTS["pre_ln"]
IDS, MASK = random_batch(CONFIG, seed=2)  # (3, 9), rows left-padded by 0, 3 and 5
T = IDS.shape[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pre_ln")
    spec_io.save_safetensors_dir(path, random_weights(CONFIG, seed=3), CONFIG.to_dict())
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return TFOPTForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return OPTForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def run(model):
    """generate(IDS, MASK, **kwargs) as a NumPy array, each distinct setting run once."""
    done = {}

    def call(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in done:
            out = model.generate(IDS, MASK, **kwargs)
            assert isinstance(out, tf.Tensor) and out.dtype == tf.int32
            done[key] = out.numpy()
        return done[key]
    return call


def torch_generate(reference, **kwargs) -> np.ndarray:
    ids, mask = torch.from_numpy(IDS).long(), torch.from_numpy(MASK).long()
    return reference.generate(ids, mask, **kwargs).numpy()


# ------------------------------------------------------------------------- parity with PyTorch
@pytest.mark.parametrize("eos", [None, 75])  # 75 is emitted early by row 2: per-row stopping and padding
def test_greedy_matches_torch(run, reference, eos):
    got = run(max_new_tokens=10, eos_token_id=eos)
    want = torch_generate(reference, max_new_tokens=10, eos_token_id=eos)
    assert got.shape == want.shape == (3, T + 10)
    assert np.array_equal(got, want)
    assert np.array_equal(got[:, :T], IDS)  # the prompt comes back unchanged
    # a fair case: along the generated path the top two logits are never near a tie
    seq = torch.from_numpy(want).long()
    with torch.no_grad():
        logits = reference(seq, torch.from_numpy(np.concatenate([MASK, np.ones((3, 10), np.int32)], 1)).long()).logits
    top2 = torch.topk(logits[:, T - 1:-1].float(), 2, dim=-1).values  # (3, 10, 2), the steps' logits
    live = seq[:, T:] != CONFIG.pad_token_id if eos is not None else torch.ones(3, 10, dtype=torch.bool)
    assert float((top2[..., 0] - top2[..., 1])[live].min()) > 1e-3


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_beam_search_matches_torch(run, reference, num_beams, length_penalty):
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, length_penalty=length_penalty)
    got, want = run(**kwargs), torch_generate(reference, **kwargs)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_repetition_penalty_matches_torch_and_the_spec_rule(model, run, reference):
    got = run(max_new_tokens=4, repetition_penalty=1.7)
    assert np.array_equal(got, torch_generate(reference, max_new_tokens=4, repetition_penalty=1.7))
    assert not np.array_equal(got, run(max_new_tokens=10)[:, :T + 4])  # the penalty changes this output
    # replay the steps with the NumPy reference of the rule on full (uncached) forwards
    seq, m = IDS, MASK
    for step in range(4):
        logits = model(seq, attention_mask=m).logits[:, -1].numpy().astype(np.float32)
        seen = np.zeros_like(logits, dtype=bool)
        for b in range(3):
            seen[b, seq[b][m[b] == 1]] = True
        nxt = gen.apply_repetition_penalty(logits, seen, 1.7).argmax(-1).astype(np.int32)
        assert np.array_equal(nxt, got[:, T + step])
        seq, m = np.concatenate([seq, nxt[:, None]], 1), np.concatenate([m, np.ones((3, 1), np.int32)], 1)


# ---------------------------------------------------------------------------- stopping rules
def test_eos_stops_rows_and_pads_them(run):
    free = run(max_new_tokens=10)
    out = run(max_new_tokens=10, eos_token_id=75)
    assert (free[2, T:] == 75).any(), "the case needs row 2 to emit 75"
    first = T + int(np.argmax(free[2, T:] == 75))
    assert np.array_equal(out[2, :first + 1], free[2, :first + 1])
    assert (out[2, first + 1:] == CONFIG.pad_token_id).all()
    for row in (0, 1):  # rows that never emit it are unchanged
        assert np.array_equal(out[row], free[row]) or (free[row, T:] == 75).any()
    padded = run(max_new_tokens=10, eos_token_id=75, pad_token_id=0)
    assert (padded[2, first + 1:] == 0).all() and np.array_equal(padded[:2], out[:2])


def test_min_new_tokens_holds_eos_back(run):
    free = run(max_new_tokens=10, eos_token_id=75)
    held = run(max_new_tokens=10, min_new_tokens=4, eos_token_id=75)
    assert (free[2, T:T + 4] == 75).any(), "the case needs row 2 to emit 75 within 4 steps"
    assert (held[:, T:T + 4] != 75).all()


def test_all_rows_finished_ends_early(model):
    ids, mask = IDS[2:], MASK[2:]
    first = int(model.generate(ids, mask, max_new_tokens=3, eos_token_id=50).numpy()[0, T])
    assert first != 50
    out = model.generate(ids, mask, max_new_tokens=3, eos_token_id=first)
    assert out.shape == (1, T + 1) and int(out[0, T]) == first


# ------------------------------------------------------------------------------------ sampling
SAMPLING = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)


def test_sampling_is_reproducible_with_a_seed(model, run):
    a = run(seed=1, **SAMPLING)
    assert a.shape == (3, T + 10)
    assert np.array_equal(a, model.generate(IDS, MASK, seed=1, **SAMPLING).numpy())  # a fresh call, not the memo
    assert not np.array_equal(a, run(seed=2, **SAMPLING))


def test_top_k_1_sampling_equals_greedy(run):
    greedy = run(max_new_tokens=10)
    assert np.array_equal(run(max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7, seed=5), greedy)


def test_sampling_filters_under_xla_keep_the_same_tokens():
    logits = tf.constant(np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32) * 3)
    cfg = gen.GenerationConfig(do_sample=True, top_k=10, top_p=0.5, temperature=0.7)

    @tf.function(jit_compile=True)
    def xla(x):
        return filter_for_sampling(x, cfg)

    got, want = xla(logits).numpy(), filter_for_sampling(logits, cfg).numpy()
    assert np.array_equal(np.isinf(got), np.isinf(want))  # the same tokens kept
    assert np.allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6, atol=0)  # XLA: x * (1 / t)


# ---------------------------------------------------------------------------- compiled functions
def test_second_call_does_not_retrace(model, run):
    run(max_new_tokens=10)
    run(seed=1, **SAMPLING)
    traces = model.generation_traces
    fns = dict(model._generation_fns)
    model.generate(IDS, MASK, max_new_tokens=10)
    model.generate(IDS, MASK, seed=7, **SAMPLING)  # another seed is an input, not a new function
    assert model.generation_traces == traces
    assert model._generation_fns == fns
    assert all(fn.experimental_get_tracing_count() == 1 for fn in fns.values())


def test_int64_prompts_come_back_int64(model, run):
    out = model.generate(IDS.astype(np.int64), MASK, max_new_tokens=10)
    assert out.dtype == tf.int64 and np.array_equal(out.numpy(), run(max_new_tokens=10))


@pytest.mark.parametrize("kwargs,words", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=0.0, do_sample=True), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens=9"),
    (dict(max_new_tokens=35), "max_position_embeddings=40"),
    (dict(eos_token_id=500), "eos_token_id=500 is outside the vocabulary"),
    (dict(pad_token_id=-1), "pad_token_id=-1 is outside the vocabulary"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(do_sample=True, seed=1.5), "seed=1.5: must be an int"),
])
def test_generate_rejects_bad_arguments(model, kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", "\\(")):
        model.generate(IDS, MASK, **kwargs)


def test_generate_rejects_bad_prompts(model):
    with pytest.raises(ValueError, match="token id 96 at batch row 1, position 4"):
        bad = IDS.copy()
        bad[1, 4] = 96
        model.generate(bad, MASK)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 8\)"):
        model.generate(IDS, MASK[:, 1:])
    with pytest.raises(ValueError, match="input_ids must be \\(batch, length\\)"):
        model.generate(IDS[0])
    with pytest.raises(TypeError, match="input_ids must be integers"):
        model.generate(IDS.astype(np.float32))


# ------------------------------------------------------------------------ other variants, slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["post_ln_proj", "untied_head"])
def test_other_variants_match_torch(tmp_path, name):
    config = VARIANTS[name]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, seed=3), config.to_dict())
    ours, ref = TFOPTForCausalLM.from_pretrained(tmp_path), OPTForCausalLM.from_pretrained(tmp_path)
    ids, mask = random_batch(config, seed=2)
    for kwargs in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=3, length_penalty=1.5)):
        want = ref.generate(torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), **kwargs).numpy()
        assert np.array_equal(ours.generate(ids, mask, **kwargs).numpy(), want)


@pytest.mark.slow
def test_greedy_matches_hugging_face_tf_under_xla(checkpoint, run):
    pytest.importorskip("transformers")
    pytest.importorskip("tf_keras")
    import warnings

    hf = hf_tf_causal_lm(CONFIG, spec_io.load_safetensors_dir(checkpoint))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xla_generate = tf.function(hf.generate, jit_compile=True)
        want = xla_generate(tf.constant(IDS), attention_mask=tf.constant(MASK), max_new_tokens=10,
                            eos_token_id=75, do_sample=False, pad_token_id=1).numpy()
    assert np.array_equal(run(max_new_tokens=10, eos_token_id=75), want)


# ------------------------------------------------------------ Hugging Face's other rules and outputs
def test_token_rules_under_xla_equal_the_reference():
    """Rules 0-3 (sequence bias with one- and multi-token entries and bad words, n-grams, min_length,
    forced EOS, remove_invalid_values, the exponential length penalty, suppressed tokens) compiled by XLA
    equal opt_spec.generation.reference_scores, step by step."""
    from opt_tf.generation import process_logits

    rng = np.random.default_rng(4)
    R, T0, V, N = 4, 6, 24, 5
    seq = rng.integers(0, 5, (R, T0 + N)).astype(np.int32)  # a small alphabet: entries match, n-grams repeat
    seq[:2, T0 - 2:T0] = [2, 3]                              # rows 0-1 end their prompt with [2, 3]
    real = np.ones_like(seq)
    real[1, :2] = 0                                          # a left-padded row
    d = gen.Decoding(max_new_tokens=N, eos_token_ids=(7, 9), no_repeat_ngram_size=2, min_new_tokens=2,
                     sequence_bias=(((4,), -2.5), ((2, 3, 11), 4.0), ((3, 12), float("-inf")), ((0, 1, 2, 13), 1.5)),
                     forced_eos_token_ids=(9,), remove_invalid_values=True, exponential_decay=(1, 1.7),
                     suppress_tokens=(5, 6), begin_suppress_tokens=(8,))

    @tf.function(jit_compile=True)
    def rules(scores, seq, real, now, step):
        return process_logits(scores, None, seq, real, now, step, d)

    for step in range(N):
        L = T0 + step
        logits = (rng.standard_normal((R, V)) * 3).astype(np.float32)
        logits[0, 15], logits[1, 16], logits[2, 17] = np.nan, np.inf, -np.inf  # for remove_invalid_values
        with np.errstate(over="ignore"):  # the forced step: -max EOS scores grown past float32
            want = gen.reference_scores(logits, seq[:, :L], real[:, :L], d, T0)
        got = rules(tf.constant(logits), tf.constant(seq), tf.constant(real), tf.constant(L), tf.constant(step))
        got = got.numpy()
        assert not np.array_equal(got, logits, equal_nan=True)  # the rules did something: the check can fail
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"step {step}")
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("filters", [dict(min_p=0.1), dict(typical_p=0.7), dict(epsilon_cutoff=0.02),
                                     dict(eta_cutoff=0.05), dict(top_k=20, top_p=0.9, min_p=0.02, typical_p=0.8,
                                                                 eta_cutoff=1e-3, renormalize_logits=True)])
def test_sampling_filters_under_xla_equal_the_spec(filters):
    """The filters min_p, typical_p, epsilon and eta (and renormalize_logits) compiled by XLA keep the
    tokens opt_spec's references keep, with the same values."""
    from opt_tf.generation import choice_scores

    scale = np.linspace(0.5, 4, 6)[:, None]  # flat to peaked rows
    logits = (np.random.default_rng(6).standard_normal((6, 60)) * scale).astype(np.float32)
    d = gen.Decoding(max_new_tokens=1, do_sample=True, top_k=filters.pop("top_k", 0), temperature=0.9, **filters)
    got = tf.function(lambda x: choice_scores(x, d), jit_compile=True)(tf.constant(logits)).numpy()
    want = gen.reference_scores(logits, np.zeros((6, 1), np.int32), np.ones((6, 1), np.int32), d, 1)
    assert np.isneginf(want).any() and np.isfinite(want).sum(-1).min() >= 1  # tokens dropped, one kept at least
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


def test_a_record_without_scores_reuses_the_plain_calls_function(model, run):
    """return_dict_in_generate alone (greedy) compiles nothing new: the outputs it does not hold cost nothing."""
    plain = run(max_new_tokens=10)
    traces = model.generation_traces
    record = model.generate(IDS, MASK, max_new_tokens=10, return_dict_in_generate=True, output_scores=False)
    assert model.generation_traces == traces
    np.testing.assert_array_equal(record.sequences.numpy(), plain)


@pytest.mark.slow  # nine compiled functions
def test_the_host_loops_return_the_fast_paths_records(model):
    """Beam search with a logits processor and greedy search with a streamer run step by step on the host:
    the same record as the fast path (tokens, scores, logits, beam_indices, sequences_scores)."""
    outputs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    streamed = []
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, eos_token_id=[41, 93], **outputs)
    greedy = dict(max_new_tokens=4, eos_token_id=75, **outputs)
    for settings, extras in ((beams, dict(logits_processor=[lambda ids, scores: scores])),
                             (greedy, dict(streamer=streamed.append))):
        fast, host = model.generate(IDS, MASK, **settings), model.generate(IDS, MASK, **settings, **extras)
        assert type(host) is type(fast)
        for name in ("sequences", "beam_indices", "sequences_scores"):
            a, b = getattr(host, name, None), getattr(fast, name, None)
            assert (a is None) == (b is None) and (a is None or np.allclose(a.numpy(), b.numpy(), atol=1e-5)), name
        assert len(host.scores) == len(fast.scores) == len(host.logits) == len(fast.logits) > 0
        for a, b in zip(host.scores + host.logits, fast.scores + fast.logits):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.stack(streamed, 1), fast.sequences.numpy()[:, T:])  # the greedy case's steps


# ------------------------------------------------------------------------------------ beam sampling
def beam_sampling_case(model) -> tuple:
    """Prompts (3, 4) with every token real and beam sampling settings whose EOS ids the beams likely meet
    early, with top_p narrow enough that keeping 1 + len(EOS) tokens a beam matters."""
    ids = IDS[:, 5:]
    first = np.argsort(-model(ids).logits[:, -1].numpy(), -1)
    eos = [int(first[0, 0]), int(first[1, 1])]
    return ids, dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, eos_token_id=eos, pad_token_id=1,
                     do_sample=True, temperature=2.0, top_k=0, top_p=0.5, length_penalty=0.7)


def test_beam_sampling_equals_the_reference_given_the_same_draws(model):
    """Beam sampling (do_sample with num_beams) against opt_spec.generation.beam_search_reference with draw=:
    the reference draws from the Gumbel noise generate's XLA program uses (gumbel_noise keyed by the seed and
    the step, one (B, K * V) batch a step, recomputed here under XLA), so every candidate, finished hypothesis
    and running beam must agree; next-token scores are the model's full forward with the spec's filters."""
    from opt_tf.generation import gumbel_noise, seed_key

    ids, settings = beam_sampling_case(model)
    (B, T), N, K, V, seed = ids.shape, settings["max_new_tokens"], settings["num_beams"], CONFIG.vocab_size, 11
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=T, max_positions=40, vocab_size=V)
    noise = tf.function(lambda step: gumbel_noise((B, K * V), seed_key(seed), step), jit_compile=True)
    last_logits = lambda rows: model(rows).logits[:, -1].numpy().astype(np.float32)  # noqa: E731
    padded, finished = beam_samples_reference(last_logits, ids, d, [noise(tf.constant(s)).numpy() for s in range(N)])
    got = model.generate(ids, seed=seed, **settings).numpy()
    np.testing.assert_array_equal(got[:, T:], padded)
    assert finished and any(step < N - 1 for _, step, _ in finished)
    others = [model.generate(ids, seed=s, **settings).numpy() for s in range(seed + 1, seed + 4)]
    assert any(not np.array_equal(other, got) for other in others)  # the draws matter


@pytest.mark.slow  # the host loop's six compiled pieces
def test_the_host_loop_draws_the_fast_paths_beam_samples(model):
    """Beam sampling with a logits processor (the host's step-by-step loop) draws what the fast path draws for
    the same seed: the same tokens, scores and beam_indices."""
    ids, settings = beam_sampling_case(model)
    settings.update(seed=11, return_dict_in_generate=True, output_scores=True)
    fast = model.generate(ids, **settings)
    host = model.generate(ids, logits_processor=[lambda rows, scores: scores], **settings)
    for name in ("sequences", "beam_indices", "sequences_scores"):
        np.testing.assert_allclose(getattr(host, name).numpy(), getattr(fast, name).numpy(), atol=1e-5, err_msg=name)
    assert len(host.scores) == len(fast.scores) > 0
    for a, b in zip(host.scores, fast.scores):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------ a re-used prompt cache
REUSED = 7  # C: the prompt's first positions the cache holds, of T = 9 (rows left-padded by 0, 3 and 5)


def prompt_cache(model, ids=IDS, C=REUSED):
    """The model's KVCache of the rows' first C tokens, as a forward over them gives it."""
    return model(ids[:, :C], attention_mask=MASK[:, :C], use_cache=True).past_key_values


def cache_arrays(cache) -> list:
    return [x.numpy() for x in cache.keys + cache.values] + [int(cache.length)]


def test_generate_reuses_a_cache_of_the_prompts_first_tokens(model, run):
    """generate(past_key_values=the KVCache of input_ids[:, :C]) gives the tokens of the call without it, on the
    fast path (greedy, beams returning two, seeded sampling drawing two a prompt) and the host's loop (a
    streamer, a logits processor); the cache given is left as it was; another cache of the same shapes runs the
    same compiled program (its contents are inputs, not constants)."""
    cache = prompt_cache(model)
    before = cache_arrays(cache)
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
                     dict(max_new_tokens=6, do_sample=True, seed=4, top_k=5, num_return_sequences=2)):
        got = model.generate(IDS, MASK, past_key_values=cache, **settings).numpy()
        np.testing.assert_array_equal(got, run(**settings), err_msg=str(settings))
    streamed = []
    got = model.generate(IDS, MASK, past_key_values=cache, max_new_tokens=6, streamer=streamed.append).numpy()
    np.testing.assert_array_equal(got, run(max_new_tokens=6))
    np.testing.assert_array_equal(np.stack(streamed, 1), got[:, T:])
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)
    got = model.generate(IDS, MASK, past_key_values=cache, logits_processor=[lambda rows, scores: scores], **beams)
    np.testing.assert_array_equal(got.numpy(), run(**beams))
    for a, b in zip(cache_arrays(cache), before, strict=True):
        np.testing.assert_array_equal(a, b)  # the cache given is left as it was

    # another prompt's cache, same shapes: the compiled programs run again, traced once
    other = IDS.copy()
    other[:, 5:REUSED] = (other[:, 5:REUSED] + 1) % CONFIG.vocab_size  # every row's real tokens change
    traces, fns = model.generation_traces, dict(model._generation_fns)
    host = {key: fn.experimental_get_tracing_count() for key, fn in model._host_generation_fns.items()}
    for settings in (beams, dict(max_new_tokens=6)):
        got = model.generate(other, MASK, past_key_values=prompt_cache(model, other), **settings).numpy()
        np.testing.assert_array_equal(got, model.generate(other, MASK, **settings).numpy())
        assert not np.array_equal(got, run(**settings))  # the cache's contents matter
    streamed = []
    model.generate(other, MASK, past_key_values=prompt_cache(model, other), max_new_tokens=6,
                   streamer=streamed.append)
    np.testing.assert_array_equal(np.stack(streamed, 1), got[:, T:])  # greedy's, the loop's last
    assert model.generation_traces == traces and model._generation_fns == fns
    assert all(fn.experimental_get_tracing_count() == 1 for fn in fns.values())
    assert {key: fn.experimental_get_tracing_count() for key, fn in model._host_generation_fns.items()} == host

    # a preallocated cache (init_cache) filled alike is read up to its write position
    filled = model(IDS[:, :REUSED], attention_mask=MASK[:, :REUSED], use_cache=True,
                   past_key_values=model.init_cache(3, 16)).past_key_values
    np.testing.assert_array_equal(model.generate(IDS, MASK, past_key_values=filled, max_new_tokens=6).numpy(),
                                  run(max_new_tokens=6))
    assert model.generation_traces == traces


def test_a_reused_caches_record_covers_the_positions_fed(model, reference):
    """With output_scores / hidden states / attentions: the scores of the call without the cache; step 0's
    hidden states and attentions cover the T - C positions fed and are the plain call's last T - C (the
    attentions over the C + T - C keys); later steps are the plain call's (greedy on the fast path, beam search
    on the host's loop). Greedy's record also equals the PyTorch backend's with its own cache."""
    import torch

    C = REUSED
    cache = prompt_cache(model)
    record = dict(max_new_tokens=4, return_dict_in_generate=True, output_scores=True, output_hidden_states=True,
                  output_attentions=True)
    for settings in (record, dict(record, num_beams=3)):
        got = model.generate(IDS, MASK, past_key_values=cache, **settings)
        plain = model.generate(IDS, MASK, **settings)
        np.testing.assert_array_equal(got.sequences.numpy(), plain.sequences.numpy())
        assert len(got.scores) == len(plain.scores) == len(got.hidden_states) == len(got.attentions) == 4
        for a, b in zip(got.scores, plain.scores):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
        for step in range(4):
            for a, b in zip(got.hidden_states[step], plain.hidden_states[step], strict=True):
                b = b[:, C:] if step == 0 else b  # the positions fed at step 0
                assert a.shape == b.shape
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
            for a, b in zip(got.attentions[step], plain.attentions[step], strict=True):
                b = b[:, :, C:] if step == 0 else b
                assert a.shape == b.shape
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        if "num_beams" not in settings:
            greedy = got
    ids, mask = torch.from_numpy(IDS).long(), torch.from_numpy(MASK).long()
    with torch.no_grad():
        theirs = reference(ids[:, :C], attention_mask=mask[:, :C], use_cache=True).past_key_values
        want = reference.generate(ids, attention_mask=mask, past_key_values=theirs, **record)
    np.testing.assert_array_equal(greedy.sequences.numpy(), want.sequences.numpy())
    for step in range(4):
        np.testing.assert_allclose(greedy.scores[step].numpy(), want.scores[step].numpy(), atol=1e-4)
        for a, b in zip(greedy.hidden_states[step] + greedy.attentions[step],
                        want.hidden_states[step] + want.attentions[step], strict=True):
            assert tuple(a.shape) == tuple(b.shape)
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_generate_refuses_a_cache_it_cannot_reuse(model):
    """past_key_values with inputs_embeds, of another batch / layer count / head count, holding the whole
    prompt, as a tuple, or not the model's KVCache: refused in words before anything is compiled."""
    from opt_tf import KVCache

    cache = prompt_cache(model)
    with pytest.raises(ValueError, match="not with inputs_embeds"):
        model.generate(inputs_embeds=model.get_input_embeddings()(IDS), attention_mask=MASK, past_key_values=cache)
    with pytest.raises(ValueError, match=r"each \(batch 2"):
        model.generate(IDS[:2], MASK[:2], past_key_values=cache)
    with pytest.raises(ValueError, match=f"holds {CONFIG.num_hidden_layers - 1} layers"):
        model.generate(IDS, MASK, past_key_values=KVCache(cache.keys[1:], cache.values[1:], cache.length))
    with pytest.raises(ValueError, match=f"{CONFIG.num_attention_heads}, tokens, {CONFIG.head_dim}"):
        model.generate(IDS, MASK, past_key_values=KVCache([k[:, 1:] for k in cache.keys],
                                                          [v[:, 1:] for v in cache.values], cache.length))
    with pytest.raises(ValueError, match=f"holds {T} tokens and the prompt has {T}"):
        model.generate(IDS, MASK, past_key_values=prompt_cache(model, C=T))
    with pytest.raises(TypeError, match="not a tuple"):
        model.generate(IDS, MASK, past_key_values=tuple(zip(cache.keys, cache.values)))
    with pytest.raises(TypeError, match="got dict"):
        model.generate(IDS, MASK, past_key_values={"keys": cache.keys})
