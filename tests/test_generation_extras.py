"""Hugging Face's generation surface in every backend, against transformers 4.57.6's generate on the same
random weights: generation_config.json (read, used as defaults, written), generate(generation_config=),
no_repeat_ngram_size, num_return_sequences, lists of EOS ids, max_length, logits processors, stop
strings and streamers. Equal tokens from each backend and Hugging Face mean equal tokens across backends.

One tiny model per backend serves every test (TensorFlow and Flax compile each distinct setting once).
"""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch

from opt_spec import generation as gen
from opt_spec import io as spec_io
from opt_spec.errors import CheckpointError, ConfigError
from opt_spec.testing import VARIANTS, random_batch, random_weights

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

CONFIG = VARIANTS["pre_ln"]
IDS, MASK = random_batch(CONFIG, seed=2)  # (3, 9), rows left-padded by 0, 3 and 5
T = IDS.shape[1]
BACKENDS = ("torch", "tf", "flax")


# --------------------------------------------------------------------------------------- fixtures
def write_checkpoint(path, config=CONFIG, generation=None):
    spec_io.save_safetensors_dir(path, random_weights(config, seed=3), config.to_dict())
    if generation is not None:
        (path / gen.GENERATION_CONFIG_NAME).write_text(json.dumps(generation))
    return path


def load(backend: str, path):
    if backend == "torch":
        from opt_torch import OPTForCausalLM
        return OPTForCausalLM.from_pretrained(path)
    if backend == "tf":
        pytest.importorskip("tensorflow")
        from opt_tf import TFOPTForCausalLM
        return TFOPTForCausalLM.from_pretrained(path)
    pytest.importorskip("flax")
    from opt_flax import FlaxOPTForCausalLM
    return FlaxOPTForCausalLM.from_pretrained(path)


def native(backend: str, array: np.ndarray):
    """The backend's own array type (what its logits processors receive)."""
    if backend == "torch":
        return torch.from_numpy(array)
    if backend == "tf":
        import tensorflow as tf
        return tf.constant(array)
    import jax.numpy as jnp
    return jnp.asarray(array)


def as_numpy(x) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x).astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("pre_ln"))


@pytest.fixture(scope="module")
def models(checkpoint):
    made = {}

    def get(backend):
        if backend not in made:
            made[backend] = load(backend, checkpoint)
        return made[backend]
    return get


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def hf(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.OPTForCausalLM.from_pretrained(checkpoint).eval()


def ours(models, backend, ids=IDS, mask=MASK, **kwargs) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorFlow's retracing notes
        return as_numpy(models(backend).generate(ids, mask, **kwargs))


def reference(hf, ids=IDS, mask=MASK, **kwargs) -> np.ndarray:
    kwargs.setdefault("pad_token_id", 1)
    with torch.no_grad():
        return hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                           **kwargs).numpy()


# ------------------------------------------------------------------------------ the extras vs HF
# Two settings combine every extra, for all backends (each compiled setting costs TensorFlow and Flax
# seconds); each ingredient changes their output (test_each_ingredient_matters). PyTorch also runs the
# extras one at a time.
COMBINED = {
    "greedy": dict(max_length=T + 7, no_repeat_ngram_size=2, repetition_penalty=1.3, eos_token_id=[94, 58]),
    "beams": dict(max_new_tokens=7, max_length=T + 3, num_beams=3, num_return_sequences=2, no_repeat_ngram_size=2,
                  repetition_penalty=1.3, length_penalty=0.5, min_new_tokens=6, eos_token_id=[41, 93]),
}
SINGLE = {
    "no_repeat_greedy": dict(max_new_tokens=10, no_repeat_ngram_size=2),
    "no_repeat_1": dict(max_new_tokens=10, no_repeat_ngram_size=1),
    "no_repeat_beams": dict(max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2),
    "eos_list_greedy": dict(max_new_tokens=8, repetition_penalty=1.6, eos_token_id=[93, 58]),
    "eos_list_beams": dict(max_new_tokens=8, num_beams=3, eos_token_id=[75, 28, 2], min_new_tokens=2),
    "max_length": dict(max_length=T + 5),
    "max_new_tokens_wins": dict(max_length=T + 5, max_new_tokens=7),
    "beams_return_3": dict(max_new_tokens=8, num_beams=4, num_return_sequences=3, length_penalty=0.5),
    "beams_repetition": dict(max_new_tokens=6, num_beams=2, repetition_penalty=1.3),
}


@pytest.mark.parametrize("case", sorted(COMBINED))
def test_extras_match_hugging_face(models, hf, backend, case):
    kwargs = COMBINED[case]
    got, want = ours(models, backend, **kwargs), reference(hf, **kwargs)
    assert got.shape == want.shape and np.array_equal(got, want), (got[:, T:], want[:, T:])


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_each_extra_alone_matches_hugging_face_in_torch(models, hf, case):
    got, want = ours(models, "torch", **SINGLE[case]), reference(hf, **SINGLE[case])
    assert got.shape == want.shape and np.array_equal(got, want), (got[:, T:], want[:, T:])


@pytest.mark.parametrize("case,key", [("greedy", "no_repeat_ngram_size"), ("greedy", "eos_token_id"),
                                      ("greedy", "repetition_penalty"), ("greedy", "max_length"),
                                      ("beams", "no_repeat_ngram_size"), ("beams", "eos_token_id"),
                                      ("beams", "repetition_penalty"), ("beams", "min_new_tokens")])
def test_each_ingredient_matters(hf, case, key):
    """Without the ingredient Hugging Face's output differs, so agreement above tests it."""
    kwargs = dict(COMBINED[case])
    full = reference(hf, **kwargs)
    kwargs.pop(key)
    without = reference(hf, **kwargs)
    assert full.shape != without.shape or not np.array_equal(full, without)


def test_the_combined_cases_have_their_shapes(hf):
    greedy, beams = reference(hf, **COMBINED["greedy"]), reference(hf, **COMBINED["beams"])
    assert greedy.shape == (3, T + 7)                     # max_length counts the prompt
    assert set(greedy[:, T:].ravel()) & {94} and set(greedy[:, T:].ravel()) & {58}  # both EOS ids stop rows
    assert beams.shape == (6, T + 7)                      # max_new_tokens wins over max_length
    assert np.array_equal(beams[:, :T], np.repeat(IDS, 2, axis=0))


# ---------------------------------------------------------------------------------------- sampling
def test_sampling_returns_several_sequences_reproducibly(models, backend):
    kwargs = dict(max_new_tokens=6, do_sample=True, num_return_sequences=3, temperature=2.0, top_k=0)
    a = ours(models, backend, seed=5, **kwargs)
    assert a.shape == (9, T + 6)
    assert np.array_equal(a[:, :T], np.repeat(IDS, 3, axis=0))  # each prompt three times, in place
    assert np.array_equal(a, ours(models, backend, seed=5, **kwargs))
    assert not np.array_equal(a, ours(models, backend, seed=6, **kwargs))
    assert len({tuple(row) for row in a[6:9, T:]}) > 1  # the samples of one prompt differ


def test_sampling_keeps_the_top_50_by_default(models, hf, backend):
    """top_k defaults to 50 as in Hugging Face: nearly uniform draws (temperature 100) over 96 tokens all
    land among each row's 50 most likely (with top_k=0 that would happen with probability ~1e-14)."""
    assert models(backend).generation_config.top_k == 50
    out = ours(models, backend, max_new_tokens=1, do_sample=True, temperature=100.0, num_return_sequences=16, seed=0)
    with torch.no_grad():
        logits = hf(torch.from_numpy(IDS).long(), attention_mask=torch.from_numpy(MASK).long()).logits[:, -1]
    top50 = torch.topk(logits, 50).indices.numpy()
    assert all(out[r, T] in top50[r // 16] for r in range(48))
    assert len(set(out[:, T])) > 20  # and they are spread over many tokens


# ------------------------------------------------------------------------------- logits processors
def test_logits_processor_sees_what_hugging_face_passes(models, hf, backend):
    """A processor gets (ids so far, float32 scores) as the backend's arrays, pads included, in Hugging
    Face's order (after the penalties and bans, before sampling's filters); its change is used."""
    bias = np.zeros((1, CONFIG.vocab_size), np.float32)
    bias[0, [11, 42, 77]] = 30.0
    seen, seen_hf = [], []

    def favour(ids, scores):
        seen.append((type(ids), type(scores), np.asarray(ids), str(scores.dtype)))
        return scores + native(backend, bias)

    def favour_hf(ids, scores):
        seen_hf.append(ids.numpy().copy())
        return scores + torch.from_numpy(bias)

    for kwargs in (dict(max_new_tokens=5, no_repeat_ngram_size=1), dict(max_new_tokens=4, num_beams=2)):
        seen.clear(), seen_hf.clear()
        got = ours(models, backend, logits_processor=[favour], **kwargs)
        want = reference(hf, logits_processor=transformers.LogitsProcessorList([favour_hf]), **kwargs)
        assert np.array_equal(got, want), (got[:, T:], want[:, T:])
        assert [s[2].tolist() for s in seen] == [s.tolist() for s in seen_hf]
        assert set(got[:, T].ravel()) <= {11, 42, 77}
    array = type(native(backend, bias))
    assert all(issubclass(s[0], array) and issubclass(s[1], array) and "float32" in s[3] for s in seen)


def test_logits_processor_errors_name_it(models, backend):
    with pytest.raises(ValueError, match=r"logits_processor\[1\] returned shape"):
        ours(models, backend, max_new_tokens=2, logits_processor=[lambda i, s: s, lambda i, s: s[:1]])
    with pytest.raises(TypeError, match=r"logits_processor\[0\] is a str"):
        ours(models, backend, max_new_tokens=2, logits_processor=["no"])


# ------------------------------------------------------------------------------------- streamers
class Recorder:
    """Hugging Face's streamer protocol, recording what it is handed."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(np.asarray(value))

    def end(self):
        self.ended += 1


class Letters:
    """Just enough of a tokenizer for transformers.TextStreamer: one letter per id."""

    def decode(self, ids, **kwargs):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_streamer_gets_the_prompt_then_each_step(models, hf, backend):
    mine, theirs = Recorder(), Recorder()
    got = ours(models, backend, max_new_tokens=5, streamer=mine)
    want = reference(hf, max_new_tokens=5, streamer=theirs)
    assert np.array_equal(got, want) and mine.ended == theirs.ended == 1
    assert len(mine.puts) == len(theirs.puts) == 6
    for a, b in zip(mine.puts, theirs.puts):
        assert a.shape == b.shape and np.array_equal(a, b)
    callback = []  # a plain callable gets each step's tokens only
    ours(models, backend, max_new_tokens=5, streamer=callback.append)
    assert np.array_equal(np.stack([np.asarray(c) for c in callback], 1), got[:, T:])
    with pytest.raises(ValueError, match="beam search cannot stream"):
        ours(models, backend, max_new_tokens=3, num_beams=2, streamer=Recorder())


def test_text_streamer_prints_the_new_text(models, backend, capsys):
    streamer = transformers.TextStreamer(Letters(), skip_prompt=True)
    out = ours(models, backend, ids=IDS[:1], mask=MASK[:1], max_new_tokens=6, do_sample=True, top_k=0, seed=3,
               streamer=streamer)
    assert capsys.readouterr().out == Letters().decode(out[0, T:]) + "\n"


# ---------------------------------------------------------------------------------- stop strings
@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A model whose vocabulary is a trained byte-level BPE's (320 ids), its folder, and the tokenizer
    both as optkit's and as Hugging Face's."""
    pytest.importorskip("tokenizers")
    from opt_spec.tokenizer import OPTTokenizer

    from .test_tokenizer import build_bpe

    path = tmp_path_factory.mktemp("bpe")
    tok = build_bpe(path)
    config = CONFIG.replace(vocab_size=tok.get_vocab_size())
    write_checkpoint(path, config)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    ids, mask = random_batch(config, seed=4)
    return dict(path=path, config=config, ours=OPTTokenizer.from_pretrained(path), hf=hf_tok, ids=ids, mask=mask)


@pytest.mark.parametrize("backend", ["torch", *(pytest.param(b, marks=pytest.mark.slow) for b in ("tf", "flax"))])
def test_stop_strings_stop_rows_as_hugging_face_does(bpe, backend):
    """(Slow in TensorFlow and Flax: a second model, compiled twice for the step-by-step loop.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.OPTForCausalLM.from_pretrained(bpe["path"]).eval()
    model = load(backend, bpe["path"])
    ids, mask, V = bpe["ids"], bpe["mask"], bpe["config"].vocab_size
    # printable ASCII tokens only (a stray byte of a UTF-8 character is text of its own to Hugging Face's
    # vocabulary matching), no token twice: varied text whose stop strings are plain
    text = [bpe["hf"].decode([i]) for i in range(V)]
    banned = np.array([[0.0 if t and t.isascii() and t.isprintable() else -np.inf for t in text]], np.float32)

    def ascii_only(ids, scores):
        return scores + native(backend, banned)

    def ascii_only_hf(ids, scores):
        return scores + torch.from_numpy(banned)

    base = dict(no_repeat_ngram_size=1)
    hf_base = dict(base, logits_processor=transformers.LogitsProcessorList([ascii_only_hf]))
    free = reference(ref, ids, mask, max_new_tokens=8, **hf_base)
    # stop strings across a token boundary: ending in row 0's 4th new token, in row 1's 6th
    stops = [text[free[0, T + 2]][-1] + text[free[0, T + 3]][0], text[free[1, T + 4]][-1] + text[free[1, T + 5]][0]]
    for kwargs in (dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=2)):
        want = reference(ref, ids, mask, stop_strings=stops, tokenizer=bpe["hf"], **hf_base, **kwargs)
        got = as_numpy(model.generate(ids, mask, stop_strings=stops, tokenizer=bpe["ours"],
                                      logits_processor=[ascii_only], **base, **kwargs))
        assert np.array_equal(got, want), (stops, got[:, T:], want[:, T:])
    assert (want[:, T:] == 1).any()  # beams: a hypothesis ended on a stop string
    stopped = reference(ref, ids, mask, stop_strings=stops, tokenizer=bpe["hf"], max_new_tokens=8, **hf_base)
    assert (stopped[0, T + 4:] == 1).all() and (stopped[1, T + 6:] == 1).all()  # rows 0 and 1 stopped there
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        model.generate(ids, mask, stop_strings="x")


def test_stop_string_rule_on_token_boundaries():
    class Pieces:
        vocab = ["st", "op", "stop", "opera", "s", "at", "x"]

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.vocab[i] for i in ids)

    rule = gen.StopStrings(["stop"], Pieces())
    for tokens, hit in [([0, 1], True), ([2], True), ([0, 3], True), ([6, 4, 0, 1], True),
                        ([2, 5], False), ([0, 1, 4], False), ([6, 0], False)]:
        assert rule.hit(tokens) is hit, tokens


# ---------------------------------------------------------------------------- generation_config.json
FILE = {"max_new_tokens": 7, "no_repeat_ngram_size": 2, "eos_token_id": [93, 2], "repetition_penalty": 1.6,
        "bos_token_id": 2, "pad_token_id": 1, "my_own_key": {"kept": True}, "transformers_version": "4.57.6"}


@pytest.fixture(scope="module")
def with_file(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("with_file"), generation=FILE)


def test_generation_config_file_gives_the_defaults(with_file, backend, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.OPTForCausalLM.from_pretrained(with_file).eval()
    model = load(backend, with_file)
    assert model.generation_config.max_new_tokens == 7 and model.generation_config.extra["my_own_key"] == {"kept": True}
    got = as_numpy(model.generate(IDS, MASK))
    want = reference(ref)
    assert got.shape[1] <= T + 7 and np.array_equal(got, want)
    # a call's generation_config: its unset values take the file's, unless use_model_defaults=False
    given, runs = transformers.GenerationConfig(max_new_tokens=5), []
    for use in (None, True, False):
        runs.append(as_numpy(model.generate(IDS, MASK, generation_config=given, use_model_defaults=use)))
        assert np.array_equal(runs[-1], reference(ref, generation_config=given, use_model_defaults=use)), use
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[1], runs[2])
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / gen.GENERATION_CONFIG_NAME).read_text())
    assert written == FILE
    assert transformers.GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 7


def test_generate_takes_a_generation_config(models, hf, backend):
    settings = COMBINED["beams"]
    want = reference(hf, **settings)
    given = [gen.GenerationConfig(**settings), dict(settings), transformers.GenerationConfig(**settings)]
    for config in given:
        assert np.array_equal(ours(models, backend, generation_config=config), want)
    # keywords win over the config, whose unset values fall back to the model's
    greedy = dict(COMBINED["greedy"])
    eos = greedy.pop("eos_token_id")
    assert np.array_equal(ours(models, backend, generation_config=dict(greedy, num_beams=4), num_beams=1,
                               eos_token_id=eos), reference(hf, **COMBINED["greedy"]))


def test_a_saved_model_writes_its_generation_config(models, backend, tmp_path):
    model = models(backend)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / gen.GENERATION_CONFIG_NAME).read_text())
    assert written == {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.top_k) == (2, 1, 50)


def test_model_generation_config_can_be_changed_like_hugging_faces(checkpoint, hf):
    model = load("torch", checkpoint)
    model.generation_config.max_new_tokens = 3  # as people do with transformers models
    model.generation_config.no_repeat_ngram_size = 1
    assert np.array_equal(as_numpy(model.generate(torch.from_numpy(IDS), torch.from_numpy(MASK))),
                          reference(hf, max_new_tokens=3, no_repeat_ngram_size=1))
    model.generation_config = transformers.GenerationConfig(max_new_tokens=2, eos_token_id=2, pad_token_id=1)
    assert model.generation_config.max_new_tokens == 2 and isinstance(model.generation_config, gen.GenerationConfig)
    model.generation_config.top_k = -1
    with pytest.raises(ValueError, match="top_k=-1"):
        model.generate(torch.from_numpy(IDS))
    model.generation_config = None  # back to the config's ids
    assert model.generation_config == gen.GenerationConfig(bos_token_id=2, eos_token_id=2, pad_token_id=1)


def test_a_bad_generation_config_file_is_refused_by_name(backend, tmp_path):
    write_checkpoint(tmp_path, generation={"max_new_tokens": 7, "top_k": "many"})
    with pytest.raises(ConfigError, match=r"generation_config.json: .*top_k='many'"):
        load(backend, tmp_path)


# ------------------------------------------------------------------------------ the settings (spec)
def test_settings_resolve_as_hugging_face_does():
    model = gen.GenerationConfig(max_new_tokens=7, eos_token_id=[5, 6], pad_token_id=1)

    def resolve(config=None, prompt=4, **kwargs):
        return gen.resolve(model, config, kwargs, prompt_length=prompt, max_positions=40, vocab_size=96)

    assert resolve().max_new_tokens == 7 and resolve().eos_token_ids == (5, 6)
    assert resolve(max_length=10).max_new_tokens == 7          # the model's max_new_tokens still wins
    assert resolve(max_new_tokens=None).max_new_tokens == 7    # None means "not given"
    plain = gen.GenerationConfig()
    assert gen.resolve(plain, None, {}, prompt_length=4, max_positions=40, vocab_size=96).max_new_tokens == 20
    assert gen.resolve(plain, None, {}, prompt_length=30, max_positions=40, vocab_size=96).max_new_tokens == 10
    assert gen.resolve(plain, None, dict(max_length=10), prompt_length=4, max_positions=40,
                       vocab_size=96).max_new_tokens == 6
    # a given config's defaults fall back to the model's; its own values and keywords win
    assert resolve(dict(num_beams=2)).max_new_tokens == 7
    assert resolve(dict(max_new_tokens=3), max_new_tokens=4).max_new_tokens == 4
    assert resolve(dict(max_length=20)).max_new_tokens == 7    # 20 is Hugging Face's default: unset
    assert resolve(pad_token_id=None).pad_token_id == 1
    assert gen.resolve(gen.GenerationConfig(eos_token_id=[9, 3]), None, {}, prompt_length=4, max_positions=40,
                       vocab_size=96).pad_token_id == 9        # pad defaults to the first EOS id
    assert resolve(num_beams=2, eos_token_id=[1, 2, 3]).candidates == 8


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(max_length=4), ValueError, "max_length is set to 4"),
    (dict(num_return_sequences=2), ValueError, "greedy search returns one sequence"),
    (dict(num_return_sequences=3, num_beams=2), ValueError, "is more than num_beams=2"),
    (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size=-1"),
    (dict(eos_token_id=[]), ValueError, "eos_token_id=\\[\\]"),
    (dict(stop_strings=[""]), ValueError, "stop_strings"),
    (dict(penalty_alpha=0.6), ValueError, "does not implement penalty_alpha=0.6"),
    (dict(max_time=-1.0), ValueError, "max_time=-1.0: must be a number of seconds >= 0"),
    (dict(max_time="1s"), ValueError, "max_time='1s'"),
    (dict(num_beam_groups=2), ValueError, "does not implement num_beam_groups=2"),
    (dict(maximum_tokens=3), TypeError, "unexpected keyword arguments: maximum_tokens"),
])
def test_bad_settings_are_refused_by_name(kwargs, error, words):
    with pytest.raises(error, match=words):
        gen.resolve(gen.GenerationConfig(), None, kwargs, prompt_length=4, max_positions=40, vocab_size=96)


def test_harmless_hugging_face_keywords_are_accepted():
    d = gen.resolve(gen.GenerationConfig(), None, dict(use_cache=True, output_scores=False, max_new_tokens=3),
                    prompt_length=4, max_positions=40, vocab_size=96)
    assert d.max_new_tokens == 3


def test_max_time_is_a_setting_and_its_criterion_starts_when_made():
    d = gen.resolve(gen.GenerationConfig(max_time=5), None, {}, prompt_length=4, max_positions=40, vocab_size=96)
    assert d.max_time == 5.0 and gen.resolve(gen.GenerationConfig(), None, dict(max_time=0), prompt_length=4,
                                            max_positions=40, vocab_size=96).max_time == 0.0
    assert gen.GenerationConfig.from_dict({"max_time": 2.5}).to_dict() == {"max_time": 2.5}
    mine = lambda input_ids, scores: False  # noqa: E731
    criteria = gen.check_host_rules([mine], None, 0.05)
    assert criteria[0] is mine and isinstance(criteria[1], gen.MaxTime) and len(criteria) == 2
    assert gen.check_host_rules([mine], None, None) == [mine]
    assert not criteria[1](None, None)
    time.sleep(0.06)
    assert criteria[1](None, None)


def test_generation_config_file_rules(tmp_path):
    path = tmp_path / gen.GENERATION_CONFIG_NAME
    path.write_text(json.dumps({"temperature": 0.7, "penalty_alpha": 0.6, "odd": [1, 2]}))
    with pytest.warns(UserWarning, match="penalty_alpha=0.6 ignored"):
        cfg = gen.GenerationConfig.from_pretrained(tmp_path)
    assert cfg.temperature == 0.7 and cfg.extra == {"penalty_alpha": 0.6, "odd": [1, 2]}
    cfg.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / gen.GENERATION_CONFIG_NAME).read_text()) == \
        {"temperature": 0.7, "penalty_alpha": 0.6, "odd": [1, 2]}
    path.write_text(json.dumps({"num_beams": 0}))
    with pytest.raises(ConfigError, match=r"generation_config.json: num_beams=0: must be an int >= 1"):
        gen.GenerationConfig.from_pretrained(tmp_path)
    path.write_text("[" * 100 + "]" * 100)
    with pytest.raises(CheckpointError, match="nested deeper"):
        gen.GenerationConfig.from_pretrained(tmp_path)
    os.remove(path)
    assert gen.GenerationConfig.from_pretrained(tmp_path, CONFIG).eos_token_id == CONFIG.eos_token_id


def test_ngram_rule_reference():
    tokens = np.array([[5, 6, 7, 5, 6], [1, 5, 6, 9, 5]])
    real = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    banned = gen.banned_by_ngrams(tokens, real, 3, 10)
    assert np.flatnonzero(banned[0]).tolist() == [7]           # 5 6 -> 7 was seen
    assert np.flatnonzero(gen.banned_by_ngrams(tokens, real, 2, 10)[1]).tolist() == [6]
    assert np.flatnonzero(gen.banned_by_ngrams(tokens, real, 1, 10)[1]).tolist() == [5, 6, 9]  # the pad is not real

