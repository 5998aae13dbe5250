"""optkit's JAX/Flax backend: OPT as flax.linen modules whose parameter paths are the canonical names.

A parameter's tree path joined by dots is its canonical (Hugging Face PyTorch) name with the leaf
renamed as `opt_spec.layouts.LEAF_NAMES["flax"]` says (kernel, bias, embedding, scale) and linear
kernels stored (in, out): `model.decoder.layers.0.fc1.weight` is `params["model"]["decoder"]["layers"]
["0"]["fc1"]["kernel"]`. A tied LM head is no parameter (the logits use the token embedding).

    model = FlaxOPTForCausalLM.from_pretrained("opt-125m", dtype=jnp.bfloat16)  # params stay float32
    out = model(input_ids, attention_mask=mask)          # out.logits (B, T, V)
    model.save_pretrained("out/")                         # loads in opt_torch / Hugging Face unchanged
    model.module, model.params                            # the linen module and a plain nested dict

KV cache (opt_spec.cache's contract; preallocated, static shapes, for incremental decoding under jax.jit):

    cache = model.init_cache(batch_size, max_length)    # KVCache: per layer keys/values (B, nh, S, hs),
                                                          # S = max_length (its capacity), and `length`
    out = model(prompt_ids, attention_mask=prompt_mask, past_key_values=cache)  # fills [0, T)
    mask = jnp.zeros((B, max_length), jnp.int32).at[:, :T + 1].set(1)          # the capacity, for jit
    step = jax.jit(lambda p, ids, mask, cache: model(ids, mask, params=p, past_key_values=cache))
    out = step(model.params, next_ids, mask, out.past_key_values)            # one token at length T

With a cache, `attention_mask` covers the past and the new tokens (B, length + T), as in Hugging Face, or
the cache's whole capacity (B, max_length); any other width is an error naming both. Under jit the
length is traced, so there the mask must cover the capacity. Positions come from that mask
(`cumsum(mask) * mask - 1`), the new tokens are written at [length, length + T) and the returned cache
(a new object: the one passed in is left as it was) has length + T. A step that does not fit raises
eagerly; under jit the caller keeps length + T <= max_length. A tuple of (keys, values) per layer is
refused: the KVCache is the one format.

Importing opt_flax imports neither torch nor tensorflow.
"""

from opt_spec import OPTConfig

from .modeling import (KVCache, Numerics, OPTForCausalLMModule, OPTForQuestionAnsweringModule,
                       OPTForSequenceClassificationModule, OPTModule)
from .pretrained import (FlaxOPTForCausalLM, FlaxOPTForQuestionAnswering, FlaxOPTForSequenceClassification,
                         FlaxOPTModel, FlaxOPTPreTrainedModel, canonical_to_params, params_to_canonical)

__all__ = [
    "FlaxOPTForCausalLM", "FlaxOPTForQuestionAnswering", "FlaxOPTForSequenceClassification", "FlaxOPTModel",
    "FlaxOPTPreTrainedModel", "KVCache", "Numerics", "OPTConfig", "OPTForCausalLMModule",
    "OPTForQuestionAnsweringModule", "OPTForSequenceClassificationModule", "OPTModule", "canonical_to_params",
    "params_to_canonical",
]
