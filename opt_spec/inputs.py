"""The rules on a call's inputs that run on the host, written once: every backend calls these on concrete
values (under tracing, jit or XLA the values are not known, and each backend then checks what it can: the
dtype, or an asynchronous device-side assert with `token_range_message`).

- Token ids are integers in [0, vocab_size); the error names the first bad id, its row and position.
- A forward's inputs are a batch: input_ids (B, T), or inputs_embeds (B, T, E) of floats, with B, T >= 1.
- attention_mask holds only 0 (pad) and 1 (token), in any dtype (bool, int, float): a 2 or a 0.5 would be
  read differently by the backends' casts (a count in the positions, a truth value in the attention).
- Positions (explicit position_ids, or the ones the mask gives) stay below max_position_embeddings;
  explicit position_ids are integers (B, T) or (1, T) (one row for every row), at least -1 (a pad's).
- Causal-LM labels are integers (B, T), each a token id or IGNORE_INDEX (-100). Sequence-classification
  labels are one per row (B,) (or (B, 1)), each a class in [0, num_labels) or -100, for single-label
  problems, and (B, num_labels) for multi-label ones and regression over several labels. QA start and end
  positions are integers, one per row (values outside the sequence are ignored: opt_spec.numerics).
- Seeds (model initialization, resized embeddings, training, generate) are ints in [0, 2**32): the range
  every backend's generator takes without wrapping or refusing (JAX's keys hold 32 bits; NumPy's and
  torch's take more, so one rule for all is the narrowest one).
"""

from __future__ import annotations

import numpy as np

from .numerics import IGNORE_INDEX, problem_type

SEED_LIMIT = 2 ** 32


def _dtype_name(dtype) -> str:
    """int64 for NumPy's, TensorFlow's and JAX's dtypes (`.name`) and torch's (torch.int64)."""
    name = getattr(dtype, "name", None)
    return (name if isinstance(name, str) else str(dtype)).removeprefix("torch.")


def is_integer_dtype(dtype) -> bool:
    """Whether a NumPy, torch, TensorFlow or JAX dtype holds integers (bool does not)."""
    return _dtype_name(dtype).startswith(("int", "uint"))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_range_message(vocab_size: int) -> str:
    """What is wrong when the bad id itself is not known (a device-side check)."""
    return f"a token id is outside the vocabulary [0, {vocab_size})"


def not_integers(dtype, name: str = "input_ids") -> TypeError:
    """The error for input_ids (or `name`) of a non-integer dtype (named as the backend names it)."""
    return TypeError(f"{name} must be integers, got {dtype}")


def check_token_ids(ids, vocab_size: int) -> None:
    """ids (B, T) (anything np.asarray takes): TypeError unless integers, ValueError naming the first id
    outside [0, vocab_size)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise not_integers(ids.dtype)
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        at = f"at batch row {where[0]}, position {where[1]}" if len(where) == 2 else f"at index {where}"
        raise ValueError(f"token id {int(ids[where])} {at} is outside the vocabulary [0, {vocab_size})")


def check_positions(top: int, max_positions: int) -> None:
    """`top`: the largest position a call uses (-1 for none); it must be below max_position_embeddings."""
    if int(top) >= max_positions:
        raise ValueError(f"position {int(top)} is past the model's max_position_embeddings={max_positions}")


def check_batch_shape(shape, name: str = "input_ids") -> None:
    """input_ids (B, T), or inputs_embeds (B, T, E), with B, T >= 1. A dimension None (unknown while
    tracing) passes."""
    shape = tuple(shape)
    rank, what = (3, "(batch, length, width)") if name == "inputs_embeds" else (2, "(batch, length)")
    if len(shape) != rank or any(d is not None and d < 1 for d in shape[:2]):
        raise ValueError(f"{name} must be {what} with batch >= 1 and length >= 1, got shape {shape}")


def check_inputs_embeds(shape, dtype, width: int) -> None:
    """inputs_embeds: floats (B, T, E) with E the model's word_embed_proj_dim."""
    if is_integer_dtype(dtype) or _dtype_name(dtype) == "bool":
        raise TypeError(f"inputs_embeds must be floating point, got {_dtype_name(dtype)}")
    check_batch_shape(shape, "inputs_embeds")
    if shape[2] is not None and shape[2] != width:
        raise ValueError(f"inputs_embeds has shape {tuple(shape)}; its last axis must be the model's embedding "
                         f"width word_embed_proj_dim={width}")


def host_array(x) -> np.ndarray:
    """An input's known values as NumPy for the checks below; half precision (bfloat16 included, which NumPy
    compares only through ml_dtypes) as float32, since 0/1 and integer values are exact there."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "V" or x.dtype.name in ("bfloat16", "float16") else x


def check_attention_mask(mask) -> None:
    """The mask's values (anything np.asarray takes; None: not known here) are only 0 (pad) and 1 (token)."""
    if mask is None:
        return
    mask = np.asarray(mask)
    if mask.size and not np.isin(mask, (0, 1)).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isin(mask, (0, 1)))[0])
        raise ValueError(f"attention_mask must hold only 0 (pad) and 1 (token); it holds {mask[bad].item()!r:.20} "
                         f"at index {bad}")


def refuse_head_mask(head_mask) -> None:
    """head_mask (Hugging Face's argument to switch attention heads off) is refused unless None: Hugging Face
    4.57's OPT takes it and ignores it, so code passing one gets the unmasked model there without a word."""
    if head_mask is not None:
        raise ValueError("head_mask is not supported (Hugging Face 4.57's OPT accepts it and ignores it, which would "
                         "give the model with every head): pass None")


def check_position_ids(shape, dtype, batch, length, max_positions: int, values=None) -> None:
    """Explicit position_ids: integers (B, T) or (1, T) (None dimensions unknown while tracing pass);
    `values`, when known, in [-1, max_positions) (-1 is a pad's position, as the mask rule gives)."""
    if not is_integer_dtype(dtype):
        raise not_integers(_dtype_name(dtype), "position_ids")
    shape = tuple(shape)
    if len(shape) != 2 or not all(g is None or e is None or g == e for g, e in zip(shape, (None, length))) \
            or (shape[0] is not None and batch is not None and shape[0] not in (1, batch)):
        raise ValueError(f"position_ids has shape {shape}; expected (batch, length) = ({batch}, {length}) or "
                         f"(1, {length})")
    if values is not None and np.size(values):
        values = np.asarray(values)
        if values.min() < -1:
            where = tuple(int(i) for i in np.argwhere(values < -1)[0])
            raise ValueError(f"position_ids holds {int(values[where])} at index {where}: positions start at 0 "
                             "(-1 marks a pad)")
        check_positions(int(values.max()), max_positions)


def check_labels(shape, dtype, batch, length, vocab_size: int, values=None) -> None:
    """Causal-LM labels: integers of input_ids' shape (B, T) (None dimensions pass); `values`, when known,
    token ids in [0, vocab_size) or IGNORE_INDEX (-100), the first bad one named."""
    if not is_integer_dtype(dtype):
        raise not_integers(_dtype_name(dtype), "labels")
    shape = tuple(shape)
    if len(shape) != 2 or not all(g is None or e is None or g == e for g, e in zip(shape, (batch, length))):
        raise ValueError(f"labels has shape {shape}; expected input_ids' (batch, length) = ({batch}, {length})")
    if values is not None and np.size(values):
        values = np.asarray(values)
        bad = np.argwhere(((values < 0) | (values >= vocab_size)) & (values != IGNORE_INDEX))
        if bad.size:
            where = tuple(int(i) for i in bad[0])
            raise ValueError(f"label {int(values[where])} at batch row {where[0]}, position {where[1]} is neither a "
                             f"token id in [0, {vocab_size}) nor {IGNORE_INDEX} (ignored)")


def check_classification_labels(shape, dtype, batch, config, values=None) -> None:
    """Sequence-classification labels for `config`'s problem (opt_spec.numerics.problem_type): see the module
    docstring. Dimensions None (traced) pass; `values`, when known, are checked for single-label problems."""
    shape, n = tuple(shape), config.num_labels
    problem = problem_type(config, is_integer_dtype(dtype))
    per_row = problem == "single_label_classification" or (problem == "regression" and n == 1)
    if per_row:
        ok = len(shape) in (1, 2) and (len(shape) == 1 or shape[1] in (1, None))
        want = f"({batch},) or ({batch}, 1): one per row"
    else:
        ok = len(shape) == 2 and shape[1] in (n, None)
        want = f"({batch}, {n}): num_labels per row"
    if not ok or (shape[0] is not None and batch is not None and shape[0] != batch):
        raise ValueError(f"labels has shape {shape}; a {problem} problem takes {want}")
    if problem == "single_label_classification" and values is not None and np.size(values):
        values = np.asarray(values).reshape(-1)
        bad = np.flatnonzero(((values < 0) | (values >= n)) & (values != IGNORE_INDEX))
        if bad.size:
            raise ValueError(f"label {values[bad[0]].item()!r} of batch row {int(bad[0])} is neither a class in "
                             f"[0, {n}) (num_labels) nor {IGNORE_INDEX} (ignored)")


def check_pooling(batch, pad_token_id) -> None:
    """Sequence classification pools each row's last token that is not pad_token_id; without a pad id it
    cannot tell a padded row's last token, so (as Hugging Face) only a batch of one row is taken. A batch
    of None (traced) passes."""
    if pad_token_id is None and batch is not None and batch != 1:
        raise ValueError(f"sequence classification of a batch of {batch} rows needs config.pad_token_id (it pools "
                         "each row's last token that is not a pad); with pad_token_id None pass one row at a time")


def check_span_positions(name: str, shape, dtype, batch) -> None:
    """QA start_positions / end_positions: integers, one per row ((B,) or (B, 1))."""
    if not is_integer_dtype(dtype):
        raise not_integers(_dtype_name(dtype), name)
    shape = tuple(shape)
    if not (len(shape) in (1, 2) and (len(shape) == 1 or shape[1] in (1, None))) or \
            (shape[0] is not None and batch is not None and shape[0] != batch):
        raise ValueError(f"{name} has shape {shape}; expected ({batch},): one position per row")


def check_seed(seed, name: str = "seed") -> int:
    """The seed as an int, or ValueError naming `name` unless it is an int in [0, 2**32)."""
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}={seed!r:.50}: must be an int in [0, 2**32)")
    return int(seed)


def seeded_rng(seed) -> np.random.Generator:
    """NumPy's generator for a checked seed (None: fresh entropy)."""
    return np.random.default_rng(None if seed is None else check_seed(seed))
