"""Classification metrics shared by training (validation), evaluation (test) and the champion gate.

The formulas, for 0/1 truth and probabilities: the full table at a threshold (`binary_metrics`, and its fast
form for bootstraps), AUC from ranks, macro AUC, bootstrap intervals, the threshold chosen on validation
(`choose_threshold`) and calibration. Which of them a task reports is pipeline.tasks' business.
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
SUBGROUP_METRICS = ("auc", "accuracy", "sensitivity", "specificity")  # per subgroup, those a task reports
TOO_SMALL = "n too small"  # a subgroup's note in place of its metrics, under evaluate.min_subgroup_patients


def describe_bootstrap(rounds: int) -> str:
    """How every interval in metrics.json was made, for the file itself and the documents that show it."""
    return f"patient-clustered percentile bootstrap, {rounds} rounds"


def bootstrap_intervals(
    y_true: np.ndarray, probability: np.ndarray, threshold: float, rounds: int = 1000, seed: int = 0, level: float = 0.95,
    *, clusters: np.ndarray,
) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals, resampling whole patients (`clusters`: one id per film), for each metric in
    INTERVAL_METRICS.

    A small test split gives wide intervals: that width is the honest answer to "how good is it".
    A metric undefined in too many resamples (e.g. AUC with one class) gets None.
    """
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=float)
    return bootstrap(lambda pick: threshold_metrics(y_true[pick], probability[pick], threshold), len(y_true), rounds, seed,
                     level, clusters=clusters)


def bootstrap(
    score: Callable[[np.ndarray], dict[str, float | None]], n: int, rounds: int = 1000, seed: int = 0, level: float = 0.95,
    *, clusters: np.ndarray,
) -> dict[str, list[float] | None]:
    """Percentile intervals of each score `score(pick)` returns, over `rounds` resamples `pick` of n films.

    `clusters` (one id per film: the patient pseudonym, or a film's own id where nothing links films) is
    required: the resample draws clusters with replacement and takes every film of each drawn cluster, so films
    of one patient, which are correlated, stay together and the interval is not too narrow; `pick` then varies
    in length. There is no film-level resample: with one film per cluster this is that resample. A score
    undefined (None) in more than half of the resamples gets None rather than a biased interval.
    """
    rng = np.random.default_rng(seed)
    draw = _cluster_sampler(np.asarray(clusters), n, rng)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, value in score(draw()).items():
            samples.setdefault(name, [])
            if value is not None:
                samples[name].append(value)
    tail = (1 - level) / 2 * 100
    return {
        name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))] if len(values) >= rounds // 2 else None
        for name, values in samples.items()
    }


def _cluster_sampler(clusters: np.ndarray, n: int, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """A function drawing one cluster resample: as many clusters as there are, with replacement, all films of each."""
    if len(clusters) != n:
        raise ValueError(f"bootstrap: {len(clusters)} cluster ids for {n} films")
    _, which = np.unique(clusters, return_inverse=True)
    members = np.argsort(which, kind="stable")  # films grouped by cluster
    sizes = np.bincount(which)
    starts = np.cumsum(sizes) - sizes

    def draw() -> np.ndarray:
        chosen = rng.integers(0, len(sizes), len(sizes))
        counts = sizes[chosen]
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return members[np.repeat(starts[chosen], counts) + offsets]

    return draw


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
    youden_mid: the middle of the widest interval of thresholds that all reach the maximum J. Where validation
    separates the classes (almost) perfectly, every threshold between the highest negative and the lowest
    positive is optimal, and `youden` takes the very edge of that gap: the lowest positive's probability, so any
    unseen positive a hair lower is missed. The middle keeps a margin on both sides; where one threshold alone
    is optimal its interval is the gap below it, and the two methods nearly agree.
    sensitivity: the highest threshold at which validation sensitivity still reaches `target_sensitivity`,
    i.e. the k-th highest positive probability with k = ceil(target x positives). fixed: `fixed` as given.
    """
    if method == "fixed":
        return float(fixed)
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=float)
    positives, negatives = np.sort(probability[y_true == 1]), np.sort(probability[y_true == 0])
    if not len(positives) or (method in ("youden", "youden_mid") and not len(negatives)):
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
    best = np.flatnonzero(youden >= youden.max() - 1e-12)
    if method == "youden":
        return float(candidates[best[0]])
    return _middle_of_widest_run(candidates, best)


def _middle_of_widest_run(candidates: np.ndarray, best: np.ndarray) -> float:
    """The middle of the widest interval of thresholds reaching the best J. Every threshold in (candidates[i - 1],
    candidates[i]] calls the same films positive as candidates[i], so a run of consecutive optimal candidates
    i..j is optimal over (candidates[i - 1], candidates[j]]; below the lowest probability nothing changes, so a run
    starting there starts at its own first candidate."""
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    lows = [candidates[run[0] - 1] if run[0] > 0 else candidates[run[0]] for run in runs]
    highs = [candidates[run[-1]] for run in runs]
    widths = np.subtract(highs, lows)
    widest = int(np.flatnonzero(widths >= widths.max() - 1e-12)[0])  # a tie goes to the lower run (more sensitive)
    return float((lows[widest] + highs[widest]) / 2)


def threshold_spread(y_true: np.ndarray, probability: np.ndarray, method: str, rounds: int, seed: int, *,
                     clusters: np.ndarray, fixed: float = 0.5, target_sensitivity: float = 0.95) -> dict | None:
    """How far the validation-chosen threshold moves when validation's patients are resampled (`rounds` cluster
    resamples, as the metric intervals): its 95 % percentile interval and standard deviation. A threshold that
    swings widely says the validation split cannot pin the operating point down; None for `fixed` (nothing chosen).
    A resample holding one class only chooses nothing and is skipped."""
    if method == "fixed":
        return None
    y_true, probability = np.asarray(y_true).astype(int), np.asarray(probability, dtype=float)
    chosen: list[float] = []

    def score(pick: np.ndarray) -> dict[str, float | None]:
        try:
            value = choose_threshold(y_true[pick], probability[pick], method, fixed, target_sensitivity)
        except CxrError:
            return {"threshold": None}
        chosen.append(value)
        return {"threshold": value}

    interval = bootstrap(score, len(y_true), rounds, seed, clusters=clusters)["threshold"]
    if interval is None:
        return None
    return {"ci95": interval, "sd": float(np.std(chosen)), "rounds": rounds}


def one_hot(class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) class indices → (N, n_classes) 0/1 columns: multiclass truth as one-vs-rest labels."""
    return (np.asarray(class_index).astype(int)[:, None] == np.arange(n_classes)).astype(int)


def macro_auc(truth: np.ndarray, probability: np.ndarray) -> float | None:
    """The mean of the per-column AUCs that are defined (a column holding one class only is left out)."""
    aucs = [rank_auc(truth[:, k], probability[:, k]) for k in range(truth.shape[1])]
    defined = [auc for auc in aucs if auc is not None]
    return float(np.mean(defined)) if defined else None


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


def apply_temperature(probability: np.ndarray, temperature: float, softmax: bool = False) -> np.ndarray:
    """Probabilities recalibrated by temperature scaling, i.e. logits divided by T; T = 1 changes nothing.

    Independent probabilities (a binary model's positive class, a multilabel model's labels), of any shape:
    sigmoid(logit(p) / T). softmax: rows of softmax probabilities (N, K): softmax(log(p) / T), as log p is the
    logits up to a constant.
    """
    if temperature == 1.0:
        return probability
    p = np.clip(np.asarray(probability, dtype=np.float64), 1e-7, 1 - 1e-7)
    if softmax:
        scaled = np.log(p) / temperature
        scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return scaled / scaled.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


def fit_temperature(y_true: np.ndarray, probability: np.ndarray, softmax: bool = False) -> float:
    """The temperature minimising validation log-loss (Guo et al. 2017): T > 1 softens an overconfident model.

    One scalar, so it cannot change the ranking (AUC) of films, only how far the probabilities can be trusted.
    `y_true` as `probability` is shaped (0/1), or with softmax rows the class index of each row.
    """
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_true)

    def log_loss(temperature: float) -> float:
        p = np.clip(apply_temperature(probability, temperature, softmax), 1e-7, 1 - 1e-7)
        if softmax:
            return float(-np.log(p[np.arange(len(y)), y.astype(int)]).mean())
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    return float(minimize_scalar(log_loss, bounds=(0.05, 20.0), method="bounded").x)
