"""Evaluate: choose the operating point on validation, then score the best checkpoint on the held-out test split.

Writes reports/metrics.json (DVC metrics), ROC, PR, reliability and confusion data as CSV (DVC plots) and as
PNG (MLflow artifacts), reports/predictions.csv (per film: what the champion gate and the report read), and
logs the metrics into the run that `cxr train` opened.

What is scored follows the task the checkpoint was trained for (data.task):
- binary: the positive label's probability, called positive at a threshold chosen on validation
  (evaluate.threshold_method); the full table (AUC, accuracy, sensitivity, specificity, PPV, NPV, F1) at it.
- multiclass: the most probable class; `auc` is the macro one-vs-rest AUC (so the champion gate's test_auc
  works unchanged), `accuracy` that of the most probable class, plus a confusion matrix and each class's
  one-vs-rest metrics.
- multilabel: one threshold per label, chosen on validation as for binary; `auc` is the macro AUC over labels,
  `accuracy` the mean per-label accuracy at those thresholds, plus each label's table at its threshold.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, EvaluateConfig
from pipeline.documents import describe_operating_point, describe_threshold
from pipeline.errors import CxrError
from pipeline.files import atomic_path, sha256_of, write_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)


SUBGROUP_COLUMNS = ("source", "view", "modality", "format")  # manifest columns a model may do better or worse on

# The operating point: a float (binary), {label: float} (multilabel) or None (multiclass: the most probable class).
Threshold = float | dict[str, float] | None


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    plot_paths: list[Path]


@dataclass(frozen=True)
class Scored:
    """One split's targets and probabilities, shaped as the task reads them.

    binary: truth 0/1 and the positive label's probability, both (N,). multiclass: truth the class index (N,),
    probability (N, K). multilabel: truth 0/1 and probability, both (N, K).
    """

    truth: np.ndarray
    probability: np.ndarray

    def subset(self, inside: np.ndarray) -> Scored:
        return Scored(self.truth[inside], self.probability[inside])


def evaluate_stage(paths: ProjectPaths, config: Config) -> EvaluateResult:
    """The operating point chosen on validation, test and validation metrics at it, plots, and their MLflow logging."""
    from pipeline.metrics import calibration_table
    from pipeline.models import apply_temperature, fit_temperature, load_checkpoint
    from pipeline.plots import write_evaluation_plots

    model, state = load_checkpoint(paths.checkpoint)
    task, labels = state["task"], list(state["labels"])
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run `cxr ingest` first")
    manifest = pd.read_parquet(paths.manifest, columns=["store_index", "image_id", "split", "label", "label_index", *SUBGROUP_COLUMNS])
    images = np.load(paths.images, mmap_mode="r")
    settings = config.evaluate
    rows = {split: _split_rows(manifest, split) for split in ("val", "test")}
    raw = {split: score_films(model, task, labels, part, np.asarray(images[part["store_index"].to_numpy()]))
           for split, part in rows.items()}
    temperature = fit_temperature(raw["val"].truth, raw["val"].probability, task == "multiclass") if settings.temperature_scaling else 1.0
    scored = {split: Scored(s.truth, apply_temperature(s.probability, temperature, task == "multiclass")) for split, s in raw.items()}
    # On the calibrated validation probabilities: the threshold is served together with the temperature.
    threshold = operating_threshold(task, labels, scored["val"], settings)

    method = settings.threshold_method if task != "multiclass" else "argmax"
    metrics: dict = {"task": task, "labels": labels, "threshold": threshold, "threshold_method": method}
    if method == "sensitivity":
        metrics["target_sensitivity"] = settings.target_sensitivity
    metrics |= {"temperature": temperature, "model": state["model"], "best_epoch": state["epoch"],
                "checkpoint_sha256": sha256_of(paths.checkpoint)}
    for split in ("val", "test"):
        metrics[split] = split_metrics(task, labels, scored[split], threshold)
    test = scored["test"]
    metrics["test"]["ci95"] = _intervals(task, labels, test, threshold, settings)
    calibration, metrics["test"]["ece"] = calibration_table(*_calibration_inputs(task, test), settings.calibration_bins)
    metrics["test"]["subgroups"] = _subgroup_metrics(rows["test"], task, labels, test, threshold)
    if settings.external:
        metrics["external"] = {spec.path: _external_metrics(paths, config, spec, model, state, metrics["test"], threshold, temperature)
                               for spec in settings.external}
    plot_paths = write_evaluation_plots(paths.plots, task, labels, test.truth, test.probability, threshold, calibration)
    write_json(paths.metrics, metrics)
    with atomic_path(paths.predictions) as tmp:
        predictions = [_prediction_rows(split, rows[split], task, labels, scored[split], threshold) for split in ("val", "test")]
        pd.concat(predictions).to_csv(tmp, index=False, float_format="%.9g")
    _log_to_mlflow(paths, metrics, plot_paths)
    _log_summary(metrics, paths.metrics)
    return EvaluateResult(metrics, paths.metrics, plot_paths)


def _split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise CxrError(f"evaluate: the {split} split is empty; add data or raise data.split.{split}")
    return rows


def score_films(model, task: str, labels: list[str], rows: pd.DataFrame, images: np.ndarray) -> Scored:
    """The model's probabilities for `images` and the targets of their manifest `rows` (label, label_index)."""
    import torch

    from pipeline.labels import targets
    from pipeline.models import predict_proba

    probability = predict_proba(model, images, torch.device("cpu"), multilabel=task == "multilabel")
    truth = targets(rows, task, labels)
    if task == "binary":
        return Scored((truth == len(labels) - 1).astype(int), probability[:, -1])
    return Scored(truth, probability)


def operating_threshold(task: str, labels: list[str], val: Scored, settings: EvaluateConfig) -> Threshold:
    """binary: one threshold on the positive label's probability; multilabel: one per label, chosen the same way;
    multiclass: None (the most probable class is the prediction)."""
    from pipeline.metrics import choose_threshold

    def choose(truth: np.ndarray, probability: np.ndarray, label: str) -> float:
        return choose_threshold(truth, probability, settings.threshold_method, settings.threshold,
                                settings.target_sensitivity, label)

    if task == "binary":
        return choose(val.truth, val.probability, labels[-1])
    if task == "multilabel":
        return {label: choose(val.truth[:, k], val.probability[:, k], label) for k, label in enumerate(labels)}
    return None


def split_metrics(task: str, labels: list[str], scored: Scored, threshold: Threshold) -> dict:
    """One split's metrics at the operating point; `auc` and `accuracy` mean the same to the gate in every task."""
    from pipeline.metrics import binary_metrics, decision_metrics, label_scores, one_hot, rank_auc

    truth, probability = scored.truth, scored.probability
    if task == "binary":
        return binary_metrics(truth, probability, threshold)
    if task == "multilabel":
        cut = threshold_vector(threshold, labels)
        per_label = {label: {"threshold": float(cut[k]), **binary_metrics(truth[:, k], probability[:, k], cut[k])}
                     for k, label in enumerate(labels)}
        return {**label_scores(task, truth, probability, cut), "n": int(len(truth)), "per_label": per_label}
    predicted, hot = probability.argmax(axis=1), one_hot(truth, len(labels))
    per_label = {label: {"auc": rank_auc(hot[:, k], probability[:, k]), **decision_metrics(hot[:, k], predicted == k)}
                 for k, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (truth, predicted), 1)
    return {**label_scores(task, truth, probability), "n": int(len(truth)), "per_label": per_label,
            "confusion": {"rows": "actual", "columns": "predicted", "labels": labels, "matrix": confusion.tolist()}}


def threshold_vector(threshold: Threshold, labels: list[str]) -> np.ndarray:
    """A multilabel operating point as one threshold per label, in `labels` order."""
    return np.array([threshold[label] for label in labels], dtype=float)


def _intervals(task: str, labels: list[str], scored: Scored, threshold: Threshold, settings: EvaluateConfig) -> dict:
    """95 % bootstrap intervals: the binary table's metrics, or macro AUC, accuracy and each label's AUC."""
    from pipeline.metrics import bootstrap_intervals, label_bootstrap_intervals

    rounds, seed = settings.bootstrap_rounds, settings.seed
    if task == "binary":
        return bootstrap_intervals(scored.truth, scored.probability, threshold, rounds, seed)
    cut = threshold_vector(threshold, labels) if task == "multilabel" else 0.5
    return label_bootstrap_intervals(task, scored.truth, scored.probability, labels, cut, rounds, seed)


def _calibration_inputs(task: str, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
    """What the reliability curve compares: the positive probability (binary), the most probable class's
    probability against being right (multiclass), or every label's probability pooled (multilabel)."""
    if task == "binary":
        return scored.truth, scored.probability
    if task == "multiclass":
        return (scored.probability.argmax(axis=1) == scored.truth).astype(int), scored.probability.max(axis=1)
    return scored.truth.ravel(), scored.probability.ravel()


def _prediction_rows(split: str, rows: pd.DataFrame, task: str, labels: list[str], scored: Scored, threshold: Threshold) -> pd.DataFrame:
    """predictions.csv rows: binary `truth, probability, threshold`; multiclass `truth` (class index) and
    `probability_<label>`; multilabel `truth_<label>`, `probability_<label>`, `threshold_<label>`."""
    frame: dict = {"split": split, "image_id": rows["image_id"].to_numpy(), "store_index": rows["store_index"].to_numpy()}
    if task == "binary":
        return pd.DataFrame(frame | {"truth": scored.truth, "probability": scored.probability, "threshold": threshold})
    if task == "multiclass":
        frame["truth"] = scored.truth
    else:
        frame |= {f"truth_{label}": scored.truth[:, k].astype(int) for k, label in enumerate(labels)}
    frame |= {f"probability_{label}": scored.probability[:, k] for k, label in enumerate(labels)}
    if task == "multilabel":
        frame |= {f"threshold_{label}": threshold[label] for label in labels}
    return pd.DataFrame(frame)


def read_predictions(predictions: pd.DataFrame) -> tuple[str, list[str], Scored, Threshold]:
    """predictions.csv rows back to (task, labels, scored, threshold), as _prediction_rows wrote them.

    Binary files do not name their labels (labels is empty).
    """
    columns = list(predictions.columns)
    if "probability" in columns:
        return ("binary", [], Scored(predictions["truth"].to_numpy(dtype=int), predictions["probability"].to_numpy(dtype=float)),
                float(predictions["threshold"].iloc[0]) if len(predictions) else 0.5)
    labels = [column.removeprefix("probability_") for column in columns if column.startswith("probability_")]
    probability = predictions[[f"probability_{label}" for label in labels]].to_numpy(dtype=float)
    if "truth" in columns:
        return "multiclass", labels, Scored(predictions["truth"].to_numpy(dtype=int), probability), None
    truth = predictions[[f"truth_{label}" for label in labels]].to_numpy(dtype=int)
    threshold = {label: float(predictions[f"threshold_{label}"].iloc[0]) for label in labels} if len(predictions) else None
    return "multilabel", labels, Scored(truth, probability), threshold


def _subgroup_metrics(test_rows: pd.DataFrame, task: str, labels: list[str], test: Scored, threshold: Threshold) -> dict:
    """Test metrics per value of each subgroup column that holds two or more values (e.g. PA vs AP films)."""
    groups: dict = {}
    for column in SUBGROUP_COLUMNS:
        values = test_rows[column].fillna("").astype(str).to_numpy()
        kinds = sorted(set(values) - {""})
        if len(kinds) < 2:
            continue
        groups[column] = {}
        for kind in kinds:
            scores = split_metrics(task, labels, test.subset(values == kind), threshold)
            groups[column][kind] = {k: scores[k] for k in ("n", "auc", "accuracy", "sensitivity", "specificity") if k in scores}
    return groups


def _log_to_mlflow(paths: ProjectPaths, metrics: dict, plot_paths: list[Path]) -> None:
    """Every numeric metric of val and test (per-label ones as `test_auc_<label>`), the intervals, the threshold(s)
    as metrics and how they were chosen as a tag (a tag: a rerun may choose another way), plus the files."""
    import mlflow

    from pipeline import tracking

    tracking.connect(paths.root)
    run_id = tracking.read_run_id(paths)
    flat: dict[str, float] = {}
    for split in ("val", "test"):
        flat |= {f"{split}_{name}": value for name, value in metrics[split].items() if _is_number(value)}
        for label, scores in metrics[split].get("per_label", {}).items():
            flat |= {f"{split}_{name}_{_metric_name(label)}": scores[name] for name in ("auc", "sensitivity", "specificity")
                     if _is_number(scores.get(name))}
    intervals = metrics["test"]["ci95"]
    flat |= {f"test_{name}_ci95_{end}": bound for name, interval in intervals.items() if isinstance(interval, list)
             for end, bound in zip(("low", "high"), interval)}
    threshold = metrics["threshold"]
    if isinstance(threshold, dict):
        flat |= {f"threshold_{_metric_name(label)}": value for label, value in threshold.items()}
    elif threshold is not None:
        flat["threshold"] = threshold
    mlflow.log_metrics(flat, run_id=run_id)
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "threshold_method", describe_threshold(metrics))
    client.log_artifact(run_id, str(paths.metrics), artifact_path="evaluation")
    for plot in plot_paths:
        client.log_artifact(run_id, str(plot), artifact_path="evaluation")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_name(label: str) -> str:
    """A label as MLflow metric names allow it (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", label)


def _log_summary(metrics: dict, where: Path) -> None:
    test = metrics["test"]
    auc_ci = test["ci95"]["auc"] or [None, None]
    headline = (f"test AUC {format_metric(test['auc'])} (95% CI {format_metric(auc_ci[0], 3)} to {format_metric(auc_ci[1], 3)}), "
                f"accuracy {format_metric(test['accuracy'], 3)}")
    if metrics["task"] == "binary":
        headline += f", sensitivity {format_metric(test['sensitivity'], 3)}, specificity {format_metric(test['specificity'], 3)}"
    else:
        headline = "macro " + headline
    log.info("evaluate: operating point %s (%s); %s (n=%d) → %s", describe_operating_point(metrics),
             describe_threshold(metrics), headline, test["n"], where)


def _external_metrics(paths: ProjectPaths, config: Config, spec, model, state: dict, internal: dict, threshold: Threshold,
                      temperature: float) -> dict:
    """Score a labelled source the model never saw, decoded exactly as at ingest, at the internal operating point
    (threshold and temperature from validation), and its shift from the internal test."""
    from pipeline.decode_cache import Decoded
    from pipeline.imaging import resize
    from pipeline.ingest import decode_items
    from pipeline.models import apply_temperature
    from pipeline.sources import read_source

    task, labels = state["task"], list(state["labels"])
    items, rejected = read_source(spec, paths.root, config.data)
    labelled = [item for item in items if item.label is not None]
    size = int(state["image_size"])
    files = [item for item in labelled if item.file is not None]
    decoded = dict(zip(map(id, files), decode_items(files, size, config.data.num_workers)))
    images, read = [], []
    for item in labelled:
        outcome = decoded.get(id(item))
        if item.file is None:
            images.append(resize(np.asarray(item.pixels, dtype=np.uint8), size))
        elif isinstance(outcome, Decoded):
            images.append(outcome.pixels)
        else:
            continue
        read.append(item.label)
    if not images:
        raise CxrError(f"evaluate.external: none of the films in '{spec.path}' could be read")
    rows = pd.DataFrame({"label": read, "label_index": [labels.index(label) if label in labels else -1 for label in read]})
    raw = score_films(model, task, labels, rows, np.stack(images))
    scored = Scored(raw.truth, apply_temperature(raw.probability, temperature, task == "multiclass"))
    scores = split_metrics(task, labels, scored, threshold)
    scores["ci95"] = _intervals(task, labels, scored, threshold, config.evaluate)
    scores["unreadable"] = len(labelled) - len(images) + len(rejected)
    scores["shift_from_internal_test"] = {
        name: (scores[name] - internal[name]) if scores[name] is not None and internal.get(name) is not None else None
        for name in ("auc", "accuracy", "sensitivity", "specificity") if name in scores
    }
    log.info("evaluate: external %s: AUC %s (internal test %s), n=%d", spec.path, format_metric(scores["auc"]),
             format_metric(internal.get("auc")), scores["n"])
    return scores
