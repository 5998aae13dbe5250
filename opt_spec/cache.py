"""The key/value cache contract every backend keeps, with its NumPy reference.

One interface, one name in each backend (`KVCache`):
- `cache.update(layer, k, v) -> (keys, values)`: k, v are the new tokens' keys and values of one layer,
  (B, heads, T, head_dim); the cache writes them at its own write position and returns everything the
  T queries attend to, (B, heads, S, head_dim). The caller never passes a position.
- `cache.length`: tokens written so far (the write position). It moves on by T once every layer of a
  forward pass has been updated (`advance(T)`, called by the decoder after its last layer).
- A preallocated cache (`capacity` slots) returns its whole buffer (S = capacity); a dynamic one returns
  past + new (S = length + T). Slots not written yet are masked by the mask rule below, never read as 0s.
- The attention mask given with a cache covers the past and the new tokens (B, length + T), as in
  Hugging Face, or the whole buffer (B, capacity), as compiled decode loops pass it. Any other length is an
  error in words (`cache_mask_width`), never padded or cut silently.
- Past keys and values are given as a cache object, never as a tuple per layer (Hugging Face's legacy
  format, dropped in transformers v5); a tuple is refused in words (`refuse_legacy_cache`).

The model returns the cache it was given, holding the new tokens; under XLA (JAX, TF) `update` replaces the
cache's arrays instead of writing into them, so the returned cache is the updated one.
"""

from __future__ import annotations

import numpy as np


def cache_mask_width(mask_length: int, past: int | None, new: int | None, capacity: int | None) -> int:
    """How wide the attention mask given with a cache must be made (the S of the keys), or a ValueError.

    mask_length: the given mask's length; past: cache.length; new: the T new tokens; capacity: the
    preallocated buffer's slots, None for a dynamic cache. past None: the write position is not known
    (traced, inside jit or a tf.function that takes the cache): then only a mask covering the capacity can
    be checked and is accepted; a dynamic cache's mask is taken as past + new, unchecked.
    """
    if past is None:
        if capacity is None or mask_length == capacity:
            return mask_length
        raise ValueError(f"attention_mask covers {mask_length} positions; where the cache's length is traced "
                         "(inside jit, or a tf.function taking the cache) the write position is unknown, so the "
                         f"mask must cover the cache's capacity {capacity} (widen it with zeros first)")
    if capacity is not None and past + new > capacity:
        raise ValueError(f"the cache holds {capacity} tokens: {past} written and {new} new do not fit")
    if mask_length == past + new:
        return capacity if capacity is not None else past + new
    if capacity is not None and mask_length == capacity:
        return capacity
    allowed = f"{past + new} (past {past} + new {new})" + (f" or {capacity} (the cache's capacity)"
                                                          if capacity is not None else "")
    raise ValueError(f"attention_mask covers {mask_length} positions; with a cache it must cover {allowed}")


def check_capacity(capacity: int, max_positions: int, pads: int = 0) -> None:
    """A preallocated cache holds at most max_position_embeddings tokens: a slot past the position table
    could never be written by a real token. `pads`: slots more that left-padded prompts' pads will take
    (they have no position; generate passes them, see pad_slots). ValueError in words (every backend's
    init_cache / KVCache)."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"a cache's capacity must be an int >= 1, got {capacity!r:.100}")
    if capacity > max_positions + pads:
        raise ValueError(f"a cache of {capacity} tokens is longer than the model's max_position_embeddings="
                         f"{max_positions}" + (f" and {pads} pads" if pads else ""))


def pad_slots(prompt_width: int, max_new_tokens: int, max_positions: int) -> int:
    """The slots of generate's cache (prompt_width + max_new_tokens) past the position table: pads, once
    opt_spec.generation.check_prompt has bounded every row's real tokens + new tokens by the table."""
    return max(0, prompt_width + max_new_tokens - max_positions)


def check_cache_position(cache_position, past: int, new: int) -> None:
    """cache_position, as Hugging Face's decode loops pass it (the new tokens' slots in the cache), must be
    past .. past + new - 1 (None: not known, as while tracing): optkit's caches keep their own write position,
    so other slots (a static cache's arbitrary writes) would not be written where the caller asks."""
    if cache_position is None:
        return
    given = np.asarray(cache_position)
    want = np.arange(past, past + new)
    if given.shape != want.shape or not np.array_equal(given, want):
        shown = given.tolist() if given.size <= 8 else f"{given.shape} values"
        raise ValueError(f"cache_position is {shown}; the cache holds {past} tokens, so the {new} new ones take "
                         f"slots {past}..{past + new - 1} (pass those, or no cache_position)")


def refuse_legacy_cache(past_key_values) -> None:
    """A tuple/list of per-layer (keys, values) is refused in words (the cache object is the one format)."""
    if isinstance(past_key_values, (tuple, list)):
        raise TypeError("past_key_values must be the model's KVCache (from model.init_cache or a previous "
                        "output's past_key_values), not a tuple of (keys, values) per layer; build one with "
                        "KVCache and pass it on")


def held_positions(layers, num_layers: int, batch: int, heads: int, head_dim: int) -> int | None:
    """The positions S a cache holds when its per layer (keys, values) (any arrays with a shape; None for a layer
    holding nothing) are all (batch, heads, S, head_dim) for num_layers layers, else None."""
    shapes = [None if x is None else tuple(x.shape) for kv in layers for x in kv]
    S = shapes[0][2] if shapes and shapes[0] is not None and len(shapes[0]) == 4 else -1
    fits = len(shapes) == 2 * num_layers and all(s == (batch, heads, S, head_dim) for s in shapes)
    return S if fits else None


def check_reused_cache(cache, is_the_models: bool, expected: str, beside: str | None = None) -> None:
    """generate(past_key_values=cache)'s refusals before the cache is read (opt_spec.generation, "Re-using a
    prompt's cache"): given beside another form of the prompt (`beside` names it: inputs_embeds, ...), a tuple
    (refuse_legacy_cache), or anything but the backend's cache (`expected` names what it takes)."""
    if beside:
        raise ValueError("past_key_values (a cache of the prompt's first tokens, to re-use) goes with input_ids: "
                         f"not with {beside}")
    refuse_legacy_cache(cache)
    if not is_the_models:
        raise TypeError(f"past_key_values must be {expected}, got {type(cache).__name__}")


def reused_prompt_positions(layers, num_layers: int, batch: int, heads: int, head_dim: int, prompt_length: int) -> int:
    """generate(past_key_values=cache)'s C: the prompt's first positions the cache holds (see
    opt_spec.generation, "Re-using a prompt's cache"), from its per layer (keys, values). A cache of another model
    or batch, or one that does not hold 0 < C < T of the prompt's T tokens, is a ValueError in words."""
    C = held_positions(layers, num_layers, batch, heads, head_dim)
    if C is None:
        given = sorted({tuple(x.shape) for kv in layers for x in kv if x is not None})
        raise ValueError(f"past_key_values holds {len(layers)} layers of keys and values {given}; the model has "
                         f"{num_layers} layers, each (batch {batch}, {heads}, tokens, {head_dim})")
    if not 0 < C < prompt_length:
        raise ValueError(f"past_key_values holds {C} tokens and the prompt has {prompt_length}: it must hold the "
                         "prompt's first tokens, at least one and fewer than all (the last one is fed to the model)")
    return C


class KVCache:
    """The NumPy reference of the contract: a preallocated cache (capacity slots) or a dynamic one (None)."""

    def __init__(self, num_layers: int, capacity: int | None = None):
        self.keys: list[np.ndarray | None] = [None] * num_layers
        self.values: list[np.ndarray | None] = [None] * num_layers
        self.capacity, self.length = capacity, 0

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        B, H, T, D = k.shape
        if self.capacity is None:
            keep = (lambda old, new: new if old is None else np.concatenate([old, new], axis=2))
            self.keys[layer], self.values[layer] = keep(self.keys[layer], k), keep(self.values[layer], v)
        else:
            if self.keys[layer] is None:
                self.keys[layer] = np.zeros((B, H, self.capacity, D), k.dtype)
                self.values[layer] = np.zeros((B, H, self.capacity, D), v.dtype)
            if self.length + T > self.capacity:
                raise ValueError(f"the cache holds {self.capacity} tokens: {self.length} written and {T} new "
                                 "do not fit")
            self.keys[layer][:, :, self.length:self.length + T] = k
            self.values[layer][:, :, self.length:self.length + T] = v
        return self.keys[layer], self.values[layer]

    def advance(self, new: int) -> None:
        self.length += new

    def attention_mask(self, attention_mask: np.ndarray, new: int) -> np.ndarray:
        """The given mask widened to the keys' S: unwritten slots 0 (so the mask rule hides them)."""
        mask = np.asarray(attention_mask)
        S = cache_mask_width(mask.shape[1], self.length, new, self.capacity)
        return np.pad(mask, ((0, 0), (0, S - mask.shape[1])))
