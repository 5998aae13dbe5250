"""generate(inputs_embeds=...) in every backend (soft prompts, an image encoder's outputs as BLIP-2 feeds
OPT), against transformers 4.57.6's generate on the same random weights: the new tokens, the lengths
Hugging Face counts (max_length and min_length include the embedded positions, the default is 20 including
them), the rules that see only the rows (repetition penalty, n-grams, forced BOS and begin_suppress_tokens
on rows that start empty), beam search, the record's scores, hidden states and attentions, and input_ids
given with the embeddings. The embeddings of a prompt's own tokens give that prompt's tokens, sampled ones
too, in every backend.
"""

import warnings

import numpy as np
import pytest
import torch

from opt_spec import generation as gen
from opt_spec.testing import random_weights

from .test_generation_extras import (CONFIG, IDS, MASK, T, backend, checkpoint, hf,  # noqa: F401
                                     models, native)
from .test_generation_surface import to_numpy

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

E = CONFIG.word_embed_proj_dim
TABLE = random_weights(CONFIG, seed=3)["model.decoder.embed_tokens.weight"]  # the checkpoint's (same seed)
P = 6
SOFT = (np.random.default_rng(7).standard_normal((3, P, E)) * 0.7).astype(np.float32)  # not any token's embedding
SOFT_MASK = np.array([[1] * P, [0] + [1] * (P - 1), [0, 0, 0] + [1] * (P - 3)], np.int64)
SOFT_IDS = np.random.default_rng(8).integers(3, CONFIG.vocab_size, (3, P))  # for input_ids given with SOFT


def ours(models, backend, input_ids=None, inputs_embeds=SOFT, attention_mask=SOFT_MASK, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's retracing notes
        return models(backend).generate(
            input_ids=None if input_ids is None else native(backend, np.asarray(input_ids)),
            inputs_embeds=None if inputs_embeds is None else native(backend, inputs_embeds),
            attention_mask=None if attention_mask is None else native(backend, np.asarray(attention_mask)),
            **settings)


def reference(hf, input_ids=None, inputs_embeds=SOFT, attention_mask=SOFT_MASK, **settings):
    settings.setdefault("pad_token_id", 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(input_ids=None if input_ids is None else torch.from_numpy(input_ids).long(),
                           inputs_embeds=torch.from_numpy(inputs_embeds),
                           attention_mask=torch.from_numpy(attention_mask).long(), **settings)


def tokens(out) -> np.ndarray:
    return to_numpy(out.sequences if hasattr(out, "sequences") else out).astype(np.int64)


def close(a, b, atol) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.array_equal(np.isinf(a), np.isinf(b)) \
        and np.allclose(np.where(np.isinf(a), 0, a), np.where(np.isinf(b), 0, b), atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------ the lengths
@pytest.mark.parametrize("settings", [
    {}, dict(max_length=P + 4), dict(max_new_tokens=5), dict(max_length=P + 9, max_new_tokens=3),
    dict(max_new_tokens=8, min_length=P + 3), dict(max_new_tokens=8, min_length=3),
    dict(max_new_tokens=8, min_new_tokens=2),
    dict(max_new_tokens=8, min_length=P + 6, min_new_tokens=2), dict(max_length=P + 5, min_length=P + 9)])
@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds", "ids_and_embeds"])
def test_lengths_count_what_hugging_face_counts(hf, settings, with_ids):
    """The new tokens allowed and the steps EOS waits, from opt_spec.generation.resolve, equal what Hugging
    Face's generate prepares (_prepare_generated_length) for inputs_embeds of P positions, with or without
    their input_ids (Hugging Face's processors then compare the rows' length, T + step, with min_length)."""
    rows = P if with_ids else 0
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=P, row_length=rows,
                    max_positions=CONFIG.max_position_embeddings, vocab_size=CONFIG.vocab_size)
    config = transformers.GenerationConfig(**settings)
    has_default_max = "max_length" not in settings
    if has_default_max:
        config.max_length = gen.HF_DEFAULT_MAX_LENGTH
    config = hf._prepare_generated_length(config, has_default_max_length=has_default_max,
                                          has_default_min_length="min_length" not in settings,
                                          model_input_name="inputs_embeds", input_ids_length=rows,
                                          inputs_tensor=torch.from_numpy(SOFT))
    assert d.max_new_tokens == config.max_length - rows
    assert d.min_new_tokens == min(max(config.min_length - rows, config.min_new_tokens or 0, 0), d.max_new_tokens)


def test_rules_go_by_the_rows():
    """forced_bos_token_id forces the rows' second token when they start empty (Hugging Face forces where
    the rows' length is 1), and begin_suppress_tokens then wait for it, as Hugging Face's begin_index."""
    settings = dict(max_new_tokens=4, forced_bos_token_id=5, begin_suppress_tokens=[6])
    d = gen.resolve(gen.GenerationConfig(), None, settings, prompt_length=P, row_length=0, max_positions=40,
                    vocab_size=CONFIG.vocab_size)
    assert d.begin_suppress_step == 1
    logits = np.zeros((1, CONFIG.vocab_size), np.float32)
    for step, forced in ((0, False), (1, True), (2, False)):
        rows = np.full((1, step), 9)
        x = gen.reference_scores(logits, rows, np.ones_like(rows), d, 0)
        assert (np.isneginf(x).sum() == CONFIG.vocab_size - 1) == forced, step
        assert np.isneginf(x[0, 6]) == (step == 1), step


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(input_ids=IDS[:, :P - 1]), ValueError, "ids of the embedded positions"),
    (dict(inputs_embeds=SOFT[..., :E - 1]), ValueError, "word_embed_proj_dim"),
    (dict(inputs_embeds=SOFT.astype(np.int32)), TypeError, "floating point"),
    (dict(attention_mask=SOFT_MASK[:, 1:]), ValueError, "attention_mask has shape"),
    (dict(inputs_embeds=np.zeros((3, 20, E), np.float32), attention_mask=None), ValueError,
     "inputs_embeds is 20, but max_length is set to 20 \\(the default\\)"),
    (dict(inputs_embeds=None, attention_mask=None), ValueError, "input_ids .* or inputs_embeds"),
    (dict(max_new_tokens=CONFIG.max_position_embeddings - P + 1), ValueError, "max_position_embeddings"),
])
def test_bad_embeddings_are_refused_by_name(models, backend, kwargs, error, words):
    settings = {"max_new_tokens": 3, **kwargs} if "max_new_tokens" not in kwargs else kwargs
    if "the default" in words:
        settings.pop("max_new_tokens")
    with pytest.raises(error, match=words):
        ours(models, backend, **settings)


# ------------------------------------------------------------------------------------- the tokens
def test_a_prompts_own_embeddings_give_its_tokens(models, backend):
    """inputs_embeds = the embeddings of IDS: the new tokens are those generate(IDS) makes, greedy and
    sampled (the same draws), and input_ids with them return the prompt too."""
    embeds = TABLE[IDS]
    for settings in (dict(max_new_tokens=6, eos_token_id=None),
                     dict(max_new_tokens=5, do_sample=True, seed=4, num_return_sequences=2, top_k=0)):
        whole = tokens(ours(models, backend, IDS, None, MASK, **settings))
        new = tokens(ours(models, backend, None, embeds, MASK, **settings))
        both = tokens(ours(models, backend, IDS, embeds, MASK, **settings))
        assert new.tolist() == whole[:, T:].tolist() and both.tolist() == whole.tolist(), settings


def _without(settings: dict, *keys) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


@pytest.fixture(scope="module")
def cases(hf):
    """Settings naming tokens the model really produces from SOFT, so that every rule changes the tokens
    (test_each_case_needs_its_rules)."""
    plain = tokens(reference(hf, max_new_tokens=8, eos_token_id=None))
    free = tokens(reference(hf, max_new_tokens=8, eos_token_id=None, no_repeat_ngram_size=1))
    eos = [int(plain[1, 0]), int(plain[2, 4])]      # row 1 would end at once, row 2 at its fifth token
    greedy = dict(max_new_tokens=8, eos_token_id=eos, min_length=P + 3, bad_words_ids=[[int(plain[0, 0])]])
    rows_only = dict(max_new_tokens=8, eos_token_id=None, repetition_penalty=1.1, no_repeat_ngram_size=2)
    forced_bos = dict(max_new_tokens=5, eos_token_id=None, forced_bos_token_id=int(free[2, 1]))
    begin_suppress = dict(max_new_tokens=5, eos_token_id=None, begin_suppress_tokens=[int(plain[0, 0])])
    beams = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, eos_token_id=eos, length_penalty=0.5)
    return {
        "greedy": greedy, "rows_only": rows_only, "forced_bos": forced_bos, "begin_suppress": begin_suppress,
        "max_length": dict(max_length=P + 4, eos_token_id=eos),
        "default_length": dict(eos_token_id=eos),
        "beams": beams,
        # the cases above merged, for the backends that compile a program per setting (each rule still matters)
        "greedy_rows_max_length": dict(_without(greedy, "max_new_tokens"), max_length=P + 8,
                                       **_without(rows_only, "max_new_tokens", "eos_token_id")),
        "forced_bos_default_length": dict(_without(forced_bos, "max_new_tokens"), eos_token_id=eos),
        "beams_begin_suppress": dict(beams, begin_suppress_tokens=begin_suppress["begin_suppress_tokens"]),
        "ids_and_embeds": dict(input_ids=SOFT_IDS, max_new_tokens=8, eos_token_id=None, repetition_penalty=1.1,
                               no_repeat_ngram_size=2),
        # a host-side rule (the step-by-step loop): the rows it is shown start empty, as Hugging Face's
        "host": dict(max_new_tokens=6, eos_token_id=None, prefix_allowed_tokens_fn=lambda batch_id, row: [
            t for t in range(CONFIG.vocab_size) if t not in plain[batch_id] or len(row) % 2]),
    }


CASES = ("greedy", "rows_only", "forced_bos", "begin_suppress", "max_length", "default_length", "beams",
         "ids_and_embeds", "host")
MERGED = ("greedy_rows_max_length", "forced_bos_default_length", "beams_begin_suppress", "ids_and_embeds", "host")
RULES = ("eos_token_id", "min_length", "bad_words_ids", "repetition_penalty", "no_repeat_ngram_size",
         "forced_bos_token_id", "begin_suppress_tokens", "input_ids", "prefix_allowed_tokens_fn")


def test_each_case_needs_its_rules(hf, cases):
    """Without any one of its rules (or input_ids), each case's tokens change in Hugging Face; the merged cases'
    lengths are those their max_length or the default allows (their rows run to the end)."""
    for name in CASES + MERGED[:3]:
        full = tokens(reference(hf, **cases[name]))
        for key in set(cases[name]) & set(RULES):
            if cases[name][key] is None:
                continue
            fewer = {k: v for k, v in cases[name].items() if k != key}
            assert tokens(reference(hf, **fewer)).tolist() != full.tolist(), (name, key)
    for name, length in (("greedy_rows_max_length", 8), ("forced_bos_default_length", gen.HF_DEFAULT_MAX_LENGTH - P)):
        assert tokens(reference(hf, **cases[name])).shape[1] == length, name


@pytest.mark.parametrize("backend,name", [("torch", name) for name in CASES + MERGED[:3]] +
                         [(b, name) for b in ("tf", "flax") for name in MERGED])
def test_soft_prompts_give_hugging_faces_tokens(models, hf, backend, cases, name):
    """Every case in PyTorch; TensorFlow and Flax, which compile each setting, take the merged ones."""
    got, want = tokens(ours(models, backend, **cases[name])), tokens(reference(hf, **cases[name]))
    assert got.shape == want.shape and got.tolist() == want.tolist(), (got, want)


def test_the_record_as_hugging_face(models, hf, backend, cases):
    """return_dict_in_generate with soft prompts: the scores and logits of every step, and the hidden
    states and attentions (the P embedded positions at step 0, then one position attending to P + s)."""
    _check_record(models, hf, backend, cases["greedy"], 1)


def test_beam_search_record_as_hugging_face(models, hf, backend, cases):
    """The same with beam search: each step's hidden states and attentions over its running beams (the soft
    prompts' embeddings repeated num_beams times, then the beams' new tokens)."""
    _check_record(models, hf, backend, cases["beams"], cases["beams"]["num_beams"])


def _check_record(models, hf, backend, case: dict, beams: int) -> None:
    """generate's record for `case` equals Hugging Face's eager one: scores, logits, hidden states and
    attentions of every step, over len(SOFT) * beams rows."""
    settings = dict(case, return_dict_in_generate=True, output_scores=True, output_logits=True,
                    output_hidden_states=True, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = transformers.OPTForCausalLM.from_pretrained(hf.name_or_path, attn_implementation="eager").eval()
    out, want = ours(models, backend, **settings), reference(eager, **settings)
    assert tokens(out).tolist() == tokens(want).tolist()
    steps = len(want.scores)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == steps
    real = np.repeat(SOFT_MASK, beams, 0).astype(bool)
    for s in range(steps):
        assert close(to_numpy(out.scores[s]), want.scores[s].numpy(), 2e-4), s
        assert close(to_numpy(out.logits[s]), want.logits[s].numpy(), 2e-4), s
        queries = real if s == 0 else np.ones((len(real), 1), bool)  # a pad's own state is not specified
        for ours_h, hf_h in zip(to_numpy(out.hidden_states[s]), want.hidden_states[s]):
            assert ours_h.shape == tuple(hf_h.shape) == (len(real), P if s == 0 else 1, CONFIG.hidden_size), s
            assert close(ours_h[queries], hf_h.numpy()[queries], 1e-4), s
        for ours_a, hf_a in zip(to_numpy(out.attentions[s]), want.attentions[s]):
            assert ours_a.shape == tuple(hf_a.shape) == (len(real), CONFIG.num_attention_heads,
                                                         P if s == 0 else 1, P + s), s
            assert close(ours_a.transpose(0, 2, 1, 3)[queries], hf_a.numpy().transpose(0, 2, 1, 3)[queries], 1e-5), s
