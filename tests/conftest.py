"""Shared test set-up: quiet TensorFlow, tolerance helpers, the variant configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from opt_spec.testing import VARIANTS  # noqa: E402

HEADS = ("base", "causal_lm", "sequence_classification", "question_answering")


def max_abs_diff(a, b, mask=None) -> float:
    """max |a - b| over the positions mask keeps (mask broadcast over trailing axes)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.abs(a - b)
    if mask is not None:
        d = d[np.asarray(mask).astype(bool)]
    return float(d.max()) if d.size else 0.0


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]
