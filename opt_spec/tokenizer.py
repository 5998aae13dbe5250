"""OPT's tokenizer: GPT-2 byte-level BPE, read from a Hugging Face OPT directory, on `tokenizers`.

OPT's rules, as the released checkpoints were trained:
- every input starts with `</s>` (the bos token, id 2); no eos is appended;
- batches are padded on the LEFT with `<pad>` (id 1), so the last column is every row's last real
  token, and the attention mask is 1 on real tokens and 0 on pads;
- decoding drops the special tokens (`</s>`, `<pad>`, ...).

Files read (nothing is ever downloaded): `tokenizer.json`, or `vocab.json` + `merges.txt`; the special
tokens' strings from `special_tokens_map.json` / `tokenizer_config.json` when present, and their ids
from `config.json` when present. Framework-free: NumPy and the `tokenizers` library (imported when a
tokenizer is built, so `opt_spec` itself does not need it).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# OPT's special tokens (facebook/opt-*): </s> is bos, eos and unk at once; <pad> pads.
DEFAULT_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
DEFAULT_IDS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
INSTALL_HINT = "pip install 'optkit[tokenizer]'"


class TokenizerUnavailableError(ImportError):
    pass


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerUnavailableError(
            f"the OPT tokenizer needs the `tokenizers` library, which is not installed: {INSTALL_HINT}") from None
    return tokenizers


def find_tokenizer_files(directory: str | os.PathLike) -> dict[str, str] | None:
    """{'tokenizer': path} or {'vocab': path, 'merges': path} for a directory, or None if it has neither."""
    directory = os.fspath(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(path):
        return {"tokenizer": path}
    vocab, merges = os.path.join(directory, VOCAB_FILE), os.path.join(directory, MERGES_FILE)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return {"vocab": vocab, "merges": merges}
    return None


def _read_json(path: str) -> dict:
    """A tokenizer settings file, read by the checkpoint JSON reader (bounded size and depth)."""
    from .io import load_json

    if not os.path.isfile(path):
        return {}
    data = load_json(path)
    return data if isinstance(data, dict) else {}


def _token_string(value: Any) -> str | None:
    """A special token as written by Hugging Face: a string or {"content": string, ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class OPTTokenizer:
    """Encodes text to OPT token ids and back. Build it with `OPTTokenizer.from_pretrained(dir)`."""

    def __init__(self, tokenizer, *, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                 special_tokens: Mapping[str, str] | None = None):
        self._tokenizer = tokenizer
        self.bos_token_id = int(bos_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.special_tokens = dict(special_tokens or DEFAULT_SPECIAL_TOKENS)
        # Ids dropped when decoding with skip_special_tokens: ours, whatever the file marks special.
        self._special_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        for token in self.special_tokens.values():
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                self._special_ids.add(token_id)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config=None) -> "OPTTokenizer":
        """Reads the tokenizer of a Hugging Face OPT directory. `config` (an OPTConfig) gives the
        special ids; by default they come from the directory's config.json, else the vocabulary."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a directory")
        files = find_tokenizer_files(directory)
        if files is None:
            seen = ", ".join(sorted(os.listdir(directory))) or "nothing"
            raise FileNotFoundError(f"{directory} has no tokenizer: expected {TOKENIZER_FILE}, or "
                                    f"{VOCAB_FILE} and {MERGES_FILE} (found: {seen})")
        tk = _tokenizers()

        special = dict(DEFAULT_SPECIAL_TOKENS)
        for source in (_read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)),
                       _read_json(os.path.join(directory, SPECIAL_TOKENS_FILE))):
            for key in special:
                token = _token_string(source.get(key))
                if token:
                    special[key] = token

        if "tokenizer" in files:
            try:
                tokenizer = tk.Tokenizer.from_file(files["tokenizer"])
            except Exception as err:  # the library raises a bare Exception on bad files
                raise ValueError(f"{files['tokenizer']}: cannot be read as a tokenizer ({err})") from None
            tokenizer.no_padding()      # we pad (on the left) ourselves
            tokenizer.no_truncation()
        else:
            try:
                bpe = tk.models.BPE.from_file(files["vocab"], files["merges"])
            except Exception as err:
                raise ValueError(f"{files['vocab']} / {files['merges']}: cannot be read as a BPE "
                                 f"vocabulary ({err})") from None
            tokenizer = tk.Tokenizer(bpe)
            # GPT-2's byte-level scheme as OPT uses it: no prefix space, bytes mapped to printable chars.
            tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = tk.decoders.ByteLevel()
        # The special strings are matched whole in text (never split by BPE), like Hugging Face does.
        present = [t for t in dict.fromkeys(special.values()) if tokenizer.token_to_id(t) is not None]
        tokenizer.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in present])

        if config is None and os.path.isfile(os.path.join(directory, "config.json")):
            config = _read_json(os.path.join(directory, "config.json"))
        ids = {}
        for key, token_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                               ("pad_token_id", "pad_token")):
            value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
            if value is None:
                value = tokenizer.token_to_id(special[token_key])
            ids[key] = DEFAULT_IDS[key] if value is None else value
        return cls(tokenizer, **ids, special_tokens=special)

    # ----------------------------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of one text, starting with `</s>` (OPT's rule) unless add_bos=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else list(ids)

    def encode_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets): offsets[i] = (start, end) character span of token i in `text` ((0, 0) for
        the bos). Byte-level tokens keep their leading space, and the bytes of one character split
        over several tokens all report that character's span."""
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets() takes a string, got {type(text).__name__}")
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        return ([self.bos_token_id, *ids], [(0, 0), *offsets]) if add_bos else (ids, offsets)

    def __call__(self, texts: str | Sequence[str], add_bos: bool = True, max_length: int | None = None,
                 dtype=np.int64) -> dict[str, np.ndarray]:
        """{'input_ids', 'attention_mask'}: (B, T) integer arrays, LEFT-padded with pad_token_id.

        max_length: raise a ValueError naming the row when a text needs more tokens than this.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to encode")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        encoded = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = [([self.bos_token_id] if add_bos else []) + e.ids for e in encoded]
        return self.pad(rows, max_length=max_length, dtype=dtype)

    def pad(self, rows: Iterable[Sequence[int]], max_length: int | None = None,
            dtype=np.int64) -> dict[str, np.ndarray]:
        """Left-pads lists of token ids into {'input_ids', 'attention_mask'} (B, T) arrays."""
        return left_pad(rows, self.pad_token_id, max_length=max_length, dtype=dtype)

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (special tokens and pads dropped by default). Ids past the
        tokenizer's vocabulary (OPT's embedding has 50272 rows for 50265 tokens) decode to nothing."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        size = self.vocab_size
        ids = [i for i in ids if 0 <= i < size]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]

    def __repr__(self) -> str:
        return (f"OPTTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_id}, pad={self.pad_token_id})")


def left_pad(rows: Iterable[Sequence[int]], pad_token_id: int, max_length: int | None = None,
             dtype=np.int64) -> dict[str, np.ndarray]:
    """Lists of token ids -> {'input_ids', 'attention_mask'} (B, T) arrays, LEFT-padded (OPT's way:
    every row's last real token is in the last column)."""
    rows = [list(r) for r in rows]
    if not rows:
        raise ValueError("no rows to pad")
    for i, row in enumerate(rows):
        if max_length is not None and len(row) > max_length:
            raise ValueError(f"text {i} is {len(row)} tokens long; at most {max_length} fit")
    T = max(len(r) for r in rows)
    input_ids = np.full((len(rows), T), pad_token_id, dtype=dtype)
    attention_mask = np.zeros((len(rows), T), dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, T - len(row):] = row
            attention_mask[i, T - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
