"""The Hugging Face PreTrainedModel methods that training scripts and PEFT call on a PyTorch model.

- `gradient_checkpointing_enable(gradient_checkpointing_kwargs)` / `_disable()` / `is_gradient_checkpointing`:
  in training each decoder layer is recomputed in the backward pass by torch.utils.checkpoint (which
  replays the random state, so dropout draws the same masks), and the cache is off. Unlike transformers
  the default is the non-reentrant checkpoint (`use_reentrant=False`), which also lets gradients reach
  adapters behind a frozen embedding; `gradient_checkpointing_kwargs` go to torch.utils.checkpoint.
- `enable_input_require_grads()` / `disable_input_require_grads()`.
- `get_input_embeddings()` / `set_input_embeddings(module)`, `get_output_embeddings()` /
  `set_output_embeddings(module)`, `get_decoder()` / `set_decoder(decoder)`: a module set must fit the config's
  shapes (resize_token_embeddings changes the vocabulary), and a tied head stays tied to the embedding (Hugging
  Face leaves the old head tied to the old embedding until tie_weights is called).
- `name_or_path` (what from_pretrained was given; "" otherwise: PEFT writes it into adapter_config.json),
  `main_input_name`, `floating_point_ops(inputs)` (Trainer's total_flos: 6 x tokens x parameters without the
  embeddings, as transformers estimates it).
- `num_parameters(only_trainable, exclude_embeddings)`, `get_memory_footprint(return_buffers)`: counted as
  transformers counts them (a tied weight once; exclude_embeddings leaves out every nn.Embedding's weight,
  the learned positions included); `can_generate()`.
- `resize_token_embeddings(n, pad_to_multiple_of, mean_resizing)` (opt_spec.surface): the embedding (and an
  untied LM head) keep their first rows and gain new ones at the end, a tied head follows, and every
  module's config gets the new vocab_size (OPTConfig is frozen: a replaced copy).
- `prepare_inputs_for_generation` (causal LM), which PEFT's PeftModelForCausalLM wraps, and
  `_prepare_generation_config`, which transformers' pipelines call.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from opt_spec import surface
from opt_spec.cache import refuse_legacy_cache
from opt_spec.generation import prepared_config

from .cache import cache_length


class HFModelMethods(surface.ModelSurface):
    """Mixed into OPTPreTrainedModel (an nn.Module with `config`, `get_input_embeddings`, `pack_weights`)."""

    supports_gradient_checkpointing = True

    # ------------------------------------------------------------------------- gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for m in self._checkpointed_modules():
            m.gradient_checkpointing = True
            m.checkpoint_fn = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for m in self._checkpointed_modules():
            m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(m.gradient_checkpointing for m in self._checkpointed_modules())

    def _checkpointed_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if hasattr(m, "gradient_checkpointing")]

    def enable_input_require_grads(self) -> None:
        """The embedding output requires grad even when the embedding is frozen (what a reentrant checkpoint
        needs for gradients to reach adapters behind it)."""
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(
            lambda module, args, out: out.requires_grad_(True))

    def disable_input_require_grads(self) -> None:
        self._require_grads_hook.remove()

    # ------------------------------------------------------------------------------ modules by role
    def get_input_embeddings(self) -> nn.Module:
        return self.get_decoder().embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replaces the token embedding with `value` (a module whose weight is (vocab_size,
        word_embed_proj_dim)); a tied LM head is tied to the new weight."""
        config = self.config
        _check_module(value, "set_input_embeddings", (config.vocab_size, config.word_embed_proj_dim))
        self.get_decoder().embed_tokens = value
        self._after_swap()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Module) -> None:
        """Replaces the LM head with `value` (a module whose weight is (vocab_size, word_embed_proj_dim)). Under
        tie_word_embeddings the head is the token embedding: a head with a weight of its own is refused."""
        config = self.config
        if self.get_output_embeddings() is None:
            raise AttributeError(f"{type(self).__name__} has no LM head to set")
        _check_module(value, "set_output_embeddings", (config.vocab_size, config.word_embed_proj_dim))
        if config.tie_word_embeddings and value.weight is not self.get_input_embeddings().weight:
            raise ValueError("set_output_embeddings: config.tie_word_embeddings is True, so the LM head is the token "
                             "embedding's weight; set_input_embeddings changes both, or load the model with a config "
                             "whose tie_word_embeddings is False for a head of its own")
        self.lm_head = value
        self._after_swap()

    def set_decoder(self, decoder: nn.Module) -> None:
        """Replaces the decoder (embeddings and layers) with another of the same config."""
        from .modeling import OPTDecoder

        if not isinstance(decoder, OPTDecoder) or decoder.config != self.config:
            raise ValueError("set_decoder takes an opt_torch OPTDecoder of the model's config (get_decoder() of "
                             "a model of the same shape)")
        self._decoder_parent().decoder = decoder
        self._after_swap()

    def get_decoder(self) -> nn.Module:
        return self._decoder_parent().decoder

    def _decoder_parent(self) -> nn.Module:
        return getattr(self, "model", self)

    def _after_swap(self) -> None:
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        self.pack_weights()

    # ---------------------------------------------------------------------------------------- sizes
    def _parameter_sizes(self) -> list[surface.Parameter]:
        """Every parameter (a tied weight once), LoRA's and other swapped-in modules' included; an
        nn.Embedding's weight counts as an embedding."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return [surface.Parameter(p.numel(), p.numel() * p.element_size(), id(p) in embeddings, p.requires_grad)
                for p in self.parameters()]

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes the parameters (and, with return_buffers, the buffers) take."""
        buffers = sum(t.nelement() * t.element_size() for t in self.buffers()) if return_buffers else 0
        return super().get_memory_footprint() + buffers

    # -------------------------------------------------------------------------------------- vocabulary
    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resizes the token embedding (and an untied LM head) to new_num_tokens rows (rounded up to
        pad_to_multiple_of); see opt_spec.surface. Added rows draw from torch's global generator (seed it
        with torch.manual_seed). Returns the embedding."""
        refuse_split(self, "resize_token_embeddings", "resize the whole model first, save it, and load that")
        embed = self.get_input_embeddings()
        n = surface.resized_vocab_size(embed.num_embeddings, new_num_tokens, pad_to_multiple_of)
        if n == embed.num_embeddings:
            return embed
        config = self.config.replace(vocab_size=n)  # refuses a vocabulary without the pad/bos/eos ids
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        head = self.get_output_embeddings()
        untied = head is not None and head.weight is not embed.weight
        with torch.no_grad():
            for module in (embed, head) if untied else (embed,):
                w = module.weight
                rows = surface.resized_rows(w.detach().float().cpu().numpy(), n, mean_resizing, config.init_std, rng)
                module.weight = nn.Parameter(torch.from_numpy(rows).to(w.device, w.dtype), w.requires_grad)
        embed.num_embeddings = n
        if untied:
            head.out_features = n
        for m in self.modules():
            if getattr(m, "config", None) is self.config and m is not self:
                m.config = config
        self.config = config
        if hasattr(self, "tie_weights"):
            self.tie_weights()
        self.pack_weights()
        return embed


def refuse_split(model: nn.Module, what: str, instead: str) -> None:
    """A ValueError for `what` on a model split over processes or dispatched over devices (opt_torch.distributed)."""
    if getattr(model, "device_mesh", None) is not None or getattr(model, "hf_device_map", None) is not None:
        raise ValueError(f"{what} on a model split over processes or devices: {instead} (opt_torch.distributed)")


def _check_module(value, what: str, shape: tuple) -> None:
    weight = getattr(value, "weight", None)
    if not isinstance(value, nn.Module) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what} takes an nn.Module with a weight tensor (an nn.Embedding or nn.Linear), "
                        f"got {type(value).__name__}")
    if tuple(weight.shape) != shape:
        raise ValueError(f"{what}: the weight is {tuple(weight.shape)}; the model's config needs {shape} "
                         "(vocab_size, word_embed_proj_dim). resize_token_embeddings changes the vocabulary")


class CausalLMMethods:
    """Mixed into OPTForCausalLM, after GenerationMixin."""

    generation_config = None  # PEFT's generate assigns it; GenerationMixin's own, when it has one, comes first

    def _prepare_generation_config(self, generation_config=None, use_model_defaults: Optional[bool] = None,
                                   **kwargs) -> tuple:
        """What transformers.pipeline("text-generation", model=...) asks (opt_spec.generation.prepared_config):
        its defaults under generation_config.json's values, as with Hugging Face's PyTorch models."""
        return prepared_config(self.generation_config, generation_config, use_model_defaults, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      cache_position=None, use_cache: bool = True, **kwargs) -> dict:
        """The forward's inputs for the next step of a decode loop (opt_spec.surface.generation_inputs): the
        tokens the cache `past_key_values` (the model's KVCache, or a Hugging Face DynamicCache) has not seen.
        Hugging Face's loop also passes cache_position; the cache keeps its own write position, so it is not
        needed."""
        refuse_legacy_cache(past_key_values)
        past = cache_length(past_key_values) if past_key_values is not None else 0
        return surface.generation_inputs(input_ids, past, attention_mask, inputs_embeds,
                                         past_key_values=past_key_values, use_cache=use_cache, **kwargs)
