"""Assisted decoding in every backend (opt_spec.generation, "Assisted decoding"): prompt lookup and an assistant
model propose tokens that one forward pass checks. Greedy search must give its own tokens (and Hugging Face's,
plain and assisted: PyTorch's, which TensorFlow's and Flax's plain tokens equal) with every rule in play, in
fewer forward passes of the model when the candidates are right; sampling must draw each token from the scores
plain decoding gives that row."""

import numpy as np
import pytest
import torch

from opt_spec import generation as gen
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_weights
from opt_torch import OPTForCausalLM

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

CONFIG = VARIANTS["pre_ln"]
# A prompt that repeats itself (prompt lookup finds matches), then the model's own loops do.
PROMPT = torch.tensor([[2, 5, 6, 7, 8, 9, 5, 6, 7, 11, 12, 5, 6]])
RULES = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3, eos_token_id=[24, 29],
             sequence_bias={(21,): 2.0}, forced_eos_token_id=29)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for name, seed in (("model", 5), ("other", 9)):
        path = tmp_path_factory.mktemp(name)
        spec_io.save_safetensors_dir(path, random_weights(CONFIG, "causal_lm", seed=seed), CONFIG.to_dict())
        made[name] = path
    return made


@pytest.fixture(scope="module")
def model(folders):
    return OPTForCausalLM.from_pretrained(folders["model"]).eval()


class Forwards:
    """Counts the model's forward passes through its module (its own, not an assistant's): the prompt's
    and assisted decoding's checks (plain decoding's steps take the fused DecodeStep instead)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.model.register_forward_hook(self.hook)

    def hook(self, module, args, out):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assistants(folders, cls=OPTForCausalLM):
    """Every kind of candidates: prompt lookup (n-grams, 1-grams), an assistant of the same weights (every
    candidate right) and one of other weights with the heuristic schedule, of the backend's class `cls`."""
    return {"prompt lookup": dict(prompt_lookup_num_tokens=4),
            "prompt lookup, 1-grams": dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1),
            "same weights": dict(assistant_model=cls.from_pretrained(folders["model"])),
            "other weights": dict(assistant_model=cls.from_pretrained(folders["other"]),
                                  num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic")}


@pytest.mark.parametrize("rules", [False, True])
def test_assisted_greedy_search_gives_greedy_search_tokens_and_hugging_faces(folders, model, rules):
    settings = dict(max_new_tokens=24, **(RULES if rules else dict(eos_token_id=None)))
    plain = model.generate(PROMPT, **settings)
    hf = transformers.OPTForCausalLM.from_pretrained(folders["model"]).eval()
    with torch.no_grad():
        assert torch.equal(plain, hf.generate(PROMPT, pad_token_id=1, **settings))
        if rules:  # (Hugging Face's prompt lookup fails without an EOS id)
            assert torch.equal(plain, hf.generate(PROMPT, pad_token_id=1, prompt_lookup_num_tokens=4, **settings))
    counts = {}
    for name, assist in assistants(folders).items():
        with Forwards(model) as forwards:
            assert torch.equal(model.generate(PROMPT, **assist, **settings), plain), name
        counts[name] = forwards.count
    steps = plain.shape[1] - PROMPT.shape[1]             # plain decoding: the prompt, then one pass per token
    assert counts["same weights"] <= steps // 2          # every candidate taken: a few tokens per pass
    if not rules:                                        # the model's loops give prompt lookup its matches
        assert counts["prompt lookup"] < steps
    assert max(counts.values()) <= steps                 # never more passes than plain decoding


def test_assisted_decoding_keeps_the_record_stream_and_criteria_of_plain_decoding(folders, model):
    settings = dict(max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
                    output_logits=True, output_hidden_states=True)
    plain = model.generate(PROMPT, **settings)
    out = model.generate(PROMPT, prompt_lookup_num_tokens=5, **settings)
    assert torch.equal(out.sequences, plain.sequences) and len(out.scores) == len(plain.scores) == 20
    for name in ("scores", "logits"):
        for mine, theirs in zip(getattr(out, name), getattr(plain, name)):
            assert max(float((mine - theirs).abs().max()), 0.0) <= 1e-4  # a k-token pass rounds a little apart
    assert len(out.hidden_states) == 20
    streamed = list(model.stream(PROMPT, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=5))
    assert torch.equal(torch.stack(streamed, 1), plain.sequences[:, PROMPT.shape[1]:])
    stop_after = PROMPT.shape[1] + 7  # a criterion ends the row mid-draft: nothing after it is kept
    short = model.generate(PROMPT, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=5,
                           stopping_criteria=[lambda ids, scores: ids.shape[1] >= stop_after])
    assert torch.equal(short, plain.sequences[:, :stop_after])


def test_assisted_sampling_draws_plain_samplings_tokens(folders, model):
    """Each step draws its token from the scores plain decoding gives that row (checked teacher-forced), one draw
    a token as plain decoding does: so with the same seed the same tokens, whatever the candidates."""
    settings = dict(max_new_tokens=16, eos_token_id=None, do_sample=True, top_k=8, temperature=1.5)
    rows = set()
    for seed in range(3):
        plain = model.generate(PROMPT, seed=seed, **settings)
        rows.add(tuple(plain[0].tolist()))
        for name, assist in assistants(folders).items():
            assert torch.equal(model.generate(PROMPT, seed=seed, **assist, **settings), plain), (seed, name)
    assert len(rows) == 3  # the seeds matter
    out = model.generate(PROMPT, seed=7, return_dict_in_generate=True, output_scores=True, prompt_lookup_num_tokens=4,
                         **settings)
    T = PROMPT.shape[1]
    for s, scores in enumerate(out.scores):
        alone = model.generate(out.sequences[:, :T + s], max_new_tokens=1, return_dict_in_generate=True,
                               output_scores=True, **{k: v for k, v in settings.items() if k != "max_new_tokens"})
        np.testing.assert_allclose(scores.numpy(), alone.scores[0].numpy(), atol=1e-4)
        assert np.isfinite(scores[0, out.sequences[0, T + s]].item())  # a token the filters kept


def test_prompt_lookup_is_hugging_faces():
    row = [1, 2, 3, 4, 9, 1, 2, 3, 7, 2, 3]
    assert gen.prompt_lookup(row, 3, 2) == [4, 9, 1]          # "2 3" first follows at 1: 4 9 1
    assert gen.prompt_lookup(row, 10, 2) == [4, 9, 1, 2, 3, 7, 2, 3]  # as far as the row goes
    assert gen.prompt_lookup(row, 3, 2, eos_ids=[9]) == [4]   # cut before an EOS id
    assert gen.prompt_lookup([5, 6, 7, 6], 2, 3) == [7, 6]    # no 3- or 2-gram match: the 1-gram "6"
    assert gen.prompt_lookup([5, 6, 7], 2, 2) == []
    generator = transformers.generation.candidate_generator.PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor([9]), num_output_tokens=3, max_matching_ngram_size=2, max_length=100)
    ids = torch.tensor([row])
    theirs = generator.get_candidates(ids)[0][0, len(row):].tolist()
    assert theirs == gen.prompt_lookup(row, 3, 2, eos_ids=[9])
    assert [gen.next_draft_length(5, m, 5, s) for m, s in ((5, "heuristic"), (2, "heuristic"),
                                                           (2, "constant"))] == [7, 4, 5]


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_beams=2), "one prompt and one row"),
    (dict(do_sample=True, num_return_sequences=2), "one prompt and one row"),
])
def test_assisted_decoding_refuses_what_it_cannot_do(folders, model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        model.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=2, **kwargs)
    with pytest.raises(ValueError, match="one prompt and one row"):
        model.generate(PROMPT.repeat(2, 1), max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="not both"):
        model.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=2, assistant_model=model)
    with pytest.raises(ValueError, match="same vocabulary"):
        model.generate(PROMPT, max_new_tokens=3, assistant_model=OPTForCausalLM.from_config(
            CONFIG.replace(vocab_size=64)))
    from opt_flax import FlaxOPTForCausalLM

    with pytest.raises(ValueError, match="an optkit opt_torch causal LM .* got FlaxOPTForCausalLM from opt_flax"):
        model.generate(PROMPT, max_new_tokens=3, assistant_model=FlaxOPTForCausalLM.from_pretrained(folders["model"]))
    with pytest.raises(ValueError, match="cannot read inputs_embeds"):
        model.generate(inputs_embeds=model.get_input_embeddings()(PROMPT), max_new_tokens=3, assistant_model=model)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens=0"):
        gen.GenerationConfig(prompt_lookup_num_tokens=0)
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        gen.GenerationConfig(num_assistant_tokens_schedule="fast")


# ------------------------------------------------------------------------------------------ TensorFlow
# The same semantics in opt_tf: its host loop checks the candidates with one compiled forward pass per draft.
@pytest.fixture(scope="module")
def tf_model(folders):
    pytest.importorskip("tensorflow")
    from opt_tf import TFOPTForCausalLM

    return TFOPTForCausalLM.from_pretrained(folders["model"])


@pytest.fixture(scope="module")
def tf_assistants(folders, tf_model):
    """Every kind of candidates, the assistants loaded once (each compiles its prompt pass and one-token feed)."""
    from opt_tf import TFOPTForCausalLM

    return assistants(folders, TFOPTForCausalLM)


class TFForwards:
    """Counts the forward passes of a TF model's host loop (its own, not an assistant's): the calls of its compiled
    pieces that run the model, the prompt pass ("first"), a one-token step ("later") and a check of candidates
    ("check"), as generate looks them up through model._compiled."""

    def __init__(self, model):
        self.model, self.count, compiled = model, 0, model._compiled

        def counting(key, fn, *args, **kwargs):
            run = compiled(key, fn, *args, **kwargs)
            if not any(isinstance(part, str) and part in ("first", "later", "check") for part in key):
                return run

            def counted(*a, **kw):
                self.count += 1
                return run(*a, **kw)
            return counted
        object.__setattr__(model, "_compiled", counting)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.model.__dict__["_compiled"]


@pytest.mark.parametrize("rules", [False, True])
def test_tf_assisted_greedy_search_gives_greedy_search_tokens_and_pytorchs(tf_assistants, model, tf_model, rules):
    """TensorFlow's assisted greedy search gives its plain greedy search's tokens, which are the PyTorch backend's
    (and so Hugging Face's, above) on the same weights; in fewer forward passes when the candidates are right."""
    settings = dict(max_new_tokens=24, **(RULES if rules else dict(eos_token_id=None)))
    plain = tf_model.generate(PROMPT.numpy(), **settings).numpy()
    np.testing.assert_array_equal(plain, model.generate(PROMPT, **settings).numpy())
    with TFForwards(tf_model) as forwards:  # plain decoding on the host loop: the prompt, then a pass per token
        np.testing.assert_array_equal(tf_model.generate(PROMPT.numpy(), streamer=lambda tokens: None,
                                                        **settings).numpy(), plain)
    steps = plain.shape[1] - PROMPT.shape[1]
    assert forwards.count == steps
    counts = {}
    for name, assist in tf_assistants.items():
        with TFForwards(tf_model) as forwards:
            np.testing.assert_array_equal(tf_model.generate(PROMPT.numpy(), **assist, **settings).numpy(), plain,
                                          err_msg=name)
        counts[name] = forwards.count
    assert counts["same weights"] <= steps // 2          # every candidate taken: a few tokens per pass
    if not rules:                                        # the model's loops give prompt lookup its matches
        assert counts["prompt lookup"] < steps
    assert max(counts.values()) <= steps                 # never more passes than plain decoding


def test_tf_assisted_decoding_keeps_the_record_stream_and_criteria_of_plain_decoding(tf_model):
    settings = dict(max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
                    output_logits=True, output_hidden_states=True)
    ids = PROMPT.numpy()
    plain = tf_model.generate(ids, **settings)
    out = tf_model.generate(ids, prompt_lookup_num_tokens=5, **settings)
    np.testing.assert_array_equal(out.sequences.numpy(), plain.sequences.numpy())
    assert len(out.scores) == len(plain.scores) == len(out.logits) == 20
    for name in ("scores", "logits"):
        for mine, theirs in zip(getattr(out, name), getattr(plain, name), strict=True):
            np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-4)  # a k-token pass rounds apart
    assert len(out.hidden_states) == len(plain.hidden_states) == 20
    streamed = []
    got = tf_model.generate(ids, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=5,
                            streamer=streamed.append)
    np.testing.assert_array_equal(got.numpy(), plain.sequences.numpy())
    np.testing.assert_array_equal(np.stack(streamed, 1), plain.sequences.numpy()[:, PROMPT.shape[1]:])
    stop_after = PROMPT.shape[1] + 7  # a criterion ends the row mid-draft: nothing after it is kept
    short = tf_model.generate(ids, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=5,
                              stopping_criteria=[lambda rows, scores: rows.shape[1] >= stop_after])
    np.testing.assert_array_equal(short.numpy(), plain.sequences.numpy()[:, :stop_after])

    class Letters:  # one letter per id: stop strings' tokenizer
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(ord("a") + int(i) % 26) for i in ids)

    new = plain.sequences.numpy()[0, PROMPT.shape[1]:]
    change = next(i for i in range(1, len(new)) if new[i] != new[i - 1])  # where the model's loop changes
    stops = dict(max_new_tokens=20, eos_token_id=None, stop_strings=[Letters().decode(new[change - 1:change + 1])],
                 tokenizer=Letters())
    stopped = tf_model.generate(ids, **stops).numpy()
    assert stopped.shape[1] < plain.sequences.shape[1]
    np.testing.assert_array_equal(tf_model.generate(ids, prompt_lookup_num_tokens=5, **stops).numpy(), stopped)


def test_tf_assisted_sampling_draws_plain_samplings_tokens(tf_assistants, tf_model):
    """TensorFlow's draws are keyed by (seed, step): a token drawn at a checked position is the one plain sampling
    draws at that step, so with the same seed the same tokens, whatever the candidates."""
    settings = dict(max_new_tokens=16, eos_token_id=None, do_sample=True, top_k=8, temperature=1.5)
    rows = set()
    for seed in range(3):
        plain = tf_model.generate(PROMPT.numpy(), seed=seed, **settings).numpy()
        rows.add(tuple(plain[0].tolist()))
        for name, assist in tf_assistants.items():
            np.testing.assert_array_equal(tf_model.generate(PROMPT.numpy(), seed=seed, **assist, **settings).numpy(),
                                          plain, err_msg=f"seed {seed}, {name}")
    assert len(rows) == 3  # the seeds matter


def test_tf_assisted_decoding_refuses_what_it_cannot_do(model, tf_model):
    """Each refusal in words, before anything runs: (the call's inputs and settings, the words)."""
    from opt_tf import TFOPTForCausalLM

    ids, lookup = PROMPT.numpy(), dict(prompt_lookup_num_tokens=2)
    refused = [(dict(input_ids=ids, num_beams=2, **lookup), "one prompt and one row"),
               (dict(input_ids=ids, do_sample=True, num_return_sequences=2, **lookup), "one prompt and one row"),
               (dict(input_ids=np.repeat(ids, 2, 0), **lookup), "one prompt and one row"),
               (dict(input_ids=ids, assistant_model=tf_model, **lookup), "not both"),
               (dict(input_ids=ids, assistant_model=TFOPTForCausalLM.from_config(CONFIG.replace(vocab_size=64))),
                "same vocabulary"),
               (dict(input_ids=ids, assistant_model=model), "an optkit opt_tf causal LM .* got OPTForCausalLM from "
                                                            "opt_torch"),
               (dict(inputs_embeds=tf_model.get_input_embeddings()(ids), assistant_model=tf_model),
                "cannot read inputs_embeds")]
    for call, words in refused:
        with pytest.raises(ValueError, match=words):
            tf_model.generate(max_new_tokens=3, **call)


def test_tf_assisted_decoding_with_a_reused_prompt_cache(tf_assistants, tf_model):
    """generate(past_key_values=the KVCache of the prompt's first C tokens) with prompt lookup (the model's cache
    holds the prefix) or an assistant (which reads the whole prompt itself): the tokens of the call without it."""
    ids, C = PROMPT.numpy(), 7
    cache = tf_model(ids[:, :C], use_cache=True).past_key_values
    plain = tf_model.generate(ids, max_new_tokens=12, eos_token_id=None).numpy()
    for assist in (dict(prompt_lookup_num_tokens=3), tf_assistants["same weights"]):
        got = tf_model.generate(ids, max_new_tokens=12, eos_token_id=None, past_key_values=cache, **assist)
        np.testing.assert_array_equal(got.numpy(), plain)
    other = ids.copy()
    other[0, 2:C] = (other[0, 2:C] + 1) % CONFIG.vocab_size  # the cache's contents matter: another prompt's
    changed = tf_model.generate(other, max_new_tokens=12, eos_token_id=None, prompt_lookup_num_tokens=3,
                                past_key_values=tf_model(other[:, :C], use_cache=True).past_key_values).numpy()
    np.testing.assert_array_equal(changed, tf_model.generate(other, max_new_tokens=12, eos_token_id=None).numpy())
    assert not np.array_equal(changed, plain)


def test_tf_assisted_decoding_runs_the_hosts_rules_at_every_checked_position(tf_assistants, tf_model):
    """A logits processor and prefix_allowed_tokens_fn that read the rows so far see, at each position a checking
    pass computed, the row as plain decoding has it there: the same tokens."""
    import tensorflow as tf

    V = CONFIG.vocab_size

    def fewer_repeats(rows, scores):  # the row's last token loses 3 (the model's loops go on a while)
        return scores - 3.0 * tf.cast(tf.equal(tf.range(V)[None, :], tf.cast(rows[:, -1:], tf.int32)), tf.float32)

    def not_twice(batch_id, row):  # no token twice in a row on even lengths
        return [t for t in range(V) if len(row) % 2 or t != int(row[-1])]

    ids = PROMPT.numpy()
    for host in (dict(logits_processor=[fewer_repeats]), dict(prefix_allowed_tokens_fn=not_twice)):
        settings = dict(max_new_tokens=16, eos_token_id=None, **host)
        plain = tf_model.generate(ids, **settings).numpy()
        assert not np.array_equal(plain, tf_model.generate(ids, max_new_tokens=16, eos_token_id=None).numpy())
        counts = []
        for name, assist in tf_assistants.items():
            with TFForwards(tf_model) as forwards:
                np.testing.assert_array_equal(tf_model.generate(ids, **assist, **settings).numpy(), plain,
                                              err_msg=f"{list(host)}, {name}")
            counts.append(forwards.count)
        assert min(counts) < 16  # candidates were taken: the rules ran at positions a checking pass computed


# ------------------------------------------------------------------------------------------ the Flax backend
# The same semantics in opt_flax: its step-by-step host loop with checks of the candidates (one jitted forward
# per check), each step's scores and pick the jitted pieces of plain decoding. Compiles dominate: the tests share
# one length (and so the programs of the same settings, the assistants' drafts among them).
FLAX_PROMPT = PROMPT.numpy().astype(np.int32)
FLAX_GREEDY = dict(max_new_tokens=24, eos_token_id=None)


@pytest.fixture(scope="module")
def flax_model(folders):
    from opt_flax import FlaxOPTForCausalLM

    return FlaxOPTForCausalLM.from_pretrained(folders["model"])


@pytest.fixture(scope="module")
def flax_assistants(folders):
    """The four kinds of candidates (as `assistants`), the assistants made once (their drafts compile once)."""
    from opt_flax import FlaxOPTForCausalLM

    return assistants(folders, FlaxOPTForCausalLM)


class FlaxForwards:
    """Counts calls of the Flax model's jitted host-loop pieces that run its forward: the prompt pass ("first"),
    plain decoding's steps ("later") and assisted decoding's checks ("check"); not an assistant's."""

    def __init__(self, model):
        self.model, self.count, self.names = model, 0, []

    def __enter__(self):
        original = type(self.model)._host_piece

        def piece(static, name, fn):
            jitted = original(self.model, static, name, fn)
            if name[0] not in ("first", "later", "check"):
                return jitted

            def counted(*args):
                self.count += 1
                self.names.append(name[0])
                return jitted(*args)
            return counted
        self.model._host_piece = piece
        return self

    def __exit__(self, *exc):
        del self.model._host_piece


@pytest.mark.parametrize("rules", [False, True])
def test_flax_assisted_greedy_search_gives_greedy_search_tokens_and_torchs(model, flax_model, flax_assistants,
                                                                           rules):
    settings = dict(max_new_tokens=24, **RULES) if rules else FLAX_GREEDY
    plain = np.asarray(flax_model.generate(FLAX_PROMPT, **settings))
    assert np.array_equal(plain, model.generate(PROMPT, **settings).numpy())  # (and so Hugging Face's: above)
    counts = {}
    for name, assist in flax_assistants.items():
        with FlaxForwards(flax_model) as forwards:
            assert np.array_equal(np.asarray(flax_model.generate(FLAX_PROMPT, **assist, **settings)), plain), name
        assert forwards.names[0] == "first" and set(forwards.names[1:]) <= {"check"}, name
        counts[name] = forwards.count
    # as in PyTorch: plain decoding's passes are one per step (the prompt's among them); an assistant of the same
    # weights has every candidate taken, prompt lookup finds the model's loops (without the rules' bans), and no
    # kind takes more passes than plain decoding
    steps = plain.shape[1] - FLAX_PROMPT.shape[1]
    assert counts["same weights"] <= steps // 2 and max(counts.values()) <= steps, counts
    assert rules or counts["prompt lookup"] < steps, counts


def test_flax_assisted_decoding_keeps_the_record_stream_and_criteria_of_plain_decoding(flax_model):
    settings = dict(FLAX_GREEDY, return_dict_in_generate=True, output_scores=True, output_logits=True,
                    output_hidden_states=True)
    plain = flax_model.generate(FLAX_PROMPT, **settings)
    out = flax_model.generate(FLAX_PROMPT, prompt_lookup_num_tokens=5, **settings)
    assert np.array_equal(out.sequences, plain.sequences) and len(out.scores) == len(plain.scores) == 24
    for name in ("scores", "logits"):
        for mine, theirs in zip(getattr(out, name), getattr(plain, name)):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-4)  # a k-token pass rounds apart
    assert len(out.hidden_states) == len(plain.hidden_states) == 24
    streamed = []
    flax_model.generate(FLAX_PROMPT, **FLAX_GREEDY, prompt_lookup_num_tokens=5,
                        streamer=lambda tokens: streamed.append(np.asarray(tokens)))
    assert np.array_equal(np.stack(streamed, 1), np.asarray(plain.sequences)[:, FLAX_PROMPT.shape[1]:])
    stop_after = FLAX_PROMPT.shape[1] + 7  # a criterion ends the row mid-draft: nothing after it is kept
    with FlaxForwards(flax_model) as forwards:
        short = flax_model.generate(FLAX_PROMPT, **FLAX_GREEDY, prompt_lookup_num_tokens=5,
                                    stopping_criteria=[lambda ids, scores: ids.shape[1] >= stop_after])
    assert np.array_equal(np.asarray(short), np.asarray(plain.sequences)[:, :stop_after])
    assert "check" in forwards.names  # (the candidates were checked: the criterion ended a draft)
    import jax.numpy as jnp

    def lower(ids, scores):  # a logits processor, on the host between a check's positions' scores and picks
        return scores - 0.5 * (jnp.arange(scores.shape[-1]) == ids[:, -1:]).astype(scores.dtype)

    processed = np.asarray(flax_model.generate(FLAX_PROMPT, **FLAX_GREEDY, logits_processor=[lower]))
    assert not np.array_equal(processed, np.asarray(plain.sequences))
    assert np.array_equal(np.asarray(flax_model.generate(FLAX_PROMPT, **FLAX_GREEDY, logits_processor=[lower],
                                                         prompt_lookup_num_tokens=5)), processed)


def test_flax_assisted_sampling_draws_plain_samplings_tokens(flax_model, flax_assistants):
    """Each position of a check draws with its step's key, as plain sampling does: the same tokens for a seed."""
    settings = dict(FLAX_GREEDY, do_sample=True, top_k=8, temperature=1.5)
    rows = set()
    for seed in range(3):
        plain = np.asarray(flax_model.generate(FLAX_PROMPT, seed=seed, **settings))
        rows.add(tuple(plain[0].tolist()))
        for name, assist in flax_assistants.items():
            got = np.asarray(flax_model.generate(FLAX_PROMPT, seed=seed, **assist, **settings))
            assert np.array_equal(got, plain), (seed, name)
    assert len(rows) == 3  # the seeds matter


def test_flax_assisted_decoding_with_a_reused_prompt_cache_and_given_params(folders, flax_model, flax_assistants):
    """generate(past_key_values=) (a cache of the prompt's first tokens): prompt lookup, and an assistant (which
    reads the whole prompt itself), give the plain tokens; params= (other weights) are what the checks run."""
    from opt_flax import FlaxOPTForCausalLM

    C = 5
    cache = flax_model(FLAX_PROMPT[:, :C], past_key_values=flax_model.init_cache(1, 12)).past_key_values
    settings = FLAX_GREEDY
    plain = np.asarray(flax_model.generate(FLAX_PROMPT, **settings))
    for name in ("prompt lookup", "same weights"):
        got = flax_model.generate(FLAX_PROMPT, past_key_values=cache, **flax_assistants[name], **settings)
        assert np.array_equal(np.asarray(got), plain), name
    assert int(cache.length) == C  # left as it was
    other = FlaxOPTForCausalLM.from_pretrained(folders["other"]).params
    theirs = np.asarray(flax_model.generate(FLAX_PROMPT, params=other, **settings))
    assert not np.array_equal(theirs, plain)
    assert np.array_equal(np.asarray(flax_model.generate(FLAX_PROMPT, params=other, prompt_lookup_num_tokens=4,
                                                         **settings)), theirs)


def test_flax_assisted_decoding_refuses_what_it_cannot_do(folders, model, flax_model):
    from opt_flax import FlaxOPTForCausalLM
    from opt_flax.distributed import make_mesh

    lookup = dict(max_new_tokens=3, prompt_lookup_num_tokens=2)
    for kwargs in (dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
        with pytest.raises(ValueError, match="one prompt and one row"):
            flax_model.generate(FLAX_PROMPT, **lookup, **kwargs)
    with pytest.raises(ValueError, match="one prompt and one row"):
        flax_model.generate(np.repeat(FLAX_PROMPT, 2, 0), **lookup)
    with pytest.raises(ValueError, match="not both"):
        flax_model.generate(FLAX_PROMPT, **lookup, assistant_model=flax_model)
    with pytest.raises(ValueError, match="same vocabulary"):
        flax_model.generate(FLAX_PROMPT, max_new_tokens=3,
                            assistant_model=FlaxOPTForCausalLM.from_config(CONFIG.replace(vocab_size=64)))
    with pytest.raises(ValueError, match="an optkit opt_flax causal LM .* got OPTForCausalLM from opt_torch"):
        flax_model.generate(FLAX_PROMPT, max_new_tokens=3, assistant_model=model)
    embeds = np.asarray(flax_model.params["model"]["decoder"]["embed_tokens"]["embedding"])[FLAX_PROMPT]
    with pytest.raises(ValueError, match="cannot read inputs_embeds"):
        flax_model.generate(inputs_embeds=embeds, max_new_tokens=3, assistant_model=flax_model)
    sharded = FlaxOPTForCausalLM.from_pretrained(folders["model"], mesh=make_mesh(1, 1))
    with pytest.raises(ValueError, match="runs on one device: .* laid out on a device mesh"):
        sharded.generate(FLAX_PROMPT, **lookup)
    with pytest.raises(ValueError, match="runs on one device: .* laid out on a device mesh"):
        flax_model.generate(FLAX_PROMPT, max_new_tokens=3, assistant_model=sharded)
