"""What the Hugging Face model methods that optkit offers in every backend mean, defined once (NumPy only).

- `dtype_argument`: `torch_dtype=` is transformers' older name of `dtype=`; both are accepted.
- `auto_dtype`: what `dtype="auto"` loads in, as transformers 4.57 decides it: the config.json's "dtype"
  (or its older "torch_dtype") when it names one, else the checkpoint's own floating dtype.
- `resized_vocab_size` / `resized_rows`: `resize_token_embeddings(n, pad_to_multiple_of, mean_resizing)`.
  Rows are kept or cut from the end; added rows are drawn, as transformers 4.57 draws them, from a
  normal distribution with the old rows' mean and 1e-9 times their covariance (so, to five digits, the
  mean row: a new token starts out as the average token and changes no other token's probability much),
  or the mean itself when that covariance is not positive definite; with mean_resizing=False from
  OPT's normal(0, init_std).
- `generation_inputs`: `prepare_inputs_for_generation`, the inputs of one step of a Hugging Face-style
  decode loop (transformers' generate calls it; PEFT wraps it).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

MEAN_RESIZING_SCALE = 1e-9  # transformers' covariance factor for added embedding rows


class ModelSurface:
    """What Hugging Face's models say about themselves, alike in every backend (mixed into each backend's
    model methods): the main input's name, and whether the class generates."""

    main_input_name = "input_ids"

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the model has `generate` (the causal LM), as transformers' models say (its pipelines ask)."""
        return callable(getattr(cls, "generate", None))


def dtype_argument(dtype: Any, torch_dtype: Any) -> Any:
    """The dtype asked for through either name (None when neither is given); two different ones are an error."""
    if torch_dtype is None:
        return dtype
    if dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is the older name "
                         "of dtype: pass one of them")
    return torch_dtype


def auto_dtype(config, saved: str) -> str:
    """dtype="auto"'s dtype name: config.json's "dtype", else its "torch_dtype" (Hugging Face's precedence),
    else `saved`, the name of the checkpoint's floating dtype. A config naming something other than a
    float dtype is a ValueError naming the key."""
    from .io import FLOAT_DTYPES

    extra = getattr(config, "extra", {}) or {}
    for key in ("dtype", "torch_dtype"):
        value = extra.get(key)
        if value is None:
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else None
        if name not in FLOAT_DTYPES:
            raise ValueError(f'dtype="auto": config.json has {key}={value!r}, not one of {", ".join(FLOAT_DTYPES)}')
        return name
    return saved


def resized_vocab_size(old: int, new_num_tokens: Optional[int], pad_to_multiple_of: Optional[int] = None) -> int:
    """The row count `resize_token_embeddings(new_num_tokens, pad_to_multiple_of)` gives a (old, E) embedding:
    new_num_tokens (old when None) rounded up to a multiple of pad_to_multiple_of."""
    n = old if new_num_tokens is None else new_num_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"new_num_tokens={new_num_tokens!r}: expected a positive int")
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}: expected a positive int")
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    return int(n)


def resized_rows(old: np.ndarray, n: int, mean_resizing: bool, init_std: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A (V, E) matrix (token embedding, or an untied LM head's weight) resized to (n, E) in float32: the first
    min(V, n) rows kept, the rest drawn as the module docstring says."""
    old = np.asarray(old, dtype=np.float32)
    V, E = old.shape
    if n <= V:
        return old[:n].copy()
    added = n - V
    if not mean_resizing:
        new = (init_std * rng.standard_normal((added, E))).astype(np.float32)
    else:
        mean = old.mean(axis=0, dtype=np.float64)
        centered = old - mean
        covariance = centered.T.astype(np.float64) @ centered / V  # (E, E)
        try:
            scale = np.linalg.cholesky(MEAN_RESIZING_SCALE * covariance)
        except np.linalg.LinAlgError:  # not positive definite: every new row is the mean
            new = np.broadcast_to(mean, (added, E))
        else:
            new = mean + rng.standard_normal((added, E)) @ scale.T
    return np.concatenate([old, np.asarray(new, np.float32)], axis=0)


def generation_inputs(input_ids, past_length: int, attention_mask=None, inputs_embeds=None, **kwargs) -> dict:
    """The forward's keyword arguments for the next step of a decode loop over `input_ids` (B, N), all tokens
    so far, when the cache already holds `past_length` of them: only the tokens it has not seen (the
    embeddings instead while nothing is cached and `inputs_embeds` are given), the mask over all N, and
    every other argument (past_key_values, use_cache, ...) passed through."""
    if inputs_embeds is not None and past_length == 0:
        inputs = {"inputs_embeds": inputs_embeds}
    else:
        inputs = {"input_ids": input_ids[:, past_length:]}
    inputs["attention_mask"] = attention_mask
    inputs.update(kwargs)
    return inputs
