"""Evaluation metrics, framework-free (NumPy and the standard library), the same for every backend.

- perplexity: exp of the mean token negative log-likelihood (from the mean loss, or from token NLLs);
- accuracy, F1 (binary: of the positive class 1; macro: unweighted mean over classes);
- question answering: exact match and token F1 after SQuAD's normalization (lowercase, drop
  punctuation, drop the articles a/an/the, collapse whitespace), best over the gold answers.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def perplexity(mean_loss: float | None = None, token_nlls: Iterable[float] | None = None) -> float:
    """exp(mean NLL). Give the mean loss (natural log) or the per-token NLLs; inf on overflow."""
    if (mean_loss is None) == (token_nlls is None):
        raise ValueError("pass exactly one of mean_loss and token_nlls")
    if token_nlls is not None:
        nlls = np.asarray(list(token_nlls), dtype=np.float64)
        if nlls.size == 0:
            raise ValueError("no token NLLs")
        mean_loss = float(nlls.mean())
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must have the same non-empty shape")
    return float((p == y).mean())


def _f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(predictions: Sequence, labels: Sequence, average: str = "binary", num_classes: int | None = None) -> float:
    """F1 of class 1 (average='binary') or the unweighted mean over classes (average='macro';
    classes 0..num_classes-1, default: every class seen in labels or predictions)."""
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must have the same non-empty shape")
    if average == "binary":
        return _f1(float(np.sum((p == 1) & (y == 1))), float(np.sum((p == 1) & (y != 1))),
                   float(np.sum((p != 1) & (y == 1))))
    if average != "macro":
        raise ValueError(f"average={average!r}; choose 'binary' or 'macro'")
    classes = range(num_classes) if num_classes is not None else np.union1d(p, y)
    return float(np.mean([_f1(float(np.sum((p == c) & (y == c))), float(np.sum((p == c) & (y != c))),
                              float(np.sum((p != c) & (y == c)))) for c in classes]))


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else list(answers)
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def answer_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Token-overlap F1 of the normalized strings, best over the gold answers."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            score = float(pred == gold)
        else:
            common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
            score = 0.0 if common == 0 else 2 * common / (len(pred) + len(gold))
        best = max(best, score)
    return best


def squad(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """{'exact_match', 'f1'} in percent, averaged over examples (SQuAD v1 style)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} examples")
    em = np.mean([exact_match(p, a) for p, a in zip(predictions, answers)])
    f = np.mean([answer_f1(p, a) for p, a in zip(predictions, answers)])
    return {"exact_match": 100.0 * float(em), "f1": 100.0 * float(f)}


def classification(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics for a sequence-classification head from its pooled logits (N, L) and labels:
    int labels -> accuracy and F1 (binary for 2 classes, else macro); float (N,) labels (regression)
    -> mse; float (N, L) labels (multi-label) -> per-label accuracy and macro F1 at logit > 0."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if labels.dtype.kind in "iu":
        pred = logits.argmax(-1)
        num = logits.shape[-1]
        return {"accuracy": accuracy(pred, labels),
                "f1": f1(pred, labels, "binary") if num == 2 else f1(pred, labels, "macro", num_classes=num)}
    if labels.ndim == 1 or labels.shape[-1] == 1 and logits.shape[-1] == 1:
        return {"mse": float(np.mean((logits.reshape(-1) - labels.reshape(-1).astype(np.float64)) ** 2))}
    pred = (logits > 0).astype(np.int64)
    y = labels.astype(np.int64)
    return {"accuracy": accuracy(pred, y),
            "f1": float(np.mean([f1(pred[:, j], y[:, j], "binary") for j in range(y.shape[1])]))}
