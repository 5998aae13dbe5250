"""opt_spec.tokenizer on a small byte-level BPE vocabulary built here (nothing is downloaded)."""

import json
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
    batch = tokenizer(texts)
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
    single = tokenizer("Hello", dtype=np.int32)
    assert single["input_ids"].dtype == np.int32 and single["input_ids"].shape == (1, len(rows[0]))


def test_max_length_names_the_text(tokenizer):
    with pytest.raises(ValueError, match="text 1 is .* tokens long; at most 3"):
        tokenizer(["a", "The quick brown fox"], max_length=3)


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
    assert tok(["a", "dog jumps"])["input_ids"][0, 0] == 3


def test_missing_files_and_library(dirs, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        OPTTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges.txt.*found: vocab.json"):
        OPTTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot be read as a tokenizer"):
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
    batch = ours(TEXTS[:4])
    np.testing.assert_array_equal(batch["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], theirs["attention_mask"])
