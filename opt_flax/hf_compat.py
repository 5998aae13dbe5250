"""The Hugging Face model methods that training scripts call on a Flax model.

- `gradient_checkpointing_enable()` / `gradient_checkpointing_disable()` / `is_gradient_checkpointing`
  (Hugging Face's Flax models call the first `enable_gradient_checkpointing()`; both names work): the
  module is rebuilt with `remat=True`, so under `model(..., deterministic=False)` every decoder layer is
  an nn.remat (jax.checkpoint) whose activations are recomputed in the backward pass, with the same
  dropout keys, hence the same gradients.
- `resize_token_embeddings(n, pad_to_multiple_of, mean_resizing, seed)` (opt_spec.surface): new
  parameter arrays for the token embedding (and an untied LM head), a tied head follows (it is the
  embedding), and the config and module get the new vocab_size.
- `to_bf16(params, mask)` / `to_fp16` / `to_fp32`: a cast copy of a parameter tree (Hugging Face Flax's).
- `can_generate()`, `name_or_path`, `num_parameters(only_trainable, exclude_embeddings)` (every parameter
  is trainable), `get_memory_footprint()`, `floating_point_ops(inputs)` (opt_spec.surface.ModelSurface).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from opt_spec import WeightKind, surface
from opt_spec.inputs import seeded_rng


class FlaxModelMethods(surface.ModelSurface):
    """Mixed into FlaxOPTPreTrainedModel (`config`, `module`, `params`)."""

    # ------------------------------------------------------------------------- gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        if gradient_checkpointing_kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}: nn.remat's options "
                             "are not exposed")
        self._rebuild(remat=True)

    enable_gradient_checkpointing = gradient_checkpointing_enable  # Hugging Face Flax's name

    def gradient_checkpointing_disable(self) -> None:
        self._rebuild(remat=False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.module.remat

    def _rebuild(self, **changes) -> None:
        """A new module with `changes` (clone); compiled functions built on the old one are dropped."""
        self.module = self.module.clone(**changes)
        for cached in ("_generation_fns", "_sharded_fns"):
            self.__dict__.pop(cached, None)

    def _parameter_sizes(self) -> list[surface.Parameter]:
        """Every parameter array (all trained: an optax transform decides what an update changes)."""
        from .pretrained import check_params

        return [surface.Parameter(int(leaf.size), int(leaf.size) * leaf.dtype.itemsize,
                                  spec.kind is WeightKind.EMBEDDING, True)
                for spec, leaf in check_params(self.params, self.config, self.head).values()]

    # ----------------------------------------------------------------------------------- param dtypes
    def to_bf16(self, params, mask=None) -> dict:
        """A copy of the parameter tree `params` with its floating arrays in bfloat16 (Hugging Face Flax's
        to_bf16); mask: a tree of the same paths whose True leaves say which arrays to cast."""
        return _cast_floating(params, jnp.bfloat16, mask)

    def to_fp16(self, params, mask=None) -> dict:
        """As to_bf16, in float16."""
        return _cast_floating(params, jnp.float16, mask)

    def to_fp32(self, params, mask=None) -> dict:
        """As to_bf16, in float32."""
        return _cast_floating(params, jnp.float32, mask)

    # -------------------------------------------------------------------------------------- vocabulary
    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True, seed: int = 0) -> jnp.ndarray:
        """Resizes the token embedding (and an untied LM head) to new_num_tokens rows (rounded up to
        pad_to_multiple_of); see opt_spec.surface. Added rows draw from NumPy's generator `seed`.
        Returns the new embedding (V, E)."""
        if self.sharding is not None:
            raise ValueError("resize_token_embeddings on a model laid out on a mesh: resize it on one device first, "
                             "then lay it out (opt_flax.distributed.shard_model)")
        decoder = (self.params["model"] if "model" in self.params else self.params)["decoder"]
        embedding = decoder["embed_tokens"]["embedding"]
        n = surface.resized_vocab_size(embedding.shape[0], new_num_tokens, pad_to_multiple_of)
        if n == embedding.shape[0]:
            return embedding
        config = self.config.replace(vocab_size=n)
        rng = seeded_rng(seed)

        def resized(array, transposed=False):  # a kernel (E, V) is the (V, E) weight transposed
            rows = np.asarray(array, np.float32)
            rows = surface.resized_rows(rows.T if transposed else rows, n, mean_resizing, config.init_std, rng)
            return jnp.asarray(rows.T if transposed else rows, array.dtype)

        decoder["embed_tokens"] = {"embedding": resized(embedding)}
        if "lm_head" in self.params:  # untied
            self.params["lm_head"] = {"kernel": resized(self.params["lm_head"]["kernel"], transposed=True)}
        self.config = config
        self._rebuild(config=config)
        return decoder["embed_tokens"]["embedding"]


def _cast_floating(params, dtype, mask=None) -> dict:
    """params (a nested dict or FrozenDict) with the floating arrays cast to dtype where the mask (the same
    paths, bool leaves) is True, every one without a mask; a mask of other paths is a ValueError naming them."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    cast = {path: True for path in flat} if mask is None else traverse_util.flatten_dict(mask)
    if cast.keys() != flat.keys():
        missing, extra = sorted(flat.keys() - cast.keys()), sorted(cast.keys() - flat.keys())
        raise ValueError(f"mask must have the parameter tree's paths: missing {['.'.join(p) for p in missing]}, "
                         f"unknown {['.'.join(p) for p in extra]}")
    return traverse_util.unflatten_dict({
        path: leaf.astype(dtype) if cast[path] and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        for path, leaf in flat.items()})
