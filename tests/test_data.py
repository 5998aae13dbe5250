"""opt_spec.data: packing, classification and QA examples, span mapping, errors, shuffling."""

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from opt_spec import data  # noqa: E402
from opt_spec.tokenizer import OPTTokenizer  # noqa: E402

CORPUS = ["Hello, my name is Ada and I like tea.", "The quick brown fox jumps over the lazy dog!",
          "Paris is the capital of France. Berlin is the capital of Germany.", "naïve café 🙂 costs 3 euros"]


def build_tokenizer(directory, vocab_size=300):
    """A byte-level BPE trained here (OPT's special ids 0..3), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return OPTTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines),
                    encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("seq_len", [2, 5, 7, 16, 1000])
@pytest.mark.parametrize("drop_last", [False, True])
def test_packing_keeps_every_token_once_in_order(tok, tmp_path, seq_len, drop_last):
    (tmp_path / "a.txt").write_text(CORPUS[0] + "\n\n" + CORPUS[1] + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(CORPUS[2] + "\n" + CORPUS[3], encoding="utf-8")
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    stream = data.token_stream(paths, tok, documents="paragraph").tolist()
    # </s> d1 </s> d2 </s> d3 </s>: documents separated (and framed) by eos, each as the tokenizer encodes it
    docs = [CORPUS[0], CORPUS[1], CORPUS[2] + "\n" + CORPUS[3]]
    expected = [tok.eos_token_id]
    for d in docs:
        expected += tok.encode(d, add_bos=False) + [tok.eos_token_id]
    assert stream == expected
    if drop_last and len(stream) < seq_len:
        with pytest.raises(data.DataError, match="not one full block"):
            data.load_text(paths, tok, seq_len, drop_last=True, documents="paragraph")
        return
    ds = data.load_text(paths, tok, seq_len, drop_last=drop_last, documents="paragraph")
    batch = ds.collate(range(len(ds)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (len(ds), min(seq_len, len(stream)))
    flat = ids[mask == 1].tolist()  # row-major over left-padded rows = the blocks in order
    keep = len(stream) if not drop_last else len(stream) // seq_len * seq_len
    assert flat == stream[:keep]
    assert (labels == np.where(mask == 1, ids, -100)).all()
    assert (mask[:-1] == 1).all()  # only the last block may be partial, and it is left-padded
    assert (ids[mask == 0] == tok.pad_token_id).all()
    if (mask == 0).any():
        row = mask[-1]
        assert row[0] == 0 and row[-1] == 1 and (np.diff(row) >= 0).all()


def test_document_splitting(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("one line\ntwo line\n\nthree\n", encoding="utf-8")
    eos = tok.eos_token_id
    assert data.token_stream(path, tok, "line").tolist().count(eos) == 4
    assert data.token_stream(path, tok, "paragraph").tolist().count(eos) == 3
    assert data.token_stream(path, tok, "file").tolist().count(eos) == 2
    with pytest.raises(ValueError, match="documents"):
        data.token_stream(path, tok, "sentence")


def test_empty_and_missing_text_files(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"empty\.txt: empty file"):
        data.load_text(tmp_path / "empty.txt", tok, 8)
    with pytest.raises(data.DataError, match=r"nope\.txt: no such file"):
        data.load_text(tmp_path / "nope.txt", tok, 8)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(data.DataError, match=r"bin\.txt: not UTF-8"):
        data.load_text(tmp_path / "bin.txt", tok, 8)


# ----------------------------------------------------------------------------------- classification
def test_classification_examples_and_batches(tok, tmp_path):
    path = write(tmp_path / "c.jsonl", [{"text": "good tea", "label": 1}, "", {"text": "bad dog", "label": 0},
                                        {"text": CORPUS[1], "label": 2}])
    assert len(tok.encode("good tea")) < 8 < len(tok.encode(CORPUS[1]))
    ds = data.load_classification(path, tok, max_length=8, num_labels=3)
    assert len(ds) == 3 and ds.rows[0] == tok.encode("good tea") and ds.rows[2] == tok.encode(CORPUS[1])[:8]
    batch = ds.collate([0, 2])
    assert batch["labels"].dtype == np.int64 and batch["labels"].tolist() == [1, 2]
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, -len(ds.rows[0]):].tolist() == ds.rows[0]  # left-padded
    reg = data.load_classification(write(tmp_path / "r.jsonl", [{"text": "a", "label": 0.5},
                                                                 {"text": "b", "label": -1.0}]), tok, 8)
    assert reg.collate([0, 1])["labels"].dtype == np.float32
    multi = data.load_classification(write(tmp_path / "m.jsonl", [{"text": "a", "label": [1, 0, 1]}]), tok, 8)
    assert multi.collate([0])["labels"].tolist() == [[1.0, 0.0, 1.0]]


@pytest.mark.parametrize("lines, line, reason", [
    ([{"text": "a", "label": 0}, {"label": 1}], 2, "missing field 'text'"),
    ([{"text": "a"}], 1, "missing field 'label'"),
    ([{"text": "a", "label": 0}, '{"text": "b", "label": 1'], 2, "invalid JSON"),
    ([{"text": 3, "label": 0}], 1, "field 'text' must be a string"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 0.5}], 2, "regression-label but earlier lines are single"),
    ([{"text": "a", "label": 5}], 1, r"label 5 is outside \[0, 3\)"),
    ([{"text": "a", "label": True}], 1, "must be an int, a float or a list"),
    (["[1, 2]"], 1, "expected a JSON object"),
])
def test_bad_classification_lines_name_file_and_line(tok, tmp_path, lines, line, reason):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(data.DataError, match=reason) as err:
        data.load_classification(path, tok, 8, num_labels=3)
    assert str(err.value).startswith(f"{path}:{line}: ") and err.value.line == line


def test_empty_jsonl(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"e\.jsonl: empty file"):
        data.load_classification(tmp_path / "e.jsonl", tok, 8)


# ---------------------------------------------------------------------------------- question answering
def qa(context, question, *answers):
    return {"context": context, "question": question,
            "answers": {"text": [a for a in answers], "answer_start": [context.index(a) for a in answers]}}


def test_answer_token_span_on_hand_made_offsets():
    offsets = [(0, 5), (5, 9), (9, 10), (10, 16), (16, 17)]  # "Hello| Ada|,| world|!"
    assert data.answer_token_span(offsets, 6, 9) == (1, 1)      # "Ada" inside " Ada"
    assert data.answer_token_span(offsets, 6, 16) == (1, 3)
    assert data.answer_token_span(offsets, 0, 2) == (0, 0)      # part of a token
    assert data.answer_token_span(offsets, 17, 18) is None


def test_qa_spans_map_to_the_answer_tokens(tok, tmp_path):
    ctx = CORPUS[2]
    examples = [qa(ctx, "What is the capital of France?", "Paris"), qa(ctx, "And of Germany?", "Berlin"),
                qa(ctx, "Which country has Berlin?", "Germany"), qa(CORPUS[3], "What costs 3 euros?", "naïve café 🙂")]
    path = write(tmp_path / "qa.jsonl", examples)
    ds = data.load_question_answering(path, tok, max_length=64)
    assert len(ds) == 4
    batch = ds.collate(range(4))
    T = batch["input_ids"].shape[1]
    for b, ex in enumerate(examples):
        q_ids = tok.encode(ex["question"])
        row = ds.rows[b]
        assert row[:len(q_ids) + 1] == q_ids + [tok.eos_token_id]       # </s> question </s> context
        s, e = int(batch["start_positions"][b]), int(batch["end_positions"][b])
        assert batch["attention_mask"][b, s] == 1 and s <= e < T
        answer = tok.decode(batch["input_ids"][b, s:e + 1]).strip()
        assert answer == ex["answers"]["text"][0]
        # the gold span read back through the offsets is the answer, too
        m = ds.meta[b]
        pad = T - len(row)
        lo = pad + m.context_start
        assert m.context[m.offsets[s - lo][0]:m.offsets[e - lo][1]].strip() == ex["answers"]["text"][0]
    # predictions from one-hot logits at the gold positions give back the answers
    start = np.full(batch["input_ids"].shape, -5.0)
    end = np.full(batch["input_ids"].shape, -5.0)
    start[np.arange(4), batch["start_positions"]] = 5.0
    end[np.arange(4), batch["end_positions"]] = 5.0
    assert data.qa_predictions(ds, range(4), batch, start, end) == [ex["answers"]["text"][0] for ex in examples]


def test_qa_errors(tok, tmp_path):
    ctx = CORPUS[2]
    good = qa(ctx, "Capital?", "Paris")
    cases = [
        (dict(good, answers={"text": ["Rome"], "answer_start": [0]}),
         "answer 'Rome' is not in the context at character 0"),
        (dict(good, answers={"text": ["Paris"], "answer_start": [3]}), "is not in the context"),
        ({k: v for k, v in good.items() if k != "question"}, "missing field 'question'"),
        (dict(good, answers={"text": ["Paris"]}), "missing field 'answer_start'"),
        (dict(good, answers={"text": ["Paris", "x"], "answer_start": [0]}), "2 texts and 1 answer_start"),
    ]
    for obj, reason in cases:
        path = write(tmp_path / "bad_qa.jsonl", [good, obj])
        with pytest.raises(data.DataError, match=reason) as err:
            data.load_question_answering(path, tok, 64)
        assert str(err.value).startswith(f"{path}:2: ")
    far = qa(ctx, "Which country has Berlin?", "Germany")
    path = write(tmp_path / "long.jsonl", [good, far])
    with pytest.raises(data.DataError, match=r"long\.jsonl:2: the answer ends at token \d+, past max_length=12"):
        data.load_question_answering(path, tok, 12)
    assert len(data.load_question_answering(path, tok, 12, skip_overflow=True)) == 1


# ----------------------------------------------------------------------------------------- shuffling
def test_batch_stream_is_seeded_deterministic_and_covers_each_epoch(tok, tmp_path):
    ds = data.Dataset("sequence_classification", [[2, 5 + i] for i in range(10)], list(range(10)))
    a, b, c = data.BatchStream(ds, 4, seed=1), data.BatchStream(ds, 4, seed=1), data.BatchStream(ds, 4, seed=2)
    assert a.batches_per_epoch == 3
    first = [a.indices(i).tolist() for i in range(6)]
    assert first == [b.indices(i).tolist() for i in range(6)]
    assert first != [c.indices(i).tolist() for i in range(6)]
    for epoch in range(2):
        seen = sum(first[3 * epoch:3 * epoch + 3], [])
        assert sorted(seen) == list(range(10))
    assert first[:3] != first[3:]  # a new permutation each epoch
    # random access equals iteration (what resuming relies on)
    fresh = data.BatchStream(ds, 4, seed=1)
    assert fresh.batch(4)["labels"].tolist() == [int(x) for x in first[4]]
    it = iter(data.BatchStream(ds, 4, seed=1))
    for i in range(5):
        assert next(it)["labels"].tolist() == first[i]
    assert data.BatchStream(ds, 4, shuffle=False).indices(1).tolist() == [4, 5, 6, 7]
