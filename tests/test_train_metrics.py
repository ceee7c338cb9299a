import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from gigamamba.train.metrics import (
    classification_metrics, compute_metrics, mean_std, per_patient, survival_metrics,
)


def test_binary_hand_made():
    # The classic example: AUC 0.75 (3 of the 4 positive/negative pairs are ordered right).
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    assert m["auc"] == pytest.approx(0.75)
    assert m["acc"] == pytest.approx(0.75)       # argmax: 0, 0, 0, 1
    assert m["bacc"] == pytest.approx(0.75)      # recall 1.0 and 0.5
    assert m["f1"] == pytest.approx(f1_score(y, [0, 0, 0, 1], average="macro"))


def test_multiclass_macro_ovr_matches_sklearn():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet([1, 1, 1], size=30)
    probs[np.arange(30), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    # A perfectly separated case gives exactly 1.
    assert classification_metrics(y, np.eye(3)[y] * 0.8 + 0.2 / 3)["auc"] == pytest.approx(1.0)


def test_single_class_auc_is_nan():
    assert math.isnan(classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]))["auc"])


def test_c_index_hand_made():
    t = [1.0, 2.0, 3.0, 4.0]
    e = [1, 1, 1, 1]
    assert survival_metrics(t, e, [4, 3, 2, 1])["c_index"] == pytest.approx(1.0)
    assert survival_metrics(t, e, [1, 2, 3, 4])["c_index"] == pytest.approx(0.0)
    assert survival_metrics(t, e, [1, 1, 1, 1])["c_index"] == pytest.approx(0.5)
    # Censored at t=1: it cannot be compared with later times, so only pairs anchored on events count.
    # Comparable pairs: (2,3), (2,4), (3,4) -> risks 3>2 ok, 3>5 wrong, 2>5 wrong -> 1/3.
    assert survival_metrics(t, [0, 1, 1, 1], [9, 3, 2, 5])["c_index"] == pytest.approx(1 / 3)


def test_per_patient_mean_of_slides():
    pred = pd.DataFrame({
        "case_id": ["a", "a", "b", "c"], "y": [1, 1, 0, 1],
        "prob_0": [0.9, 0.1, 0.6, 0.3], "prob_1": [0.1, 0.9, 0.4, 0.7],
    })
    pat = per_patient(pred, "classification")
    assert pat.set_index("case_id").loc["a", "prob_1"] == pytest.approx(0.5)
    m = compute_metrics(pred, "classification")
    # patients: a (y=1, p=0.5), b (y=0, p=0.4), c (y=1, p=0.7) -> AUC 1.0 on patients
    assert m["auc"] == pytest.approx(roc_auc_score([1, 0, 1], [0.5, 0.4, 0.7]))
    assert m["acc"] == pytest.approx(2 / 3)  # a ties 0.5/0.5 -> argmax 0


def test_survival_per_patient():
    pred = pd.DataFrame({
        "case_id": ["a", "a", "b", "c"], "survival_months": [5.0, 5.0, 10.0, 20.0], "event": [1, 1, 1, 0],
        "risk": [3.0, 1.0, 1.5, 0.5],
    })
    m = compute_metrics(pred, "survival")
    assert m["c_index"] == pytest.approx(1.0)  # a: 2.0 > b: 1.5 > c: 0.5


def test_mean_std():
    mean, std = mean_std([0.5, 0.7, float("nan")])
    assert mean == pytest.approx(0.6) and std == pytest.approx(np.std([0.5, 0.7], ddof=1))
