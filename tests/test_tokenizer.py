"""opt_spec.tokenizer on a small byte-level BPE vocabulary built here (nothing is downloaded)."""

import json
import os
import sys

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from opt_spec.tokenizer import OPTTokenizer, TokenizerUnavailableError, left_pad  # noqa: E402

CORPUS = ["Hello, my name is Ada and I like tea.", "The quick brown fox jumps over the lazy dog!",
          "Ünïcödé, accents and emoji 🙂 work too.", "Large language models continue the text they are given.",
          "  spaces   and\ttabs\nand newlines  "]
TEXTS = CORPUS + ["Hello", "a", "dog jumps", "naïve café 🙂🙂", "unseen words: zyxw qqq", " leading space"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3


def build_bpe(directory, vocab_size=320):
    """Trains a byte-level BPE (GPT-2's scheme, no prefix space) and saves vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    directory.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(directory))
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{'bpe': folder with vocab.json + merges.txt, 'json': folder with tokenizer.json only}."""
    root = tmp_path_factory.mktemp("tok")
    tok = build_bpe(root / "bpe")
    (root / "json").mkdir()
    tok.save(str(root / "json" / "tokenizer.json"))
    return {"bpe": root / "bpe", "json": root / "json"}


@pytest.fixture(scope="module", params=["bpe", "json"])
def tokenizer(request, dirs):
    return OPTTokenizer.from_pretrained(dirs[request.param])


def test_encode_starts_with_bos_and_round_trips(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids[0] == 2 and 2 not in ids[1:], (text, ids)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("") == [2]
    assert tokenizer.encode("Hello", add_bos=False) == tokenizer.encode("Hello")[1:]
    assert len(tokenizer.encode("Hello, my name is Ada")) < len("Hello, my name is Ada")  # merges are used


def test_both_file_formats_agree(dirs):
    a, b = OPTTokenizer.from_pretrained(dirs["bpe"]), OPTTokenizer.from_pretrained(dirs["json"])
    assert a.vocab_size == b.vocab_size == 320
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text


def test_special_tokens_are_whole_and_skipped_when_decoding(tokenizer):
    ids = tokenizer.encode("a</s>b")
    assert ids.count(2) == 2  # the bos and the </s> in the text, as one token
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "</s>a</s>b"
    # pads, bos/eos and ids past the tokenizer's vocabulary (a model's spare rows) decode to nothing
    hello = tokenizer.encode("Hello", add_bos=False)
    assert tokenizer.decode([1, 1, 2, *hello, 2, 10_000]) == "Hello"
    assert tokenizer.decode(np.array([[1, 2, *hello]])) == "Hello"


def test_batch_is_left_padded_with_mask(tokenizer):
    texts = ["Hello", "The quick brown fox jumps over the lazy dog!", ""]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [tokenizer.encode(t) for t in texts]
    T = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, T)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    for i, row in enumerate(rows):
        pads = T - len(row)
        assert ids[i, pads:].tolist() == row                # real tokens end in the last column
        assert (ids[i, :pads] == 1).all()                    # <pad> = 1 on the left
        assert mask[i].tolist() == [0] * pads + [1] * len(row)
    assert tokenizer.batch_decode(ids) == texts
    single = tokenizer("Hello", return_tensors="np", dtype=np.int32)
    assert single["input_ids"].dtype == np.int32 and single["input_ids"].shape == (1, len(rows[0]))
    assert tokenizer("Hello") == {"input_ids": rows[0], "attention_mask": [1] * len(rows[0])}  # one text: lists


def test_ragged_rows_cannot_be_tensors(tokenizer):
    with pytest.raises(ValueError, match="needs rows of one length, but they have 2 to .* pass padding=True"):
        tokenizer(["a", "The quick brown fox"], return_tensors="np")
    with pytest.raises(ValueError, match="padding='max_length' needs max_length"):
        tokenizer(["a"], padding="max_length")
    with pytest.raises(ValueError, match="padding_side='middle'"):
        tokenizer(["a"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors='mx'"):
        tokenizer(["a"], return_tensors="mx")


def test_left_pad_helper():
    out = left_pad([[5, 6, 7], [8]], pad_token_id=9)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_special_ids_come_from_config(dirs, tmp_path):
    import shutil

    for f in ("vocab.json", "merges.txt"):
        shutil.copy(dirs["bpe"] / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "pad_token_id": 3,
                                                      "bos_token_id": 0, "eos_token_id": 0}))
    tok = OPTTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 3)
    assert tok.encode("a")[0] == 0
    assert tok(["a", "dog jumps"], padding=True, return_tensors="np")["input_ids"][0, 0] == 3


def test_a_tokenizer_json_whose_model_states_no_type_is_read_as_bpe(dirs, tmp_path):
    """Older `tokenizers` releases wrote the model without its "type"; the library infers it from the keys.
    Such a file reads to the same ids; one the library makes into another model (WordLevel here) is refused."""
    from opt_spec.errors import CheckpointError

    data = json.loads((dirs["json"] / "tokenizer.json").read_text())
    del data["model"]["type"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours, typed = OPTTokenizer.from_pretrained(tmp_path), OPTTokenizer.from_pretrained(dirs["json"])
    assert [ours.encode(t) for t in TEXTS] == [typed.encode(t) for t in TEXTS]
    data["model"] = {"vocab": {"a": 0, "<unk>": 1}, "unk_token": "<unk>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="tokenizer.json: model WordLevel is not part of OPT's byte-level BPE"):
        OPTTokenizer.from_pretrained(tmp_path)


def test_missing_files_and_library(dirs, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        OPTTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges.txt.*found: vocab.json"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="tokenizer.json: not valid JSON"):
        OPTTokenizer.from_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if it were not installed
    with pytest.raises(TokenizerUnavailableError, match=r"pip install 'optkit\[tokenizer\]'"):
        OPTTokenizer.from_pretrained(dirs["bpe"])


def test_matches_hugging_face_gpt2_tokenizer_with_opt_settings(dirs):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Tokenizer(str(dirs["bpe"] / "vocab.json"), str(dirs["bpe"] / "merges.txt"),
                                    bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
                                    add_bos_token=True, padding_side="left")
    ours = OPTTokenizer.from_pretrained(dirs["bpe"])
    for text in TEXTS + ["x </s> y <pad> z"]:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    theirs = hf(TEXTS[:4], padding=True, return_tensors="np")
    batch = ours(TEXTS[:4], padding=True, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], theirs["attention_mask"])


# ------------------------------------------------------------------- Hugging Face's calling conventions
def hf_gpt2(directory, fast: bool = False):
    """transformers' GPT-2 tokenizer with OPT's settings (what AutoTokenizer gives for facebook/opt-*)."""
    transformers = pytest.importorskip("transformers")
    cls = transformers.GPT2TokenizerFast if fast else transformers.GPT2Tokenizer
    return cls(str(directory / "vocab.json"), str(directory / "merges.txt"), bos_token="</s>", eos_token="</s>",
               unk_token="</s>", pad_token="<pad>", add_bos_token=True, padding_side="left")


CALLS = [  # (texts, keyword arguments), each compared with HF's answer
    (TEXTS, {}), (TEXTS[0], {}), (TEXTS, {"padding": True}), (TEXTS, {"padding": "longest", "padding_side": "right"}),
    (TEXTS[:4], {"padding": "max_length", "max_length": 40}), (TEXTS, {"max_length": 4}),
    (TEXTS, {"truncation": True, "max_length": 5, "padding": True}),
    (TEXTS, {"truncation": "longest_first", "max_length": 6, "padding": "max_length", "padding_side": "right"}),
    (TEXTS, {"add_special_tokens": False, "padding": True}), (TEXTS, {"truncation": True}),
    (TEXTS, {"padding": True, "return_attention_mask": False}), (TEXTS[1], {"max_length": 3}),
    (TEXTS, {"truncation": False, "max_length": 3}),
    (TEXTS, {"add_special_tokens": False, "truncation": True, "max_length": 2, "padding": True}),
]


@pytest.mark.parametrize("fast", [False, True], ids=["slow", "fast"])
def test_call_matches_hugging_face_argument_by_argument(dirs, fast):
    hf = hf_gpt2(dirs["bpe"], fast)
    for source in ("bpe", "json"):
        ours = OPTTokenizer.from_pretrained(dirs[source])
        for texts, kwargs in CALLS:
            assert ours(texts, **kwargs) == dict(hf(texts, **kwargs)), (source, texts, kwargs)
    assert len(ours) == len(hf) == 320
    # max_length=1 leaves only the </s> (HF logs an error and keeps the whole text instead)
    assert ours(TEXTS[:2], max_length=1)["input_ids"] == [[2], [2]]
    with pytest.raises(ValueError, match="max_length=0 leaves no room for the leading '</s>'"):
        ours(TEXTS[:2], max_length=0)


@pytest.mark.parametrize("kind,framework", [("np", "numpy"), ("pt", "torch"), ("tf", "tensorflow"), ("jax", "jax")])
def test_return_tensors_match_hugging_face(dirs, kind, framework):
    pytest.importorskip(framework)
    hf, ours = hf_gpt2(dirs["bpe"]), OPTTokenizer.from_pretrained(dirs["bpe"])
    for texts, kwargs in [(TEXTS, {"padding": True}), (TEXTS[0], {}),
                           (TEXTS, {"truncation": True, "max_length": 4, "padding": "max_length"})]:
        got, want = ours(texts, return_tensors=kind, **kwargs), hf(texts, return_tensors=kind, **kwargs)
        assert got.keys() == want.keys()
        for key in want:
            assert type(got[key]) is type(want[key]), key
            assert got[key].dtype == want[key].dtype and tuple(got[key].shape) == tuple(want[key].shape)
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    enc = ours(TEXTS[:2], padding=True, return_tensors=kind)
    assert enc.input_ids is enc["input_ids"]  # attribute access, as on HF's BatchEncoding
    if kind == "pt":
        assert enc.to("cpu")["input_ids"].device.type == "cpu"


def test_return_tensors_np_imports_no_framework(dirs):
    import subprocess

    code = ("import sys; from opt_spec.tokenizer import OPTTokenizer; "
            f"t = OPTTokenizer.from_pretrained({str(dirs['bpe'])!r}); "
            "x = t(['a b', 'Hello'], padding=True, return_tensors='np'); "
            "bad = {'torch', 'tensorflow', 'jax', 'flax', 'keras'} & set(sys.modules); assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_pad_takes_what_a_data_collator_holds(dirs):
    hf, ours = hf_gpt2(dirs["bpe"]), OPTTokenizer.from_pretrained(dirs["bpe"])
    features = [{"input_ids": ours.encode(t), "label": i % 2} for i, t in enumerate(TEXTS[:4])]
    got, want = ours.pad(features, return_tensors="np"), hf.pad(features, return_tensors="np")
    assert got.keys() == want.keys() == {"input_ids", "attention_mask", "label"}
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert ours.pad([[2, 5], [2]], padding_side="right") == {"input_ids": [[2, 5], [2, 1]],
                                                             "attention_mask": [[1, 1], [1, 0]]}


@pytest.mark.parametrize("source", ["bpe", "json"])
def test_save_pretrained_is_read_by_auto_tokenizer_to_the_same_ids(dirs, source, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = OPTTokenizer.from_pretrained(dirs[source])
    (tmp_path / "config.json").write_text("{}")  # a model's file already there is kept
    files = ours.save_pretrained(tmp_path)
    assert {os.path.basename(f) for f in files} == {"tokenizer.json", "vocab.json", "merges.txt",
                                                    "tokenizer_config.json", "special_tokens_map.json"}
    assert (tmp_path / "config.json").read_text() == "{}"
    texts = TEXTS + ["x </s> y <pad> z"]
    for fast in (True, False):
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), use_fast=fast)
        assert type(theirs).__name__ == ("GPT2TokenizerFast" if fast else "GPT2Tokenizer")
        assert len(theirs) == len(ours)
        for text in texts:
            assert theirs(text)["input_ids"] == ours.encode(text), (fast, text)
            assert theirs.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
        assert dict(theirs(texts, padding=True)) == ours(texts, padding=True)  # left padding is in the file
        assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (1, 2, 2)
    again = OPTTokenizer.from_pretrained(tmp_path)
    assert all(again.encode(t) == ours.encode(t) for t in texts) and again.padding_side == "left"
    ours.padding_side = "right"
    ours.model_max_length = 7
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert theirs.padding_side == "right" and theirs.model_max_length == 7
    again = OPTTokenizer.from_pretrained(tmp_path)
    assert again.padding_side == "right" and again.model_max_length == 7
    assert again(TEXTS, truncation=True) == dict(theirs(TEXTS, truncation=True))  # model_max_length truncates


def test_save_pretrained_keeps_special_ids_from_the_config(dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    for f in ("vocab.json", "merges.txt"):
        shutil.copy(dirs["bpe"] / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "pad_token_id": 3,
                                                      "bos_token_id": 0, "eos_token_id": 0}))
    ours = OPTTokenizer.from_pretrained(tmp_path)
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 0, 3)
    assert theirs("dog jumps")["input_ids"] == ours.encode("dog jumps") and ours.encode("dog jumps")[0] == 0


@pytest.mark.parametrize("kept_in", ["added_tokens_decoder", "added_tokens.json"])
def test_tokens_a_fine_tune_added_are_read_from_a_folder_without_tokenizer_json(dirs, tmp_path, kept_in):
    """A slow tokenizer's save (vocab.json + merges.txt) keeps added tokens in tokenizer_config.json's
    added_tokens_decoder (transformers >= 4.34) or in added_tokens.json: they were ignored, so "<extra>"
    became 8 BPE pieces where Hugging Face gives one id."""
    transformers = pytest.importorskip("transformers")
    hf = hf_gpt2(dirs["bpe"])
    hf.add_tokens(["<extra>", "foo bar"])
    hf.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    hf.save_pretrained(str(tmp_path))
    assert not (tmp_path / "tokenizer.json").exists()
    if kept_in == "added_tokens.json":  # as older transformers wrote it
        settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
        del settings["added_tokens_decoder"]
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False)
    fast = transformers.AutoTokenizer.from_pretrained(str(tmp_path), use_fast=True)
    ours = OPTTokenizer.from_pretrained(tmp_path)
    texts = ["hello <extra> world<sep>foo bar", "<sep><sep>", "foo barfoo bar <extra>", *TEXTS[:4]]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids == fast(text)["input_ids"], text
        # (the slow tokenizer's decode puts spaces around added tokens; the fast one, like ours, does not)
        assert ours.decode(ids) == fast.decode(ids, skip_special_tokens=True), text
    assert ours.vocab_size == len(theirs) and ours("<extra>")["input_ids"][1:] == [len(theirs) - 3]

    # ids that do not follow the vocabulary's are refused in words (Hugging Face numbers them in order)
    table = {"<extra>": len(theirs) + 5}
    (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    settings.pop("added_tokens_decoder", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"added_tokens.json: added token ids \[\d+\] do not follow the vocabulary"):
        OPTTokenizer.from_pretrained(tmp_path)


# ------------------------------------------------ a fine-tune's add_prefix_space / add_bos_token (tokenizer_config)
FLAG_TEXTS = ["Hello world", " leading space", "\nnew line", "Hello\n\nworld", "naïve café 🙂", "a</s>b",
              "x </s> y <pad> z", "</s>Hello", "", "  two spaces"]
OPT_SETTINGS = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                "pad_token": "<pad>", "padding_side": "left"}


def flag_folder(path, source, add_prefix_space=None, add_bos_token=None, **extra):
    """A copy of a fixture folder with a tokenizer_config.json holding OPT's settings, the two flags when not
    None (absent otherwise) and `extra`."""
    import shutil

    shutil.copytree(source, path)
    flags = {"add_prefix_space": add_prefix_space, "add_bos_token": add_bos_token}
    settings = {**OPT_SETTINGS, **{k: v for k, v in flags.items() if v is not None}, **extra}
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


def slow_agrees(text, prefix_space):
    """Whether transformers' slow GPT2Tokenizer gives the fast one's ids (module docstring): always without a
    prefix space; with one, only for a text that does not start with a space and holds no special token."""
    return not prefix_space or (text[:1] not in ("", " ") and "</s>" not in text and "<pad>" not in text)


def assert_same_ids(ours, hf, texts, compared="fast"):
    """ours == hf on every text, with and without special tokens, one by one, as a padded batch, and through
    encode / encode_with_offsets."""
    for special in (True, False):
        for text in texts:
            want = hf(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == want, (compared, special, text)
            assert ours.encode(text, add_special_tokens=special) == want, (compared, special, text)
            if not special:
                assert ours.encode(text, add_bos=False) == want
            ids, offsets = ours.encode_with_offsets(text)
            assert ids == ours.encode(text) and len(offsets) == len(ids), text
        if texts:
            assert ours(texts, padding=True, add_special_tokens=special) == dict(
                hf(texts, padding=True, add_special_tokens=special)), (compared, special)


@pytest.mark.parametrize("add_prefix_space", [None, True, False], ids=["space-absent", "space", "no-space"])
@pytest.mark.parametrize("add_bos_token", [None, True, False], ids=["bos-absent", "bos", "no-bos"])
def test_vocab_merges_folder_follows_tokenizer_config_as_auto_tokenizer(dirs, tmp_path, add_prefix_space,
                                                                        add_bos_token):
    """A folder without tokenizer.json (like facebook/opt-*): tokenizer_config.json's add_prefix_space and
    add_bos_token were ignored (always no prefix space, always </s> first). An absent add_bos_token is OPT's
    </s> first, which transformers gives only when told (its GPT-2 default is none)."""
    transformers = pytest.importorskip("transformers")
    folder = flag_folder(tmp_path / "tok", dirs["bpe"], add_prefix_space, add_bos_token)
    ours = OPTTokenizer.from_pretrained(folder)
    bos = True if add_bos_token is None else add_bos_token
    assert (ours.add_prefix_space, ours.add_bos_token) == (bool(add_prefix_space), bos)
    told = {} if add_bos_token is not None else {"add_bos_token": True}
    fast = transformers.AutoTokenizer.from_pretrained(str(folder), **told)
    slow = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=False, **told)
    assert type(fast).__name__ == "GPT2TokenizerFast" and type(slow).__name__ == "GPT2Tokenizer"
    assert_same_ids(ours, fast, FLAG_TEXTS)
    assert_same_ids(ours, slow, [t for t in FLAG_TEXTS if slow_agrees(t, ours.add_prefix_space)], "slow")
    for texts, kwargs in CALLS:  # truncation and padding count the </s> only when there is one
        assert ours(texts, **kwargs) == dict(fast(texts, **kwargs)), (texts, kwargs)
    hello = fast("Hello", add_special_tokens=False)["input_ids"]
    assert ours.encode("Hello", add_bos=True) == [2, *hello]  # an explicit add_bos is obeyed (opt_spec.data's use)
    assert ours.encode_with_offsets("Hello", add_bos=True)[0] == [2, *hello]
    assert ours.encode_with_offsets("Hello", add_bos=False)[0] == hello
    if add_prefix_space:  # the documented difference: the slow tokenizer puts a second space before " leading"
        assert slow(" leading")["input_ids"] != fast(" leading")["input_ids"] == ours(" leading")["input_ids"]


def tokenizer_json(path, source, pre="bytelevel", post="template", **settings):
    """A folder as a fast tokenizer's save_pretrained leaves it (tokenizer.json + vocab.json + merges.txt +
    tokenizer_config.json), with tokenizer.json's pre-tokenizer ("bytelevel": ByteLevel without prefix space,
    "bytelevel-space": with one, "sequence-space": a Sequence holding the latter) and post_processor
    ("template": </s> first, "bytelevel": nothing added, None: none) chosen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    flag_folder(path, source, **settings)
    tok = Tokenizer(models.BPE.from_file(str(source / "vocab.json"), str(source / "merges.txt")))
    tok.decoder = decoders.ByteLevel()
    level = pre_tokenizers.ByteLevel(add_prefix_space=pre != "bytelevel")
    tok.pre_tokenizer = pre_tokenizers.Sequence([level]) if pre.startswith("sequence") else level
    if post == "template":
        tok.post_processor = processors.TemplateProcessing(single="</s>:0 $A:0", pair="</s>:0 $A:0 $B:1",
                                                           special_tokens=[("</s>", 2)])
    elif post == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("post", ["template", "bytelevel"])
@pytest.mark.parametrize("pre", ["bytelevel", "bytelevel-space", "sequence-space"])
def test_tokenizer_json_folder_follows_the_fast_tokenizer(dirs, tmp_path, pre, post):
    """With tokenizer.json, AutoTokenizer's fast tokenizer takes the bos from the post_processor (not
    tokenizer_config.json's add_bos_token) and a top-level ByteLevel's prefix space from tokenizer_config.json
    (false when absent), a Sequence's from the file. optkit always put </s> first and kept the file's ByteLevel."""
    transformers = pytest.importorskip("transformers")
    for i, (space, bos) in enumerate((s, b) for s in (None, True, False) for b in (None, True, False)):
        folder = tokenizer_json(tmp_path / str(i), dirs["bpe"], pre, post, add_prefix_space=space, add_bos_token=bos)
        ours, fast = OPTTokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
        want_space = pre == "sequence-space" or bool(space)
        assert (ours.add_prefix_space, ours.add_bos_token) == (want_space, post == "template"), (space, bos)
        assert_same_ids(ours, fast, FLAG_TEXTS)
        if bos is (post == "template") and bool(space) == want_space:  # files that agree: the slow one agrees too
            slow = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=False)
            assert_same_ids(ours, slow, [t for t in FLAG_TEXTS if slow_agrees(t, want_space)], "slow")


def test_tokenizer_json_without_post_processor_reads_add_bos_token(dirs, tmp_path):
    """A tokenizer.json without a post_processor (the `tokenizers` library's own save) leaves the bos to
    tokenizer_config.json's add_bos_token, OPT's </s> first when absent (the fast tokenizer adds none)."""
    transformers = pytest.importorskip("transformers")
    off = tokenizer_json(tmp_path / "off", dirs["bpe"], post=None, add_bos_token=False)
    ours, fast = OPTTokenizer.from_pretrained(off), transformers.AutoTokenizer.from_pretrained(str(off))
    assert not ours.add_bos_token
    assert_same_ids(ours, fast, FLAG_TEXTS)
    absent = tokenizer_json(tmp_path / "absent", dirs["bpe"], post=None)
    ours, fast = OPTTokenizer.from_pretrained(absent), transformers.AutoTokenizer.from_pretrained(str(absent))
    assert ours.add_bos_token and ours.encode("Hello") == [2, *fast("Hello")["input_ids"]]


@pytest.mark.parametrize("source", ["bpe", "json"])
@pytest.mark.parametrize("add_prefix_space,add_bos_token", [(True, True), (True, False), (False, False)])
def test_save_pretrained_keeps_the_flags(dirs, tmp_path, source, add_prefix_space, add_bos_token):
    """save_pretrained wrote add_bos_token: true and add_prefix_space: false whatever the tokenizer did."""
    transformers = pytest.importorskip("transformers")
    if source == "bpe":
        folder = flag_folder(tmp_path / "in", dirs["bpe"], add_prefix_space, add_bos_token)
    else:
        folder = tokenizer_json(tmp_path / "in", dirs["bpe"], "bytelevel", "template" if add_bos_token else "bytelevel",
                                add_prefix_space=add_prefix_space)
    ours = OPTTokenizer.from_pretrained(folder)
    assert (ours.add_prefix_space, ours.add_bos_token) == (add_prefix_space, add_bos_token)
    ours.save_pretrained(tmp_path / "out")
    again = OPTTokenizer.from_pretrained(tmp_path / "out")
    assert (again.add_prefix_space, again.add_bos_token) == (add_prefix_space, add_bos_token)
    assert_same_ids(again, transformers.AutoTokenizer.from_pretrained(str(folder)), FLAG_TEXTS)  # as the original
    for special in (True, False):
        assert [again.encode(t, add_special_tokens=special) for t in FLAG_TEXTS] == [
            ours.encode(t, add_special_tokens=special) for t in FLAG_TEXTS]
    assert_same_ids(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")), FLAG_TEXTS)
    slow = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), use_fast=False)
    assert_same_ids(ours, slow, [t for t in FLAG_TEXTS if slow_agrees(t, add_prefix_space)], "slow")


@pytest.mark.parametrize("key", ["add_prefix_space", "add_bos_token"])
@pytest.mark.parametrize("value", ["false", 0, None, [True]])
@pytest.mark.parametrize("source", ["bpe", "json"])
def test_flags_that_are_not_true_or_false_are_refused_by_name(dirs, tmp_path, key, value, source):
    """"false" would be true to Python: such a value is refused, naming the file and the key."""
    from opt_spec.errors import CheckpointError

    folder = flag_folder(tmp_path / "tok", dirs[source], **{key: True}) if source == "bpe" else \
        tokenizer_json(tmp_path / "tok", dirs["bpe"], add_bos_token=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, key: value}))
    with pytest.raises(CheckpointError, match=rf"tokenizer_config.json: {key}=.* is not true or false"):
        OPTTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("post", ["roberta", "eos-after"])
def test_a_post_processor_adding_more_than_the_bos_is_refused(dirs, tmp_path, post):
    """optkit puts at most one </s> in front; a tokenizer.json whose post_processor adds other tokens (which it
    used to ignore, giving other ids than transformers) is refused, naming the file."""
    from tokenizers import Tokenizer, processors

    from opt_spec.errors import CheckpointError

    folder = tokenizer_json(tmp_path / "tok", dirs["bpe"])
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0)) if post == "roberta" else \
        processors.TemplateProcessing(single="$A:0 </s>:0", special_tokens=[("</s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer.json: post_processor \w+ makes \[\d+\] into \[.*"
                                              r"adds only the bos \(id 2\) in front"):
        OPTTokenizer.from_pretrained(folder)
