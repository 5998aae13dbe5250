"""opt_spec.generation's rules of one decoding step against Hugging Face's: `reference_scores` (the
definition every backend's step is tested against) equals the scores of the logits-processor list that
transformers 4.57.6's generate builds for the same settings, on random logits and rows, rule by rule and
all together; the settings' checks; `transition_scores` against compute_transition_scores."""

import dataclasses
import math

import numpy as np
import pytest

from opt_spec import generation as gen

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

V, T = 40, 6
EOS = [2, 7]


def hf_model():
    config = transformers.OPTConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
                                    max_position_embeddings=64, word_embed_proj_dim=8)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf():
    return hf_model()


def hf_processors(hf, settings: dict, prompt_length: int, max_new_tokens: int, prefix_allowed_tokens_fn=None):
    """The LogitsProcessorList Hugging Face's generate builds for these settings (its lengths prepared as
    generate prepares them: min_new_tokens replaces min_length)."""
    config = transformers.GenerationConfig(**{"eos_token_id": EOS, "pad_token_id": 1, **settings,
                                              "max_length": prompt_length + max_new_tokens})
    hf._prepare_special_tokens(config, device="cpu")
    config = hf._prepare_generated_length(config, has_default_max_length=False,
                                          has_default_min_length="min_length" not in settings,
                                          model_input_name="input_ids", input_ids_length=prompt_length,
                                          inputs_tensor=torch.zeros(1, prompt_length, dtype=torch.long))
    return hf._get_logits_processor(config, input_ids_seq_length=prompt_length,
                                    encoder_input_ids=torch.zeros(1, prompt_length, dtype=torch.long),
                                    prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                    logits_processor=transformers.LogitsProcessorList(), device="cpu")


def ours(settings: dict, prompt_length: int, max_new_tokens: int) -> gen.Decoding:
    return gen.resolve(gen.GenerationConfig(), None, {"eos_token_id": EOS, "pad_token_id": 1, **settings,
                                                      "max_new_tokens": max_new_tokens},
                       prompt_length=prompt_length, max_positions=64, vocab_size=V)


def rows(seed: int, R: int, L: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 12, size=(R, L))           # few distinct ids: n-grams and sequences repeat
    logits = (rng.standard_normal((R, V)) * 3).astype(np.float32)
    return tokens, logits


def same(a: np.ndarray, b: np.ndarray, atol=1e-5) -> bool:
    return np.array_equal(np.isneginf(a), np.isneginf(b)) and np.array_equal(np.isposinf(a), np.isposinf(b)) \
        and np.allclose(np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b), atol=atol, rtol=1e-5)


RULES = {
    "sequence_bias": dict(sequence_bias=[[[5], 1.5], [[4, 5], -2.0], [[3, 4, 6], 0.75], [[9], -1.0]]),
    "bad_words": dict(bad_words_ids=[[5], [4, 6], [3, 4, 8], [2]]),   # [2] is an EOS id: not banned
    "repetition": dict(repetition_penalty=1.4),
    "ngrams": dict(no_repeat_ngram_size=2),
    "min_length": dict(min_length=T + 3),
    "min_new_tokens": dict(min_new_tokens=2),
    "forced_eos": dict(forced_eos_token_id=[7, 30]),
    "decay": dict(exponential_decay_length_penalty=(1, 1.7)),
    "invalid_values": dict(remove_invalid_values=True, suppress_tokens=[3]),
    "suppress": dict(suppress_tokens=[4, 10, 39]),
    "begin_suppress": dict(begin_suppress_tokens=[5, 6]),
    "renormalize": dict(renormalize_logits=True, bad_words_ids=[[8]]),
    "temperature_top_k_p": dict(do_sample=True, temperature=0.7, top_k=9, top_p=0.8),
    "min_p": dict(do_sample=True, min_p=0.2, top_k=0),
    "typical": dict(do_sample=True, typical_p=0.6, top_k=0),
    "epsilon": dict(do_sample=True, epsilon_cutoff=0.03, top_k=0),
    "eta": dict(do_sample=True, eta_cutoff=0.05, top_k=0),
    "sampling_only_filters_ignored_in_greedy": dict(min_p=0.5, typical_p=0.3, top_k=3),
    "filters_at_their_narrowest": dict(do_sample=True, top_k=1, top_p=0.05, min_p=0.9, typical_p=0.05,
                                       epsilon_cutoff=0.5, eta_cutoff=0.5),
    "everything": dict(sequence_bias=[[[5], 1.5], [[4, 5], -2.0]], bad_words_ids=[[6], [4, 9]],
                       repetition_penalty=1.3, no_repeat_ngram_size=3, min_length=T + 2, min_new_tokens=1,
                       exponential_decay_length_penalty=(1, 1.3),
                       suppress_tokens=[11], begin_suppress_tokens=[12], do_sample=True, temperature=1.3, top_k=20,
                       top_p=0.95, min_p=0.01, typical_p=0.99, epsilon_cutoff=0.001, eta_cutoff=0.001,
                       renormalize_logits=True),
}


@pytest.mark.parametrize("name,mode", [(name, mode) for name in sorted(RULES)
                                       for mode in ("greedy_or_sampling", "beam", "beam_sample")
                                       if mode != "beam_sample" or RULES[name].get("do_sample")])
def test_each_steps_scores_equal_hugging_faces_processors(hf, name, mode):
    """Every rule's scores; beam sampling's filters keep at least 1 + len(EOS) tokens per beam."""
    settings, beam = dict(RULES[name]), mode != "greedy_or_sampling"
    if mode == "beam" and settings.pop("do_sample", False):
        settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_k", "top_p", "min_p",
                                                                     "typical_p", "epsilon_cutoff", "eta_cutoff")}
    if beam:
        settings["num_beams"] = 2
    N = 4
    for step in range(N):
        for seed in range(3):
            tokens, logits = rows(seed * 10 + step, R=4, L=T + step)
            if name == "invalid_values":
                logits[0, :3], logits[1, 5] = [np.nan, np.inf, -np.inf], np.nan
            processors = hf_processors(hf, settings, T, N)
            x = torch.from_numpy(logits)
            if beam:
                x = torch.log_softmax(x, -1)
            want = processors(torch.from_numpy(tokens), x).numpy()
            got = gen.reference_scores(logits, tokens, np.ones_like(tokens), ours(settings, T, N), T, beam=beam)
            assert same(got, want), (name, step, seed, np.argwhere(~np.isclose(got, want)))
            if name == "filters_at_their_narrowest" and mode != "beam":  # each filter alone would keep one
                assert (np.isfinite(got).sum(-1) == (1 + len(EOS) if mode == "beam_sample" else 1)).all()


def test_forced_bos_and_begin_suppress_on_a_one_token_prompt(hf):
    settings = dict(forced_bos_token_id=9, begin_suppress_tokens=[4, 5])
    for step in range(3):
        tokens, logits = rows(step, R=2, L=1 + step)
        want = hf_processors(hf, settings, 1, 3)(torch.from_numpy(tokens), torch.from_numpy(logits)).numpy()
        d = ours(settings, 1, 3)
        assert d.begin_suppress_step == 1
        assert same(gen.reference_scores(logits, tokens, np.ones_like(tokens), d, 1), want), step


def test_a_banned_eos_stays_banned_under_the_length_penalty(hf):
    """min_length bans EOS while exponential_decay_length_penalty would boost it: Hugging Face computes
    -inf + inf = NaN (every probability then NaN); optkit keeps the ban, the rest as Hugging Face."""
    settings = dict(min_length=T + 3, exponential_decay_length_penalty=(0, 1.5))
    tokens, logits = rows(0, R=2, L=T + 1)
    want = hf_processors(hf, settings, T, 4)(torch.from_numpy(tokens), torch.from_numpy(logits)).numpy()
    got = gen.reference_scores(logits, tokens, np.ones_like(tokens), ours(settings, T, 4), T)
    assert np.isnan(want[:, EOS]).all() and (got[:, EOS] == -np.inf).all()
    others = np.setdiff1d(np.arange(V), EOS)
    assert same(got[:, others], want[:, others])


def test_a_banned_eos_stays_banned_when_invalid_values_are_removed_first(hf):
    """remove_invalid_values turns min_length's -inf into the lowest float32; a length penalty growing past
    2x then overflows it to +inf in Hugging Face, so EOS is chosen inside min_length. optkit keeps the ban."""
    settings = dict(min_length=T + 4, remove_invalid_values=True, exponential_decay_length_penalty=(0, 2.5))
    tokens, logits = rows(1, R=2, L=T + 2)
    want = hf_processors(hf, settings, T, 4)(torch.from_numpy(tokens), torch.from_numpy(logits)).numpy()
    got = gen.reference_scores(logits, tokens, np.ones_like(tokens), ours(settings, T, 4), T)
    assert (want[:, EOS] == np.inf).all() and (got[:, EOS] == np.finfo(np.float32).min).all()
    others = np.setdiff1d(np.arange(V), EOS)
    assert same(got[:, others], want[:, others])


def test_every_rule_changes_the_scores():
    """Each setting of RULES is really applied by the reference (a rule that did nothing would pass the
    comparison above only if Hugging Face's did nothing too)."""
    for name, settings in RULES.items():
        if name == "sampling_only_filters_ignored_in_greedy":
            continue
        changed = False
        for step in range(4):
            tokens, logits = rows(step, R=4, L=T + step)
            d = ours(settings, T, 4)
            plain = dataclasses.replace(ours({k: v for k, v in settings.items() if k == "do_sample"}, T, 4))
            got = gen.reference_scores(logits, tokens, np.ones_like(tokens), d, T)
            base = gen.reference_scores(logits, tokens, np.ones_like(tokens), plain, T)
            changed |= not same(got, base)
        assert changed, name


def test_bad_words_join_the_sequence_bias_and_eos_alone_is_kept():
    d = ours(dict(bad_words_ids=[[2], [3, 2], [5]], sequence_bias={(5,): 1.0, (8,): 0.5}), T, 3)
    assert d.sequence_bias == (((5,), -math.inf), ((8,), 0.5), ((3, 2), -math.inf))


@pytest.mark.parametrize("settings,words", [
    (dict(min_length=-1), "min_length=-1"),
    (dict(early_stopping="always"), "early_stopping='always'"),
    (dict(bad_words_ids=[]), "bad_words_ids"),
    (dict(bad_words_ids=[[3, -1]]), "bad_words_ids"),
    (dict(bad_words_ids=[[3, 99]]), "bad_words_ids: token id 99 is outside the vocabulary"),
    (dict(sequence_bias={(3,): float("nan")}), "a bias must be a number"),
    (dict(sequence_bias=[[[], 1.0]]), "non-empty list of token ids"),
    (dict(sequence_bias={(200,): 1.0}), "sequence_bias: token id 200"),
    (dict(suppress_tokens=[1, "a"]), "suppress_tokens"),
    (dict(forced_eos_token_id=[]), "forced_eos_token_id"),
    (dict(forced_bos_token_id=V), "forced_bos_token_id: token id 40"),
    (dict(exponential_decay_length_penalty=(2, 0)), "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=[1]), "exponential_decay_length_penalty"),
    (dict(min_p=1.5), "min_p=1.5"),
    (dict(typical_p=0), "typical_p=0"),
    (dict(epsilon_cutoff=1.0), "epsilon_cutoff=1.0"),
    (dict(eta_cutoff=-0.1), "eta_cutoff=-0.1"),
    (dict(output_scores="yes"), "output_scores='yes'"),
    (dict(penalty_alpha=0.6), "does not implement penalty_alpha=0.6"),
])
def test_bad_rule_settings_are_refused_by_name(settings, words):
    with pytest.raises(ValueError, match=words):
        ours(settings, T, 3)


def test_rule_settings_round_trip_through_generation_config_json(tmp_path):
    cfg = gen.GenerationConfig(sequence_bias={(5, 6): -1.5}, bad_words_ids=[[3]], early_stopping="never",
                               exponential_decay_length_penalty=(2, 1.1), min_p=0.1, return_dict_in_generate=True)
    cfg.save_pretrained(tmp_path)
    back = gen.GenerationConfig.from_pretrained(tmp_path)
    assert gen.sequence_bias_items(back.sequence_bias) == (((5, 6), -1.5),)
    assert (back.bad_words_ids, back.early_stopping, back.min_p) == ([[3]], "never", 0.1)
    assert back.exponential_decay_length_penalty == [2, 1.1] and back.return_dict_in_generate is True
    hf_cfg = transformers.GenerationConfig.from_pretrained(tmp_path)  # Hugging Face reads what optkit writes
    assert hf_cfg.sequence_bias == [[[5, 6], -1.5]] and hf_cfg.early_stopping == "never"


@pytest.mark.parametrize("settings", [dict(num_beams=3, num_return_sequences=2, length_penalty=0.7),
                                      dict(), dict(do_sample=True, top_k=10)], ids=["beams", "greedy", "sampling"])
def test_transition_scores_equal_hugging_faces(hf, settings):
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = hf.generate(ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True, pad_token_id=1,
                      eos_token_id=EOS, **settings)
    beams = getattr(out, "beam_indices", None)
    for normalize in (False, True):
        want = hf.compute_transition_scores(out.sequences, out.scores, beams, normalize_logits=normalize).numpy()
        got = gen.transition_scores(out.sequences.numpy(), [s.numpy() for s in out.scores],
                                    None if beams is None else beams.numpy(), normalize_logits=normalize)
        assert got.shape == want.shape and same(got, want)


OUTCOMES = {}


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_reference_stops_as_hugging_face_does(hf, early_stopping, length_penalty):
    """beam_search_reference (early_stopping, best_length) against Hugging Face's beam search on the same
    model: the same hypotheses and sequences_scores. EOS ids the model likes make beams finish early; with
    this prompt (seed 12) and length_penalty 1 the three early_stopping values give three outcomes."""
    ids = torch.randint(3, V, (2, 4), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        first = hf(ids).logits[:, -1].argsort(-1, descending=True)
    eos = [int(first[0, 1]), int(first[1, 0])]
    settings = dict(num_beams=3, num_return_sequences=2, length_penalty=length_penalty,
                    early_stopping=early_stopping, eos_token_id=eos, pad_token_id=1, max_new_tokens=7)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_scores=True,
                      **settings)

    def next_logprobs(rows):
        with torch.no_grad():
            return torch.log_softmax(hf(torch.from_numpy(rows)).logits[:, -1].float(), -1).numpy()

    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=4, max_positions=64, vocab_size=V)
    finished, scores = [], []
    want = gen.beam_search_reference(next_logprobs, ids.numpy(), d, finished, scores)
    got = out.sequences[:, 4:].numpy()
    for r, hypotheses in enumerate(want):
        for j, tokens in enumerate(hypotheses):
            row = got[r * 2 + j]
            assert row[:len(tokens)].tolist() == tokens and (row[len(tokens):] == 1).all(), (r, j)
    np.testing.assert_allclose(np.ravel(scores), out.sequences_scores.numpy(), rtol=1e-5)
    assert finished  # hypotheses finished on an EOS id before the length limit
    OUTCOMES[length_penalty, early_stopping] = (want, np.round(scores, 4).tolist())
    if length_penalty == 1.0 and len([k for k in OUTCOMES if k[0] == 1.0]) == 3:  # the setting matters
        a, b, c = (OUTCOMES[1.0, e] for e in (False, True, "never"))
        assert a != b and a != c and b != c


@pytest.mark.parametrize("beams", [1, 2])
def test_prefix_allowed_tokens_sit_where_hugging_face_puts_them(hf, beams):
    """allowed_tokens + reference_scores(allowed=) against Hugging Face's PrefixConstrainedLogitsProcessor in its
    list, with rules before it (bias, min_length) and after it (forced EOS at the last step, suppression): the
    batch_id is the row's index over num_beams."""
    def fn(batch_id, row):
        return [int(row[-1]) % V, (int(row[-1]) + 3 + batch_id) % V, 2, 11]

    settings = dict(sequence_bias={(11,): 2.0}, min_length=T + 2, forced_eos_token_id=[7], suppress_tokens=[11],
                    num_beams=beams)
    for step in range(3):
        tokens, logits = rows(step, R=4, L=T + step)
        want = hf_processors(hf, settings, T, 3, prefix_allowed_tokens_fn=fn)(torch.from_numpy(tokens),
                                                                               torch.from_numpy(logits)).numpy()
        allowed = gen.allowed_tokens(fn, list(tokens), beams, V)
        got = gen.reference_scores(logits, tokens, np.ones_like(tokens), ours(settings, T, 3), T, allowed=allowed)
        assert same(got, want), step


def test_criteria_hits_reads_a_bool_per_row_or_one_bool():
    ids = np.array([[3, 4], [5, 6]])
    assert gen.criteria_hits([lambda i, s: i[:, -1] == 6], ids, None, 2, np.asarray).tolist() == [False, True]
    assert gen.criteria_hits([lambda i, s: False, lambda i, s: True], ids, None, 2, np.asarray).tolist() == [True, True]
    with pytest.raises(ValueError, match=r"stopping_criteria\[0\] returned float64 of shape \(2,\)"):
        gen.criteria_hits([lambda i, s: np.zeros(2)], ids, None, 2, np.asarray)
