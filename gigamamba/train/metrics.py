"""Metrics, computed by scikit-learn and scikit-survival (never by hand), per patient.

A patient with several slides gets the mean of their slides' predictions (DESIGN.md). Classification:
AUC (macro one-vs-rest for more than two classes), macro-F1, accuracy, balanced accuracy. Survival:
Harrell's C-index on censored data (sksurv `concordance_index_censored`), higher risk = earlier event.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, roc_auc_score

CLASSIFICATION_METRICS = ("auc", "f1", "acc", "bacc")
SURVIVAL_METRICS = ("c_index",)


def prob_columns(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))


def per_patient(pred: pd.DataFrame, task: str) -> pd.DataFrame:
    """Mean of each patient's slide predictions; targets are taken per patient (and label)."""
    if task == "classification":
        # Grouping by (case, label) keeps a patient whose slides carry different labels honest.
        keys = ["case_id", "y"]
        cols = prob_columns(pred)
    else:
        keys = ["case_id", "survival_months", "event"]
        cols = ["risk"]
    return pred.groupby(keys, as_index=False, sort=True)[cols].mean()


def classification_metrics(y_true, probs) -> dict[str, float]:
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    n_classes = probs.shape[1]
    y_pred = probs.argmax(axis=1)
    out = {
        "acc": float(accuracy_score(y_true, y_pred)),
        "bacc": float(balanced_accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
        # Cross-entropy of the patients' mean probabilities: a smoother model-selection signal than AUC
        # on a small validation set (not a reported result).
        "loss": float(log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=list(range(n_classes)))),
    }
    present = np.unique(y_true)
    if len(present) < 2:  # one class only in this set: AUC undefined
        out["auc"] = math.nan
        return out
    try:
        if n_classes == 2:
            out["auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        else:
            # Rows renormalised over the classes present: roc_auc_score's OvR needs probabilities summing to 1.
            if len(present) < n_classes:
                sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
                out["auc"] = float(roc_auc_score(y_true, sub, multi_class="ovr", average="macro", labels=present))
            else:
                out["auc"] = float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
    except ValueError:  # one class only in this set: AUC undefined
        out["auc"] = math.nan
    return out


def survival_metrics(time, event, risk) -> dict[str, float]:
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event).astype(bool)
    if event.sum() == 0:
        return {"c_index": math.nan}
    c, *_ = concordance_index_censored(event, np.asarray(time, dtype=float), np.asarray(risk, dtype=float))
    return {"c_index": float(c)}


def compute_metrics(pred: pd.DataFrame, task: str) -> dict[str, float]:
    """Patient-level metrics from per-slide predictions."""
    if len(pred) == 0:
        return {}
    pat = per_patient(pred, task)
    if task == "classification":
        return classification_metrics(pat["y"], pat[prob_columns(pat)].to_numpy())
    return survival_metrics(pat["survival_months"], pat["event"], pat["risk"])


def metric_names(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if task == "classification" else SURVIVAL_METRICS


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(arr) == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
