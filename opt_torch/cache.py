"""A preallocated key/value cache for decoding without re-allocation (and CUDA-graph capture).

`StaticCache(config, batch_size, max_length)` holds keys and values for every layer in fixed buffers
of shape (L, B, nh, max_length, hs). A forward pass given `past_key_values=cache` must also get
`cache_position` (T,): the slots its T new tokens are written to, and an `attention_mask` of shape
(B, max_length) covering every slot (0 for slots not written yet and for padding). The model then
returns the same cache object, updated in place.

Without a StaticCache the model uses the plain format: a tuple per layer of (keys, values), each
(B, nh, S, hs), grown by concatenation.
"""

from __future__ import annotations

import torch

from opt_spec import OPTConfig


class StaticCache:
    def __init__(self, config: OPTConfig, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", num_heads: int | None = None):
        """num_heads: the heads one process keeps (model.kv_heads; fewer than the config's under tensor
        parallelism), default all."""
        if max_length > config.max_position_embeddings:
            raise ValueError(f"cache of {max_length} tokens is longer than max_position_embeddings="
                             f"{config.max_position_embeddings}")
        nh = config.num_attention_heads if num_heads is None else num_heads
        shape = (config.num_hidden_layers, batch_size, nh, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)    # (L, B, nh, max_length, hs)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nh, max_length, hs)
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor):
        """Writes (B, nh, T, hs) keys/values at cache_position (T,); returns the layer's full buffers."""
        self.keys[layer].index_copy_(2, cache_position, k)
        self.values[layer].index_copy_(2, cache_position, v)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps batch rows `index` (beam search: each beam continues from its parent's cache)."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
