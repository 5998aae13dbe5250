"""opt_spec.data: packing, classification and QA examples, span mapping, errors, shuffling."""

import json
import os

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


# ---------------------------------------------------------------------------------- corpora of any size
def whole_documents_stream(path, tok, documents):
    """The stream as defined: the file read whole (universal newlines), its documents (data.documents_of) each
    encoded whole."""
    with open(path, encoding="utf-8") as f:
        docs = data.documents_of(f.read(), documents)
    stream = [tok.bos_token_id]
    for doc in docs:
        stream += tok.encode(doc, add_bos=False) + [tok.eos_token_id]
    return stream


@pytest.fixture()
def tiny_pieces(monkeypatch):
    """Reads of 16 bytes and pieces of 4+ characters: every text below is cut in many places."""
    monkeypatch.setattr(data, "READ_BYTES", 16)
    monkeypatch.setattr(data, "PIECE_CHARS", 4)
    monkeypatch.setattr(data, "BATCH_CHARS", 64)
    monkeypatch.setattr(data, "FORCE_CHARS", 10**6)


def variant_tokenizer(directory, kind):
    """The module's BPE as tokenizer.json, with a prefix space ('prefix') or with added tokens that hold
    spaces, start or end with letters, or strip their neighbours' spaces ('added')."""
    from tokenizers import AddedToken, Tokenizer

    base = build_tokenizer(directory / "base")
    raw = Tokenizer.from_str(base._tokenizer.to_str())
    directory = directory / kind
    directory.mkdir()
    if kind == "added":
        raw.add_tokens([AddedToken("New York", normalized=False), AddedToken("tea", rstrip=True),
                        AddedToken("fox", lstrip=True), AddedToken("is", single_word=True), AddedToken("ab")])
    else:
        (directory / "tokenizer_config.json").write_text('{"add_prefix_space": true}', encoding="utf-8")
    raw.save(str(directory / "tokenizer.json"))
    return OPTTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("kind", ["plain", "added", "prefix"])
def test_streamed_corpus_equals_encoding_each_document_whole(tok, tmp_path, tiny_pieces, kind):
    """Files read in 16-byte blocks and cut at every allowed place give the ids of the whole documents, for
    random texts of words, digits, newlines (\r\n, \r, Unicode line breaks), Unicode spaces, multi-byte
    characters, special and added tokens, in every documents mode."""
    tokenizer = tok if kind == "plain" else variant_tokenizer(tmp_path, kind)
    assert tokenizer.add_prefix_space == (kind == "prefix")
    parts = ["tea", "New", "York", "fox", "is", "ab", "3", "42", " ", " ", " ", "  ", "\n", "\n", "\n\n", "\r\n",
             "\r", ",", ".", "'s", "é", "🙂", "\u3000", "\x85", "\u2028", "\x1c", "\xa0", "\t", "</s>", "<pad>"]
    rng = np.random.default_rng(0)
    for trial in range(60):
        text = "".join(rng.choice(parts, size=int(rng.integers(0, 120))))
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(text.encode("utf-8"))
        for documents in data.DOCUMENT_SPLITS:
            expected = whole_documents_stream(path, tokenizer, documents)
            if len(expected) == 1:
                with pytest.raises(data.DataError, match="empty file"):
                    data.token_stream(path, tokenizer, documents)
                continue
            got = data.token_stream(path, tokenizer, documents)
            assert got.dtype == np.uint16 and got.tolist() == expected, (documents, text)


def test_cut_rules():
    from opt_spec.tokenizer import CutRules

    rules = CutRules(exact=True, prefix_space=False)
    text = "tea and\ncake, 3 4 \n\nx"
    allowed = [i for i in range(len(text) + 1) if rules.allows(text, i)]
    assert allowed == [3, 8, 15]                        # "tea| and", "and\n|cake", "3| 4"
    assert [i for i in allowed if CutRules(True, True).allows(text, i)] == [3, 15]  # no cut after \n
    assert not CutRules(True, False, ("a an",)).allows("tea and", 3)  # an added token near the cut


def test_corpus_is_handed_to_the_tokenizer_in_bounded_pieces(tok, tmp_path, monkeypatch):
    """However long a document, the tokenizer sees pieces of at most FORCE_CHARS characters and batches of
    about BATCH_CHARS: natural text is cut near PIECE_CHARS at word starts, a run with no word start at
    FORCE_CHARS; memory holds the ids and a few blocks of text."""
    monkeypatch.setattr(data, "READ_BYTES", 1000)
    monkeypatch.setattr(data, "PIECE_CHARS", 50)
    monkeypatch.setattr(data, "FORCE_CHARS", 400)
    monkeypatch.setattr(data, "BATCH_CHARS", 2000)
    calls = []
    original = tok.encode_texts
    monkeypatch.setattr(tok, "encode_texts", lambda texts: calls.append([len(t) for t in texts]) or original(texts))
    words = " ".join(CORPUS * 200)                                # 36k characters of prose
    run = "x" * 3000                                              # no word start for 3000 characters
    path = tmp_path / "big.txt"
    path.write_text(words + "\n" + run + " " + words, encoding="utf-8")
    got = data.token_stream(path, tok, "file")
    pieces = [n for call in calls for n in call]
    assert sum(pieces) == len(path.read_text(encoding="utf-8")) and len(pieces) > 100
    assert max(pieces) <= 400 and max(sum(call) for call in calls) <= 2000 + 400
    assert sorted(pieces)[len(pieces) // 2] < 2 * 50              # most pieces end at the first word start
    # the prose around the run is cut only where allowed: its ids are those of the prose encoded whole
    prose = tok.encode(words, add_bos=False)
    assert got[1:1 + len(prose)].tolist() == prose and got[-1 - len(prose):-1].tolist() == prose


def test_utf8_errors_name_the_byte_and_long_lines(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 7)
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode("utf-8") * 3 + b"\xc3(" + b" tail")
    with pytest.raises(data.DataError, match=r"bad\.txt: not UTF-8 text \(invalid continuation byte at byte 42\)"):
        data.token_stream(path, tok, "line")
    path.write_bytes("é".encode("utf-8") * 5 + "é".encode("utf-8")[:1])    # cut inside the last character
    with pytest.raises(data.DataError, match=r"unexpected end of data at byte 10"):
        data.token_stream(path, tok, "file")
    monkeypatch.setattr(data, "PIECE_CHARS", 4)
    monkeypatch.setattr(data, "FORCE_CHARS", 50)
    path.write_text("a\n\nb\n" + " " * 60 + "c\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"bad\.txt:4: over 50 characters of whitespace in one line"):
        data.token_stream(path, tok, "paragraph")
    assert data.token_stream(path, tok, "line").tolist() == whole_documents_stream(path, tok, "line")


def test_jsonl_corpus_one_document_a_record(tok, tmp_path):
    texts = [CORPUS[0] + "\n\n" + CORPUS[1], "  \n ", CORPUS[2] + "\r\n" + CORPUS[3]]
    path = write(tmp_path / "c.jsonl", [{"text": t, "meta": i} for i, t in enumerate(texts)])
    eos = [tok.eos_token_id]

    def stream(docs):
        return [tok.bos_token_id] + sum((tok.encode(d, add_bos=False) + eos for d in docs), [])

    assert data.token_stream(path, tok, "file").tolist() == stream([texts[0], texts[2]])  # blank record dropped
    assert data.token_stream(path, tok, "paragraph").tolist() == stream([CORPUS[0], CORPUS[1],
                                                                        CORPUS[2] + "\n" + CORPUS[3]])
    assert data.token_stream([path, path], tok, "line").tolist() == stream(CORPUS * 2)
    for record, reason in (({"txt": "a"}, "missing field 'text'"), ({"text": 3}, "field 'text' must be a string")):
        bad = write(tmp_path / "bad.jsonl", [{"text": "fine"}, record])
        with pytest.raises(data.DataError, match=rf"bad\.jsonl:2: {reason}"):
            data.load_text(bad, tok, 8)


def counting(tok, monkeypatch):
    calls = []
    original = tok.encode_texts
    monkeypatch.setattr(tok, "encode_texts", lambda texts: calls.append(len(texts)) or original(texts))
    return calls


def test_token_cache_reuses_ids_until_an_input_changes(tok, tmp_path, monkeypatch):
    corpus, cache = tmp_path / "c.txt", tmp_path / "cache"
    corpus.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    plain = data.token_stream(corpus, tok, "paragraph")
    calls = counting(tok, monkeypatch)
    first = data.token_stream(corpus, tok, "paragraph", cache_dir=cache)
    assert calls and sorted(p.suffix for p in cache.iterdir()) == [".ids", ".json", ".lock"]
    encoded = len(calls)
    again = data.token_stream(corpus, tok, "paragraph", cache_dir=cache)
    assert len(calls) == encoded                                        # read back, not encoded
    assert isinstance(again, np.memmap) and again.tolist() == first.tolist() == plain.tolist()
    ds = data.load_text(corpus, tok, 16, cache_dir=cache, documents="paragraph")
    assert len(calls) == encoded and ds.collate([0])["input_ids"][0].tolist() == plain[:16].tolist()
    # another documents mode, tokenizer or file content is another entry
    by_line = data.token_stream(corpus, tok, "line", cache_dir=cache)
    assert by_line.tolist() == data.token_stream(corpus, tok, "line").tolist()
    assert len(calls) > encoded
    encoded = len(calls)
    corpus.write_text("\n\n".join(CORPUS[::-1]), encoding="utf-8")
    os.utime(corpus, ns=(1, 1))                                          # even with an old time: the size differs
    assert data.token_stream(corpus, tok, "paragraph", cache_dir=cache).tolist() == \
        data.token_stream(corpus, tok, "paragraph").tolist()
    assert len(calls) > encoded
    other = variant_tokenizer(tmp_path, "prefix")
    assert other.fingerprint() != tok.fingerprint()
    assert data.token_stream(corpus, other, "paragraph", cache_dir=cache).tolist() == \
        data.token_stream(corpus, other, "paragraph").tolist()


def test_token_cache_drops_the_entries_an_edited_corpus_supersedes(tok, tmp_path):
    corpus, other, cache = tmp_path / "c.txt", tmp_path / "d.txt", tmp_path / "cache"
    corpus.write_text("\n\n".join(CORPUS), encoding="utf-8")
    other.write_text(" ".join(CORPUS), encoding="utf-8")

    def entries():
        return sorted(p.stem for p in cache.glob("*.json"))

    data.token_stream(corpus, tok, "paragraph", cache_dir=cache)
    (first,) = entries()
    data.token_stream(corpus, tok, "line", cache_dir=cache)           # another mode, another file, another
    data.token_stream(other, tok, "paragraph", cache_dir=cache)       # tokenizer: entries of their own
    data.token_stream(corpus, variant_tokenizer(tmp_path, "prefix"), "paragraph", cache_dir=cache)
    kept = entries()
    assert len(kept) == 4 and first in kept
    corpus.write_text("\n\n".join(CORPUS[::-1]), encoding="utf-8")  # edited: its paragraph entry is replaced
    fresh = data.token_stream(corpus, tok, "paragraph", cache_dir=cache)
    assert fresh.tolist() == data.token_stream(corpus, tok, "paragraph").tolist()
    now = entries()
    assert first not in now and len(now) == 4 and set(kept) - {first} < set(now)
    assert not (cache / f"{first}.ids").exists() and not (cache / f"{first}.lock").exists()


def test_token_cache_entries_that_do_not_check_out_are_encoded_again(tok, tmp_path, monkeypatch):
    corpus, cache = tmp_path / "c.txt", tmp_path / "cache"
    corpus.write_text(" ".join(CORPUS), encoding="utf-8")
    expected = data.token_stream(corpus, tok).tolist()
    data.token_stream(corpus, tok, cache_dir=cache)
    ids = next(cache.glob("*.ids"))
    for damage in (lambda: ids.write_bytes(ids.read_bytes()[:-2]),                       # cut short
                   lambda: ids.write_bytes(np.full(len(expected), 60000, np.uint16).tobytes()),  # ids past the vocab
                   lambda: next(cache.glob("*.json")).write_text("{", encoding="utf-8")):
        damage()
        calls = counting(tok, monkeypatch)
        assert data.token_stream(corpus, tok, cache_dir=cache).tolist() == expected and calls
        monkeypatch.undo()
    blocked = tmp_path / "a-file"
    blocked.write_text("", encoding="utf-8")
    with pytest.warns(UserWarning, match="token cache .*a-file: not written"):
        assert data.token_stream(corpus, tok, cache_dir=blocked).tolist() == expected


def test_vocabularies_past_65536_ids_keep_uint32(tok, tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS), encoding="utf-8")
    narrow = data.token_stream(corpus, tok, "paragraph")
    monkeypatch.setattr(type(tok), "vocab_size", property(lambda self: 70000))  # a grown vocabulary
    assert tok.id_dtype == np.uint32
    wide = data.token_stream(corpus, tok, "paragraph", cache_dir=tmp_path / "cache")
    again = data.token_stream(corpus, tok, "paragraph", cache_dir=tmp_path / "cache")
    assert wide.dtype == again.dtype == np.uint32 and isinstance(again, np.memmap)
    assert wide.tolist() == again.tolist() == narrow.tolist()
    rows = data.load_classification(write(tmp_path / "c.jsonl", [{"text": "a b", "label": 0}]), tok, 8).rows
    assert rows.ids.dtype == np.uint32 and rows[0] == tok.encode("a b", add_bos=True)


def test_token_cache_is_written_as_encoded_and_survives_a_full_disk(tok, tmp_path, monkeypatch):
    """The ids go to the entry's file batch by batch (memory holds one batch, not the corpus); a disk that
    fills up meanwhile leaves no entry and no temporary file, and the ids are encoded again in memory."""
    corpus, cache = tmp_path / "c.txt", tmp_path / "cache"
    corpus.write_text("\n".join(CORPUS * 50), encoding="utf-8")
    expected = data.token_stream(corpus, tok, "line")
    monkeypatch.setattr(data, "BATCH_CHARS", 500)
    with open(tmp_path / "ids", "wb") as sink:
        built = data._encode_corpus([str(corpus)], tok, "line", None, sink=sink)
    assert built.parts == [] and built.tokens == expected.size
    assert np.fromfile(tmp_path / "ids", dtype=np.uint16).tolist() == expected.tolist()

    encode = data._encode_corpus

    def full_disk(paths, tokenizer, documents, progress, sink=None):
        if sink is not None:
            sink.write(b"\0" * 64)
            raise OSError(28, "No space left on device")
        return encode(paths, tokenizer, documents, progress, sink)

    monkeypatch.setattr(data, "_encode_corpus", full_disk)
    with pytest.warns(UserWarning, match=r"token cache .*cache: not written \(\[Errno 28\] No space left"):
        assert data.token_stream(corpus, tok, "line", cache_dir=cache).tolist() == expected.tolist()
    assert sorted(p.suffix for p in cache.iterdir()) == [".lock"]


_CACHE_WORKER = """
import sys
from opt_spec import data
from opt_spec.tokenizer import OPTTokenizer
tok = OPTTokenizer.from_pretrained(sys.argv[1])
calls = []
original = tok.encode_texts
tok.encode_texts = lambda texts: calls.append(1) or original(texts)
stream = data.token_stream(sys.argv[2], tok, "line", cache_dir=sys.argv[3])
print(len(calls), int(stream.size), int(stream.astype("int64").sum()))
"""


def test_processes_sharing_a_token_cache_encode_once(tok, tmp_path):
    """Two processes asking for the same corpus at once (a distributed run's ranks): one encodes, the other
    waits on the entry's lock and reads what it wrote."""
    import subprocess
    import sys

    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS * 20000), encoding="utf-8")  # ~4 MB: encoding takes a moment
    args = [sys.executable, "-c", _CACHE_WORKER, str(folder), str(corpus), str(tmp_path / "cache")]
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [r[1][-2000:] for r in results]
    lines = [r[0].split() for r in results]
    assert sorted(int(line[0]) > 0 for line in lines) == [False, True]   # exactly one encoded
    assert lines[0][1:] == lines[1][1:]


def test_progress_counts_every_byte_read(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 100)
    text = tmp_path / "c.txt"
    text.write_text("\n".join(CORPUS * 30), encoding="utf-8")
    lines = write(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS * 30])
    told = []
    data.token_stream([text, lines], tok, "line", progress=told.append)
    assert sum(told) == text.stat().st_size + lines.stat().st_size and len(told) > 10
    told.clear()
    data.token_stream([text], tok, cache_dir=tmp_path / "cache", progress=told.append)
    assert sum(told) == text.stat().st_size
    told.clear()
    data.token_stream([text], tok, cache_dir=tmp_path / "cache", progress=told.append)
    assert told == []                                                        # read from the cache


def test_blocks_and_ragged_rows(tok, tmp_path):
    stream = np.arange(23, dtype=np.uint16)
    blocks = data.Blocks(stream, 5)
    assert len(blocks) == 5 and blocks[0] == [0, 1, 2, 3, 4] and blocks[-1] == [20, 21, 22]
    assert len(data.Blocks(stream, 5, drop_last=True)) == 4 and blocks[1:3] == [list(range(5, 10)), list(range(10, 15))]
    with pytest.raises(IndexError):
        blocks[5]
    assert data.pack(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    rows = [[2, 7, 9], [2], [2, 5, 5, 5, 1]]
    ragged = data.Ragged(rows, np.uint16)
    assert len(ragged) == 3 and list(ragged) == rows and ragged[-1] == rows[-1] and ragged.array(1).tolist() == [2]
    by_lists = data.Dataset("sequence_classification", rows, [0, 1, 0]).collate([2, 0, 1])
    by_ragged = data.Dataset("sequence_classification", ragged, [0, 1, 0]).collate([2, 0, 1])
    assert all((by_lists[k] == by_ragged[k]).all() and by_lists[k].dtype == by_ragged[k].dtype for k in by_lists)


def test_jsonl_is_read_a_line_at_a_time(tok, tmp_path, monkeypatch):
    # U+2028 and U+0085 are valid inside a JSON string: a line ends at \n only
    path = write(tmp_path / "u.jsonl", [json.dumps({"text": "a\u2028b\x85c", "label": 1}, ensure_ascii=False),
                                        {"text": "d", "label": 0}])
    ds = data.load_classification(path, tok, 64)
    assert len(ds) == 2 and ds.rows[0] == tok.encode("a\u2028b\x85c", add_bos=True)
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 40)
    path = write(tmp_path / "long.jsonl", [{"text": "short", "label": 0}, {"text": "x" * 50, "label": 1}])
    with pytest.raises(data.DataError, match=r"long\.jsonl:2: a line of over 40 bytes"):
        data.load_classification(path, tok, 8)
    path.write_bytes(b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 0}\n')
    with pytest.raises(data.DataError, match=r"long\.jsonl:2: not UTF-8 text \(invalid start byte at byte 36\)"):
        data.load_classification(path, tok, 8)


def test_any_bytes_give_ids_or_a_data_error(tok, tmp_path, monkeypatch):
    """The data readers' contract on files from anywhere: a stream / dataset, or a DataError naming the file;
    nothing else escapes (random bytes, and valid JSONL with bytes replaced, inserted or cut)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    monkeypatch.setattr(data, "READ_BYTES", 7)
    monkeypatch.setattr(data, "PIECE_CHARS", 3)
    monkeypatch.setattr(data, "FORCE_CHARS", 40)
    valid = (json.dumps({"text": CORPUS[3], "label": 1, "context": CORPUS[2], "question": "Which?",
                         "answers": {"text": ["Paris"], "answer_start": [0]}}, ensure_ascii=False) + "\n").encode()
    edits = st.lists(st.tuples(st.integers(0, len(valid)), st.sampled_from(["put", "insert", "cut"]),
                               st.binary(min_size=1, max_size=3)), max_size=4)

    def edited(changes):
        raw = bytearray(valid * 2)
        for at, how, value in changes:
            at = min(at, len(raw))
            if how == "put":
                raw[at:at + len(value)] = value
            elif how == "insert":
                raw[at:at] = value
            else:
                del raw[at:at + len(value)]
        return bytes(raw)

    @hypothesis.settings(max_examples=150, derandomize=True, database=None, deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.one_of(st.binary(max_size=200), edits.map(edited)), st.sampled_from(data.DOCUMENT_SPLITS))
    def check(raw, documents):
        for name in ("t.txt", "t.jsonl"):
            path = tmp_path / name
            path.write_bytes(raw)
            for load in (lambda: data.token_stream(path, tok, documents),
                         lambda: data.load_classification(path, tok, 8, num_labels=3),
                         lambda: data.load_question_answering(path, tok, 32, skip_overflow=True)):
                try:
                    load()
                except data.DataError as err:
                    assert str(err).startswith(str(path))

    check()


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
        assert m.offsets.dtype == np.int32 and m.offsets.shape == (len(row) - m.context_start, 2)  # compact
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


def test_split_holds_out_a_seeded_fraction(tok, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS * 5), encoding="utf-8")
    blocks = data.load_text(corpus, tok, 8)
    train, held = data.split(blocks, 0.2, seed=3)
    assert len(held) == round(len(blocks) * 0.2) and len(train) + len(held) == len(blocks)
    rows = sorted(map(tuple, list(train.rows) + list(held.rows)))
    assert rows == sorted(map(tuple, blocks.rows))                        # every block once
    again = data.split(blocks, 0.2, seed=3)
    assert list(again[1].rows) == list(held.rows) and list(data.split(blocks, 0.2, seed=4)[1].rows) != list(held.rows)
    assert (held.collate([0, 1])["input_ids"] == blocks.collate(held.rows.indices[:2])["input_ids"]).all()
    qa_rows = data.Dataset("question_answering", [[2, 5], [2, 6, 7], [2]], [(0, 1), (1, 2), (0, 0)], ["a", "b", "c"])
    kept, out = data.split(qa_rows, 0.3, seed=0)
    assert len(out) == 1 and sorted(kept.meta + out.meta) == ["a", "b", "c"]
    assert out.targets == [qa_rows.targets[qa_rows.meta.index(out.meta[0])]]
    for fraction in (0.0, 1.0, 0.99):
        with pytest.raises(ValueError, match="between 0 and 1|leaves none to train on"):
            data.split(qa_rows, fraction)


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
