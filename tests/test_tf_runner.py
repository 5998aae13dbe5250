"""The CLI's TensorFlow runner (`optkit parity`, the fallback generate loop): its traced forward gives the
eager model's logits (to float32 rounding), one trace serves every shape, and bad token ids still get the
model's clear error."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from opt_spec.io import save_safetensors_dir  # noqa: E402
from opt_spec.testing import VARIANTS, random_weights  # noqa: E402
from optkit_cli.parity import random_batch  # noqa: E402
from optkit_cli.runners import load_runner  # noqa: E402


def test_tf_runner_forward_is_the_eager_forward(tmp_path):
    config = VARIANTS["post_ln_proj"]
    save_safetensors_dir(tmp_path, random_weights(config, seed=5), config.to_dict())
    runner, _ = load_runner("tf", str(tmp_path), "float32")
    ids, mask = random_batch(config, batch=3, length=9, seed=1, left_pad=(0, 2, 4))
    eager = runner.model(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32)).logits.numpy()
    traced = runner.forward(ids, mask)
    assert np.abs(traced - eager).max() <= 1e-5 * np.abs(eager).max()
    assert not np.array_equal(eager[0], eager[1])
    longer = random_batch(config, batch=2, length=12, seed=2, left_pad=(0, 1))  # another shape: traced again
    assert runner.forward(*longer).shape == (2, 12, config.vocab_size)
    assert runner._traced.experimental_get_tracing_count() <= 2  # the second shape made it shape-generic
    ids[1, 3] = config.vocab_size
    with pytest.raises(ValueError, match=f"token id {config.vocab_size} at batch row 1, position 3"):
        runner.forward(ids, mask)
