"""The rules on a call's inputs that run on the host, written once: every backend calls these on concrete
values (under tracing, jit or XLA the values are not known, and each backend then checks what it can: the
dtype, or an asynchronous device-side assert with `token_range_message`).

- Token ids are integers in [0, vocab_size); the error names the first bad id, its row and position.
- Positions (explicit position_ids, or the ones the mask gives) stay below max_position_embeddings.
- Seeds (model initialization, resized embeddings, training, generate) are ints in [0, 2**32): the range
  every backend's generator takes without wrapping or refusing (JAX's keys hold 32 bits; NumPy's and
  torch's take more, so one rule for all is the narrowest one).
"""

from __future__ import annotations

import numpy as np

SEED_LIMIT = 2 ** 32


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_range_message(vocab_size: int) -> str:
    """What is wrong when the bad id itself is not known (a device-side check)."""
    return f"a token id is outside the vocabulary [0, {vocab_size})"


def not_integers(dtype) -> TypeError:
    """The error for input_ids of a non-integer dtype (named as the backend names it)."""
    return TypeError(f"input_ids must be integers, got {dtype}")


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


def check_seed(seed, name: str = "seed") -> int:
    """The seed as an int, or ValueError naming `name` unless it is an int in [0, 2**32)."""
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}={seed!r:.50}: must be an int in [0, 2**32)")
    return int(seed)


def seeded_rng(seed) -> np.random.Generator:
    """NumPy's generator for a checked seed (None: fresh entropy)."""
    return np.random.default_rng(None if seed is None else check_seed(seed))
