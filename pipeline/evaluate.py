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
from pipeline.files import atomic_path, write_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)


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
    from pipeline.metrics import binary_metrics
    from pipeline.models import load_checkpoint, predict_proba

    model, state = load_checkpoint(paths.checkpoint)
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run `cxr ingest` first")
    manifest = pd.read_parquet(paths.manifest, columns=["store_index", "split", "label_index"])
    images = np.load(paths.images, mmap_mode="r")
    positive = len(state["labels"]) - 1
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    metrics: dict = {"threshold": config.evaluate.threshold, "model": state["model"], "best_epoch": state["epoch"]}
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            raise CxrError(f"evaluate: the {split} split is empty; add data or raise data.split.{split}")
        probability = predict_proba(model, np.asarray(images[rows["store_index"].to_numpy()]), torch.device("cpu"))[:, positive]
        truth = (rows["label_index"].to_numpy() == positive).astype(int)
        scored[split] = (truth, probability)
        metrics[split] = binary_metrics(truth, probability, config.evaluate.threshold)

    plot_paths = _write_plots(paths, *scored["test"], config.evaluate.threshold, state["labels"])
    write_json(paths.metrics, metrics)

    tracking.connect(paths.root)
    run_id = tracking.read_run_id(paths)
    flat = {f"{split}_{name}": value for split in ("val", "test") for name, value in metrics[split].items() if value is not None}
    mlflow.log_metrics(flat, run_id=run_id)
    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(paths.metrics), artifact_path="evaluation")
    for plot in plot_paths:
        client.log_artifact(run_id, str(plot), artifact_path="evaluation")
    test = metrics["test"]
    log.info("evaluate: test AUC %s, accuracy %.3f, sensitivity %.3f, specificity %.3f (n=%d) → %s",
             format_metric(test["auc"]), test["accuracy"], test["sensitivity"] or 0, test["specificity"] or 0, test["n"], paths.metrics)
    return EvaluateResult(metrics, paths.metrics, plot_paths)


def _write_plots(paths: ProjectPaths, truth: np.ndarray, probability: np.ndarray, threshold: float, labels: list[str]) -> list[Path]:
    """ROC curve and confusion pairs as CSV for `dvc plots`, and the same two as PNG for people and MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

    fpr, tpr, thresholds = roc_curve(truth, probability) if len(np.unique(truth)) == 2 else ([0, 1], [0, 1], [1, 0])
    with atomic_path(paths.roc) as tmp:
        pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thresholds, 1.0)}).to_csv(tmp, index=False, float_format="%.6f")
    predicted = (probability >= threshold).astype(int)
    names = np.array([labels[0], labels[-1]])
    with atomic_path(paths.confusion) as tmp:
        pd.DataFrame({"actual": names[truth], "predicted": names[predicted]}).to_csv(tmp, index=False)

    roc_png, confusion_png = paths.plots / "roc.png", paths.plots / "confusion.png"
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(fpr, tpr, label="model")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axis.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)", title="ROC, test split")
    axis.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(roc_png) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(names[truth], names[predicted], labels=list(names), ax=axis, colorbar=False)
    axis.set_title(f"Confusion, test split (threshold {threshold:g})")
    figure.tight_layout()
    with atomic_path(confusion_png) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return [roc_png, confusion_png]
