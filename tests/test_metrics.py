"""opt_spec.metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from opt_spec import metrics


def test_perplexity():
    assert metrics.perplexity(mean_loss=0.0) == 1.0
    assert metrics.perplexity(mean_loss=math.log(7.0)) == pytest.approx(7.0)
    nlls = [math.log(2.0), math.log(8.0)]  # geometric mean of 2 and 8 = 4
    assert metrics.perplexity(token_nlls=nlls) == pytest.approx(4.0)
    assert metrics.perplexity(mean_loss=1e6) == math.inf
    with pytest.raises(ValueError):
        metrics.perplexity()
    with pytest.raises(ValueError):
        metrics.perplexity(token_nlls=[])


def test_accuracy_and_f1():
    pred, gold = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    # class 1: tp 2, fp 1, fn 1 -> 2/3; class 0: tp 2, fp 1, fn 1 -> 2/3
    assert metrics.f1(pred, gold) == pytest.approx(2 / 3)
    assert metrics.f1(pred, gold, "macro") == pytest.approx(2 / 3)
    pred3, gold3 = [0, 1, 2, 2], [0, 2, 2, 1]
    # class 0: 1; class 1: tp0 -> 0; class 2: tp 1, fp 1, fn 1 -> 0.5
    assert metrics.f1(pred3, gold3, "macro") == pytest.approx(0.5)
    assert metrics.f1(pred3, gold3, "macro", num_classes=4) == pytest.approx(1.5 / 4)
    assert metrics.f1([0, 0], [0, 0]) == 0.0  # no positives at all
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 0])
    with pytest.raises(ValueError):
        metrics.f1([1], [1], "micro")


def test_squad_normalization_em_and_f1():
    assert metrics.normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert metrics.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert metrics.exact_match("the Paris.", ["Rome", "paris"]) == 1.0
    assert metrics.exact_match("Paris France", "Paris") == 0.0
    assert metrics.answer_f1("Paris France", "Paris") == pytest.approx(2 / 3)  # p 1/2, r 1
    assert metrics.answer_f1("the cat sat", ["a dog sat", "cat sat on"]) == pytest.approx(0.8)
    assert metrics.answer_f1("", "") == 1.0 and metrics.answer_f1("x", "the") == 0.0
    out = metrics.squad(["Paris", "blue sky"], [["paris"], ["the sky"]])
    assert out["exact_match"] == pytest.approx(50.0) and out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_classification_metrics_from_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    out = metrics.classification(logits, np.array([0, 1, 1]))
    assert out["accuracy"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(2 / 3)
    reg = metrics.classification(np.array([[0.5], [1.0]]), np.array([1.0, 1.0], dtype=np.float32))
    assert reg == {"mse": pytest.approx(0.125)}
    multi = metrics.classification(np.array([[1.0, -1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert multi["accuracy"] == pytest.approx(0.75) and multi["f1"] == pytest.approx((2 / 3 + 1) / 2)
