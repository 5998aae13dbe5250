"""Checkpoints written by one backend load in the others with the same logits, pickles included."""

import numpy as np
import pytest
import torch

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch import OPTForCausalLM

from .conftest import max_abs_diff


@pytest.fixture(scope="module")
def torch_bin_checkpoint(tmp_path_factory):
    """A sharded pytorch_model.bin written by torch.save, as the facebook/opt-* downloads ship."""
    config = VARIANTS["post_ln_proj"]
    src = tmp_path_factory.mktemp("src")
    spec_io.save_safetensors_dir(src, random_weights(config, seed=11), config.to_dict())
    model = OPTForCausalLM.from_pretrained(src)
    path = tmp_path_factory.mktemp("bin")
    model.save_pretrained(path, safe_serialization=False, max_shard_size="20KB")
    ids, mask = random_batch(config, seed=4)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).logits.numpy()
    return path, ids, mask, logits


def test_spec_reads_torch_pickles_without_torch(torch_bin_checkpoint):
    path, *_ = torch_bin_checkpoint
    fmt, files = spec_io.find_weight_files(path)
    assert fmt == "torch" and len(files) > 1
    arrays = spec_io.load_checkpoint_dir(path)
    state = {}
    for f in files:
        state.update(torch.load(f, weights_only=True))
    assert sorted(arrays) == sorted(state)
    assert all(np.array_equal(arrays[k], state[k].numpy()) for k in state)


def test_flax_loads_pytorch_bin(torch_bin_checkpoint):
    pytest.importorskip("flax")
    from opt_flax import FlaxOPTForCausalLM

    path, ids, mask, expected = torch_bin_checkpoint
    logits = FlaxOPTForCausalLM.from_pretrained(path)(ids, attention_mask=mask).logits
    assert max_abs_diff(logits, expected, mask) <= 1e-5


def test_tf_loads_pytorch_bin(torch_bin_checkpoint):
    pytest.importorskip("tensorflow")
    from opt_tf import TFOPTForCausalLM

    path, ids, mask, expected = torch_bin_checkpoint
    logits = TFOPTForCausalLM.from_pretrained(path)(ids, attention_mask=mask).logits
    assert max_abs_diff(logits, expected, mask) <= 1e-5
