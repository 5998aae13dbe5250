"""OPT's tokenizer: GPT-2 byte-level BPE, read from a Hugging Face OPT directory, on `tokenizers`.

OPT's rules, as the released checkpoints were trained:
- every input starts with `</s>` (the bos token, id 2); no eos is appended;
- no space is put before a text: "Hello" and " Hello" are different tokens;
- batches are padded on the LEFT with `<pad>` (id 1), so the last column is every row's last real
  token, and the attention mask is 1 on real tokens and 0 on pads (a tokenizer_config.json's
  "padding_side" or padding_side=... says otherwise; Hugging Face's own default is "right");
- decoding drops the special tokens (`</s>`, `<pad>`, ...).

Calling it takes Hugging Face's arguments with their meaning (tested against transformers'
GPT2Tokenizer with OPT's settings): `padding` (False, True/"longest", "max_length"), `truncation` /
`max_length` (keeping the first tokens; max_length alone truncates, as in HF), `padding_side`,
`add_special_tokens` (the leading `</s>`, when add_bos_token), `return_attention_mask` and `return_tensors`
(None: lists; "np", "pt", "tf", "jax": (B, T) arrays of that framework, imported only then: int64 for NumPy
and PyTorch, int32 for TensorFlow and JAX, as HF gives). `save_pretrained` writes files that
transformers' AutoTokenizer (fast or slow) reads to the same ids.

A fine-tune may change the first two rules, and the ids follow what transformers' AutoTokenizer (the fast
GPT2TokenizerFast) makes of its folder; `tok.add_bos_token` and `tok.add_prefix_space` say what this one does:
- vocab.json + merges.txt: tokenizer_config.json's `add_bos_token` (the leading `</s>` by default, which
  encode(add_bos=True / False) overrides) and `add_prefix_space` (the ByteLevel pre-tokenizer's setting);
- tokenizer.json: its post_processor, when it has one, says whether `</s>` comes first (TemplateProcessing
  with it: yes; ByteLevel: no; one that adds anything else is a CheckpointError) and tokenizer_config.json's
  add_bos_token is not read; without one, add_bos_token is read as above. A top-level ByteLevel
  pre-tokenizer takes tokenizer_config.json's `add_prefix_space` (false when absent) over its own; one
  inside a Sequence keeps its own;
- a value that is not true or false is a CheckpointError naming the file and key.
Where optkit differs on purpose: when tokenizer_config.json has no add_bos_token (or a tokenizer.json has
no post_processor), optkit keeps OPT's `</s>` first, where transformers' GPT-2 default adds none (the
released facebook/opt-* folders say add_bos_token: true). With add_prefix_space true the slow GPT2Tokenizer
(use_fast=False) disagrees with the fast one, and optkit follows the fast one: the slow one puts a space
before the whole text even when it starts with one (" Hi" -> "  Hi") and before an empty text, but not
after a special token inside the text ("a</s>b": fast and optkit " a", "</s>", " b"; slow " a", "</s>", "b").

Files read: `tokenizer.json`, or `vocab.json` + `merges.txt` (with the tokens a fine-tune added, from
`tokenizer_config.json`'s added_tokens_decoder or `added_tokens.json`); the special tokens' strings from
`special_tokens_map.json` / `tokenizer_config.json` when present, and their ids from `config.json`
when present. These files may come from strangers: each is named by opt_spec.io.checkpoint_file's rule
(nothing outside the folder), the JSON ones and merges.txt are bounded by opt_spec.io's JSON limits,
tokenizer.json may hold only the components of OPT's byte-level BPE (TOKENIZER_COMPONENTS: no regular
expression, no precompiled charsmap), and the ids must be tokens of the vocabulary; anything else is a
CheckpointError naming the file. A Hub id ("facebook/opt-125m") is resolved to a folder by opt_spec.hub
(the Hugging Face cache; only small files are fetched). Framework-free: NumPy and the `tokenizers`
library (imported when a tokenizer is built, so `opt_spec` itself does not need it).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# OPT's special tokens (facebook/opt-*): </s> is bos, eos and unk at once; <pad> pads.
DEFAULT_SPECIAL_TOKENS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
DEFAULT_IDS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
INSTALL_HINT = "pip install 'optkit[tokenizer]'"
# return_tensors -> (module imported for it, optkit extra that installs it, default integer dtype as HF gives)
TENSOR_TYPES = {"np": (None, None, np.int64), "pt": ("torch", "torch", np.int64),
                "tf": ("tensorflow", "tf", np.int32), "jax": ("jax", "flax", np.int32)}
# HF writes model_max_length=1e30 for "no limit"; anything this large means none.
_NO_LIMIT = 10**12


class TokenizerUnavailableError(ImportError):
    pass


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerUnavailableError(
            f"the OPT tokenizer needs the `tokenizers` library, which is not installed: {INSTALL_HINT}") from None
    return tokenizers


def _present(directory: str, name: str) -> str | None:
    """The path of the file `name` in a tokenizer folder, or None when it has none. A file that is there
    follows the weights' rule (opt_spec.io.checkpoint_file: a regular file inside the folder, or in the hub
    cache's blobs), so a `tokenizer_config.json -> ~/.secrets.json` is a CheckpointError, not read."""
    from .io import checkpoint_file

    if not os.path.lexists(os.path.join(directory, name)):
        return None
    return checkpoint_file(directory, name)


def find_tokenizer_files(directory: str | os.PathLike) -> dict[str, str] | None:
    """{'tokenizer': path} or {'vocab': path, 'merges': path} for a directory, or None if it has neither."""
    directory = os.fspath(directory)
    path = _present(directory, TOKENIZER_FILE)
    if path is not None:
        return {"tokenizer": path}
    vocab, merges = _present(directory, VOCAB_FILE), _present(directory, MERGES_FILE)
    if vocab is not None and merges is not None:
        return {"vocab": vocab, "merges": merges}
    return None


def _read_json(directory: str, name: str) -> dict:
    """A tokenizer settings file of the folder, read by the checkpoint JSON reader (bounded size and depth)."""
    from .io import load_json

    path = _present(directory, name)
    if path is None:
        return {}
    data = load_json(path)
    return data if isinstance(data, dict) else {}


# What tokenizer.json may hold, component by component: OPT's byte-level BPE, as transformers and
# save_pretrained write it. Every other component is a program the `tokenizers` library runs from the file:
# a Split or Replace pattern is a backtracking regex (`(a+)+$` takes exponential time, then the library
# panics), and a Precompiled normalizer's charsmap states its own size (2 KB of one asked for 4 GB).
TOKENIZER_COMPONENTS = {"model": ("BPE",), "normalizer": (None,), "pre_tokenizer": (None, "ByteLevel"),
                        "decoder": (None, "ByteLevel"),
                        "post_processor": (None, "ByteLevel", "TemplateProcessing", "RobertaProcessing")}


def _tokenizer_text(path: str) -> str:
    """tokenizer.json's text, checked before the `tokenizers` library parses it: the JSON reader's bounds
    (MAX_JSON_BYTES: the library takes ~18x a file's size in memory; OPT's file is 2 MB) and only the
    components of TOKENIZER_COMPONENTS (a Sequence of them included)."""
    from .io import MAX_JSON_BYTES, json_object

    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    value = json_object(path, data)
    for key, allowed in TOKENIZER_COMPONENTS.items():
        stack = [value.get(key)]
        while stack:
            part = stack.pop()
            kind = part.get("type") if isinstance(part, dict) else part  # a dict without a type is refused too,
            if key == "model" and isinstance(part, dict) and "type" not in part:  # but a model: older `tokenizers`
                kind = "BPE"  # releases wrote none, and the library infers it; from_pretrained checks it built a BPE
            parts = [part.get(k) for k in ("normalizers", "pretokenizers", "processors", "decoders")
                     if k in part] if kind == "Sequence" and key != "model" else None
            if parts is not None and all(isinstance(p, list) for p in parts):
                stack.extend(item for p in parts for item in p)
            elif kind not in allowed or (kind is None) != (part is None):
                raise CheckpointError(f"{path}: {key} {kind!r:.100} is not part of OPT's byte-level BPE (allowed: "
                                      f"{', '.join(map(str, allowed))}); optkit does not run other tokenizer "
                                      "components from a file (a pattern or a charsmap can take unbounded time "
                                      "or memory)")
    return data.decode("utf-8")


ADDED_TOKENS_FILE = "added_tokens.json"
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def _add_saved_tokens(tokenizer, directory: str, settings: Mapping, special: Mapping[str, str]) -> None:
    """The tokens a fine-tune added (`tokenizer.add_tokens`, new special tokens), as a folder without
    tokenizer.json keeps them: tokenizer_config.json's `added_tokens_decoder` ({id: {content, special,
    flags}}, transformers >= 4.34), else added_tokens.json ({content: id}). Added to the BPE in id order; the
    ids must follow the vocabulary's (N, N + 1, ...), as Hugging Face assigns them, else a CheckpointError."""
    tk = _tokenizers()
    decoder = settings.get("added_tokens_decoder")
    if isinstance(decoder, Mapping) and decoder:
        where, entries = os.path.join(directory, TOKENIZER_CONFIG_FILE), []
        for key, entry in decoder.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(entry, Mapping)
                    and isinstance(entry.get("content"), str) and entry["content"]):
                raise CheckpointError(f"{where}: added_tokens_decoder entry {key!r:.40} is not id -> {{content, ...}}")
            flags = {k: bool(entry[k]) for k in _ADDED_FLAGS if isinstance(entry.get(k), bool)}
            entries.append((int(key), entry["content"], bool(entry.get("special", False)), flags))
    else:
        path = _present(directory, ADDED_TOKENS_FILE)
        if path is None:
            return
        from .io import json_object

        where, table = path, json_object(path)
        extra = _read_json(directory, SPECIAL_TOKENS_FILE).get("additional_special_tokens") or []
        named = set(special.values()) | {_token_string(t) for t in extra if isinstance(extra, list)}
        if not all(isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool)
                   for k, v in table.items()):
            raise CheckpointError(f"{where}: not a map of token strings to ids")
        entries = [(i, t, t in named, {}) for t, i in table.items()]
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    new = sorted(e for e in entries if tokenizer.token_to_id(e[1]) != e[0])  # the vocabulary's own are there
    if [e[0] for e in new] != list(range(n, n + len(new))):
        raise CheckpointError(f"{where}: added token ids {[e[0] for e in new][:8]} do not follow the vocabulary's "
                              f"{n} entries in order ({n}, {n + 1}, ...), as Hugging Face assigns them")
    for i, content, is_special, flags in new:
        token = tk.AddedToken(content, special=is_special, **flags)
        (tokenizer.add_special_tokens if is_special else tokenizer.add_tokens)([token])
        if tokenizer.token_to_id(content) != i:  # a string the vocabulary holds under another id
            raise CheckpointError(f"{where}: added token {content!r:.60} has id {i}, but the vocabulary gives it "
                                  f"{tokenizer.token_to_id(content)}")


def _special_id(value: Any, key: str, where: str, vocab_size: int) -> int:
    """A special token id as the config states it: an int naming a token of this tokenizer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < vocab_size:
        raise CheckpointError(f"{where}: {key}={value!r:.100} is not a token id of this tokenizer (an int in "
                              f"[0, {vocab_size}))")
    return int(value)


def _token_string(value: Any) -> str | None:
    """A special token as written by Hugging Face: a string or {"content": string, ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


FLAGS = ("add_prefix_space", "add_bos_token")  # tokenizer_config.json's switches that change the ids


def _flags(settings: Mapping, where: str) -> dict[str, bool | None]:
    """tokenizer_config.json's add_prefix_space and add_bos_token: True, False, or None when absent. Anything
    else (a string "false" is true to Python) is a CheckpointError naming the file and key."""
    for key in FLAGS:
        if key in settings and not isinstance(settings[key], bool):
            raise CheckpointError(f"{where}: {key}={settings[key]!r:.60} is not true or false")
    return {key: settings.get(key) for key in FLAGS}


def _post_processor_adds_bos(tokenizer, bos_token_id: int, where: str) -> bool:
    """Whether tokenizer.json's post_processor starts a text with the bos token (as Hugging Face's fast tokenizer
    runs it), found by running it: adding nothing is False, adding the bos in front is True; anything else
    (RoBERTa's `<s> ... </s>`, an appended eos) is more than optkit's one leading bos, so a CheckpointError."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    if full == plain:
        return False
    if full == [bos_token_id, *plain]:
        return True
    raise CheckpointError(f"{where}: post_processor {type(tokenizer.post_processor).__name__} makes {plain} into "
                          f"{str(full):.100}; optkit's OPT tokenizer adds only the bos (id {bos_token_id}) in front")


@dataclass(frozen=True)
class CutRules:
    """Where text may be cut so that encoding the pieces gives the ids of encoding it whole.

    GPT-2's byte-level pre-tokenizer splits text into words with one regular expression (letters, digits
    or other symbols, each run taking one leading space, and whitespace runs) before BPE merges inside
    each word; the expression looks behind nothing and ahead only from a whitespace run. So a cut is
    exact where a word starts in the whole text and nothing before the cut reads past it:
    - before a space between two letters or digits ("tea| and"): the space starts the next word in both;
    - after a newline between two letters or digits ("tea\n|And"), unless a prefix space is added to
      every text (`prefix_space`: the second piece would gain one).
    An added token (matched in the text before the words are split) must not lie across or beside a cut
    when it could change it: those holding whitespace, starting or ending with a letter or digit, or
    stripping their neighbours' spaces are `guarded`, and no cut is made within a token's length of one.
    `exact` is False for a pre-tokenizer that is not the byte-level expression (then no cut is exact)."""

    exact: bool
    prefix_space: bool
    guarded: tuple[str, ...] = ()

    def allows(self, text: str, i: int) -> bool:
        """Whether text[:i] | text[i:] is an exact cut."""
        if not 2 <= i < len(text) - 1:
            return False
        if text[i] == " ":
            ok = text[i - 1].isalnum() and text[i + 1].isalnum()
        else:
            ok = text[i - 1] == "\n" and not self.prefix_space and text[i - 2].isalnum() and text[i].isalnum()
        if ok and self.guarded:
            reach = max(map(len, self.guarded)) + 1
            window = text[max(0, i - reach):i + reach]
            ok = not any(token in window for token in self.guarded)
        return ok


class BatchEncoding(dict):
    """What calling the tokenizer returns: {'input_ids', 'attention_mask'}, also readable as attributes
    (`enc.input_ids`) and movable with `enc.to(device)` (PyTorch tensors), like HF's BatchEncoding."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class OPTTokenizer:
    """Encodes text to OPT token ids and back. Build it with `OPTTokenizer.from_pretrained(dir or Hub id)`."""

    def __init__(self, tokenizer, *, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                 special_tokens: Mapping[str, str] | None = None, padding_side: str = "left",
                 model_max_length: int | None = None, add_bos_token: bool = True):
        self._tokenizer = tokenizer
        self._add_bos_token = bool(add_bos_token)
        # Found by running the pre-tokenizer (a ByteLevel inside a Sequence too): a prefix space makes "a" "Ġa".
        pieces = tokenizer.pre_tokenizer.pre_tokenize_str("a") if tokenizer.pre_tokenizer is not None else []
        self._add_prefix_space = bool(pieces) and pieces[0][0] != "a"
        self.bos_token_id = int(bos_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.special_tokens = dict(special_tokens or DEFAULT_SPECIAL_TOKENS)
        self.padding_side = _check_side(padding_side)
        self.model_max_length = model_max_length  # None: no limit
        # Ids dropped when decoding with skip_special_tokens: ours, whatever the file marks special.
        self._special_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        for token in self.special_tokens.values():
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                self._special_ids.add(token_id)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config=None, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None) -> "OPTTokenizer":
        """Reads the tokenizer of a Hugging Face OPT directory, or of a Hub id at `revision` (see
        opt_spec.hub). `config` (an OPTConfig) gives the special ids; by default they come from the
        directory's config.json, else the vocabulary."""
        from .hub import resolve_pretrained

        directory = resolve_pretrained(directory, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token, weights=False)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory} is not a directory")
        files = find_tokenizer_files(directory)
        if files is None:
            seen = ", ".join(sorted(os.listdir(directory))) or "nothing"
            raise FileNotFoundError(f"{directory} has no tokenizer: expected {TOKENIZER_FILE}, or "
                                    f"{VOCAB_FILE} and {MERGES_FILE} (found: {seen})")
        tk = _tokenizers()

        special = dict(DEFAULT_SPECIAL_TOKENS)
        settings = _read_json(directory, TOKENIZER_CONFIG_FILE)
        flags = _flags(settings, os.path.join(directory, TOKENIZER_CONFIG_FILE))
        for source in (settings, _read_json(directory, SPECIAL_TOKENS_FILE)):
            for key in special:
                token = _token_string(source.get(key))
                if token:
                    special[key] = token

        if "tokenizer" in files:
            text = _tokenizer_text(files["tokenizer"])
            try:
                tokenizer = tk.Tokenizer.from_str(text)
            except Exception as err:  # the library raises a bare Exception on bad files
                raise CheckpointError(f"{files['tokenizer']}: cannot be read as a tokenizer ({err})") from None
            if not isinstance(tokenizer.model, tk.models.BPE):  # a model without a type: what the library made of it
                raise CheckpointError(f"{files['tokenizer']}: model {type(tokenizer.model).__name__} is not part of "
                                      "OPT's byte-level BPE (allowed: BPE)")
            tokenizer.no_padding()      # we pad (on the left) ourselves
            tokenizer.no_truncation()
            if isinstance(tokenizer.pre_tokenizer, tk.pre_tokenizers.ByteLevel):
                # Hugging Face's fast tokenizer sets a top-level ByteLevel's prefix space from tokenizer_config.json
                # (False when absent), whatever tokenizer.json says; one inside a Sequence keeps its own.
                state = json.loads(tokenizer.pre_tokenizer.__getstate__())
                state.update(add_prefix_space=bool(flags["add_prefix_space"]))
                tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(**{k: v for k, v in state.items() if k != "type"})
        else:
            from .io import MAX_JSON_BYTES, json_object

            json_object(files["vocab"])  # the JSON reader's bounds; merges.txt is plain lines, bounded alike
            if os.path.getsize(files["merges"]) > MAX_JSON_BYTES:
                raise CheckpointError(f"{files['merges']}: {os.path.getsize(files['merges']):,} bytes; optkit reads "
                                      f"at most {MAX_JSON_BYTES:,} (OPT's is 456 KB)")
            try:
                bpe = tk.models.BPE.from_file(files["vocab"], files["merges"])
            except Exception as err:
                raise CheckpointError(f"{files['vocab']} / {files['merges']}: cannot be read as a BPE "
                                 f"vocabulary ({err})") from None
            tokenizer = tk.Tokenizer(bpe)
            # GPT-2's byte-level scheme: bytes mapped to printable chars; OPT adds no prefix space unless told.
            tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=bool(flags["add_prefix_space"]))
            tokenizer.decoder = tk.decoders.ByteLevel()
            _add_saved_tokens(tokenizer, directory, settings, special)
        # The special strings are matched whole in text (never split by BPE), like Hugging Face does.
        present = [t for t in dict.fromkeys(special.values()) if tokenizer.token_to_id(t) is not None]
        tokenizer.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in present])

        where = "config"
        if config is None and os.path.lexists(os.path.join(directory, "config.json")):
            config, where = _read_json(directory, "config.json"), os.path.join(directory, "config.json")
        ids = {}
        for key, token_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                               ("pad_token_id", "pad_token")):
            value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
            if value is None:
                value = tokenizer.token_to_id(special[token_key])
            value = DEFAULT_IDS[key] if value is None else value
            ids[key] = _special_id(value, key, where, tokenizer.get_vocab_size(with_added_tokens=True))
        add_bos = flags["add_bos_token"]
        if "tokenizer" in files and tokenizer.post_processor is not None:  # the fast tokenizer follows the file
            add_bos = _post_processor_adds_bos(tokenizer, ids["bos_token_id"], files["tokenizer"])
        side = settings.get("padding_side", "left")
        limit = settings.get("model_max_length")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _NO_LIMIT else None
        return cls(tokenizer, **ids, special_tokens=special, model_max_length=limit,
                   padding_side=side if side in ("left", "right") else "left",
                   add_bos_token=True if add_bos is None else add_bos)

    # ----------------------------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        """The number of token ids, added tokens included (HF's len(tokenizer))."""
        return self.vocab_size

    @property
    def add_bos_token(self) -> bool:
        """Whether encode() and calling the tokenizer put the bos token first by default (OPT's rule; a
        tokenizer_config.json's add_bos_token or tokenizer.json's post_processor may say otherwise)."""
        return self._add_bos_token

    @property
    def add_prefix_space(self) -> bool:
        """Whether the pre-tokenizer puts a space before a text (and before the text after a special token), so
        "Hello" is encoded as " Hello" is (OPT's default: no)."""
        return self._add_prefix_space

    @property
    def bos_token(self) -> str | None:
        return self._tokenizer.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._tokenizer.id_to_token(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._tokenizer.id_to_token(self.pad_token_id)

    def _bos(self, add_bos: bool | None, add_special_tokens: bool | None = None) -> bool:
        """Whether to put the bos first: add_special_tokens (HF's meaning: the tokenizer's own rule, or none)
        when given, else add_bos when given, else the tokenizer's rule (add_bos_token)."""
        if add_special_tokens is not None:
            return bool(add_special_tokens) and self.add_bos_token
        return self.add_bos_token if add_bos is None else bool(add_bos)

    def encode(self, text: str, add_bos: bool | None = None, *, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of one text, starting with `</s>` when add_bos_token says so (OPT's rule); add_bos=True or
        False puts it there or not whatever the rule, add_special_tokens=False (HF's name) leaves it out."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, got {type(text).__name__}")
        add_bos = self._bos(add_bos, add_special_tokens)
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else list(ids)

    def encode_with_offsets(self, text: str, add_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, offsets): the ids encode(text, add_bos) gives, offsets[i] = (start, end) character span of
        token i in `text` ((0, 0) for the bos). Byte-level tokens keep their leading space, and the bytes of
        one character split over several tokens all report that character's span."""
        if not isinstance(text, str):
            raise TypeError(f"encode_with_offsets() takes a string, got {type(text).__name__}")
        add_bos = self._bos(add_bos)
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        return ([self.bos_token_id, *ids], [(0, 0), *offsets]) if add_bos else (ids, offsets)

    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of many texts (no `</s>` added), as compact arrays (uint16 when every id fits, else
        uint32), encoded on all of the `tokenizers` library's threads: how opt_spec.data reads a corpus."""
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)  # fast: no offsets
        dtype = self.id_dtype  # get_vocab_size takes ~1 ms: once per call
        return [np.array(e.ids, dtype=dtype) for e in encode(list(texts), add_special_tokens=False)]

    @property
    def id_dtype(self) -> type:
        """The smallest unsigned integer type that holds every id of this tokenizer."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def fingerprint(self) -> str:
        """A digest of everything that decides the ids (vocabulary, merges, added tokens, pre-tokenizer,
        special ids): equal fingerprints encode every text alike. What a token cache is keyed by."""
        import hashlib

        ids = f"{self.bos_token_id} {self.eos_token_id} {self.pad_token_id} {self.add_bos_token}"
        return hashlib.sha256((self._tokenizer.to_str() + ids).encode("utf-8")).hexdigest()

    def cut_rules(self) -> "CutRules":
        """Where a long text may be cut into pieces that encode, one after the other, to the ids of the
        whole (see CutRules)."""
        pre = self._tokenizer.pre_tokenizer
        exact = type(pre).__name__ == "ByteLevel" and bool(getattr(pre, "use_regex", True))
        guarded = tuple(t.content for t in self._tokenizer.get_added_tokens_decoder().values()
                        if t.lstrip or t.rstrip or t.single_word or any(c.isspace() for c in t.content)
                        or t.content[:1].isalnum() or t.content[-1:].isalnum())
        return CutRules(exact, self.add_prefix_space, guarded)

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, padding_side: str | None = None,
                 return_attention_mask: bool = True, dtype=None) -> BatchEncoding:
        """{'input_ids', 'attention_mask'} of one text or a batch, with Hugging Face's arguments and meaning.

        padding: False (none), True / "longest" (to the longest row), "max_length" (to max_length).
        add_special_tokens: the leading `</s>` when add_bos_token says so (False: never).
        truncation: True / "longest_first" / "only_first" keep each row's first max_length tokens (the
        `</s>` counted; max_length defaults to model_max_length); None truncates only when max_length
        is given without padding, as HF does. return_tensors: None gives lists (a flat list for one
        text); "np" / "pt" / "tf" / "jax" give (B, T) arrays of that framework, which needs rows of
        one length (pad them). dtype overrides the integer type of the arrays.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts:
            raise ValueError("no texts to encode")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string")
        encoded = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        head = [self.bos_token_id] if self._bos(None, add_special_tokens) else []
        rows = [head + e.ids for e in encoded]
        if truncation is None:  # HF: a max_length without padding means "truncate to it"
            truncation = max_length is not None and padding in (False, "do_not_pad")
        if truncation not in (False, "do_not_truncate"):
            if truncation not in (True, "longest_first", "only_first"):
                raise ValueError(f"truncation={truncation!r}: expected True, False, 'longest_first', 'only_first' or "
                                 "'do_not_truncate' (pairs of texts are not supported)")
            limit = max_length if max_length is not None else self.model_max_length
            if limit is not None:
                if limit < len(head):
                    raise ValueError(f"max_length={limit} leaves no room for the leading {self.bos_token!r}")
                rows = [r[:limit] for r in rows]
        out = self.pad({"input_ids": rows}, padding=padding, max_length=max_length, padding_side=padding_side,
                       return_tensors=return_tensors, return_attention_mask=return_attention_mask, dtype=dtype)
        if single and return_tensors is None:
            return BatchEncoding({k: v[0] for k, v in out.items()})
        return out

    def pad(self, encoded, *, padding: bool | str = True, max_length: int | None = None,
            padding_side: str | None = None, return_tensors: str | None = None, return_attention_mask: bool = True,
            dtype=None) -> BatchEncoding:
        """Pads token ids given as {'input_ids': rows}, a list of {'input_ids': ids} (what a data collator
        holds) or a list of id lists, on `padding_side` (default self.padding_side) with pad_token_id.
        Arguments as in __call__; other keys of the inputs come back as given (as tensors when asked)."""
        if isinstance(encoded, Mapping):
            extra = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
            rows = encoded["input_ids"]
        else:
            encoded = list(encoded)
            if encoded and isinstance(encoded[0], Mapping):
                extra = {k: [e[k] for e in encoded] for k in encoded[0] if k not in ("input_ids", "attention_mask")}
                rows = [e["input_ids"] for e in encoded]
            else:
                extra, rows = {}, encoded
        rows = [[int(i) for i in np.asarray(r).reshape(-1)] for r in rows]
        side = _check_side(padding_side or self.padding_side)
        if padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target is None:
                raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        elif padding in (False, "do_not_pad"):
            target = 0
        else:
            raise ValueError(f"padding={padding!r}: expected True, False, 'longest', 'max_length' or 'do_not_pad'")
        ids, mask = [], []
        for r in rows:
            pads = max(0, target - len(r))
            ids.append([self.pad_token_id] * pads + r if side == "left" else r + [self.pad_token_id] * pads)
            mask.append([0] * pads + [1] * len(r) if side == "left" else [1] * len(r) + [0] * pads)
        out = {"input_ids": ids, **({"attention_mask": mask} if return_attention_mask else {}), **extra}
        if return_tensors is None:
            return BatchEncoding(out)
        lengths = sorted({len(r) for r in ids})
        if len(lengths) > 1:
            raise ValueError(f"return_tensors={return_tensors!r} needs rows of one length, but they have "
                             f"{lengths[0]} to {lengths[-1]} tokens: pass padding=True (or truncation=True with "
                             "padding='max_length')")
        return BatchEncoding({k: _as_tensor(v, return_tensors, dtype) for k, v in out.items()})

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

    # ------------------------------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Writes this tokenizer into `directory` (created if needed; other files there are kept), each
        file atomically: tokenizer.json (with the leading `</s>` as its post-processor when add_bos_token, as
        HF's fast GPT-2 tokenizer builds it), vocab.json + merges.txt (a BPE model), tokenizer_config.json and
        special_tokens_map.json. transformers' AutoTokenizer, fast or slow, reads them to the same ids,
        and so does from_pretrained. Returns the files written."""
        from .io import atomic_path

        tk = _tokenizers()
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.special_tokens.get("unk_token")}
        names = {k: v for k, v in names.items() if v is not None and self._tokenizer.token_to_id(v) is not None}
        tokenizer = tk.Tokenizer.from_str(self._tokenizer.to_str())
        bos = self.bos_token
        tokenizer.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, self.bos_token_id)],
        ) if self.add_bos_token else tk.processors.ByteLevel(trim_offsets=False)  # what HF writes without a bos
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}
        settings = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": self.add_bos_token,
                    "add_prefix_space": self.add_prefix_space, "errors": "replace",
                    "clean_up_tokenization_spaces": False, "padding_side": self.padding_side,
                    "added_tokens_decoder": added, **names}
        if self.model_max_length is not None:
            settings["model_max_length"] = self.model_max_length
        texts = {TOKENIZER_FILE: tokenizer.to_str(pretty=True),
                 TOKENIZER_CONFIG_FILE: json.dumps(settings, indent=2, ensure_ascii=False) + "\n",
                 SPECIAL_TOKENS_FILE: json.dumps(names, indent=2, ensure_ascii=False) + "\n"}
        with tempfile.TemporaryDirectory() as tmp:
            if type(self._tokenizer.model).__name__ == "BPE":  # GPT-2's files, which the slow tokenizer reads
                for path in self._tokenizer.model.save(tmp):
                    with open(path, encoding="utf-8") as f:
                        texts[os.path.basename(path)] = f.read()
        written = []
        for name, text in texts.items():
            path = os.path.join(directory, name)
            with atomic_path(path) as part:
                with open(part, "w", encoding="utf-8") as f:
                    f.write(text)
            written.append(path)
        return written

    def __repr__(self) -> str:
        return (f"OPTTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={self.eos_token_id}, pad={self.pad_token_id}, padding_side={self.padding_side!r})")


def _check_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side={side!r}: expected 'left' or 'right'")
    return side


def _as_tensor(rows, kind: str, dtype=None):
    """Equal-length rows (or a list of scalars) -> an array of the framework `kind` names, imported only now."""
    if kind not in TENSOR_TYPES:
        raise ValueError(f"return_tensors={kind!r}: expected one of {', '.join(map(repr, TENSOR_TYPES))} or None")
    module, extra, default = TENSOR_TYPES[kind]
    array = np.asarray(rows, dtype=dtype or default)
    if module is None:
        return array
    import importlib

    try:
        framework = importlib.import_module(module)
    except ImportError:
        raise ImportError(f"return_tensors={kind!r} needs {module}, which is not installed: "
                          f"pip install 'optkit[{extra}]'") from None
    if kind == "pt":
        return framework.from_numpy(array)
    if kind == "tf":
        return framework.convert_to_tensor(array)
    return framework.numpy.asarray(array)


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
