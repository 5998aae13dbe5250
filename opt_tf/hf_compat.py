"""The Hugging Face model methods that training scripts call on a TensorFlow model.

- `gradient_checkpointing_enable()` / `gradient_checkpointing_disable()` / `is_gradient_checkpointing`: in
  training each decoder layer runs under tf.recompute_grad (its activations are recomputed in the
  backward pass) with its dropout seeds drawn before the layer, so the recomputation draws the same masks
  and the gradients equal those without it; the cache is off.
- `resize_token_embeddings(n, pad_to_multiple_of, mean_resizing, seed)` (opt_spec.surface): the token
  embedding (and an untied LM head) get new variables of the new size under the same paths, a tied head
  follows (it is the embedding), every layer's config gets the new vocab_size. Compile after resizing
  (an optimizer built for the old variables does not know the new ones).
- `get_output_embeddings()`, `can_generate()` (transformers' TF text-generation pipeline asks it),
  `name_or_path`, `num_parameters(only_trainable, exclude_embeddings)` (only_trainable: Keras' trainable_weights),
  `get_memory_footprint()`, `floating_point_ops(inputs)` (opt_spec.surface.ModelSurface).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import keras
import numpy as np

from opt_spec import WeightKind
from opt_spec import io as spec_io
from opt_spec import surface
from opt_spec.inputs import seeded_rng


class TFModelMethods(surface.ModelSurface):
    """Mixed into TFOPTPreTrainedModel (a keras.Model with `config` and `get_input_embeddings`)."""

    # ------------------------------------------------------------------------- gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        if gradient_checkpointing_kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}: TensorFlow's "
                             "tf.recompute_grad takes no options")
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._checkpointed_layers())

    def _checkpointed_layers(self) -> list:
        return [layer for layer in self._flatten_layers() if hasattr(layer, "gradient_checkpointing")]

    def _set_checkpointing(self, enabled: bool) -> None:
        for layer in self._checkpointed_layers():
            layer.gradient_checkpointing = enabled
        self._forget_traces()

    def _forget_traces(self) -> None:
        """Drops traced functions (Keras fit/evaluate/predict, generate), which keep what they traced."""
        self.train_function = self.test_function = self.predict_function = None
        self.__dict__.pop("_generation_fns", None)

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def _parameter_sizes(self) -> list[surface.Parameter]:
        """Every variable of the model (a tied head is the embedding's); trainable: Keras' trainable_weights."""
        from .checkpoint import variable_map

        embeddings = {id(var) for spec, var in variable_map(self).values() if spec.kind is WeightKind.EMBEDDING}
        trainable = {id(var) for var in self.trainable_weights}
        return [surface.Parameter(int(np.prod(var.shape)), int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize,
                                  id(var) in embeddings, id(var) in trainable) for var in self.weights]

    # -------------------------------------------------------------------------------------- vocabulary
    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True, seed: Optional[int] = None):
        """Resizes the token embedding (and an untied LM head) to new_num_tokens rows (rounded up to
        pad_to_multiple_of); see opt_spec.surface. Added rows draw from NumPy's generator `seed`.
        Returns the embedding layer."""
        embed = self.get_input_embeddings()
        n = surface.resized_vocab_size(embed.rows, new_num_tokens, pad_to_multiple_of)
        if n == embed.rows:
            return embed
        old_config, config = self.config, self.config.replace(vocab_size=n)
        rng = seeded_rng(seed)
        rows = surface.resized_rows(np.asarray(embed.embeddings.numpy()), n, mean_resizing, config.init_std, rng)
        _replace_variable(embed, "embeddings", rows)
        embed.rows = n
        head = self.get_output_embeddings()
        if head is not None:  # untied: a Linear whose kernel (E, V) is the (V, E) weight transposed
            rows = surface.resized_rows(np.asarray(head.kernel.numpy()).T, n, mean_resizing, config.init_std, rng)
            _replace_variable(head, "kernel", rows.T)
            head.out_dim = n
        for layer in [self, *self._flatten_layers()]:
            if getattr(layer, "config", None) is old_config:
                layer.config = config
        self._forget_traces()
        return embed


def _replace_variable(layer: keras.layers.Layer, attr: str, value: np.ndarray) -> None:
    """A new variable for layer.<attr> holding `value`, at the old one's path (the canonical name's)."""
    old = getattr(layer, attr)
    layer._untrack_variable(old)
    layer._tracker.unlock()
    try:
        with contextlib.ExitStack() as scopes:
            for scope in old.path.split("/")[:-2]:  # the scopes above the layer's own
                scopes.enter_context(keras.name_scope(scope))
            new = layer.add_weight(shape=value.shape, initializer="zeros", name=old.name, trainable=old.trainable)
    finally:
        layer._tracker.lock()
    new.assign(value.astype(spec_io.numpy_dtype(new.dtype)))
    setattr(layer, attr, new)
    if new.path != old.path:
        raise RuntimeError(f"resized variable at {new.path}, expected {old.path}")
