"""optkit's TensorFlow backend: OPT as Keras 3 models (tf.keras, TensorFlow ops) whose variable paths
map to the canonical weight names through opt_spec.layouts.

    model = TFOPTForCausalLM.from_pretrained("path/to/hf-dir")            # no torch needed
    out = model(input_ids, attention_mask=mask)                          # out.logits (B, T, V)
    step = tf.function(lambda ids, mask: model(ids, attention_mask=mask).logits, jit_compile=True)

Incremental decoding uses `KVCache`, opt_spec.cache's contract (`model.init_cache(B, max_length)`
preallocates one), which works eagerly and under XLA; its API is described in `opt_tf.modeling`. What
exists only for speed lives in `opt_tf.fast_paths`.

    tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=20, num_beams=4)  # (B, T + N)

`generate` (greedy, sampling, beam search; opt_spec.generation's semantics) runs its whole decode loop
as one XLA program, compiled once per shapes and settings (`opt_tf.generation`).
"""

from opt_spec import OPTConfig

from .checkpoint import canonical_names, variable_map
from .modeling import (KVCache, TFOPTForCausalLM, TFOPTForQuestionAnswering, TFOPTForSequenceClassification, TFOPTModel,
                       TFOPTPreTrainedModel, init_cache)

__all__ = ["KVCache", "OPTConfig", "TFOPTForCausalLM", "TFOPTForQuestionAnswering", "TFOPTForSequenceClassification",
           "TFOPTModel", "TFOPTPreTrainedModel", "canonical_names", "init_cache", "variable_map"]
