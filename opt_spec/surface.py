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

import warnings
from typing import Any, NamedTuple, Optional

import numpy as np

MEAN_RESIZING_SCALE = 1e-9  # transformers' covariance factor for added embedding rows


class Parameter(NamedTuple):
    """One parameter as the size methods count it (each backend lists its own: `_parameter_sizes()`)."""

    size: int          # elements
    nbytes: int
    embedding: bool    # a token or position embedding's weight (exclude_embeddings leaves these out)
    trainable: bool


class ModelSurface:
    """What Hugging Face's models say about themselves, alike in every backend (mixed into each backend's
    model methods): the main input's name, whether the class generates, where it was loaded from
    (`name_or_path`: from_pretrained's folder or Hub id, else ""), and its sizes as transformers counts them
    (`num_parameters`, `get_memory_footprint`, `floating_point_ops`) over the backend's `_parameter_sizes()`, each
    distinct parameter once (a tied head is the embedding)."""

    main_input_name = "input_ids"
    name_or_path = ""

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the model has `generate` (the causal LM), as transformers' models say (its pipelines ask)."""
        return callable(getattr(cls, "generate", None))

    def _parameter_sizes(self) -> list[Parameter]:
        raise NotImplementedError

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The parameters' element count: only the trainable ones with only_trainable, and without the
        embeddings' weights (tokens and positions) with exclude_embeddings."""
        return sum(p.size for p in self._parameter_sizes()
                   if (p.trainable or not only_trainable) and not (exclude_embeddings and p.embedding))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes the parameters take (a backend with buffers adds them under return_buffers)."""
        return sum(p.nbytes for p in self._parameter_sizes())

    def estimate_tokens(self, input_dict) -> int:
        """The tokens of a batch (its input_ids' element count); 0, with a warning once, without input_ids."""
        ids = input_dict.get(self.main_input_name) if hasattr(input_dict, "get") else None
        if ids is not None:
            return int(np.prod(tuple(np.shape(ids)), dtype=np.int64))
        if not getattr(self, "_warned_tokens", False):
            self._warned_tokens = True
            warnings.warn(f"floating_point_ops: the batch has no {self.main_input_name}; its tokens (and operations) "
                          "count as 0", stacklevel=3)
        return 0

    def floating_point_ops(self, input_dict, exclude_embeddings: bool = True) -> int:
        """Floating-point operations of a training step on the batch, as transformers estimates them (what
        its Trainer sums into total_flos): 6 x tokens x parameters (without the embeddings by default)."""
        return 6 * self.estimate_tokens(input_dict) * self.num_parameters(exclude_embeddings=exclude_embeddings)


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
