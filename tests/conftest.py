"""Shared test set-up: quiet TensorFlow, tolerance helpers, the variant configs, file-tree snapshots."""

import hashlib
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


def tree_snapshot(path) -> dict[str, str] | None:
    """{relative file: sha256} under path (or {"": sha256} of a file), None when nothing is there: to prove that
    nothing was touched."""
    if not os.path.lexists(path):
        return None
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(path) for f in fs}


def temp_leftovers(parent) -> list[str]:
    """The temporary siblings (opt_spec.io.atomic_path's .tmp and .tmp.old) in the folder parent."""
    return [n for n in os.listdir(parent) if n.endswith((".tmp", ".old"))]

