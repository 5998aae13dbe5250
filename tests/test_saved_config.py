"""config.json as saved by every backend and by conversion: the dtype it states is the weights' dtype, under
both keys Hugging Face reads ("dtype", preferred since transformers 4.56, and "torch_dtype"), even when the
source config carried a stale value."""

import json

import pytest
import torch
import transformers

from opt_spec import OPTConfig
from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_weights


def stale_source(tmp_path):
    """A float32 checkpoint whose config.json was written by a recent transformers (both keys float32)."""
    config_dict = {**VARIANTS["pre_ln"].to_dict(), "dtype": "float32", "torch_dtype": "float32",
                   "architectures": ["OPTForCausalLM"]}
    src = tmp_path / "src"
    spec_io.save_safetensors_dir(src, random_weights(VARIANTS["pre_ln"], "causal_lm", seed=0), config_dict)
    return src


def check_saved(directory, dtype: str):
    saved = json.loads((directory / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == dtype
    assert saved["architectures"] == ["OPTForCausalLM"]
    hf = transformers.OPTForCausalLM.from_pretrained(directory, dtype="auto")
    assert hf.dtype == getattr(torch, dtype)


def save_torch(src, dst):
    from opt_torch import OPTForCausalLM

    OPTForCausalLM.from_pretrained(src, dtype="bfloat16").save_pretrained(dst)


def save_tf(src, dst):
    from opt_tf import TFOPTForCausalLM

    TFOPTForCausalLM.from_pretrained(src, dtype="bfloat16").save_pretrained(dst)


def save_flax(src, dst):
    from opt_flax import FlaxOPTForCausalLM

    model = FlaxOPTForCausalLM.from_pretrained(src, dtype="bfloat16", param_dtype="bfloat16")
    model.save_pretrained(dst)


def save_converted(src, dst):
    from conversion import convert

    convert(src, dst, dtype="bfloat16", progress=False)


@pytest.mark.parametrize("save", [save_torch, save_tf, save_flax, save_converted],
                         ids=["torch", "tf", "flax", "convert"])
def test_a_bfloat16_save_says_bfloat16(tmp_path, save):
    src = stale_source(tmp_path)
    save(src, tmp_path / "out")
    check_saved(tmp_path / "out", "bfloat16")


def test_mixed_dtypes_state_no_dtype():
    saved = OPTConfig.from_dict({**VARIANTS["pre_ln"].to_dict(), "dtype": "float32"}).to_saved_dict(None, None)
    assert "dtype" not in saved and "torch_dtype" not in saved
