"""Binary classification metrics shared by training (validation) and evaluation (test)."""

from __future__ import annotations

import numpy as np


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for a sentence; undefined metrics (None) read as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """AUC, accuracy, sensitivity, specificity, PPV, NPV, F1 and the confusion counts at `threshold`.

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
        "ppv": tp / (tp + fp) if tp + fp else None,
        "npv": tn / (tn + fn) if tn + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "n": int(len(y_true)),
    }


INTERVAL_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")


def bootstrap_intervals(
    y_true: np.ndarray, probability: np.ndarray, threshold: float, rounds: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals (resampling films with replacement) for each metric in INTERVAL_METRICS.

    A small test split gives wide intervals: that width is the honest answer to "how good is it".
    A metric undefined in too many resamples (e.g. AUC with one class) gets None.
    """
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=float)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in INTERVAL_METRICS}
    for _ in range(rounds):
        pick = rng.integers(0, len(y_true), len(y_true))
        scores = threshold_metrics(y_true[pick], probability[pick], threshold)
        for name, value in scores.items():
            if value is not None:
                samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) >= rounds // 2 else None
        for name, values in samples.items()
    }


def threshold_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | None]:
    """binary_metrics without sklearn or counts, for the thousand calls a bootstrap makes (AUC from ranks, ties averaged)."""
    from scipy.stats import rankdata

    positives, negatives = int(y_true.sum()), int(len(y_true) - y_true.sum())
    auc = None
    if positives and negatives:
        ranks = rankdata(probability)
        auc = float((ranks[y_true == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    predicted = probability >= threshold
    tp = float((predicted & (y_true == 1)).sum())
    tn = float((~predicted & (y_true == 0)).sum())
    fp, fn = float((predicted & (y_true == 0)).sum()), float((~predicted & (y_true == 1)).sum())
    return {
        "auc": auc,
        "accuracy": (tp + tn) / len(y_true),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "ppv": tp / (tp + fp) if tp + fp else None,
        "npv": tn / (tn + fn) if tn + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def calibration_table(y_true: np.ndarray, probability: np.ndarray, bins: int = 10) -> tuple[list[dict], float]:
    """Reliability curve (per equal-width probability bin: mean predicted, observed fraction, count) and the
    expected calibration error, the count-weighted gap between the two."""
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=float)
    which = np.minimum((probability * bins).astype(int), bins - 1)
    rows, error = [], 0.0
    for index in range(bins):
        inside = which == index
        if not inside.any():
            continue
        predicted, observed = float(probability[inside].mean()), float(y_true[inside].mean())
        rows.append({"bin": index, "predicted": predicted, "observed": observed, "count": int(inside.sum())})
        error += inside.sum() / len(y_true) * abs(predicted - observed)
    return rows, float(error)
