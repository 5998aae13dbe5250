"""A TensorFlow SavedModel of a model, for TF Serving and for programs without optkit (`tf.saved_model.load`
needs no optkit code: the graph and the weights are in the folder).

`model.save_pretrained(path, saved_model=True, version=1)` writes it to path/saved_model/<version> next to
the checkpoint, where transformers' TensorFlow models put theirs; `export_saved_model(model, folder)` writes
one anywhere. Both write atomically (a folder that was there stays whole until the new one is complete).

The signature `serving_default` takes `input_ids` and `attention_mask`, int32 (batch, length) of any sizes
(left-padded batches as the model takes them), and returns the head's outputs by Hugging Face's names:
`logits` (causal LM: (B, T, vocab); sequence classification: (B, num_labels)), `start_logits` and
`end_logits` (question answering), `last_hidden_state` (base model); the model's forward in inference mode.

`export_saved_model(model, folder, generate={"batch_size": B, "prompt_length": T, "max_new_tokens": N, ...})`
adds the endpoint `generate` (a causal LM's; `tf.saved_model.load(folder).generate(input_ids, attention_mask,
seed)`): the whole decode as one XLA program, with generate's settings fixed at export, for left-padded
prompts of exactly (B, T), returning {"sequences": what generate returns}; the seed (2,) int32 is the key
generate(seed=s) uses ([0, s]), for sampling. A SavedModel signature needs fixed shapes for XLA, hence B and T.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import tensorflow as tf

from opt_spec import io as spec_io
from opt_spec.weights import Head

OUTPUTS = {Head.BASE: ("last_hidden_state",), Head.CAUSAL_LM: ("logits",),
           Head.SEQUENCE_CLASSIFICATION: ("logits",), Head.QUESTION_ANSWERING: ("start_logits", "end_logits")}
SIGNATURE = [tf.TensorSpec((None, None), tf.int32, name="input_ids"),
             tf.TensorSpec((None, None), tf.int32, name="attention_mask")]


def export_saved_model(model, path: str | os.PathLike, generate: Optional[dict] = None) -> str:
    """Writes the model's SavedModel (module docstring) to the folder `path`; returns it. generate (a causal
    LM's): {"batch_size": B, "prompt_length": T, **generate's settings} adds the `generate` endpoint."""
    names = OUTPUTS[model.head]
    if generate is not None and model.head is not Head.CAUSAL_LM:
        raise ValueError(f"generate= needs a causal LM; {type(model).__name__} does not generate")

    def serving(input_ids, attention_mask):
        out = model(input_ids, attention_mask=attention_mask, training=False)
        return {name: getattr(out, name) for name in names}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serving, input_signature=SIGNATURE)
    if generate is not None:
        fn, spec = model._exportable_generate(**generate)
        archive.add_endpoint("generate", fn, input_signature=spec)
    with spec_io.atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
    return os.fspath(path)
