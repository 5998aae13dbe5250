"""The TensorFlow SavedModel export (opt_tf.export): every head's serving signature gives the model's outputs,
read back by TensorFlow alone in a process where optkit cannot be imported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights

pytest.importorskip("tensorflow")

HEADS = {"base": ("last_hidden_state",), "causal_lm": ("logits",), "sequence_classification": ("logits",),
         "question_answering": ("start_logits", "end_logits")}

READER = r"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("opt_spec", "opt_tf", "opt_torch", "opt_flax"):
            raise ImportError(f"{name} must not be needed to read a SavedModel")
sys.meta_path.insert(0, Refuse())
import numpy as np, tensorflow as tf
job = json.load(open(sys.argv[1]))
inputs = np.load(job["inputs"])
out = {}
for head, folder in job["folders"].items():
    serve = tf.saved_model.load(folder).signatures["serving_default"]
    for k, v in serve(input_ids=tf.constant(inputs["ids"]), attention_mask=tf.constant(inputs["mask"])).items():
        out[f"{head}/{k}"] = v.numpy()
np.savez(job["outputs"], **out)
"""


def test_every_heads_saved_model_gives_its_outputs_without_optkit(tmp_path):
    from opt_tf.modeling import MODEL_CLASSES

    config = VARIANTS["post_ln_proj"]
    ids, mask = random_batch(config, seed=1)
    ids, mask = ids.astype(np.int32), mask.astype(np.int32)
    want, folders = {}, {}
    for head, names in HEADS.items():
        source = tmp_path / f"source-{head}"
        spec_io.save_safetensors_dir(source, random_weights(config, head, seed=5), config.to_dict())
        model = {h.value: cls for h, cls in MODEL_CLASSES.items()}[head].from_pretrained(source)
        out = model(ids, attention_mask=mask)
        want.update({f"{head}/{n}": getattr(out, n).numpy() for n in names})
        files = model.save_pretrained(tmp_path / head, saved_model=True, version=3)
        folders[head] = str(tmp_path / head / "saved_model" / "3")
        assert folders[head] in files and os.path.isfile(os.path.join(folders[head], "saved_model.pb"))
        assert (tmp_path / head / "model.safetensors").is_file()  # the checkpoint as well
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask)
    job = {"inputs": str(tmp_path / "inputs.npz"), "outputs": str(tmp_path / "outputs.npz"), "folders": folders}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
    run = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "job.json")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = dict(np.load(tmp_path / "outputs.npz"))
    assert got.keys() == want.keys()
    for key in want:
        rows = mask.astype(bool) if got[key].ndim >= 2 and got[key].shape[:2] == mask.shape else None
        a, b = (got[key][rows], want[key][rows]) if rows is not None else (got[key], want[key])
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5, key


def test_a_bad_version_is_refused_before_anything_is_written(tmp_path):
    from opt_tf import TFOPTForCausalLM

    config = VARIANTS["pre_ln"]
    spec_io.save_safetensors_dir(tmp_path / "source", random_weights(config, seed=5), config.to_dict())
    model = TFOPTForCausalLM.from_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match="version='v1': a SavedModel version is a non-negative integer"):
        model.save_pretrained(tmp_path / "out", saved_model=True, version="v1")
    assert not (tmp_path / "out").exists()


def test_the_generate_endpoint_gives_generates_tokens(tmp_path):
    """export_saved_model(generate=...): greedy with rows ending early at an EOS list, beams returning two each and
    seeded sampling read back from the SavedModel give model.generate's sequences, each seed its own."""
    import tensorflow as tf

    from opt_tf import TFOPTForCausalLM
    from opt_tf.export import export_saved_model

    config = VARIANTS["pre_ln"]
    spec_io.save_safetensors_dir(tmp_path / "source", random_weights(config, seed=5), config.to_dict())
    model = TFOPTForCausalLM.from_pretrained(tmp_path / "source")
    ids, mask = (a.astype(np.int32) for a in random_batch(config, seed=1))
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1).numpy()[:, -1]
    cases = {"eos": dict(max_new_tokens=6, eos_token_id=sorted(set(first.tolist()))),
             "beams": dict(max_new_tokens=5, num_beams=3, num_return_sequences=2),
             "sampling": dict(max_new_tokens=5, do_sample=True, num_return_sequences=2, top_k=10)}
    for name, settings in cases.items():
        export_saved_model(model, tmp_path / name, generate=dict(batch_size=3, prompt_length=9, **settings))
        loaded = tf.saved_model.load(str(tmp_path / name))  # kept: its variables live as long as it does
        generate = loaded.generate
        draws = []
        for seed in (7, 8):
            got = generate(tf.constant(ids), tf.constant(mask), tf.constant([0, seed], tf.int32))["sequences"]
            want = model.generate(ids, attention_mask=mask, seed=seed, **settings)
            assert np.array_equal(got.numpy(), want.numpy()), (name, seed)
            draws.append(got.numpy())
        assert (not np.array_equal(*draws)) == (name == "sampling")
        assert draws[0].shape[1] == (10 if name == "eos" else 9 + settings["max_new_tokens"])
    with pytest.raises(ValueError, match="stop_strings cannot be exported"):
        export_saved_model(model, tmp_path / "bad", generate=dict(batch_size=1, prompt_length=4, stop_strings=["x"]))
    with pytest.raises(ValueError, match="is more than the model's max_position_embeddings"):
        export_saved_model(model, tmp_path / "bad", generate=dict(batch_size=1, prompt_length=30, max_new_tokens=20))
    assert not (tmp_path / "bad").exists()
