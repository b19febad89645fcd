"""Evaluate: score the best checkpoint on the held-out test split (and validation, for reference).

Writes reports/metrics.json (DVC metrics), ROC and confusion data as CSV (DVC plots) and as PNG
(MLflow artifacts), and logs the test metrics into the run that `cxr train` opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import atomic_path, sha256_of, write_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)


SUBGROUP_COLUMNS = ("source", "view", "modality", "format")  # manifest columns a model may do better or worse on


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    plot_paths: list[Path]


def evaluate_stage(paths: ProjectPaths, config: Config) -> EvaluateResult:
    """Test and validation metrics at `evaluate.threshold`, plots, and their MLflow logging."""
    import mlflow
    import torch

    from pipeline import tracking
    from pipeline.metrics import binary_metrics, bootstrap_intervals, calibration_table
    from pipeline.models import apply_temperature, fit_temperature, load_checkpoint, predict_proba
    from pipeline.plots import write_evaluation_plots

    model, state = load_checkpoint(paths.checkpoint)
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run `cxr ingest` first")
    manifest = pd.read_parquet(paths.manifest, columns=["store_index", "image_id", "split", "label_index", *SUBGROUP_COLUMNS])
    images = np.load(paths.images, mmap_mode="r")
    positive = len(state["labels"]) - 1
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    predictions: list[pd.DataFrame] = []
    metrics: dict = {"threshold": config.evaluate.threshold, "model": state["model"], "best_epoch": state["epoch"],
                     "checkpoint_sha256": sha256_of(paths.checkpoint)}
    temperature = 1.0
    for split in ("val", "test"):  # val first: temperature scaling is fitted there, then applied to both
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            raise CxrError(f"evaluate: the {split} split is empty; add data or raise data.split.{split}")
        probability = predict_proba(model, np.asarray(images[rows["store_index"].to_numpy()]), torch.device("cpu"))[:, positive]
        truth = (rows["label_index"].to_numpy() == positive).astype(int)
        if split == "val" and config.evaluate.temperature_scaling:
            temperature = fit_temperature(truth, probability)
        probability = apply_temperature(probability, temperature)
        scored[split] = (truth, probability)
        predictions.append(pd.DataFrame({"split": split, "image_id": rows["image_id"].to_numpy(), "store_index": rows["store_index"].to_numpy(),
                                         "truth": truth, "probability": probability, "threshold": config.evaluate.threshold}))
        metrics[split] = binary_metrics(truth, probability, config.evaluate.threshold)

    metrics["temperature"] = temperature
    truth, probability = scored["test"]
    settings = config.evaluate
    metrics["test"]["ci95"] = bootstrap_intervals(truth, probability, settings.threshold, settings.bootstrap_rounds, settings.seed)
    calibration, metrics["test"]["ece"] = calibration_table(truth, probability, settings.calibration_bins)
    metrics["test"]["subgroups"] = _subgroup_metrics(manifest[manifest["split"] == "test"], truth, probability, settings.threshold)
    if settings.external:
        metrics["external"] = {spec.path: _external_metrics(paths, config, spec, model, state, metrics["test"])
                               for spec in settings.external}
    plot_paths = write_evaluation_plots(paths.plots, truth, probability, settings.threshold, state["labels"], calibration)
    write_json(paths.metrics, metrics)
    with atomic_path(paths.predictions) as tmp:
        pd.concat(predictions).to_csv(tmp, index=False, float_format="%.6f")

    tracking.connect(paths.root)
    run_id = tracking.read_run_id(paths)
    flat = {f"{split}_{name}": value for split in ("val", "test") for name, value in metrics[split].items()
            if isinstance(value, (int, float))}
    flat |= {f"test_{name}_ci95_{end}": bound for name, interval in metrics["test"]["ci95"].items() if interval
             for end, bound in zip(("low", "high"), interval)}
    mlflow.log_metrics(flat, run_id=run_id)
    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(paths.metrics), artifact_path="evaluation")
    for plot in plot_paths:
        client.log_artifact(run_id, str(plot), artifact_path="evaluation")
    test = metrics["test"]
    auc_ci = test["ci95"]["auc"] or [None, None]
    log.info("evaluate: test AUC %s (95%% CI %s to %s), accuracy %.3f, sensitivity %.3f, specificity %.3f (n=%d) → %s",
             format_metric(test["auc"]), format_metric(auc_ci[0], 3), format_metric(auc_ci[1], 3), test["accuracy"],
             test["sensitivity"] or 0, test["specificity"] or 0, test["n"], paths.metrics)
    return EvaluateResult(metrics, paths.metrics, plot_paths)


def _subgroup_metrics(test_rows: pd.DataFrame, truth: np.ndarray, probability: np.ndarray, threshold: float) -> dict:
    """Test metrics per value of each subgroup column that holds two or more values (e.g. PA vs AP films)."""
    from pipeline.metrics import binary_metrics

    groups: dict = {}
    for column in SUBGROUP_COLUMNS:
        values = test_rows[column].fillna("").astype(str).to_numpy()
        kinds = sorted(set(values) - {""})
        if len(kinds) < 2:
            continue
        groups[column] = {}
        for kind in kinds:
            inside = values == kind
            scores = binary_metrics(truth[inside], probability[inside], threshold)
            groups[column][kind] = {k: scores[k] for k in ("n", "auc", "accuracy", "sensitivity", "specificity")}
    return groups


def _external_metrics(paths: ProjectPaths, config: Config, spec, model, state: dict, internal: dict) -> dict:
    """Score a labelled source the model never saw, decoded exactly as at ingest, and its shift from the internal test."""
    import torch

    from pipeline.decode_cache import Decoded
    from pipeline.imaging import resize
    from pipeline.ingest import decode_items
    from pipeline.metrics import binary_metrics, bootstrap_intervals
    from pipeline.models import predict_proba
    from pipeline.sources import read_source

    items, rejected = read_source(spec, paths.root, config.data)
    labelled = [item for item in items if item.label is not None]
    size = int(state["image_size"])
    files = [item for item in labelled if item.file is not None]
    decoded = dict(zip(map(id, files), decode_items(files, size, config.data.num_workers)))
    images, truth = [], []
    for item in labelled:
        outcome = decoded.get(id(item))
        if item.file is None:
            images.append(resize(np.asarray(item.pixels, dtype=np.uint8), size))
        elif isinstance(outcome, Decoded):
            images.append(outcome.pixels)
        else:
            continue
        truth.append(int(item.label == state["labels"][-1]))
    if not images:
        raise CxrError(f"evaluate.external: none of the films in '{spec.path}' could be read")
    truth = np.array(truth)
    probability = predict_proba(model, np.stack(images), torch.device("cpu"))[:, -1]
    scores = binary_metrics(truth, probability, config.evaluate.threshold)
    scores["ci95"] = bootstrap_intervals(truth, probability, config.evaluate.threshold, config.evaluate.bootstrap_rounds, config.evaluate.seed)
    scores["unreadable"] = len(labelled) - len(images) + len(rejected)
    scores["shift_from_internal_test"] = {
        name: (scores[name] - internal[name]) if scores[name] is not None and internal.get(name) is not None else None
        for name in ("auc", "accuracy", "sensitivity", "specificity")
    }
    log.info("evaluate: external %s: AUC %s (internal test %s), n=%d", spec.path, format_metric(scores["auc"]),
             format_metric(internal.get("auc")), scores["n"])
    return scores
