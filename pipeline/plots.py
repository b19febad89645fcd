"""Evaluation plots, each written twice: a CSV that `dvc plots` draws and a PNG for people and MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path


def write_evaluation_plots(
    folder: Path, truth: np.ndarray, probability: np.ndarray, threshold: float, labels: list[str], calibration: list[dict],
) -> list[Path]:
    """ROC, precision-recall, reliability (calibration) and confusion for the test split; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import precision_recall_curve, roc_curve

    two_classes = len(np.unique(truth)) == 2
    fpr, tpr, roc_thresholds = roc_curve(truth, probability) if two_classes else ([0, 1], [0, 1], [1, 0])
    _write_csv(folder / "roc.csv", {"fpr": fpr, "tpr": tpr, "threshold": np.minimum(roc_thresholds, 1.0)})
    precision, recall, _ = precision_recall_curve(truth, probability) if two_classes else ([1, 0], [0, 1], None)
    _write_csv(folder / "pr.csv", {"recall": recall, "precision": precision})
    _write_csv(folder / "calibration.csv", {key: [row[key] for row in calibration] for key in ("predicted", "observed", "count")})
    names = np.array([labels[0], labels[-1]])
    predicted = (probability >= threshold).astype(int)
    _write_csv(folder / "confusion.csv", {"actual": names[truth], "predicted": names[predicted]})

    return [
        _line_plot(folder / "roc.png", fpr, tpr, "ROC, test split", "False positive rate (1 - specificity)",
                   "True positive rate (sensitivity)", diagonal=True),
        _line_plot(folder / "pr.png", recall, precision, "Precision-recall, test split", "Recall (sensitivity)",
                   "Precision (PPV)", diagonal=False),
        _line_plot(folder / "calibration.png", [row["predicted"] for row in calibration], [row["observed"] for row in calibration],
                   "Reliability, test split", "Mean predicted probability", "Observed fraction positive", diagonal=True),
        _confusion_plot(folder / "confusion.png", names[truth], names[predicted], list(names), threshold),
    ]


def _write_csv(path: Path, columns: dict) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(columns).to_csv(tmp, index=False, float_format="%.6f")


def _line_plot(path: Path, x, y, title: str, xlabel: str, ylabel: str, diagonal: bool) -> Path:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(x, y, marker="o" if len(x) <= 12 else None, label="model")
    if diagonal:
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance" if "ROC" in title else "perfect")
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path


def _confusion_plot(path: Path, actual, predicted, labels: list[str], threshold: float) -> Path:
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=labels, ax=axis, colorbar=False)
    axis.set_title(f"Confusion, test split (threshold {threshold:g})")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path
