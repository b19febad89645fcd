"""Binary classification metrics shared by training (validation) and evaluation (test)."""

from __future__ import annotations

import numpy as np


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for a sentence; undefined metrics (None) read as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """AUC, accuracy, sensitivity, specificity and the confusion counts at `threshold`.

    AUC is None when only one class is present (it is undefined there, not 0.5).
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    predicted = (np.asarray(probability) >= threshold).astype(int)
    tp = int(((predicted == 1) & (y_true == 1)).sum())
    tn = int(((predicted == 0) & (y_true == 0)).sum())
    fp = int(((predicted == 1) & (y_true == 0)).sum())
    fn = int(((predicted == 0) & (y_true == 1)).sum())
    auc = float(roc_auc_score(y_true, probability)) if len(np.unique(y_true)) == 2 else None
    return {
        "auc": auc,
        "accuracy": (tp + tn) / len(y_true) if len(y_true) else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "n": int(len(y_true)),
    }
