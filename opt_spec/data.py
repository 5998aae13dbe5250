"""Fine-tuning data, framework-free: files -> token ids -> NumPy batches that every backend consumes.

Three tasks, one batch format (dict of NumPy arrays, (B, T) int64 ids and mask, LEFT-padded with
`pad_token_id` as OPT is):

- causal_lm (`load_text`): plain-text files are split into documents (a whole file, each line, or
  blank-line separated paragraphs), tokenized without a bos and joined into ONE token stream
  `</s> d1 </s> d2 </s> ... dn </s>` (OPT's `</s>` is both bos and eos, so every document starts
  like a fresh OPT input and ends with eos). A .jsonl file gives one record's "text" at a time, split
  the same way (documents="file": one document a record). The stream is cut into consecutive blocks of
  `seq_len` tokens: every token lands in exactly one block, in order. The last, partial block is kept,
  left-padded (mask 0, label -100), unless `drop_last=True` drops it. Batch:
  {input_ids, attention_mask, labels}; labels = input_ids with -100 at pads (the model shifts).
  Corpora of any size: files are read in blocks of a few MB and each document is encoded in pieces cut
  where the tokenizer's CutRules say the ids equal those of the whole document (at word starts), many
  pieces at once on the tokenizer's threads; the stream is one uint16 array (uint32 past 65,536 ids),
  2 bytes a token (a 100 MB corpus: 11.6 s and 0.25 GB peak on 2 cores, where encoding whole documents
  into Python lists took 92 s and 13.3 GB: bench/bench_data.py).
- sequence_classification (`load_classification`): JSONL, one {"text": str, "label": ...} per line;
  label an int (single-label class), a float (regression, num_labels 1) or a list of 0/1 (multi-label).
  One file holds one kind. Text is `</s> text`, cut to its first `max_length` tokens.
  Batch: {input_ids, attention_mask, labels} with labels (B,) int64, (B,) float32 or (B, L) float32.
- question_answering (`load_question_answering`): JSONL, SQuAD-style
  {"context": str, "question": str, "answers": {"text": [...], "answer_start": [...]}}.
  Input is `</s> question </s> context`; the first answer's character span is mapped to the first and
  last context tokens that overlap it (token offsets from the tokenizer). A context cut by `max_length`
  that loses the answer is an error (or skipped with `skip_overflow=True`).
  Batch: {input_ids, attention_mask, start_positions, end_positions} (positions in the padded row).

JSONL is read a line at a time (a line holds at most MAX_LINE_BYTES); example rows are kept in one
compact array (`Ragged`; causal-LM blocks are views of the stream, `Blocks`), and read as lists.
Bad data raises `DataError` (a ValueError) naming the file, the line and the reason.
Shuffling is seeded and deterministic: `BatchStream(dataset, batch_size, seed).batch(i)` is a pure
function of (dataset, batch_size, seed, i): epoch e = i // batches_per_epoch uses the permutation
drawn from numpy's default_rng([seed, e]), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .config import MAX_SIZES
from .numerics import IGNORE_INDEX

TASKS = ("causal_lm", "sequence_classification", "question_answering")
DOCUMENT_SPLITS = ("file", "line", "paragraph")


class DataError(ValueError):
    """A problem in a data file: str() is 'FILE:LINE: reason' (line omitted when it is the whole file)."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = os.fspath(path), line, reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


# ------------------------------------------------------------------------------------------ reading
MAX_LINE_BYTES = 1 << 26  # one JSONL line, one example: 64 MiB (a whole book fits; a line of a GB does not)


def read_jsonl(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (lines end at \\n), read one line at
    a time; errors name file and line. progress(n) is told of the bytes read, a MB or so at a time."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    seen, start, told = False, 0, 0
    with open(path, "rb") as f:
        for number in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(path, number, f"a line of over {MAX_LINE_BYTES:,} bytes (one example per line)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, number, f"not UTF-8 text ({err.reason} at byte {start + err.start})") from None
            start += len(raw)
            if progress is not None and start >> 20 != (start - len(raw)) >> 20:
                progress(start - told)
                told = start
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as err:
                raise DataError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from None
            except RecursionError:  # the C parser recurses per bracket
                raise DataError(path, number, "invalid JSON (nested too deep)") from None
            except ValueError as err:  # NaN / Infinity, an integer of over 4300 digits
                raise DataError(path, number, f"invalid JSON ({err})") from None
            if not isinstance(obj, dict):
                raise DataError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield number, obj
    if progress is not None and start > told:
        progress(start - told)
    if not seen:
        raise DataError(path, None, "empty file (no JSON lines)")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _field(obj: dict, key: str, kind, path: str, line: int, what: str):
    if key not in obj:
        raise DataError(path, line, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(path, line, f"field {key!r} must be {what}, got {json.dumps(value)[:60]}")
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 reads as inf
        raise DataError(path, line, f"field {key!r} is {value}, not a finite number")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # "\ud800" in JSON: a lone surrogate, which no tokenizer takes
            raise DataError(path, line, f"field {key!r} holds a lone surrogate (U+{ord(value[err.start]):04X} at "
                                        f"character {err.start}), not text") from None
    return value


# ------------------------------------------------------------------------------------------ datasets
class Ragged(SequenceABC):
    """Token-id rows of varied lengths in one array (2 or 4 bytes a token instead of a Python int's 36):
    rows[i] is a list, `array(i)` a view."""

    def __init__(self, rows: Iterable[Sequence[int]], dtype=np.uint32):
        arrays = [np.asarray(r, dtype=dtype).reshape(-1) for r in rows]
        self.ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        self.ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.array(range(len(self))[i]).tolist()

    def array(self, i: int) -> np.ndarray:
        return self.ids[(self.ends[i - 1] if i else 0):self.ends[i]]


class Selection(SequenceABC):
    """Some rows of another row sequence, by index, without copying them."""

    def __init__(self, rows: Sequence[Sequence[int]], indices: np.ndarray):
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.rows[int(self.indices[i])]

    def array(self, i: int) -> np.ndarray | Sequence[int]:
        return _row_of(self.rows, int(self.indices[i]))


def _row_of(rows: Sequence[Sequence[int]], i: int) -> np.ndarray | Sequence[int]:
    """Row i of `rows`: a view of the compact array when the rows have one (`array`), else the row itself."""
    array = getattr(rows, "array", None)
    return array(i) if array is not None else rows[i]


@dataclass
class Dataset:
    """Examples of one task: `rows` are token-id rows (lists, or Ragged / Blocks: compact arrays that give
    lists), `targets` per example, `meta` per example (for question answering: what evaluation needs).
    `collate(indices)` makes one NumPy batch."""

    task: str
    rows: Sequence[Sequence[int]]
    targets: list = field(default_factory=list)
    meta: list = field(default_factory=list)
    pad_token_id: int = 1
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> np.ndarray | Sequence[int]:
        """Example i's token ids (a view of the compact array when there is one)."""
        return _row_of(self.rows, int(i))

    def num_tokens(self, indices: Sequence[int]) -> int:
        return int(sum(len(self.row(i)) for i in indices))

    def select(self, indices: Sequence[int]) -> "Dataset":
        """The examples at `indices`, in that order (rows are not copied)."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = (lambda values: [values[i] for i in indices]) if len(indices) else (lambda values: [])
        return Dataset(self.task, Selection(self.rows, indices), pick(self.targets) if self.targets else [],
                       pick(self.meta) if self.meta else [], self.pad_token_id, self.source)

    def collate(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no examples to collate")
        rows = [self.row(i) for i in indices]
        T = max(len(r) for r in rows)
        B = len(rows)
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        for b, row in enumerate(rows):  # left padding: the last column is every row's last real token
            input_ids[b, T - len(row):] = row
            attention_mask[b, T - len(row):] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == "causal_lm":
            batch["labels"] = np.where(attention_mask == 1, input_ids, IGNORE_INDEX)
        elif self.task == "sequence_classification":
            first = self.targets[indices[0]]
            dtype = np.float32 if isinstance(first, (float, list)) else np.int64
            batch["labels"] = np.asarray([self.targets[i] for i in indices], dtype=dtype)
        else:
            pads = np.asarray([T - len(r) for r in rows], dtype=np.int64)
            batch["start_positions"] = np.asarray([self.targets[i][0] for i in indices], dtype=np.int64) + pads
            batch["end_positions"] = np.asarray([self.targets[i][1] for i in indices], dtype=np.int64) + pads
        return batch


# ------------------------------------------------------------------------------------------ text corpora
READ_BYTES = 1 << 22     # read from a text file at a time
PIECE_CHARS = 1 << 14    # a document's text is encoded in pieces of about this many characters,
FORCE_CHARS = 1 << 20    # cut where CutRules allows, or here when a run this long allows no cut (not text)
BATCH_CHARS = 1 << 21    # characters handed to the tokenizer's threads at once (~128 pieces)
JSONL_SUFFIX = ".jsonl"  # a causal-LM corpus of JSON lines {"text": ...}, one record a document
_SPACE_OR_NEWLINE = re.compile("[ \n]")


def documents_of(text: str, documents: str) -> list[str]:
    """A text's documents by definition, the text whole: itself ("file"), its lines (str.splitlines: "line"),
    or its runs of non-blank lines joined by \\n ("paragraph"); whitespace-only ones dropped. What the
    streamed reading below (blocks, pieces) is tested against: the ids of each of these encoded whole."""
    if documents == "file":
        docs = [text]
    elif documents == "line":
        docs = text.splitlines()
    else:
        docs, current = [], []
        for line in text.splitlines() + [""]:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
    return [d for d in docs if d.strip()]


def _text_blocks(path: str, progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """The text of a file in blocks of about READ_BYTES, decoded as UTF-8 with universal newlines (\\r\\n
    and \\r read as \\n, as open() reads text): memory holds one block, whatever the file's size."""
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    with open(path, "rb") as f:
        start, tail, held = 0, b"", ""
        while True:
            data = f.read(READ_BYTES)
            if progress is not None and data:
                progress(len(data))
            raw = tail + data
            cut = _whole_characters(raw) if data else len(raw)
            try:
                text = held + raw[:cut].decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(path, None, f"not UTF-8 text ({err.reason} at byte {start + err.start})") from None
            start, tail, held = start + cut, raw[cut:], ""
            if data and text.endswith("\r"):  # maybe the first half of \r\n
                text, held = text[:-1], "\r"
            if text:
                yield text.replace("\r\n", "\n").replace("\r", "\n")
            if not data:
                return


def _whole_characters(raw: bytes) -> int:
    """How many leading bytes of raw hold whole UTF-8 characters (a character may straddle two reads)."""
    i = len(raw) - 1
    while i >= max(0, len(raw) - 4) and raw[i] & 0xC0 == 0x80:  # continuation bytes
        i -= 1
    if i < 0:
        return len(raw)
    lead = raw[i]
    size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return i if i + size > len(raw) else len(raw)


def _document_pieces(path: str, documents: str, progress=None) -> Iterator[tuple[str, bool]]:
    """(text, last) in file order: each document's text in one or more pieces, `last` on its final one.
    A plain-text file is read in blocks; a JSONL file (.jsonl) a record at a time, each record's "text"
    split as if it were a file of its own (documents="file": one document a record). Whitespace-only
    documents come out too (the caller drops them)."""
    if not path.endswith(JSONL_SUFFIX):
        yield from _split_documents(_text_blocks(path, progress), documents, path, 0)
        return
    for line, obj in read_jsonl(path, progress):
        text = _field(obj, "text", str, path, line, "a string")
        yield from _split_documents([text], documents, path, line)


def _split_documents(blocks: Iterable[str], documents: str, path: str, first: int) -> Iterator[tuple[str, bool]]:
    """Documents of a text given in blocks: the whole text, each line (str.splitlines), or runs of non-blank
    lines joined by \\n (paragraphs); a long line is followed in pieces. Errors name line first + n
    (a JSONL record's line when first > 0)."""
    if documents == "file":
        for block in blocks:
            yield block, False
        yield "", True
        return
    carry, open_line, in_paragraph, line = "", False, False, 0
    for block in blocks:
        lines = (carry + block).splitlines(keepends=True)
        carry = lines.pop() if lines and lines[-1].splitlines()[0] == lines[-1] else ""
        for text in lines:
            line += 1
            yield from _line(text.splitlines()[0], documents, open_line, in_paragraph, True)
            open_line, in_paragraph = False, _paragraph_after(text, documents, open_line, in_paragraph)
        if len(carry) > PIECE_CHARS and (open_line or documents == "line" or not carry.isspace()):
            yield from _line(carry, documents, open_line, in_paragraph, False)  # a long line, in pieces
            open_line, in_paragraph, carry = True, documents == "paragraph", ""
        elif len(carry) > FORCE_CHARS:
            raise DataError(path, first or line + 1, f"over {FORCE_CHARS:,} characters of whitespace in one line: "
                                                     "not text")
    if carry or open_line:
        yield from _line(carry, documents, open_line, in_paragraph, True)
        in_paragraph = _paragraph_after(carry, documents, open_line, in_paragraph)
    if in_paragraph:
        yield "", True


def _line(text: str, documents: str, open_line: bool, in_paragraph: bool, whole: bool) -> Iterator[tuple[str, bool]]:
    """The pieces of one line (or of a long line's next part: whole=False) in `documents` mode."""
    if documents == "line":
        yield text, whole
    elif open_line or text.strip():
        if in_paragraph and not open_line:
            yield "\n", False  # the paragraph's lines are joined by \n
        yield text, False
    elif in_paragraph:  # a blank line ends the paragraph
        yield "", True


def _paragraph_after(text: str, documents: str, open_line: bool, in_paragraph: bool) -> bool:
    return documents == "paragraph" and (open_line or bool(text.strip()))


class _StreamBuilder:
    """`</s> d1 </s> d2 </s> ...` from document pieces, encoded in batches on the tokenizer's threads.

    A document's text is buffered and cut into pieces of about PIECE_CHARS where the tokenizer's
    CutRules allow (so the ids are those of encoding the document whole), or at FORCE_CHARS in a run
    that allows no cut; a document is kept only when it holds more than whitespace. The finished stream
    goes to `sink` (a binary file: memory then holds one batch, whatever the corpus) or to `parts`."""

    def __init__(self, tokenizer, sink=None):
        self.tokenizer, self.rules = tokenizer, tokenizer.cut_rules()
        self.dtype = tokenizer.id_dtype
        self.sink, self.parts, self.tokens = sink, [], 0  # the finished stream: written, or kept in arrays
        self._keep(np.array([tokenizer.bos_token_id], self.dtype))
        self.eos = np.array([tokenizer.eos_token_id], self.dtype)
        self.text, self.has_text = "", False      # the current document's text not yet queued
        self.queue, self.queued = [], 0           # texts to encode and document ends (True: keep it)
        self.document: list[np.ndarray] = []      # the current document's ids so far
        self.documents = 0

    def add(self, piece: str, last: bool) -> None:
        self.has_text = self.has_text or (bool(piece) and not piece.isspace())
        text, start = self.text + piece if self.text else piece, 0
        while len(text) - start >= 2 * PIECE_CHARS:
            cut = self._cut(text, start)
            if cut is None:
                break
            self._queue(text[start:cut])
            start = cut
        self.text = text[start:]
        if last:
            self._queue(self.text)
            self._queue(self.has_text)  # the document ends: kept when it has text
            self.documents += self.has_text
            self.text, self.has_text = "", False

    def _cut(self, text: str, start: int) -> int | None:
        """The first allowed cut from start + PIECE_CHARS on; start + FORCE_CHARS when there is none by then
        (a run of that length that allows no cut is not text); None to wait for more text."""
        force = start + FORCE_CHARS
        for m in _SPACE_OR_NEWLINE.finditer(text, start + PIECE_CHARS, min(len(text), force)):
            i = m.end() if m.group() == "\n" else m.start()
            if self.rules.allows(text, i):
                return i
        return force if len(text) > force else None

    def _queue(self, item: str | bool) -> None:
        if item != "":
            self.queue.append(item)
            self.queued += len(item) if isinstance(item, str) else 1
            if self.queued >= BATCH_CHARS:
                self.flush()

    def flush(self) -> None:
        texts = [t for t in self.queue if isinstance(t, str)]
        encoded = iter(self.tokenizer.encode_texts(texts)) if texts else iter(())
        done = []  # the documents this batch ends, joined into one array (not one per line of a corpus)
        for item in self.queue:
            if isinstance(item, str):
                self.document.append(next(encoded))
            else:
                if item:
                    done.extend(self.document)
                    done.append(self.eos)
                self.document = []
        if done:
            self._keep(np.concatenate(done))
        self.queue, self.queued = [], 0

    def _keep(self, ids: np.ndarray) -> None:
        self.tokens += ids.size
        if self.sink is None:
            self.parts.append(ids)
        else:
            ids.tofile(self.sink)

    def finish(self) -> list[np.ndarray]:
        """The stream in consecutive arrays (one per batch: joining them is the caller's choice; none with
        a sink)."""
        self.flush()
        return self.parts


def token_stream(paths: Iterable[str | os.PathLike], tokenizer, documents: str = "file",
                 cache_dir: str | os.PathLike | None = None,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """`</s> d1 </s> d2 </s> ... </s>` over every document of every file, in order, as one array
    (uint16 when the vocabulary fits, else uint32). Files are read in blocks and encoded in pieces
    (see _StreamBuilder), so memory holds the ids, two or four bytes a token, and a few MB of text.

    With `cache_dir`, the ids are kept there (see TokenCache) and read back, memory-mapped, by the next
    call with the same files (path, size, modification time), tokenizer and `documents`: a resumed run,
    the evaluation set, each process of a distributed run on this machine (one encodes, the others wait).
    progress(n), when given, is told of each n bytes of the files read (not called on a cache hit)."""
    if documents not in DOCUMENT_SPLITS:
        raise ValueError(f"documents={documents!r}; choose one of {DOCUMENT_SPLITS}")
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("no text files given")
    if cache_dir is not None:
        return TokenCache(cache_dir).stream(paths, tokenizer, documents, progress)
    return np.concatenate(_encode_corpus(paths, tokenizer, documents, progress).parts)


def _encode_corpus(paths: Sequence[str], tokenizer, documents: str, progress, sink=None) -> _StreamBuilder:
    builder = _StreamBuilder(tokenizer, sink)
    for path in paths:
        before = builder.documents
        for piece, last in _document_pieces(path, documents, progress):
            builder.add(piece, last)
        if builder.documents == before:
            raise DataError(path, None, "empty file (no text)")
    builder.finish()
    return builder


class TokenCache:
    """Token streams kept on disk: KEY.ids (the ids, raw, in the stream's dtype) and KEY.json (what they
    are: dtype, count, the files and settings), KEY a digest of the files' (real path, size, modification
    time in ns), the tokenizer's fingerprint and the documents mode. Each file is written whole into a
    temporary sibling and renamed (KEY.json last: an entry without it is not there). An entry whose
    sizes or ids do not check out is encoded again; a cache that cannot be written (a full disk, no
    permission) is a warning, and the ids stay in memory. Processes on one machine take turns through a
    lock file, so one encodes and the others read its entry. Writing an entry removes the ones it
    supersedes: those of the same files (by real path, in order), documents mode and tokenizer, made
    when the files were different (an edited corpus leaves no stale copy behind). Other entries stay."""

    VERSION = 1

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)

    def key(self, paths: Sequence[str], tokenizer, documents: str) -> str:
        import hashlib

        files = []
        for path in paths:
            if not os.path.isfile(path):
                raise DataError(path, None, "no such file")
            info = os.stat(path)
            files.append([os.path.realpath(path), info.st_size, info.st_mtime_ns])
        what = {"version": self.VERSION, "documents": documents, "tokenizer": tokenizer.fingerprint(), "files": files}
        return hashlib.sha256(json.dumps(what).encode("utf-8")).hexdigest()[:32]

    def stream(self, paths: Sequence[str], tokenizer, documents: str, progress=None) -> np.ndarray:
        key = self.key(paths, tokenizer, documents)
        found = self._read(key, tokenizer)
        if found is not None:
            return found
        with self._lock(key):
            found = self._read(key, tokenizer)  # another process may have written it meanwhile
            if found is not None:
                return found
            try:
                self._write(key, paths, tokenizer, documents, progress)
            except OSError as err:  # the folder cannot be written, the disk filled up: encoded again, in memory
                import warnings

                warnings.warn(f"token cache {self.directory}: not written ({err}); the ids are kept in memory",
                              stacklevel=3)
                return np.concatenate(_encode_corpus(paths, tokenizer, documents, None).parts)
        found = self._read(key, tokenizer)  # the entry memory-mapped: its pages are shared, and dropped when idle
        if found is None:
            raise OSError(f"token cache {self._path(key, '.ids')}: written but not readable")
        return found

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, key + suffix)

    def _read(self, key: str, tokenizer) -> np.ndarray | None:
        try:
            with open(self._path(key, ".json"), encoding="utf-8") as f:
                meta = json.load(f)
            dtype = np.dtype({"uint16": np.uint16, "uint32": np.uint32}[meta["dtype"]])
            count = int(meta["tokens"])
            if count < 1 or os.path.getsize(self._path(key, ".ids")) != count * dtype.itemsize:
                return None
            ids = np.memmap(self._path(key, ".ids"), dtype=dtype, mode="r", shape=(count,))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ids if int(ids.max()) < tokenizer.vocab_size else None

    def _write(self, key: str, paths: Sequence[str], tokenizer, documents: str, progress) -> None:
        """Encodes the corpus straight into KEY.ids (memory holds one batch of ids, whatever the corpus), then
        writes KEY.json."""
        from .io import atomic_path

        with atomic_path(self._path(key, ".ids")) as target:
            with open(target, "wb") as f:
                built = _encode_corpus(paths, tokenizer, documents, progress, sink=f)
        meta = {"dtype": np.dtype(built.dtype).name, "tokens": built.tokens, "documents": documents,
                "files": [os.path.realpath(p) for p in paths], "tokenizer": tokenizer.fingerprint()}
        with atomic_path(self._path(key, ".json")) as target:
            with open(target, "w", encoding="utf-8") as f:
                json.dump(meta, f)
        self._remove_superseded(key, meta)

    def _remove_superseded(self, key: str, meta: dict) -> None:
        """Removes the entries `meta` (entry `key`'s) supersedes: its files, documents mode and tokenizer
        under another key (the files were different then). KEY.json goes first, so a reader never finds
        an entry without its ids; a reader that has the ids memory-mapped keeps them until it is done."""
        same = ("files", "documents", "tokenizer")
        for name in sorted(os.listdir(self.directory)):
            other = name[:-len(".json")]
            if not name.endswith(".json") or other == key or len(other) != len(key):
                continue
            try:
                with open(self._path(other, ".json"), encoding="utf-8") as f:
                    found = json.load(f)
                if not isinstance(found, dict) or any(found.get(k) != meta[k] for k in same):
                    continue
                for suffix in (".json", ".ids", ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._path(other, suffix))
            except (OSError, ValueError):  # unreadable, or removed by another process meanwhile: left alone
                continue

    @contextlib.contextmanager
    def _lock(self, key: str):
        try:
            import fcntl
        except ImportError:  # not POSIX: no waiting for each other
            fcntl = None
        try:
            os.makedirs(self.directory, exist_ok=True)
            handle = open(self._path(key, ".lock"), "a")
        except OSError:
            yield
            return
        with handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield


class Blocks(SequenceABC):
    """Consecutive blocks of seq_len tokens of one token stream (an array, or a memory-mapped file),
    made on demand: block i is stream[i * seq_len:(i + 1) * seq_len]; the last may be shorter."""

    def __init__(self, stream: np.ndarray, seq_len: int, drop_last: bool = False):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: a causal LM block needs at least 2 tokens")
        self.stream, self.seq_len = stream, seq_len
        self.count = len(stream) // seq_len if drop_last else -(-len(stream) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        i = range(self.count)[i]  # negative indices; IndexError past the end
        return self.stream[i * self.seq_len:(i + 1) * self.seq_len].tolist()

    def array(self, i: int) -> np.ndarray:
        return self.stream[i * self.seq_len:(i + 1) * self.seq_len]


def pack(stream: Sequence[int], seq_len: int, drop_last: bool = False) -> list[list[int]]:
    """Consecutive blocks of seq_len tokens; the last one may be shorter (dropped with drop_last)."""
    return list(Blocks(np.asarray(stream), seq_len, drop_last))


def load_text(paths, tokenizer, seq_len: int, drop_last: bool = False, documents: str = "file",
              cache_dir: str | os.PathLike | None = None, progress: Callable[[int], None] | None = None) -> Dataset:
    """Packed causal-LM blocks from plain-text or JSONL files (see the module docstring; cache_dir and
    progress: token_stream)."""
    stream = token_stream(paths, tokenizer, documents, cache_dir, progress)
    blocks = Blocks(stream, seq_len, drop_last)
    source = os.fspath(paths) if isinstance(paths, (str, os.PathLike)) else ", ".join(map(os.fspath, paths))
    if not blocks:
        raise DataError(source, None, f"{len(stream)} tokens: not one full block of {seq_len} (drop_last=True)")
    return Dataset("causal_lm", blocks, pad_token_id=tokenizer.pad_token_id, source=source)


def load_classification(path, tokenizer, max_length: int, num_labels: int | None = None) -> Dataset:
    """Sequence-classification examples from JSONL {"text", "label"} (see the module docstring)."""
    path = os.fspath(path)
    rows, targets, kind, texts = [], [], None, []

    def encode() -> None:  # a batch of texts on the tokenizer's threads: </s> text, cut to max_length
        bos = np.array([tokenizer.bos_token_id])
        rows.extend(np.concatenate([bos.astype(ids.dtype), ids[:max_length - 1]])[:max_length]
                    for ids in tokenizer.encode_texts(texts))
        texts.clear()

    for line, obj in read_jsonl(path):
        text = _field(obj, "text", str, path, line, "a string")
        label = _field(obj, "label", (int, float, list), path, line, "an int, a float or a list")
        this = "multi" if isinstance(label, list) else "regression" if isinstance(label, float) else "single"
        if kind is None:
            kind = this
        elif this != kind:
            raise DataError(path, line, f"label {json.dumps(label)} is {this}-label but earlier lines are {kind}")
        if this == "single":
            most = num_labels if num_labels is not None else MAX_SIZES["num_labels"]  # an int64 label column
            if not 0 <= label < most:
                raise DataError(path, line, f"label {label} is outside [0, {most})")
        elif this == "multi":
            if not label or any(v not in (0, 1) or isinstance(v, bool) for v in label):
                raise DataError(path, line, "a multi-label label must be a non-empty list of 0/1")
            if num_labels is not None and len(label) != num_labels:
                raise DataError(path, line, f"label has {len(label)} entries; the model has {num_labels} labels")
            if targets and len(label) != len(targets[0]):
                raise DataError(path, line, f"label has {len(label)} entries; earlier lines have {len(targets[0])}")
            label = [float(v) for v in label]
        elif num_labels not in (None, 1):
            raise DataError(path, line, f"float label (regression) needs num_labels=1, the model has {num_labels}")
        texts.append(text)
        targets.append(label)
        if len(texts) == 4096:
            encode()
    encode()
    return Dataset("sequence_classification", Ragged(rows, tokenizer.id_dtype), targets,
                   pad_token_id=tokenizer.pad_token_id, source=path)


@dataclass(frozen=True, eq=False)
class QAMeta:
    """What evaluation needs to turn predicted token positions into answer text."""

    context: str
    context_start: int                 # index of the first context token in the row
    offsets: np.ndarray                # (n, 2) int32: the character span of each context token
    answers: tuple[str, ...]


def answer_token_span(offsets, start_char: int, end_char: int) -> tuple[int, int] | None:
    """(first, last) token index whose character spans (offsets: (n, 2) or n pairs) overlap
    [start_char, end_char), or None."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    hits = np.flatnonzero((offsets[:, 0] < end_char) & (offsets[:, 1] > start_char))
    return (int(hits[0]), int(hits[-1])) if hits.size else None


def load_question_answering(path, tokenizer, max_length: int, skip_overflow: bool = False) -> Dataset:
    """SQuAD-style question-answering examples from JSONL (see the module docstring)."""
    path = os.fspath(path)
    rows, targets, meta, dtype = [], [], [], tokenizer.id_dtype
    for line, obj in read_jsonl(path):
        context = _field(obj, "context", str, path, line, "a string")
        question = _field(obj, "question", str, path, line, "a string")
        answers = _field(obj, "answers", dict, path, line, 'an object {"text": [...], "answer_start": [...]}')
        texts = _field(answers, "text", list, path, line, "a list of strings")
        starts = _field(answers, "answer_start", list, path, line, "a list of ints")
        if not texts or len(texts) != len(starts):
            raise DataError(path, line, f"answers has {len(texts)} texts and {len(starts)} answer_start values; "
                                        "need the same number, at least one")
        for text, start in zip(texts, starts):
            if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool) \
                    or start < 0:
                raise DataError(path, line, f"answer {json.dumps(text)} at {json.dumps(start)}: need a non-empty "
                                            "string and a non-negative int")
            if context[start:start + len(text)] != text:
                raise DataError(path, line, f"answer {text!r} is not in the context at character {start} "
                                            f"(found {context[start:start + len(text)]!r})")
        q_ids = tokenizer.encode(question, add_bos=True)      # </s> question
        c_ids, c_offsets = tokenizer.encode_with_offsets(context, add_bos=False)
        c_offsets = np.asarray(c_offsets, dtype=np.int32).reshape(-1, 2)  # 8 bytes a token, not a tuple's ~110
        prefix = q_ids + [tokenizer.eos_token_id]             # </s> question </s>
        span = answer_token_span(c_offsets, starts[0], starts[0] + len(texts[0]))
        if span is None:  # only possible for whitespace-only answers the tokenizer folds away
            raise DataError(path, line, f"answer {texts[0]!r} maps to no token of the context")
        keep = max_length - len(prefix)
        if keep <= 0 or span[1] >= keep:
            if skip_overflow:
                continue
            raise DataError(path, line, f"the answer ends at token {len(prefix) + span[1]}, past max_length="
                                        f"{max_length} (question {len(prefix)} + context {len(c_ids)} tokens)")
        rows.append(np.asarray(prefix + c_ids[:keep], dtype=dtype))
        targets.append((len(prefix) + span[0], len(prefix) + span[1]))
        meta.append(QAMeta(context, len(prefix), c_offsets[:keep].copy(), tuple(texts)))
    if not rows:
        raise DataError(path, None, f"no example fits max_length={max_length}")
    return Dataset("question_answering", Ragged(rows, dtype), targets, meta,
                   pad_token_id=tokenizer.pad_token_id, source=path)


def load(task: str, paths, tokenizer, seq_len: int, **options) -> Dataset:
    """One entry point for the three tasks (seq_len is the block length or max_length)."""
    if task == "causal_lm":
        return load_text(paths, tokenizer, seq_len, **options)
    if isinstance(paths, (list, tuple)):
        if len(paths) != 1:
            raise ValueError(f"{task} reads one JSONL file, got {len(paths)}")
        paths = paths[0]
    if task == "sequence_classification":
        return load_classification(paths, tokenizer, seq_len, **options)
    if task == "question_answering":
        return load_question_answering(paths, tokenizer, seq_len, **options)
    raise ValueError(f"task={task!r}; choose one of {TASKS}")


def split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training, held out): a seeded random `fraction` of the examples held out for evaluation (at least
    one, and at least one left to train on), each part in the dataset's order; the same call gives the
    same parts (a resumed run trains on what it trained on). Causal-LM examples are blocks of the stream."""
    if not 0 < fraction < 1:
        raise ValueError(f"a held-out fraction must be between 0 and 1, got {fraction}")
    n = len(dataset)
    held = max(1, round(n * fraction))
    if held >= n:
        raise ValueError(f"{dataset.source}: {n} examples; holding out {fraction} of them leaves none to train on")
    order = np.random.default_rng([seed, 0x5E1EC7]).permutation(n)
    return dataset.select(np.sort(order[held:])), dataset.select(np.sort(order[:held]))


# ------------------------------------------------------------------------------------------ batching
class BatchStream:
    """An endless, seeded sequence of batches over epochs; `batch(i)` depends only on i (resumable)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.batches_per_epoch = math.ceil(len(dataset) / batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def indices(self, i: int) -> np.ndarray:
        epoch, k = divmod(int(i), self.batches_per_epoch)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, i: int) -> dict[str, np.ndarray]:
        return self.dataset.collate(self.indices(i))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(indices, batch) over the dataset once, in order."""
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)))
        yield idx, dataset.collate(idx)


def qa_predictions(dataset: Dataset, indices: Sequence[int], batch: dict[str, np.ndarray],
                   start_logits: np.ndarray, end_logits: np.ndarray, max_answer_tokens: int = 30) -> list[str]:
    """Answer text per row: the context span (start <= end, at most max_answer_tokens) with the
    highest start + end logit, read from the context through the token offsets."""
    out = []
    T = batch["input_ids"].shape[1]
    start_logits, end_logits = np.asarray(start_logits, np.float64), np.asarray(end_logits, np.float64)
    for b, i in enumerate(indices):
        m: QAMeta = dataset.meta[int(i)]
        pad = T - len(dataset.row(i))
        lo, n = pad + m.context_start, len(m.offsets)
        s, e = start_logits[b, lo:lo + n], end_logits[b, lo:lo + n]
        score = s[:, None] + e[None, :]                              # (n, n): start i, end j
        valid = np.triu(np.ones((n, n), dtype=bool)) & ~np.triu(np.ones((n, n), dtype=bool), max_answer_tokens)
        score = np.where(valid, score, -np.inf)
        si, ei = np.unravel_index(int(np.argmax(score)), score.shape)
        out.append(m.context[m.offsets[si][0]:m.offsets[ei][1]].strip())
    return out


def select_inputs(batch: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The `keys` of a NumPy batch as the dtypes every backend feeds its model: integers int32,
    floats float32 (regression and multi-label labels); a missing key is an error naming it."""
    out = {}
    for key in keys:
        if key not in batch:
            raise KeyError(f"the batch has no {key!r} (it has {', '.join(sorted(batch))})")
        value = np.asarray(batch[key])
        out[key] = value.astype(np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32, copy=False)
    return out
