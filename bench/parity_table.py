"""Max |difference| of float32 outputs, per OPT variant and head, between the backends and against
Hugging Face transformers 4.57.6 (PyTorch), on random varied weights and a left-padded batch of 3,
over real (unpadded) positions. Prints a Markdown table.

    python bench/parity_table.py [--backends torch,tf,flax] [--heads causal_lm,base,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from opt_spec import HEADS  # noqa: E402
from opt_spec import io as spec_io  # noqa: E402
from opt_spec.testing import VARIANTS, random_batch, random_weights  # noqa: E402

HF_NAMES = {"base": "OPTModel", "causal_lm": "OPTForCausalLM",
            "sequence_classification": "OPTForSequenceClassification",
            "question_answering": "OPTForQuestionAnswering"}


def main_outputs(out, head):
    """The head's outputs as NumPy arrays (QA: start and end logits stacked on the last axis)."""
    if head == "base":
        return np.asarray(out.last_hidden_state)
    if head == "question_answering":
        return np.stack([np.asarray(out.start_logits), np.asarray(out.end_logits)], -1)
    return np.asarray(out.logits)


def run_torch(path, head, ids, mask):
    import torch

    from opt_torch.modeling import MODEL_CLASSES

    with torch.no_grad():
        out = MODEL_CLASSES[head].from_pretrained(path)(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    return main_outputs(out, head)


def run_hf(path, head, ids, mask):
    import torch
    import transformers

    model = getattr(transformers, HF_NAMES[head]).from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return main_outputs(out, head)


def run_tf(path, head, ids, mask):
    import tensorflow as tf

    import opt_tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per model is intended here
    cls = {"base": opt_tf.TFOPTModel, "causal_lm": opt_tf.TFOPTForCausalLM,
           "sequence_classification": opt_tf.TFOPTForSequenceClassification,
           "question_answering": opt_tf.TFOPTForQuestionAnswering}[head]
    model = cls.from_pretrained(path)
    eager = main_outputs(model(ids, attention_mask=mask), head)
    xla = tf.function(lambda i, m: model(i, attention_mask=m), jit_compile=True)
    return eager, main_outputs(xla(tf.constant(ids), tf.constant(mask)), head)


def run_flax(path, head, ids, mask):
    import jax

    import opt_flax

    cls = {"base": opt_flax.FlaxOPTModel, "causal_lm": opt_flax.FlaxOPTForCausalLM,
           "sequence_classification": opt_flax.FlaxOPTForSequenceClassification,
           "question_answering": opt_flax.FlaxOPTForQuestionAnswering}[head]
    model = cls.from_pretrained(path)
    eager = main_outputs(model(ids, attention_mask=mask), head)
    jitted = jax.jit(lambda p, i, m: model(i, attention_mask=m, params=p))(model.params, ids, mask)
    return eager, main_outputs(jitted, head)


def masked_max(a, b, mask):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if d.shape[:2] == mask.shape:
        d = d[mask.astype(bool)]
    return float(d.max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,tf,flax")
    parser.add_argument("--heads", default=",".join(HEADS))
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    columns = ["torch vs HF"] if "torch" in backends else []
    for b, modes in (("tf", ("eager", "XLA")), ("flax", ("eager", "jit"))):
        if b in backends:
            columns += [f"{b} {m} vs torch" for m in modes]
    print("| variant | head | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    worst = 0.0
    with tempfile.TemporaryDirectory() as root:
        for name, config in VARIANTS.items():
            for head in args.heads.split(","):
                path = os.path.join(root, f"{name}-{head}")
                spec_io.save_safetensors_dir(path, random_weights(config, head, seed=7), config.to_dict())
                ids, mask = random_batch(config, seed=1)
                ref = run_torch(path, head, ids, mask)
                row = []
                if "torch" in backends:
                    row.append(masked_max(ref, run_hf(path, head, ids, mask), mask))
                if "tf" in backends:
                    row += [masked_max(ref, out, mask) for out in run_tf(path, head, ids, mask)]
                if "flax" in backends:
                    row += [masked_max(ref, out, mask) for out in run_flax(path, head, ids, mask)]
                worst = max(worst, *row)
                print(f"| {name} | {head} | " + " | ".join(f"{d:.1e}" for d in row) + " |", flush=True)
    print(f"\nlargest difference: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
