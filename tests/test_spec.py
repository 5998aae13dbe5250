"""opt_spec: config round trips and validation, the weight table, the numeric rules, safetensors I/O."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from opt_spec import (HEADS, PRESETS, OPTConfig, WeightMismatchError, check_weights, count_parameters, layouts,
                      normalize_names, numerics, weight_table)
from opt_spec import io as spec_io
from opt_spec.errors import ConfigError
from opt_spec.testing import VARIANTS, random_batch, random_weights

# Published parameter counts (millions, rounded) of the causal-LM checkpoints.
PUBLISHED_MILLIONS = {"125m": 125, "350m": 331, "1.3b": 1316, "2.7b": 2652, "6.7b": 6658, "13b": 12853,
                      "30b": 29975, "66b": 65720, "175b": 174604}

HUB_125M_CONFIG = {
    "_name_or_path": "facebook/opt-125m", "_remove_final_layer_norm": False, "activation_dropout": 0.0,
    "activation_function": "relu", "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 3072,
    "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048,
    "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True,
    "vocab_size": 50272, "word_embed_proj_dim": 768,
}


@pytest.mark.parametrize("preset", [p for p in PRESETS if not p.startswith("tiny")])
def test_presets_round_trip_and_match_published_sizes(preset, tmp_path):
    config = OPTConfig.from_preset(preset)
    path = tmp_path / "config.json"
    config.to_json_file(path)
    again = OPTConfig.from_json_file(path)
    assert again == config
    assert round(count_parameters(config) / 1e6) == PUBLISHED_MILLIONS[preset]
    assert OPTConfig.from_preset(f"facebook/opt-{preset}") == config


def test_350m_is_post_ln_with_projections():
    c = OPTConfig.from_preset("350m")
    assert not c.do_layer_norm_before and c.has_projections and not c.has_final_layer_norm
    names = {w.name for w in weight_table(c)}
    assert "model.decoder.project_in.weight" in names and "model.decoder.final_layer_norm.weight" not in names


def test_hub_config_keeps_unknown_keys(tmp_path):
    config = OPTConfig.from_dict(HUB_125M_CONFIG)
    assert config == OPTConfig.from_preset("125m").replace(dropout=0.1)
    assert config.extra["prefix"] == "</s>" and config.extra["activation_dropout"] == 0.0
    config.to_json_file(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in HUB_125M_CONFIG.items():
        assert written[key] == value, key
    assert OPTConfig.from_json_file(tmp_path / "config.json") == config


def test_word_embed_proj_dim_defaults_to_hidden_size():
    data = {k: v for k, v in HUB_125M_CONFIG.items() if k != "word_embed_proj_dim"}
    data["hidden_size"] = 256
    data["num_attention_heads"] = 4
    assert OPTConfig.from_dict(data).word_embed_proj_dim == 256


def test_num_labels_from_id2label():
    config = OPTConfig.from_dict({**HUB_125M_CONFIG, "id2label": {"0": "neg", "1": "neu", "2": "pos"}})
    assert config.num_labels == 3
    assert config.to_dict()["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 100, "divisible by num_attention_heads"),
    ("activation_function", "gelu_fast2", "unknown activation"),
    ("num_hidden_layers", 0, "must be positive"),
    ("vocab_size", -5, "must be positive"),
    ("ffn_dim", "3072", "must be an int"),
    ("do_layer_norm_before", "yes", "must be a bool"),
    ("dropout", 1.5, "[0, 1)"),
    ("pad_token_id", 99999, "vocab_size"),
    ("problem_type", "ranking", "problem_type"),
])
def test_bad_config_names_field_and_value(field, value, words):
    with pytest.raises(ValueError) as err:
        OPTConfig(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value) and words in str(err.value)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OPTConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        OPTConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        OPTConfig.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown OPT preset"):
        OPTConfig.from_preset("7b")


def test_config_is_frozen():
    config = OPTConfig()
    with pytest.raises(Exception):
        config.hidden_size = 5  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_weight_table_names_are_unique_and_prefixed(name, head):
    config = VARIANTS[name]
    table = weight_table(config, head)
    names = [w.name for w in table]
    assert len(set(names)) == len(names)
    base = [n for n in names if "decoder." in n]
    assert all(n.startswith("decoder.") == (head == "base") for n in base)
    kinds = {w.name: w.kind.value for w in table}
    assert kinds[base[0]] == "embedding"
    if config.enable_bias:
        assert any(k == "linear_bias" for k in kinds.values())
    else:
        assert not any(n.endswith("proj.bias") or ".fc" in n and n.endswith("bias") for n in names)


def test_check_weights_lists_every_problem():
    config = VARIANTS["pre_ln"]
    weights = random_weights(config, "causal_lm")
    check_weights(weights, config, "causal_lm")  # tied head may be absent
    del weights["model.decoder.layers.1.fc1.bias"]
    weights["model.decoder.layers.0.fc2.weight"] = weights["model.decoder.layers.0.fc2.weight"].T
    weights["model.decoder.layers.9.fc1.weight"] = np.zeros(3)
    with pytest.raises(WeightMismatchError) as err:
        check_weights(weights, config, "causal_lm")
    msg = str(err.value)
    assert "missing (1): model.decoder.layers.1.fc1.bias" in msg
    assert "unexpected (1): model.decoder.layers.9.fc1.weight" in msg
    assert "model.decoder.layers.0.fc2.weight is (48, 32), expected (32, 48)" in msg


def test_normalize_names_maps_base_and_head_checkpoints():
    names = ["decoder.embed_tokens.weight", "model.decoder.layers.0.fc1.weight", "lm_head.weight"]
    assert normalize_names(names, "causal_lm") == {
        "decoder.embed_tokens.weight": "model.decoder.embed_tokens.weight",
        "model.decoder.layers.0.fc1.weight": "model.decoder.layers.0.fc1.weight",
        "lm_head.weight": "lm_head.weight"}
    assert normalize_names(names, "base")["model.decoder.layers.0.fc1.weight"] == "decoder.layers.0.fc1.weight"


def test_layouts_transpose_only_linear_weights():
    config = VARIANTS["post_ln_proj"]
    for spec in weight_table(config, "causal_lm"):
        array = np.arange(np.prod(spec.shape), dtype=np.float32).reshape(spec.shape)
        for convention in layouts.CONVENTIONS:
            native = layouts.to_native(spec, array, convention)
            assert native.shape == layouts.native_shape(spec, convention)
            assert np.array_equal(layouts.from_native(spec, native, convention), array)
            path = layouts.native_path(spec, convention)
            assert ".".join(path[:-1]) == spec.name.rsplit(".", 1)[0]
        assert layouts.native_path(spec, "flax")[-1] in ("kernel", "bias", "embedding", "scale")


def test_position_ids_from_mask():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert numerics.position_ids_from_mask(mask).tolist() == [[0, 1, 2, 3], [-1, -1, 0, 1], [-1, 0, 1, 2]]
    assert numerics.position_ids_from_mask(mask, past_length=3).tolist() == [[3], [1], [2]]


def test_attention_allowed_never_leaves_a_row_empty():
    mask = np.array([[0, 0, 1, 1]])
    allowed = numerics.attention_allowed(mask, 4)[0]
    assert allowed.any(-1).all()
    assert allowed.tolist() == [[True, False, False, False], [False, True, False, False],
                                [False, False, True, False], [False, False, True, True]]
    # a pad after real tokens sees them (and not itself), as in Hugging Face; one before any sees itself
    allowed = numerics.attention_allowed(np.array([[0, 1, 0, 1], [1, 1, 0, 0]]), 4)
    assert allowed[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, True, False, False], [False, True, False, True]]
    assert allowed[1].tolist() == [[True, False, False, False], [True, True, False, False],
                                   [True, True, False, False], [True, True, False, False]]


def test_pooled_token_index_left_and_right_padding():
    ids = np.array([[5, 6, 7, 1, 1], [1, 1, 5, 6, 7], [1, 1, 1, 1, 1]])
    assert numerics.pooled_token_index(ids, 1, 5, 3).tolist() == [2, 4, 0]
    assert numerics.pooled_token_index(None, 1, 5, 3).tolist() == [4, 4, 4]


def test_mask_value_is_finite():
    for dtype in ("float16", "float32"):
        assert np.isfinite(numerics.mask_value(dtype))


def test_random_weights_are_varied_and_deterministic():
    config = VARIANTS["pre_ln"]
    a, b = random_weights(config, seed=1), random_weights(config, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(a[k].std() > 0 for k in a)
    assert not np.array_equal(a["model.decoder.layers.0.fc1.bias"], random_weights(config, seed=2)[
        "model.decoder.layers.0.fc1.bias"])
    ids, mask = random_batch(config)
    assert ids.shape == mask.shape == (3, 9) and mask[:, -1].all() and not mask[2, :5].any()


# ------------------------------------------------------------------------------------------ io
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int64])
def test_safetensors_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(dtype), "b": rng.standard_normal(7).astype(dtype),
               "empty": np.zeros((0, 4), dtype)}
    spec_io.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = spec_io.SafetensorsFile(tmp_path / "x.safetensors")
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].tobytes() == v.tobytes()


def test_safetensors_readable_by_reference_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.ones(3, np.float16)}
    spec_io.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = safetensors.load_file(str(tmp_path / "x.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    safetensors.save_file(tensors, str(tmp_path / "y.safetensors"))
    ours = spec_io.SafetensorsFile(tmp_path / "y.safetensors")
    assert all(np.array_equal(ours[k], v) for k, v in tensors.items())


def test_corrupt_safetensors_errors(tmp_path):
    spec_io.write_safetensors(tmp_path / "x.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated: tensor 'w'"):
        spec_io.SafetensorsFile(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        spec_io.SafetensorsFile(tmp_path / "junk.safetensors")
    (tmp_path / "hdr.safetensors").write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        spec_io.SafetensorsFile(tmp_path / "hdr.safetensors")


def test_sharded_directory_round_trip_and_stale_files(tmp_path):
    config = VARIANTS["pre_ln"]
    weights = random_weights(config)
    files = spec_io.save_safetensors_dir(tmp_path, weights, config.to_dict(), max_shard_size="20KB")
    assert len(files) > 1 and (tmp_path / spec_io.SAFE_INDEX_NAME).exists()
    loaded = spec_io.load_safetensors_dir(tmp_path)
    assert sorted(loaded) == sorted(weights)
    assert all(loaded[k].tobytes() == weights[k].tobytes() for k in weights)
    # saving again unsharded removes the old shards and index
    spec_io.save_safetensors_dir(tmp_path, weights, config.to_dict())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with spec_io.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(FileExistsError):
        with spec_io.atomic_path(target, overwrite=False):
            pass


def test_missing_weights_error_lists_what_was_seen(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="found: notes.txt"):
        spec_io.find_weight_files(tmp_path)


def test_parse_size():
    assert spec_io.parse_size("5GB") == 5 * 10**9
    assert spec_io.parse_size("10KiB") == 10 * 1024
    assert spec_io.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read"):
        spec_io.parse_size("lots")


def test_opt_spec_imports_no_framework():
    code = "import sys, opt_spec, opt_spec.io, opt_spec.testing, opt_spec.layouts; " \
           "print([m for m in ('torch', 'tensorflow', 'jax', 'flax') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_id2label_and_label2id_as_transformers_gives_them():
    config = OPTConfig.from_dict({"num_labels": 3})
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and config.label2id["LABEL_2"] == 2
    named = OPTConfig.from_dict({"id2label": {"0": "no", "1": "yes"}})
    assert named.num_labels == 2 and named.id2label == {0: "no", 1: "yes"} and named.label2id == {"no": 0, "yes": 1}
    with pytest.raises(ConfigError, match="id2label's keys must be class indices"):
        OPTConfig.from_dict({"id2label": {"first": "no", "second": "yes"}}).id2label
