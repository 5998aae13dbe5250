"""The rest of Hugging Face's generate in every backend, against transformers 4.57.6 on the same random
weights: the rules of opt_spec.generation ("More rules": sequence_bias, bad_words_ids, min_length, forced
BOS/EOS, remove_invalid_values, exponential_decay_length_penalty, suppress tokens, the sampling filters
min_p / typical_p / epsilon / eta, renormalize_logits, early_stopping) and the outputs
(return_dict_in_generate, output_scores, output_logits, sequences_scores, beam_indices,
compute_transition_scores).

The token ids the rules name are taken from the model's own free-running output, so that every rule
changes what it generates (test_each_rule_changes_the_tokens). Sampling cannot match Hugging Face's draws;
its steps are checked against opt_spec.generation.reference_scores on the returned logits, and the
returned logits against Hugging Face's forward of the returned sequences.
"""

import itertools
import time
import warnings

import numpy as np
import pytest
import torch
import transformers

from opt_spec import generation as gen
from opt_spec.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .test_generation_extras import (CONFIG, IDS, MASK, T, backend, checkpoint, hf,  # noqa: F401
                                     models)

V = CONFIG.vocab_size


def to_numpy(x):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(to_numpy(v) for v in x)
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def run(models, backend, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's retracing notes
        return models(backend).generate(IDS, MASK, **kwargs)


def reference(hf, **kwargs):
    kwargs.setdefault("pad_token_id", 1)
    with torch.no_grad():
        return hf.generate(input_ids=torch.from_numpy(IDS).long(), attention_mask=torch.from_numpy(MASK).long(),
                           **kwargs)


def tokens_of(out) -> np.ndarray:
    sequences = out.sequences if hasattr(out, "sequences") else out
    return to_numpy(sequences).astype(np.int64)


def close(a, b, atol=2e-4) -> bool:
    """Equal -inf/+inf positions and finite values within atol (float32 forward passes of two frameworks)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(np.isneginf(a), np.isneginf(b)) \
        and np.array_equal(np.isposinf(a), np.isposinf(b)) \
        and np.allclose(np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b), atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------- the settings
def first_pair_that_matters(hf, settings: dict, key: str, values: tuple) -> list:
    """EOS ids for a beam search case: the first pair of tokens its beams produce (without EOS ids) with
    which every value of `key` gives different outputs."""
    seen = reference(hf, **settings, eos_token_id=None).numpy()[:, T:]
    for pair in itertools.combinations(sorted(set(seen[:, 1:5].ravel().tolist())), 2):
        outs = [reference(hf, **settings, eos_token_id=list(pair), **{key: v}).numpy().tolist() for v in values]
        if all(x != y for x, y in itertools.combinations(outs, 2)):
            return list(pair)
    raise AssertionError(f"no EOS pair makes {key} matter in {settings}")


@pytest.fixture(scope="module")
def cases(hf):
    """Settings naming tokens the model really produces (free: greedy decoding that repeats no token), so
    that every rule changes the tokens."""
    free = reference(hf, max_new_tokens=8, eos_token_id=None, no_repeat_ngram_size=1).numpy()[:, T:]
    a, b, c = (int(x) for x in free[:, 0])              # each row's first new token
    eos = [int(free[0, 4]), int(free[2, 3])]
    greedy = dict(max_new_tokens=8, eos_token_id=eos, bad_words_ids=[[a], [int(free[1, 0]), int(free[1, 1])]],
                  min_length=T + 3, begin_suppress_tokens=[c], exponential_decay_length_penalty=(3, 3.0),
                  renormalize_logits=True)
    o = reference(hf, **greedy).numpy()[:, T:]          # what the rules so far give: suppress and bias those
    greedy.update(suppress_tokens=[int(o[1, 2])], sequence_bias=[[[int(o[0, 1])], -8.0],
                                                                 [[int(o[2, 0]), int(o[2, 1])], -8.0],
                                                                 [[int(o[1, 1])], 2.0]])
    beams = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=2.0, bad_words_ids=[[a], [b]],
                 suppress_tokens=[c])
    never = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=1.5,
                 sequence_bias=[[[a], -3.0]], renormalize_logits=True)
    return {
        "greedy": greedy,
        "forced": dict(max_new_tokens=5, eos_token_id=eos, forced_eos_token_id=[b, 9], remove_invalid_values=True,
                       bad_words_ids=[[a]]),
        "beams": dict(beams, early_stopping=True,
                      eos_token_id=first_pair_that_matters(hf, beams, "early_stopping", (False, True))),
        "beams_never": dict(never, early_stopping="never",
                            eos_token_id=first_pair_that_matters(hf, never, "early_stopping", (False, "never"))),
        "sampling": dict(max_new_tokens=6, do_sample=True, seed=5, temperature=0.8, top_k=0, min_p=0.05,
                         typical_p=0.9, epsilon_cutoff=2e-3, eta_cutoff=2e-3, eos_token_id=eos,
                         bad_words_ids=[[a]], suppress_tokens=[c], renormalize_logits=True),
    }


OUTPUTS = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
SEARCHES = ("greedy", "forced", "beams", "beams_never")


def test_each_rule_changes_the_tokens(hf, cases):
    """Without any one of its rules, each case's tokens change in Hugging Face: every rule is exercised."""
    for name in SEARCHES:
        settings = cases[name]
        full = reference(hf, **settings).numpy()
        for key in settings:
            if key in ("max_new_tokens", "num_beams", "num_return_sequences", "eos_token_id", "length_penalty",
                       "renormalize_logits", "remove_invalid_values"):  # the last two change scores, not tokens
                continue
            fewer = {k: v for k, v in settings.items() if k != key}
            assert not np.array_equal(reference(hf, **fewer).numpy(), full), (name, key)


# ------------------------------------------------------------------------------- tokens and scores
@pytest.mark.parametrize("name", SEARCHES)
def test_rules_give_hugging_faces_tokens_and_scores(models, hf, backend, cases, name):
    settings = cases[name]
    want = reference(hf, **settings, **OUTPUTS)
    out = run(models, backend, **settings, **OUTPUTS)
    beams = settings.get("num_beams", 1) > 1
    assert isinstance(out, GenerateBeamDecoderOnlyOutput if beams else GenerateDecoderOnlyOutput)
    np.testing.assert_array_equal(tokens_of(out), want.sequences.numpy())
    scores, logits = to_numpy(out.scores), to_numpy(out.logits)
    assert len(scores) == len(want.scores) == len(logits)
    if beams:
        np.testing.assert_array_equal(to_numpy(out.beam_indices), want.beam_indices.numpy())
        np.testing.assert_allclose(to_numpy(out.sequences_scores), want.sequences_scores.numpy(), atol=2e-4)
        steps = [0]  # later steps' running beams are checked through the transition scores below
        mine = to_numpy(models(backend).compute_transition_scores(out.sequences, out.scores, out.beam_indices))
        theirs = hf.compute_transition_scores(want.sequences, want.scores, want.beam_indices).numpy()
        assert close(mine, theirs)
    else:
        steps = range(len(scores))
    done = np.zeros(scores[0].shape[0], bool)
    for s in steps:  # rows still running (a finished row's scores are of the pad it is fed: unspecified)
        live = ~done
        assert close(scores[s][live], want.scores[s].numpy()[live]), (name, s)
        assert close(logits[s][live], want.logits[s].numpy()[live]), (name, s)
        if not beams:
            done |= np.isin(tokens_of(out)[:, T + s], settings["eos_token_id"])


def test_the_host_loop_gives_the_fast_paths_tokens_and_scores(models, backend, cases):
    """A logits processor sends a call through the step-by-step host loop: same rules, same outputs."""
    settings = cases["greedy"]
    fast = run(models, backend, **settings, **OUTPUTS)
    host = run(models, backend, **settings, **OUTPUTS, logits_processor=[lambda ids, scores: scores])
    np.testing.assert_array_equal(tokens_of(host), tokens_of(fast))
    for a, b in zip(to_numpy(host.scores), to_numpy(fast.scores)):
        assert close(a, b, atol=1e-5)


def test_sampling_steps_follow_the_reference(models, hf, backend, cases):
    """Each sampling step's scores are opt_spec.generation.reference_scores of that step's logits (every
    filter, renormalized); the logits are the model's (Hugging Face's forward of the returned rows); every
    drawn token had a finite score; the seed reproduces the draw."""
    settings = cases["sampling"]
    out = run(models, backend, **settings, **OUTPUTS)
    seq = tokens_of(out)
    np.testing.assert_array_equal(tokens_of(run(models, backend, **settings)), seq)
    d = gen.resolve(gen.GenerationConfig(pad_token_id=1), None, settings, prompt_length=T,
                    max_positions=CONFIG.max_position_embeddings, vocab_size=V)
    scores, logits = to_numpy(out.scores), to_numpy(out.logits)
    real = np.concatenate([MASK, np.ones((seq.shape[0], seq.shape[1] - T), MASK.dtype)], 1)
    with torch.no_grad():
        full = hf(input_ids=torch.from_numpy(seq), attention_mask=torch.from_numpy(real)).logits.float().numpy()
    done = np.zeros(seq.shape[0], bool)
    filtered = 0
    for s in range(len(scores)):
        live = ~done
        want = gen.reference_scores(logits[s], seq[:, :T + s], real[:, :T + s], d, T)
        assert close(scores[s][live], want[live], atol=1e-5), s
        assert close(logits[s][live], full[:, T + s - 1][live]), s
        chosen = scores[s][np.arange(seq.shape[0]), seq[:, T + s]]
        assert np.isfinite(chosen[live]).all(), s
        filtered += int(np.isneginf(scores[s][live]).sum() - np.isneginf(logits[s][live]).sum())
        done |= np.isin(seq[:, T + s], settings["eos_token_id"])
    assert filtered > 0  # the filters removed tokens


def test_outputs_hold_what_was_asked_for(models, backend):
    plain = run(models, backend, max_new_tokens=3)
    record = run(models, backend, max_new_tokens=3, return_dict_in_generate=True)
    np.testing.assert_array_equal(tokens_of(record), tokens_of(plain))
    assert record.scores is None and record.logits is None and record[0] is record.sequences
    beams = run(models, backend, max_new_tokens=3, num_beams=2, return_dict_in_generate=True)
    assert beams.sequences_scores is None and beams.scores is None and beams.beam_indices is not None
    with_scores = run(models, backend, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert len(with_scores.scores) == 3 and with_scores.logits is None
    assert tuple(with_scores.scores[0].shape) == (IDS.shape[0], V)


def test_transition_scores_equal_hugging_faces(models, hf, backend):
    settings = dict(max_new_tokens=5, eos_token_id=None, **OUTPUTS)
    out, want = run(models, backend, **settings), reference(hf, **settings)
    for normalize in (False, True):
        mine = models(backend).compute_transition_scores(out.sequences, out.scores, normalize_logits=normalize)
        assert type(mine) is type(out.sequences) or backend == "flax"  # the backend's own array type
        theirs = hf.compute_transition_scores(want.sequences, want.scores, normalize_logits=normalize).numpy()
        assert close(to_numpy(mine), theirs)


# ---------------------------------------------------------------------------------- beam sampling
def test_cold_beam_sampling_gives_hugging_faces_beam_search(models, hf, backend, cases):
    """do_sample=True with num_beams (Hugging Face's beam sample) at temperature 1e-4: every score is 10^4 times
    beam search's, so drawing without replacement takes the best candidates in order and the hypotheses are
    Hugging Face's beam search's. (Hugging Face's own beam sample is not the reference here: its
    torch.multinomial draws the candidates after the first from probabilities that underflowed to 0.)"""
    want = tokens_of(reference(hf, **cases["beams"]))
    got = tokens_of(run(models, backend, **cases["beams"], do_sample=True, temperature=1e-4, top_k=0, seed=1))
    assert got.tolist() == want.tolist()


def test_beam_sampling_scores_add_up(models, backend, cases):
    """Warm beam sampling (every filter, keeping 1 + len(EOS) tokens a beam): the seed reproduces the draw, seeds
    differ, and each returned hypothesis's sequences_scores is the sum of its tokens' processed scores
    (compute_transition_scores over scores and beam_indices) over its length ** length_penalty, each finite."""
    settings = dict(cases["beams"], do_sample=True, temperature=1.3, top_k=5, top_p=0.9, min_p=0.05,
                    return_dict_in_generate=True, output_scores=True)
    out = run(models, backend, **settings, seed=2)
    assert tokens_of(run(models, backend, **settings, seed=2)).tolist() == tokens_of(out).tolist()
    assert len({tokens_of(run(models, backend, **settings, seed=s)).tobytes() for s in range(4)}) > 1
    model = models(backend)
    steps = to_numpy(model.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    indices = to_numpy(out.beam_indices)
    lengths = (indices >= 0).sum(-1)
    assert np.isfinite(steps[indices >= 0]).all()
    want = steps.sum(-1) / lengths.astype(np.float32) ** settings["length_penalty"]
    assert close(to_numpy(out.sequences_scores), want, 1e-4)


def test_min_length_holds_under_the_length_penalty(models, backend):
    """min_length bans EOS; exponential_decay_length_penalty boosts EOS scores, and with remove_invalid_values
    the ban is the lowest float32, not -inf: a boost past 2x used to overflow it to +inf (EOS chosen at
    once). No row ends before min_length in any backend, and the rows do end after it."""
    free = tokens_of(run(models, backend, max_new_tokens=6, eos_token_id=None))[:, T:]
    eos = sorted({int(free[0, 0]), int(free[1, 0]), int(free[2, 0])})   # every row would end at once
    settings = dict(max_new_tokens=6, eos_token_id=eos, min_length=T + 3, exponential_decay_length_penalty=(0, 3.0))
    for extra in ({}, {"remove_invalid_values": True}):
        new = tokens_of(run(models, backend, **settings, **extra))[:, T:]
        assert not np.isin(new[:, :3], eos).any(), (extra, new)
        assert np.isin(new[:, 3], eos).all(), (extra, new)  # boosted 3 ** 3 - 1 times: they end right after


# ------------------------------------------------------- stopping_criteria and prefix_allowed_tokens_fn
def host_ints(x) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x).astype(np.int64)


class LastTokenIn:
    """A stopping criterion: a row is done when its last token is one of `ids` (called with the backend's
    arrays, like Hugging Face's StoppingCriteria with torch's); records what it was given."""

    def __init__(self, ids, backend_result):
        self.ids, self.make, self.calls = list(ids), backend_result, []

    def __call__(self, input_ids, scores, **kwargs):
        rows = host_ints(input_ids)
        self.calls.append((rows.shape, None if scores is None else len(scores)))
        return self.make(np.isin(rows[:, -1], self.ids))


def allow_after(free):
    """prefix_allowed_tokens_fn: each batch row may take only a few tokens depending on its last token and
    batch_id (a different set per row, so the batch_id matters)."""
    pool = sorted({int(t) for t in free.ravel()})

    def fn(batch_id, row):
        last = int(host_ints(row)[-1])
        start = (last + 7 * batch_id) % len(pool)
        return [pool[(start + j) % len(pool)] for j in range(3)]
    return fn


def as_backend_bool(backend):
    if backend == "torch":
        return lambda x: torch.from_numpy(x)
    if backend == "tf":
        import tensorflow as tf
        return lambda x: tf.constant(x)
    import jax.numpy as jnp
    return lambda x: jnp.asarray(x)


@pytest.mark.parametrize("search", ["greedy", "beams"])
def test_stopping_criteria_and_prefix_allowed_tokens_give_hugging_faces_tokens(models, hf, backend, cases, search):
    free = reference(hf, max_new_tokens=8, eos_token_id=None, no_repeat_ngram_size=1).numpy()[:, T:]
    settings = dict(max_new_tokens=7, eos_token_id=CONFIG.eos_token_id, **OUTPUTS)  # never allowed: rows end by
    if search == "beams":                                                           # the criterion alone
        settings.update(num_beams=3, num_return_sequences=2)
    fn = allow_after(free)
    stop = sorted({int(t) for t in free[:, :3].ravel()})[:4]
    mine = LastTokenIn(stop, as_backend_bool(backend))
    theirs = LastTokenIn(stop, lambda x: torch.from_numpy(x))
    out = run(models, backend, **settings, stopping_criteria=[mine], prefix_allowed_tokens_fn=fn)
    want = reference(hf, **settings, stopping_criteria=transformers.StoppingCriteriaList([theirs]),
                     prefix_allowed_tokens_fn=lambda b, row: fn(b, row))
    np.testing.assert_array_equal(tokens_of(out), want.sequences.numpy())
    done = np.zeros(IDS.shape[0], bool)
    for s in range(len(want.scores) if search == "greedy" else 0):  # rows still running (as above)
        assert close(to_numpy(out.scores)[s][~done], want.scores[s].numpy()[~done]), s
        done |= np.isin(want.sequences.numpy()[:, T + s], stop)
    assert mine.calls == theirs.calls                   # the same rows and scores handed to the criterion
    plain = reference(hf, **{k: v for k, v in settings.items() if k not in OUTPUTS})
    assert not np.array_equal(plain.numpy(), want.sequences.numpy())  # the rules changed the tokens
    if search == "beams":
        np.testing.assert_allclose(to_numpy(out.sequences_scores), want.sequences_scores.numpy(), atol=2e-4)


def test_prefix_allowed_tokens_while_sampling_gives_each_drawn_row_its_batch_id(models, hf, backend):
    free = reference(hf, max_new_tokens=8, eos_token_id=None, no_repeat_ngram_size=1).numpy()[:, T:]
    fn = allow_after(free)
    seen = []

    def recording(batch_id, row):
        seen.append(batch_id)
        return fn(batch_id, row)

    out = tokens_of(run(models, backend, max_new_tokens=4, do_sample=True, num_return_sequences=2, seed=3,
                        eos_token_id=None, prefix_allowed_tokens_fn=recording))
    assert sorted(set(seen)) == list(range(2 * IDS.shape[0]))  # Hugging Face's batch_id: the drawn row
    for r in range(out.shape[0]):
        for s in range(4):
            assert out[r, T + s] in fn(r, out[r, :T + s]), (r, s)


def test_a_criterion_returning_one_bool_stops_every_row(models, hf, backend):
    calls = []

    def after_three(input_ids, scores):
        calls.append(host_ints(input_ids).shape[1])
        return host_ints(input_ids).shape[1] >= T + 3

    out = tokens_of(run(models, backend, max_new_tokens=8, eos_token_id=None, stopping_criteria=[after_three]))
    want = reference(hf, max_new_tokens=8, eos_token_id=None,
                     stopping_criteria=transformers.StoppingCriteriaList([lambda ids, scores: ids.shape[1] >= T + 3]))
    np.testing.assert_array_equal(out, want.numpy())
    assert out.shape[1] == T + 3 and calls == [T + 1, T + 2, T + 3]


@pytest.mark.parametrize("search", ["greedy", "beams"])
def test_an_expired_max_time_stops_after_one_step_as_in_hugging_face(models, hf, backend, search):
    settings = dict(max_new_tokens=6, eos_token_id=None)
    if search == "beams":
        settings.update(num_beams=3, num_return_sequences=2)
    out = tokens_of(run(models, backend, **settings, max_time=0.0))  # asked after each step: one token
    np.testing.assert_array_equal(out, reference(hf, **settings, max_time=0.0).numpy())
    assert out.shape[1] == T + 1
    plenty = tokens_of(run(models, backend, **settings, max_time=1e6))
    np.testing.assert_array_equal(plenty, reference(hf, **settings).numpy())
    assert plenty.shape[1] == T + 6


def test_max_time_ends_a_slow_generation_between_steps(models, backend):
    steps = []

    def slow(input_ids, scores):  # 50 ms a step: a 0.2 s budget is spent after at most 5 steps
        steps.append(1)
        time.sleep(0.05)
        return scores

    out = tokens_of(run(models, backend, max_new_tokens=30, eos_token_id=None, max_time=0.2,
                        logits_processor=[slow]))
    assert 1 <= out.shape[1] - T == len(steps) <= 5


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(stopping_criteria=[3]), TypeError, r"stopping_criteria\[0\] is a int"),
    (dict(prefix_allowed_tokens_fn="abc"), TypeError, "prefix_allowed_tokens_fn is a str"),
    (dict(prefix_allowed_tokens_fn=lambda b, row: []), ValueError, "returned no token for batch_id 0"),
    (dict(prefix_allowed_tokens_fn=lambda b, row: [V + 3]), ValueError, f"token id {V + 3} for batch_id 0"),
    (dict(stopping_criteria=[lambda ids, scores: np.zeros((5,), bool)]), ValueError,
     r"stopping_criteria\[0\] returned bool of shape \(5,\)"),
])
def test_bad_host_rules_are_refused_by_name(models, backend, kwargs, error, words):
    with pytest.raises(error, match=words):
        run(models, backend, max_new_tokens=2, **kwargs)


# ------------------------------------------------------------------------ hidden states and attentions
@pytest.fixture(scope="module")
def hf_eager(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.OPTForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()


@pytest.mark.parametrize("how", ["greedy", "sampling"])
def test_hidden_states_and_attentions_per_step_as_hugging_face(models, backend, hf_eager, how):
    """output_hidden_states / output_attentions: one entry per step taken, each a tuple over the layers of what
    Hugging Face's incremental forward passes give: the prompt first (q = k = T), then each new position
    (q = 1, k = T + s). Hugging Face is made to generate exactly our rows (prefix_allowed_tokens_fn allowing
    each row's own next token), so sampled rows and rows finished early (pads fed after EOS) are compared too."""
    free = reference(hf_eager, max_new_tokens=6, eos_token_id=None).numpy()[:, T:]
    settings = dict(max_new_tokens=6, eos_token_id=int(free[1, 2]), return_dict_in_generate=True,
                    output_hidden_states=True, output_attentions=True)
    if how == "sampling":
        settings.update(do_sample=True, seed=3, num_return_sequences=2, top_k=0)
    out = run(models, backend, **settings)
    rows = tokens_of(out)
    steps = rows.shape[1] - T
    assert out.scores is None and len(out.hidden_states) == len(out.attentions) == steps >= 3
    n = len(rows) // len(IDS)
    allowed = lambda b, prefix: [int(rows[b, len(prefix)])] if len(prefix) < rows.shape[1] else [1]  # noqa: E731
    with torch.no_grad():
        want = hf_eager.generate(input_ids=torch.from_numpy(np.repeat(IDS, n, 0)).long(),
                                 attention_mask=torch.from_numpy(np.repeat(MASK, n, 0)).long(), pad_token_id=1,
                                 max_new_tokens=6, eos_token_id=settings["eos_token_id"], return_dict_in_generate=True,
                                 output_hidden_states=True, output_attentions=True, prefix_allowed_tokens_fn=allowed)
    assert tokens_of(want).tolist() == rows.tolist() and len(want.hidden_states) == steps
    layers, real = CONFIG.num_hidden_layers, np.repeat(MASK, n, 0).astype(bool)
    for s in range(steps):
        q = T if s == 0 else 1
        queries = real if s == 0 else np.ones((len(rows), 1), bool)  # a pad's own state is not specified
        hidden, attention = to_numpy(out.hidden_states[s]), to_numpy(out.attentions[s])
        assert len(hidden) == layers + 1 and len(attention) == layers
        for ours_h, hf_h in zip(hidden, want.hidden_states[s]):
            assert ours_h.shape == (len(rows), q, CONFIG.hidden_size), s
            assert close(ours_h[queries], hf_h.numpy()[queries], 1e-4), s
        for ours_a, hf_a in zip(attention, want.attentions[s]):
            assert ours_a.shape == (len(rows), CONFIG.num_attention_heads, q, T + s) == tuple(hf_a.shape), s
            assert close(ours_a.transpose(0, 2, 1, 3)[queries], hf_a.numpy().transpose(0, 2, 1, 3)[queries], 1e-5), s


def test_hidden_states_need_the_record(models, backend):
    plain = run(models, backend, max_new_tokens=3, output_hidden_states=True, output_attentions=True)
    assert tokens_of(plain).tolist() == tokens_of(run(models, backend, max_new_tokens=3)).tolist()  # ids only
    record = run(models, backend, max_new_tokens=3, return_dict_in_generate=True)
    assert record.hidden_states is None and record.attentions is None
    beams = run(models, backend, max_new_tokens=3, num_beams=2, return_dict_in_generate=True)
    assert beams.hidden_states is None and beams.attentions is None


@pytest.mark.parametrize("backend, early_stopping", [("torch", False), ("torch", True), ("tf", True),
                                                     ("flax", True)])  # the compiled backends: the faster case
def test_beam_search_hidden_states_and_attentions_per_step_as_hugging_face(models, backend, hf_eager, early_stopping):
    """Beam search's output_hidden_states / output_attentions: one entry per step taken, each over the running
    beams of that step (B * num_beams rows, in the order of its scores), as Hugging Face's forward passes give
    them: the prompt first (q = k = T, every beam the same prompt), then each new position (q = 1, k = T + s).
    The tokens, scores and beam indices stay what they are without them."""
    K = 3
    eos = int(reference(hf_eager, max_new_tokens=6, eos_token_id=None).numpy()[0, T + 2])  # a beam finishes early
    settings = dict(max_new_tokens=6, num_beams=K, num_return_sequences=2, eos_token_id=eos,
                    early_stopping=early_stopping, return_dict_in_generate=True, output_scores=True)
    plain = run(models, backend, **settings)
    out = run(models, backend, **settings, output_hidden_states=True, output_attentions=True)
    assert tokens_of(out).tolist() == tokens_of(plain).tolist()
    assert np.array_equal(to_numpy(out.beam_indices), to_numpy(plain.beam_indices))
    with torch.no_grad():
        want = hf_eager.generate(input_ids=torch.from_numpy(IDS).long(), attention_mask=torch.from_numpy(MASK).long(),
                                 pad_token_id=1, do_sample=False, output_hidden_states=True, output_attentions=True,
                                 **settings)
    assert tokens_of(want).tolist() == tokens_of(out).tolist()
    steps = len(want.scores)
    assert len(out.scores) == len(out.hidden_states) == len(out.attentions) == steps >= 3
    layers, real = CONFIG.num_hidden_layers, np.repeat(MASK, K, 0).astype(bool)
    for s in range(steps):
        assert close(to_numpy(out.scores[s]), want.scores[s].numpy(), 1e-4), s  # the same running beams
        q = T if s == 0 else 1
        queries = real if s == 0 else np.ones((len(real), 1), bool)  # a pad's own state is not specified
        hidden, attention = to_numpy(out.hidden_states[s]), to_numpy(out.attentions[s])
        assert len(hidden) == layers + 1 and len(attention) == layers
        for ours_h, hf_h in zip(hidden, want.hidden_states[s]):
            assert ours_h.shape == (len(real), q, CONFIG.hidden_size) == tuple(hf_h.shape), s
            assert close(ours_h[queries], hf_h.numpy()[queries], 1e-4), s
        for ours_a, hf_a in zip(attention, want.attentions[s]):
            assert ours_a.shape == (len(real), CONFIG.num_attention_heads, q, T + s) == tuple(hf_a.shape), s
            assert close(ours_a.transpose(0, 2, 1, 3)[queries], hf_a.numpy().transpose(0, 2, 1, 3)[queries], 1e-5), s
