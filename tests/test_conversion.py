"""Checkpoint conversion: every format round-trips bit-exactly through Hugging Face, metaseq files
(fused qkv, model-parallel parts) read back to the exact canonical tensors, converted checkpoints give
the same logits in the installed backends, and bad input fails clearly without touching DST."""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import conversion
from conversion import ConversionError, convert, detect_format, read_checkpoint
from conversion.cli import add_arguments, run
from opt_spec import OPTConfig, WeightMismatchError
from opt_spec import io as spec_io
from opt_spec.io import _find_mmap, release_pages
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_spec.torch_pickle import UnsafePickleError
from opt_spec.weights import strip_base_prefix
from opt_torch import OPTForCausalLM
from opt_torch.modeling import MODEL_CLASSES

from .conftest import max_abs_diff, temp_leftovers, tree_snapshot

ROUND_TRIP = [name for name, fmt in conversion.FORMATS.items() if fmt.write is not None]


def hf_dir(path, config, head="causal_lm", seed=0, dtype=np.float32):
    spec_io.save_safetensors_dir(path, random_weights(config, head, seed, dtype), config.to_dict())
    return str(path)


def digests(path, fmt=None, **kwargs) -> dict[str, tuple[str, str, tuple]]:
    """{canonical name: (sha256 of the tensor's bytes, dtype, shape)}."""
    ckpt = read_checkpoint(path, fmt, **kwargs)
    out = {}
    for name, ref in ckpt.tensors.items():
        a = np.ascontiguousarray(ref.load())
        out[name] = (hashlib.sha256(a.view(np.uint8)).hexdigest(), str(a.dtype), a.shape)
    return out


def torch_logits(path, head="causal_lm"):
    model = MODEL_CLASSES[head].from_pretrained(path)
    ids, mask = random_batch(model.config)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    main = out.logits if getattr(out, "logits", None) is not None else (
        out.start_logits if hasattr(out, "start_logits") else out.last_hidden_state)
    return main.numpy(), mask


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ROUND_TRIP)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_through_hf_is_bit_exact(tmp_path, fmt, name):
    config = VARIANTS[name]
    src = hf_dir(tmp_path / "src", config)
    first = convert(src, tmp_path / "a", to=fmt, progress=False)
    assert first.dst_format == fmt and detect_format(tmp_path / "a") == fmt
    convert(tmp_path / "a", tmp_path / "hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "b", to=fmt, progress=False)
    want = digests(src)
    assert digests(tmp_path / "a") == want
    assert digests(tmp_path / "hf") == want
    assert digests(tmp_path / "b") == want


@pytest.mark.parametrize("fmt", ["hf-tf", "hf-flax", "hf-pytorch"])
@pytest.mark.parametrize("head", ["base", "sequence_classification", "question_answering"])
def test_heads_round_trip(tmp_path, fmt, head):
    config = VARIANTS["post_ln_proj"]
    src = hf_dir(tmp_path / "src", config, head)
    convert(src, tmp_path / "a", to=fmt, progress=False)
    assert read_checkpoint(tmp_path / "a").head.value == head
    convert(tmp_path / "a", tmp_path / "b", progress=False)
    assert digests(tmp_path / "b") == digests(src)
    got, mask = torch_logits(str(tmp_path / "b"), head)
    want, _ = torch_logits(src, head)
    assert max_abs_diff(got, want, mask if got.shape[:2] == mask.shape else None) == 0.0


@pytest.mark.parametrize("fmt,index", [("hf-safetensors", "model.safetensors.index.json"),
                                       ("hf-pytorch", "pytorch_model.bin.index.json"),
                                       ("hf-tf", "tf_model.h5.index.json"),
                                       ("hf-flax", "flax_model.msgpack.index.json")])
def test_sharded_outputs_round_trip(tmp_path, fmt, index):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    convert(src, tmp_path / "a", to=fmt, progress=False, max_shard_size="20KB")
    files = os.listdir(tmp_path / "a")
    assert index in files and len(files) >= 4, files
    assert digests(tmp_path / "a") == digests(src)
    convert(tmp_path / "a", tmp_path / "b", to=fmt, progress=False)  # sharded in, single out
    assert index not in os.listdir(tmp_path / "b")
    assert digests(tmp_path / "b") == digests(src)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_cast(tmp_path, dtype):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    convert(src, tmp_path / "a", to="hf-pytorch", dtype=dtype, progress=False)
    got = read_checkpoint(tmp_path / "a")
    want = spec_io.numpy_dtype(dtype)
    for name, ref in got.tensors.items():
        assert ref.dtype == want
        np.testing.assert_array_equal(ref.load(), read_checkpoint(src).tensors[name].load().astype(want))
    assert json.load(open(tmp_path / "a" / "config.json"))["torch_dtype"] == dtype
    state = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True, mmap=True)
    assert all(str(t.dtype) == f"torch.{dtype}" for t in state.values())


def test_bfloat16_survives_every_format_that_stores_it(tmp_path):
    config = VARIANTS["no_bias"]
    src = hf_dir(tmp_path / "src", config, dtype=ml_dtypes.bfloat16)
    for fmt in ("hf-pytorch", "hf-flax", "torch-state-dict", "keras-weights", "flax-params"):
        convert(src, tmp_path / fmt, to=fmt, progress=False)
        assert digests(tmp_path / fmt) == digests(src)
    with pytest.raises(ConversionError, match="bfloat16"):
        convert(src, tmp_path / "tf", to="hf-tf", progress=False)
    assert not os.path.exists(tmp_path / "tf") and temp_leftovers(tmp_path) == []


# -------------------------------------------------------------------------- framework files
def test_pytorch_bin_interoperates_with_torch(tmp_path):
    config = VARIANTS["untied_head"]
    src = hf_dir(tmp_path / "src", config)
    model = OPTForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "torch-saved", safe_serialization=False)  # written by torch.save
    assert detect_format(tmp_path / "torch-saved") == "hf-pytorch"
    assert digests(tmp_path / "torch-saved") == digests(src)
    convert(src, tmp_path / "ours", to="hf-pytorch", progress=False)  # written without torch
    for mmap in (False, True):
        state = torch.load(tmp_path / "ours" / "pytorch_model.bin", weights_only=True, mmap=mmap)
        ref = read_checkpoint(src).tensors
        assert list(state) == list(ref)
        for name, t in state.items():
            np.testing.assert_array_equal(t.numpy(), ref[name].load())


def test_torch_state_dict_loads_strictly(tmp_path):
    config = VARIANTS["proj_pre_ln_gelu"]
    src = hf_dir(tmp_path / "src", config)
    convert(src, tmp_path / "sd.pt", progress=False)  # the suffix picks torch-state-dict, a bare file
    assert os.path.isfile(tmp_path / "sd.pt") and detect_format(tmp_path / "sd.pt") == "torch-state-dict"
    state = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert state["lm_head.weight"].data_ptr() == state["model.decoder.embed_tokens.weight"].data_ptr()
    model = OPTForCausalLM(config)
    model.load_state_dict(state, strict=True)
    ids, mask = random_batch(config)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    want, _ = torch_logits(src)
    assert max_abs_diff(got.numpy(), want, mask) == 0.0
    # a bare file has no config: the shapes (and the preset table for heads) give it back, or overrides do
    guessed = read_checkpoint(tmp_path / "sd.pt")
    assert any("num_attention_heads=1 guessed" in n for n in guessed.notes)  # 32 wide: no preset, hidden/64
    ckpt = read_checkpoint(tmp_path / "sd.pt", config_overrides={"activation_function": "gelu", "dropout": 0.0,
                                                                  "num_labels": 3, "num_attention_heads": 4})
    assert ckpt.config == config
    # and a state dict saved by torch itself reads the same
    torch.save(OPTForCausalLM.from_pretrained(src).state_dict(), tmp_path / "by-torch.pt")
    assert digests(tmp_path / "by-torch.pt", config_overrides={"num_attention_heads": 4}) == digests(src)


@pytest.mark.parametrize("fmt", ["hf-flax", "hf-tf"])
def test_reads_what_transformers_writes_and_transformers_reads_ours(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    config = VARIANTS["post_ln_proj"]  # HF's TF and Flax ports handle the bias/affine/tied defaults only
    src = hf_dir(tmp_path / "src", config)
    want, mask = torch_logits(src)
    ids, _ = random_batch(config)
    convert(src, tmp_path / "ours", to=fmt, progress=False)
    cls = transformers.FlaxOPTForCausalLM if fmt == "hf-flax" else transformers.TFOPTForCausalLM
    model = cls.from_pretrained(tmp_path / "ours")
    assert max_abs_diff(np.asarray(model(ids, attention_mask=mask).logits), want, mask) < 1e-4
    model.save_pretrained(tmp_path / "by-hf")
    assert detect_format(tmp_path / "by-hf") == fmt
    assert digests(tmp_path / "by-hf") == digests(src)
    model.save_pretrained(tmp_path / "by-hf-sharded", max_shard_size="20KB")
    assert len(os.listdir(tmp_path / "by-hf-sharded")) > 4
    assert digests(tmp_path / "by-hf-sharded") == digests(src)


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_converted_checkpoints_give_equal_logits_in_other_backends(tmp_path, backend):
    config = VARIANTS["post_ln_proj"]
    src = hf_dir(tmp_path / "src", config)
    want, mask = torch_logits(src)
    # a checkpoint that went through every writable format and back still gives the same logits
    path = src
    for i, fmt in enumerate(["hf-tf", "keras-weights", "hf-flax", "flax-params", "hf-pytorch", "torch-state-dict",
                             "hf-safetensors"]):
        convert(path, tmp_path / f"{i}", to=fmt, progress=False)
        path = str(tmp_path / f"{i}")
    ids, _ = random_batch(config)
    try:
        if backend == "tf":
            from opt_tf import TFOPTForCausalLM as cls
        else:
            from opt_flax import FlaxOPTForCausalLM as cls
        model = cls.from_pretrained(path)
    except (ImportError, NotImplementedError, AttributeError) as err:
        pytest.skip(f"opt_{backend} not usable yet: {err}")
    got = model(ids, attention_mask=mask).logits
    assert max_abs_diff(np.asarray(got), want, mask) < 1e-4


HEAD_OUTPUT = {"base": "last_hidden_state", "causal_lm": "logits", "sequence_classification": "logits",
               "question_answering": "start_logits"}


@pytest.mark.parametrize("head", list(HEAD_OUTPUT))
def test_keras_weights_load_into_opt_tf_and_back(tmp_path, head):
    opt_tf = pytest.importorskip("opt_tf")
    classes = {"base": "TFOPTModel", "causal_lm": "TFOPTForCausalLM",
               "sequence_classification": "TFOPTForSequenceClassification",
               "question_answering": "TFOPTForQuestionAnswering"}
    config = VARIANTS["untied_head" if head == "causal_lm" else "post_ln_proj"]
    src = hf_dir(tmp_path / "src", config, head)
    convert(src, tmp_path / "m.weights.h5", progress=False)
    model = getattr(opt_tf, classes[head])(config)
    model.load_weights(tmp_path / "m.weights.h5")  # Keras' own loader reads our file
    ids, mask = random_batch(config)
    got = np.asarray(getattr(model(ids, attention_mask=mask), HEAD_OUTPUT[head]))
    want, _ = torch_logits(src, head)
    assert max_abs_diff(got, want, mask if got.shape[:2] == mask.shape else None) < 1e-4
    model.save_weights(tmp_path / "by-keras.weights.h5")  # and we read Keras' own file
    assert detect_format(tmp_path / "by-keras.weights.h5") == "keras-weights"
    ckpt = read_checkpoint(tmp_path / "by-keras.weights.h5",
                           config_overrides={"num_attention_heads": config.num_attention_heads, "num_labels": 3})
    assert ckpt.head.value == head
    assert digests(tmp_path / "by-keras.weights.h5", config_overrides={"num_labels": 3}) == digests(src)


@pytest.mark.parametrize("head", list(HEAD_OUTPUT))
def test_flax_params_load_into_opt_flax_and_back(tmp_path, head):
    opt_flax = pytest.importorskip("opt_flax")
    from flax import serialization

    classes = {"base": "FlaxOPTModel", "causal_lm": "FlaxOPTForCausalLM",
               "sequence_classification": "FlaxOPTForSequenceClassification",
               "question_answering": "FlaxOPTForQuestionAnswering"}
    config = VARIANTS["untied_head" if head == "causal_lm" else "post_ln_proj"]
    src = hf_dir(tmp_path / "src", config, head)
    convert(src, tmp_path / "out", to="flax-params", progress=False)  # a directory: config.json + params
    cls = getattr(opt_flax, classes[head])
    template = cls(config).params
    params = serialization.from_bytes(template, (tmp_path / "out" / "flax_params.msgpack").read_bytes())
    model = cls(config, params=params)
    ids, mask = random_batch(config)
    got = np.asarray(getattr(model(ids, attention_mask=mask), HEAD_OUTPUT[head]))
    want, _ = torch_logits(src, head)
    assert max_abs_diff(got, want, mask if got.shape[:2] == mask.shape else None) < 1e-4
    (tmp_path / "by-flax.msgpack").write_bytes(serialization.to_bytes(model.params))
    assert detect_format(tmp_path / "by-flax.msgpack") == "flax-params"
    assert read_checkpoint(tmp_path / "by-flax.msgpack", config_overrides={"num_labels": 3}).head.value == head
    assert digests(tmp_path / "by-flax.msgpack", config_overrides={"num_labels": 3}) == digests(src)


# ------------------------------------------------------------------------------------- metaseq
_COLUMN = ("q_proj", "k_proj", "v_proj", "fc1")


def metaseq_parts(config, weights, parts: int, fused: bool):
    """Splits canonical weights the way metaseq's model-parallel training stores them (written here
    independently of conversion/metaseq.py's code, from the rules its docstring states)."""
    renames = {"decoder.project_in.weight": "decoder.project_in_dim.weight",
               "decoder.project_out.weight": "decoder.project_out_dim.weight",
               "decoder.final_layer_norm.weight": "decoder.layer_norm.weight",
               "decoder.final_layer_norm.bias": "decoder.layer_norm.bias"}
    out = []
    for p in range(parts):
        sd = {}
        for name, w in weights.items():
            base = strip_base_prefix(name)
            module, leaf = base.split(".")[-2:]
            if module == "embed_tokens" or module in _COLUMN:
                w = np.split(w, parts, axis=0)[p]
            elif module in ("out_proj", "fc2") and leaf == "weight":
                w = np.split(w, parts, axis=1)[p]
            sd[renames.get(base, base)] = torch.from_numpy(np.ascontiguousarray(w))
        if fused:
            for i in range(config.num_hidden_layers):
                for leaf in ("weight", "bias"):
                    names = [f"decoder.layers.{i}.self_attn.{x}.{leaf}" for x in ("k_proj", "v_proj", "q_proj")]
                    if names[0] in sd:
                        sd[f"decoder.layers.{i}.self_attn.qkv_proj.{leaf}"] = torch.cat([sd.pop(n) for n in names])
        sd["decoder.version"] = torch.tensor([3.0])
        sd["decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]  # tied: same storage
        out.append(sd)
    return out


class TrainerState:  # stands in for the optimizer/omegaconf objects real metaseq files carry
    def __init__(self):
        self.step = 7


@pytest.mark.parametrize("name,parts,fused,style", [
    ("pre_ln", 2, True, "args"), ("post_ln_proj", 2, True, "cfg"), ("no_bias", 1, False, "args"),
    ("proj_pre_ln_gelu", 2, False, "cfg"), ("no_final_ln", 2, True, "none")])
def test_metaseq_reads_exactly(tmp_path, name, parts, fused, style):
    config = VARIANTS[name]
    weights = random_weights(config, "causal_lm", dtype=np.float16)
    hyper = dict(decoder_attention_heads=config.num_attention_heads, activation_fn=config.activation_function,
                 decoder_normalize_before=config.do_layer_norm_before, model_parallel_size=parts)
    for p, sd in enumerate(metaseq_parts(config, weights, parts, fused)):
        obj = {"model": sd, "extra_state": {"trainer": TrainerState()}}
        if style == "args":
            obj["args"] = argparse.Namespace(**hyper)
        elif style == "cfg":
            obj["cfg"] = {"model": hyper, "common": {"fp16": True}}
        fname = f"reshard-model_part-{p}.pt" if parts > 1 else "restored.pt"
        (tmp_path / "metaseq").mkdir(exist_ok=True)
        torch.save(obj, tmp_path / "metaseq" / fname)
    src = tmp_path / "metaseq" if parts > 1 else tmp_path / "metaseq" / "restored.pt"
    assert detect_format(src) == "metaseq"
    overrides = None
    if style == "none":  # no args: what shapes cannot tell (heads; pre-LN without a final LN) comes from overrides
        overrides = {"num_attention_heads": config.num_attention_heads, "do_layer_norm_before": True}
    summary = convert(src, tmp_path / "hf", progress=False, config_overrides=overrides)
    assert summary.tensors == len(weights)
    got = read_checkpoint(tmp_path / "hf")
    assert got.config == config.replace(dropout=got.config.dropout, num_labels=2)  # shapes can't tell those
    assert set(got.tensors) == set(weights)
    for n, w in weights.items():
        a = got.tensors[n].load()
        assert a.dtype == np.float16 and np.array_equal(a.view(np.uint16), w.view(np.uint16)), n
    assert any("decoder.version" in note for note in summary.notes)
    assert any("output_projection" in note for note in summary.notes)
    # and it computes what the original weights compute
    spec_io.save_safetensors_dir(tmp_path / "ref", weights, config.to_dict())
    want, mask = torch_logits(str(tmp_path / "ref"))
    got_logits, _ = torch_logits(str(tmp_path / "hf"))
    assert max_abs_diff(got_logits, want, mask) == 0.0


def test_metaseq_single_part_file_collects_its_siblings(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = random_weights(config)
    for p, sd in enumerate(metaseq_parts(config, weights, 2, True)):
        torch.save({"model": sd, "args": argparse.Namespace(decoder_attention_heads=4)},
                   tmp_path / f"checkpoint_last-model_part-{p}.pt")
    ckpt = read_checkpoint(tmp_path / "checkpoint_last-model_part-1.pt")
    assert len(ckpt.files) == 2 and ckpt.format == "metaseq"
    np.testing.assert_array_equal(ckpt.tensors["model.decoder.layers.1.self_attn.q_proj.weight"].load(),
                                  weights["model.decoder.layers.1.self_attn.q_proj.weight"])


def test_metaseq_untied_output_projection_becomes_lm_head(tmp_path):
    config = VARIANTS["untied_head"]
    weights = random_weights(config)
    sds = metaseq_parts(config, weights, 2, True)
    for p, sd in enumerate(sds):
        sd["decoder.output_projection.weight"] = torch.from_numpy(np.split(weights["lm_head.weight"], 2)[p].copy())
        torch.save({"model": sd, "args": argparse.Namespace(decoder_attention_heads=4)},
                   tmp_path / f"reshard-model_part-{p}.pt")
    ckpt = read_checkpoint(tmp_path / "reshard-model_part-0.pt")
    assert ckpt.config.tie_word_embeddings is False and any("untied" in n for n in ckpt.notes)
    np.testing.assert_array_equal(ckpt.tensors["lm_head.weight"].load(), weights["lm_head.weight"])


def test_metaseq_damaged_and_fsdp_files_fail_clearly(tmp_path):
    config = VARIANTS["pre_ln"]
    (sd,) = metaseq_parts(config, random_weights(config), 1, True)
    torch.save({"model": sd}, tmp_path / "restored.pt")
    _truncate(tmp_path / "restored.pt")
    with pytest.raises(ValueError, match="restored.pt"):
        convert(tmp_path / "restored.pt", tmp_path / "out", src_format="metaseq", progress=False)
    assert not os.path.exists(tmp_path / "out") and temp_leftovers(tmp_path) == []
    torch.save({"model": {"flat_param_0": torch.zeros(10), "decoder.version": torch.zeros(1)}},
               tmp_path / "fsdp.pt")
    with pytest.raises(ConversionError, match="FSDP"):
        read_checkpoint(tmp_path / "fsdp.pt", "metaseq")


def test_metaseq_missing_part_and_unknown_key_fail_clearly(tmp_path):
    config = VARIANTS["pre_ln"]
    sds = metaseq_parts(config, random_weights(config), 2, True)
    torch.save({"model": sds[1]}, tmp_path / "reshard-model_part-1.pt")
    with pytest.raises(ConversionError, match="not 0..K-1"):
        read_checkpoint(tmp_path, "metaseq")
    sds[0]["decoder.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save({"model": sds[0]}, tmp_path / "restored.pt")
    with pytest.raises(WeightMismatchError, match="decoder.layers.0.mystery.weight"):
        read_checkpoint(tmp_path / "restored.pt", "metaseq")


# ---------------------------------------------------------------------------- detection, CLI
def test_detect_format_names_every_layout_and_lists_what_it_saw(tmp_path):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    assert detect_format(src) == "hf-safetensors"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.npz").write_bytes(b"not a checkpoint")
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    with pytest.raises(ConversionError) as err:
        detect_format(tmp_path / "odd")
    assert "notes.txt" in str(err.value) and "weights.npz" in str(err.value) and "hf-safetensors" in str(err.value)
    with pytest.raises(ConversionError, match="starting with"):
        detect_format(tmp_path / "odd" / "notes.txt")


def test_cli_converts_and_reports(tmp_path, capsys):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    parser = add_arguments(argparse.ArgumentParser())
    assert run(parser.parse_args([src, str(tmp_path / "out"), "--to", "pytorch", "--dtype", "float16"])) == 0
    captured = capsys.readouterr()
    assert "found hf-safetensors" in captured.err
    line = captured.out.strip()
    assert line.startswith("wrote hf-pytorch") and "tensors" in line and "parameters" in line and " s " in line
    assert run(parser.parse_args([src, str(tmp_path / "out"), "--quiet"])) == 1  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert run(parser.parse_args([str(tmp_path / "out"), str(tmp_path / "out2"), "--quiet", "--to", "metaseq"])) == 1
    assert "read-only" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert run(parser.parse_args([str(tmp_path / "junk"), str(tmp_path / "out3"), "--quiet"])) == 1
    assert "matches no known checkpoint layout" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
    src = hf_dir(tmp_path / "src", VARIANTS["pre_ln"])
    proc = subprocess.run([sys.executable, "-m", "conversion", src, str(tmp_path / "out.pt"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote torch-state-dict") and os.path.isfile(tmp_path / "out.pt")
    for mod in ("tensorflow", "jax", "flax"):
        code = f"import sys, conversion.cli; assert {mod!r} not in sys.modules"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------- bad input
def _truncate(path, keep=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _garble(path):
    data = bytearray(open(path, "rb").read())
    for i in range(0, min(len(data), 4096), 7):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


WEIGHT_FILES = {"hf-safetensors": "model.safetensors", "hf-pytorch": "pytorch_model.bin",
                "hf-tf": "tf_model.h5", "hf-flax": "flax_model.msgpack"}


@pytest.mark.parametrize("fmt", list(WEIGHT_FILES))
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_files_fail_clearly_and_leave_dst_untouched(tmp_path, fmt, damage):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    convert(src, tmp_path / "a", to=fmt, progress=False)
    (_truncate if damage == "truncated" else _garble)(tmp_path / "a" / WEIGHT_FILES[fmt])
    hf_dir(tmp_path / "dst", VARIANTS["no_bias"], seed=5)  # an existing DST that force must not lose
    before = tree_snapshot(tmp_path / "dst")
    with pytest.raises((ValueError, OSError)) as err:
        convert(tmp_path / "a", tmp_path / "dst", to="hf-pytorch", src_format=fmt, force=True, progress=False)
    assert f"a/{WEIGHT_FILES[fmt]}: " in str(err.value)  # names the damaged file
    assert any(word in str(err.value) for word in ("truncated", "corrupt", "Bad magic"))
    assert tree_snapshot(tmp_path / "dst") == before and temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["hf-safetensors", "hf-pytorch", "hf-tf", "hf-flax"])
def test_wrong_shapes_and_unknown_keys_are_named(tmp_path, fmt):
    config = VARIANTS["pre_ln"]
    weights = random_weights(config)
    weights["model.decoder.layers.1.fc1.weight"] = weights["model.decoder.layers.1.fc1.weight"][:-1]
    weights["model.decoder.layers.0.adapter.weight"] = np.zeros((2, 2), np.float32)
    bad = tmp_path / "bad"
    spec_io.save_safetensors_dir(bad, weights, config.to_dict())
    with pytest.raises(WeightMismatchError) as err:
        convert(bad, tmp_path / "dst", to=fmt, progress=False)
    assert "layers.1.fc1.weight is (47, 32)" in str(err.value) and "adapter" in str(err.value)
    assert not os.path.exists(tmp_path / "dst") and temp_leftovers(tmp_path) == []
    # the same problems in a non-safetensors source are named in that format's own names
    good = hf_dir(tmp_path / "good", config)
    convert(good, tmp_path / "native", to=fmt, progress=False)
    with pytest.raises(WeightMismatchError, match="missing"):
        read_checkpoint(tmp_path / "native", config_overrides={"num_hidden_layers": 3})


def test_existing_destination_needs_force_and_is_replaced_whole(tmp_path):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    hf_dir(tmp_path / "dst", VARIANTS["no_bias"], seed=3)
    (tmp_path / "dst" / "stale.txt").write_text("old")
    before = tree_snapshot(tmp_path / "dst")
    with pytest.raises(FileExistsError):
        convert(src, tmp_path / "dst", progress=False)
    assert tree_snapshot(tmp_path / "dst") == before
    convert(src, tmp_path / "dst", force=True, progress=False)
    assert sorted(os.listdir(tmp_path / "dst")) == ["config.json", "model.safetensors"]
    assert digests(tmp_path / "dst") == digests(src)
    with pytest.raises(ConversionError, match="inside the source"):
        convert(src, tmp_path / "src" / "nested", progress=False)


def test_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    calls = []
    real = conversion.hf.produce

    def interrupted(ref, dtype):
        calls.append(ref.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(ref, dtype)

    monkeypatch.setattr(conversion.hf, "produce", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "dst", to="hf-pytorch", progress=False)
    assert not os.path.exists(tmp_path / "dst") and temp_leftovers(tmp_path) == []


def test_pickles_with_foreign_objects_are_refused(tmp_path):
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    convert(src, tmp_path / "bin", to="hf-pytorch", progress=False)
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    state["model.decoder.layers.0.fc1.weight"] = TrainerState()  # an arbitrary class inside a state dict
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match="TrainerState"):
        read_checkpoint(tmp_path / "bin")
    # metaseq files may carry such objects outside the model (left unread), never inside it
    torch.save({"model": {"decoder.embed_tokens.weight": TrainerState()}}, tmp_path / "restored.pt")
    with pytest.raises(ConversionError, match="not a tensor"):
        read_checkpoint(tmp_path / "restored.pt", "metaseq")


def test_reading_is_lazy_and_streams(tmp_path):
    """Opening a checkpoint reads no tensor data; tensors come memory-mapped, one at a time."""
    config = VARIANTS["pre_ln"]
    src = hf_dir(tmp_path / "src", config)
    for fmt in ("hf-pytorch", "hf-tf", "hf-flax"):
        convert(src, tmp_path / fmt, to=fmt, progress=False)
        ckpt = read_checkpoint(tmp_path / fmt)
        a = ckpt.tensors["model.decoder.embed_tokens.weight"].load()
        assert not a.flags.owndata and _find_mmap(a) is not None, fmt  # a view of the mapped file, not a copy
        release_pages(a)  # and its pages can be dropped once written


_STREAM_CHILD = r"""
import json, sys
import h5py, conversion  # imported before measuring: module code is not checkpoint memory

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

src, out, formats = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
conversion.convert(src, out + "/warm", to="hf-pytorch", progress=False)  # lazy imports, allocator warm-up
growth = {}
for fmt in formats:
    for a, b, to in ((src, out + "/" + fmt, fmt), (out + "/" + fmt, out + "/" + fmt + "-back", None)):
        reset_peak()
        base = status("VmRSS")
        conversion.convert(a, b, to=to, progress=False)
        growth[f"{fmt} {'write' if to else 'read'}"] = status("VmHWM") - base
print(json.dumps(growth))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_conversion_streams_one_tensor_at_a_time(tmp_path):
    """Every writer and reader holds about one tensor (and its converted copy), never the checkpoint."""
    config = OPTConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=16, ffn_dim=1024,
                       num_attention_heads=4, max_position_embeddings=64)
    weights = random_weights(config)
    size = sum(w.nbytes for w in weights.values())
    largest = max(w.nbytes for w in weights.values())
    spec_io.save_safetensors_dir(tmp_path / "src", weights, config.to_dict())
    del weights
    proc = subprocess.run([sys.executable, "-c", _STREAM_CHILD, str(tmp_path / "src"), str(tmp_path / "out"),
                           ",".join(ROUND_TRIP)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert size > 50e6 and largest < 0.05 * size
    worst = max(growth, key=growth.get)
    assert growth[worst] < 0.25 * size, (f"{worst}: peak memory grew {growth[worst] / 1e6:.1f} MB converting a "
                                         f"{size / 1e6:.1f} MB checkpoint (largest tensor {largest / 1e6:.1f} MB)")


def test_head_checkpoint_with_base_names_reads_as_the_head_model(tmp_path):
    """facebook/opt-* on the Hub store decoder.* names (saved from the base model) next to a head."""
    config = VARIANTS["untied_head"]
    weights = random_weights(config)
    hub_style = {strip_base_prefix(n): w for n, w in weights.items()}
    spec_io.save_safetensors_dir(tmp_path / "hub", hub_style, config.to_dict())
    ckpt = read_checkpoint(tmp_path / "hub")
    assert ckpt.head.value == "causal_lm" and any("renamed" in n for n in ckpt.notes)
    convert(tmp_path / "hub", tmp_path / "tf", to="hf-tf", progress=False)
    assert digests(tmp_path / "tf") == digests(hf_dir(tmp_path / "src", config))


# ------------------------------------------------------------------------------- side files
def test_converted_folder_keeps_generation_config_and_tokenizer(tmp_path):
    """A converted folder holds the source's generation_config.json and tokenizer files, byte for byte, in every
    directory format; a side file that is a symlink out of the source folder refuses the conversion and leaves
    no destination."""
    config = OPTConfig.from_preset("tiny")
    src = hf_dir(tmp_path / "src", config)
    side = {"generation_config.json": b'{"max_new_tokens": 7, "do_sample": true}',
            "vocab.json": b'{"a": 0}', "merges.txt": b"#version: 0.2\na b\n", "tokenizer_config.json": b"{}"}
    for name, data in side.items():
        (tmp_path / "src" / name).write_bytes(data)
    for fmt in ROUND_TRIP:
        dst = tmp_path / f"out-{fmt}"
        summary = convert(src, dst, to=fmt, progress=False)
        if not os.path.isdir(dst):  # a single-file format has no folder to keep them in
            continue
        assert {name: (dst / name).read_bytes() for name in side} == side, fmt
        assert all(str(dst / name) in summary.files for name in side), fmt
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    os.symlink(outside, tmp_path / "src" / "special_tokens_map.json")
    with pytest.raises(spec_io.CheckpointError, match="outside the checkpoint folder"):
        convert(src, tmp_path / "refused", progress=False)
    assert not os.path.lexists(tmp_path / "refused") and temp_leftovers(tmp_path) == []
