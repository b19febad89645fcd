"""Classification metrics shared by training (validation), evaluation (test) and the champion gate.

Binary tasks get the full table at a threshold (`binary_metrics`); multiclass and multilabel tasks get a
macro AUC and an accuracy (`label_scores`) and, per label, the binary table one-vs-rest. The operating point
is chosen on validation scores by `choose_threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipeline.errors import CxrError


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for a sentence; undefined metrics (None) read as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """AUC, accuracy, sensitivity, specificity, PPV, NPV, F1 and the confusion counts at `threshold`.

    AUC is None when only one class is present (it is undefined there, not 0.5).
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    auc = float(roc_auc_score(y_true, probability)) if len(np.unique(y_true)) == 2 else None
    return {"auc": auc, **decision_metrics(y_true, np.asarray(probability) >= threshold)}


def decision_metrics(y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float | int | None]:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 and the confusion counts of yes/no decisions."""
    y_true, predicted = np.asarray(y_true).astype(int), np.asarray(predicted).astype(int)
    tp = int(((predicted == 1) & (y_true == 1)).sum())
    tn = int(((predicted == 0) & (y_true == 0)).sum())
    fp = int(((predicted == 1) & (y_true == 0)).sum())
    fn = int(((predicted == 0) & (y_true == 1)).sum())
    return {
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
    return bootstrap(lambda pick: threshold_metrics(y_true[pick], probability[pick], threshold), len(y_true), rounds, seed, level)


def bootstrap(
    score: Callable[[np.ndarray], dict[str, float | None]], n: int, rounds: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile intervals of each score `score(pick)` returns, over `rounds` resamples `pick` of n films.

    A score undefined (None) in more than half of the resamples gets None rather than a biased interval.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, value in score(rng.integers(0, n, n)).items():
            samples.setdefault(name, [])
            if value is not None:
                samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) >= rounds // 2 else None
        for name, values in samples.items()
    }


def label_bootstrap_intervals(
    task: str, truth: np.ndarray, probability: np.ndarray, labels: list[str], threshold: float | np.ndarray = 0.5,
    rounds: int = 1000, seed: int = 0,
) -> dict:
    """Percentile bootstrap intervals of a multiclass or multilabel model's macro AUC and accuracy
    (as label_scores computes them) and of each label's one-vs-rest AUC (`per_label_auc`)."""
    truth, probability = np.asarray(truth), np.asarray(probability, dtype=float)
    hot = one_hot(truth, len(labels)) if task == "multiclass" else truth

    def score(pick: np.ndarray) -> dict[str, float | None]:
        aucs = [rank_auc(hot[pick, k], probability[pick, k]) for k in range(len(labels))]
        defined = [auc for auc in aucs if auc is not None]
        accuracy = label_scores(task, truth[pick], probability[pick], threshold)["accuracy"]
        per_label = {f"auc of {label}": auc for label, auc in zip(labels, aucs)}  # never a label's own name: 'auc' may be one
        return {"auc": float(np.mean(defined)) if defined else None, "accuracy": accuracy, **per_label}

    intervals = bootstrap(score, len(truth), rounds, seed)
    return {"auc": intervals["auc"], "accuracy": intervals["accuracy"],
            "per_label_auc": {label: intervals[f"auc of {label}"] for label in labels}}


def threshold_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | None]:
    """binary_metrics without sklearn or counts, for the thousand calls a bootstrap makes (AUC from ranks, ties averaged)."""
    auc = rank_auc(y_true, probability)
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


def rank_auc(y_true: np.ndarray, probability: np.ndarray) -> float | None:
    """ROC AUC from ranks (Mann-Whitney, ties averaged): fast enough for bootstraps; None with one class only."""
    from scipy.stats import rankdata

    y_true = np.asarray(y_true).astype(int)
    positives, negatives = int(y_true.sum()), int(len(y_true) - y_true.sum())
    if not positives or not negatives:
        return None
    ranks = rankdata(probability)
    return float((ranks[y_true == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def choose_threshold(y_true: np.ndarray, probability: np.ndarray, method: str, fixed: float = 0.5,
                     target_sensitivity: float = 0.95, name: str = "the positive label") -> float:
    """The operating point from validation scores; a film is called positive when its probability is >= it.

    youden: the threshold maximising Youden's J = sensitivity + specificity - 1 over the distinct validation
    probabilities; ties go to the lowest such threshold (the highest sensitivity: missing disease costs more).
    sensitivity: the highest threshold at which validation sensitivity still reaches `target_sensitivity`,
    i.e. the k-th highest positive probability with k = ceil(target x positives). fixed: `fixed` as given.
    """
    if method == "fixed":
        return float(fixed)
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=float)
    positives, negatives = np.sort(probability[y_true == 1]), np.sort(probability[y_true == 0])
    if not len(positives) or (method == "youden" and not len(negatives)):
        missing = "positive" if not len(positives) else "negative"
        raise CxrError(f"evaluate.threshold_method={method}: the validation split holds no {missing} films of {name}, "
                       "so no threshold can be chosen there; add validation data or use evaluate.threshold_method=fixed")
    if method == "sensitivity":
        needed = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))  # positives at or above the threshold
        return float(positives[::-1][needed - 1])
    candidates = np.unique(probability)
    sensitivity = 1 - np.searchsorted(positives, candidates, side="left") / len(positives)  # share of positives >= t
    specificity = np.searchsorted(negatives, candidates, side="left") / len(negatives)  # share of negatives < t
    youden = sensitivity + specificity - 1
    return float(candidates[np.flatnonzero(youden >= youden.max() - 1e-12)[0]])


def one_hot(class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) class indices → (N, n_classes) 0/1 columns: multiclass truth as one-vs-rest labels."""
    return (np.asarray(class_index).astype(int)[:, None] == np.arange(n_classes)).astype(int)


def macro_auc(truth: np.ndarray, probability: np.ndarray) -> float | None:
    """The mean of the per-column AUCs that are defined (a column holding one class only is left out)."""
    aucs = [rank_auc(truth[:, k], probability[:, k]) for k in range(truth.shape[1])]
    defined = [auc for auc in aucs if auc is not None]
    return float(np.mean(defined)) if defined else None


def label_scores(task: str, truth: np.ndarray, probability: np.ndarray, threshold: float | np.ndarray = 0.5) -> dict[str, float | None]:
    """Headline AUC and accuracy of a multiclass or multilabel model (binary tasks use binary_metrics).

    multiclass: truth (N,) class indices, probability (N, K) softmax; AUC is the macro one-vs-rest AUC,
    accuracy is that of the most probable class. multilabel: truth and probability (N, K); AUC is the macro
    AUC over labels, accuracy the mean per-label accuracy at `threshold` (one value, or one per label).
    """
    truth = np.asarray(truth)
    probability = np.asarray(probability, dtype=float)
    if not len(truth):
        return {"auc": None, "accuracy": None}
    if task == "multiclass":
        return {"auc": macro_auc(one_hot(truth, probability.shape[1]), probability),
                "accuracy": float((probability.argmax(axis=1) == truth).mean())}
    predicted = probability >= np.asarray(threshold, dtype=float)
    return {"auc": macro_auc(truth, probability), "accuracy": float((predicted == (truth == 1)).mean())}


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
