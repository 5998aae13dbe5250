"""The key/value cache of the PyTorch backend: opt_spec.cache's contract, with torch tensors.

`KVCache(config, batch_size, capacity=None)`, or `model.init_cache(batch_size, capacity)`:
- capacity None, a dynamic cache: each layer's keys and values grow by concatenation, (B, nh, length, hs).
  A forward with use_cache=True and no cache starts one and returns it; pass it back as past_key_values.
- capacity N, a preallocated cache: fixed buffers (L, B, nh, N, hs) written in place, so decoding
  allocates nothing per token and a compiled step has fixed shapes (generate decodes into one).

`update(layer, k, v)` writes a layer's T new keys and values at the write position and returns what the
queries attend to: past + new (dynamic) or the whole buffer (preallocated; slots not written yet are
hidden by the mask rule). The decoder calls `advance(T)` after its last layer. A preallocated cache keeps
its write position as a (1,) tensor on its device, so that a step compiled by torch.compile
(generate(compile=True)) reads and moves it inside the graph: a Python int there would be baked into the
graph and recompile it every step. `length` reads it back on the host.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from opt_spec import OPTConfig
from opt_spec.cache import cache_mask_width, check_capacity


class KVCache:
    def __init__(self, config: OPTConfig, batch_size: int, capacity: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 num_heads: Optional[int] = None, pads: int = 0):
        """num_heads: the heads one process keeps (model.kv_heads; fewer than the config's under tensor
        parallelism), default all. dtype and device matter for a preallocated cache only. pads: slots past
        the position table that left-padded prompts' pads will take (opt_spec.cache.check_capacity)."""
        if capacity is not None:
            check_capacity(capacity, config.max_position_embeddings, pads)
        self.num_layers, self.batch_size, self.capacity = config.num_hidden_layers, batch_size, capacity
        self.num_heads = config.num_attention_heads if num_heads is None else num_heads
        if capacity is None:
            self.keys: list = [None] * self.num_layers    # per layer (B, nh, length, hs)
            self.values: list = [None] * self.num_layers
            self._length = 0
        else:
            shape = (self.num_layers, batch_size, self.num_heads, capacity, config.head_dim)
            self.keys = torch.zeros(shape, dtype=dtype, device=device)    # (L, B, nh, capacity, hs)
            self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nh, capacity, hs)
            self.position = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the write slot

    @property
    def length(self) -> int:
        """Tokens written so far (the write position)."""
        return self._length if self.capacity is None else int(self.position)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes a layer's new keys and values (B, nh, T, hs); returns keys and values (B, nh, S, hs)."""
        if self.capacity is None:
            if self.keys[layer] is not None:
                k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v
        T = k.shape[2]  # one new token (a decoding step) is written at the position itself
        slots = self.position if T == 1 else self.position + torch.arange(T, device=self.position.device)
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]

    def advance(self, new: int) -> None:
        """Moves the write position on by the `new` tokens every layer has now written."""
        if self.capacity is None:
            self._length += new
        else:
            self.position += new

    def crop(self, length: int) -> None:
        """Keeps the first `length` tokens: the next ones are written from there (Hugging Face's
        DynamicCache.crop; assisted decoding drops the candidates the model did not take)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop({length}): the cache holds {self.length} tokens")
        if self.capacity is None:
            self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
            self.values = [None if v is None else v[:, :, :length] for v in self.values]
            self._length = length
        else:
            self.position.fill_(length)

    def written(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values written so far, (B, nh, length, hs) (views, not copies)."""
        if self.capacity is None:
            return list(zip(self.keys, self.values))
        return [(self.keys[i, :, :, :self.length], self.values[i, :, :, :self.length]) for i in range(self.num_layers)]

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """(new,) the slots, hence the causal positions, of the next `new` tokens (on `device`)."""
        if self.capacity is None:
            return torch.arange(self._length, self._length + new, device=device)
        return self.position + torch.arange(new, device=self.position.device)

    def mask_width(self, mask_length: int, new: int) -> int:
        """The keys' S, to which the given attention mask is widened (opt_spec.cache.cache_mask_width).
        Traced by torch.compile the write position is not known: the mask must then cover the buffer."""
        if self.capacity is not None and torch.compiler.is_compiling():
            if mask_length != self.capacity:
                raise ValueError(f"a compiled step takes an attention_mask over the cache's {self.capacity} "
                                 f"slots, got {mask_length}")
            return self.capacity
        return cache_mask_width(mask_length, self.length, new, self.capacity)

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps batch rows `index` (beam search: each beam continues from its parent's cache)."""
        if self.capacity is None:
            self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
            self.values = [None if v is None else v.index_select(0, index) for v in self.values]
        else:
            self.keys = self.keys.index_select(1, index)
            self.values = self.values.index_select(1, index)
        self.batch_size = index.shape[0]


def hugging_face_cache(cache) -> bool:
    """Whether `cache` is one of transformers' Cache objects (transformers is never imported here: an object
    of its classes exists only where the caller loaded it)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(cache, transformers.Cache)


def check_dynamic(cache) -> None:
    """Refuses, in words, a Hugging Face cache that is not a plain DynamicCache (one of transformers' caches)."""
    if not isinstance(cache, sys.modules["transformers"].DynamicCache) or getattr(cache, "offloading", False):
        raise TypeError(f"past_key_values is a Hugging Face {type(cache).__name__}: the model takes its own KVCache "
                        "(model.init_cache) or a Hugging Face DynamicCache")


class HFDynamicCacheView:
    """A Hugging Face DynamicCache passed as past_key_values (PEFT's prefix tuning passes one holding its
    learned prefix; code written for transformers may pass one, empty or filled by an earlier call), as the
    decoder reads and writes a cache. Every write goes through the DynamicCache's own `update`, so that
    afterwards it holds the new keys and values, as it would after Hugging Face's model; the forward
    returns the DynamicCache itself as past_key_values. Only a dynamic cache fits: another of
    transformers' caches (static, sliding, quantized, offloaded) is refused in words."""

    capacity = None

    def __init__(self, cache, config: OPTConfig, num_heads: int, dtype: torch.dtype):
        check_dynamic(cache)
        kind = type(cache).__name__
        held = [(k, v) for k, v in cache if k is not None and k.numel()]  # layers written so far
        self.cache, self.num_layers, self.num_heads = cache, config.num_hidden_layers, num_heads
        self.batch_size = held[0][0].shape[0] if held else None  # an empty cache takes any batch
        self._length = cache.get_seq_length() if held else 0
        want = (num_heads, self._length, config.head_dim)
        if held and (len(held) != self.num_layers or any(
                tuple(x.shape[1:]) != want or x.shape[0] != self.batch_size or x.dtype != dtype
                for kv in held for x in kv)):
            found = sorted({(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for kv in held for x in kv})
            raise ValueError(f"past_key_values (a Hugging Face {kind}) holds {len(held)} layers of keys and values "
                             f"shaped {found}; the model has {self.num_layers} layers, each (batch, {want[0]}, "
                             f"{want[1]}, {want[2]}) in {str(dtype).removeprefix('torch.')}")

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)

    def advance(self, new: int) -> None:
        self._length += new

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self._length, self._length + new, device=device)

    def mask_width(self, mask_length: int, new: int) -> int:
        return cache_mask_width(mask_length, self._length, new, None)


def cache_length(cache) -> int:
    """Tokens a cache holds: the model's KVCache or a Hugging Face cache (its get_seq_length)."""
    return cache.get_seq_length() if hugging_face_cache(cache) else cache.length
