"""Evaluation plots, each written twice: a CSV that `dvc plots` draws and a PNG for people and MLflow.

Which curves and confusion matrices there are is the task's (pipeline.tasks): one-vs-rest curves per label for
multiclass and multilabel tasks (their CSVs then start with a `label` column), the positive label's curve alone
for a binary one; one confusion matrix, or one per label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path
from pipeline.tasks import Scored, Task, Threshold


def write_evaluation_plots(folder: Path, task: Task, test: Scored, threshold: Threshold, calibration: list[dict]) -> list[Path]:
    """ROC, precision-recall, reliability (calibration) and confusion for the test split; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc_rows, pr_rows, roc_lines, pr_lines = [], [], [], []
    for name, y, p in task.curves(test):
        two_classes = len(np.unique(y)) == 2
        fpr, tpr, cuts = roc_curve(y, p) if two_classes else ([0, 1], [0, 1], [1, 0])
        precision, recall, _ = precision_recall_curve(y, p) if two_classes else ([1, 0], [0, 1], None)
        roc_rows.append(pd.DataFrame({"label": name, "fpr": fpr, "tpr": tpr, "threshold": np.minimum(cuts, 1.0)}))
        pr_rows.append(pd.DataFrame({"label": name, "recall": recall, "precision": precision}))
        roc_lines.append((name, fpr, tpr))
        pr_lines.append((name, recall, precision))
    _write_csv(folder / "roc.csv", task.curve_table(pd.concat(roc_rows)))
    _write_csv(folder / "pr.csv", task.curve_table(pd.concat(pr_rows)))
    _write_csv(folder / "calibration.csv", pd.DataFrame({key: [row[key] for row in calibration] for key in ("predicted", "observed", "count")}))
    actual, predicted = task.decisions(test, threshold)
    _write_csv(folder / "confusion.csv", pd.DataFrame({"actual": actual, "predicted": predicted}))

    return [
        _line_plot(folder / "roc.png", roc_lines, "ROC, test split", "False positive rate (1 - specificity)",
                   "True positive rate (sensitivity)", diagonal=True),
        _line_plot(folder / "pr.png", pr_lines, "Precision-recall, test split", "Recall (sensitivity)",
                   "Precision (PPV)", diagonal=False),
        _line_plot(folder / "calibration.png", [("model", [row["predicted"] for row in calibration], [row["observed"] for row in calibration])],
                   "Reliability, test split", "Mean predicted probability", "Observed fraction positive", diagonal=True),
        _confusion_plot(folder / "confusion.png", task.confusion_panels(test, threshold)),
    ]


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f")


def _line_plot(path: Path, lines: list[tuple[str, object, object]], title: str, xlabel: str, ylabel: str, diagonal: bool) -> Path:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for name, x, y in lines:
        axis.plot(x, y, marker="o" if len(x) <= 12 else None, label=name)
    if diagonal:
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance" if "ROC" in title else "perfect")
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path


def _confusion_plot(path: Path, panels: list[tuple[str, list[str], list[str], list[str]]]) -> Path:
    """One matrix, sized to its labels, or a grid of small ones (e.g. a 2x2 matrix per label at its threshold)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    if len(panels) == 1:
        title, actual, predicted, names = panels[0]
        figure, axis = plt.subplots(figsize=(4.5 + 0.4 * max(0, len(names) - 2),) * 2)
        ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=names, ax=axis, colorbar=False)
        axis.set_title(title)
    else:
        columns = min(3, len(panels))
        rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
        for (title, actual, predicted, names), axis in zip(panels, axes.flat):
            ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=names, ax=axis, colorbar=False)
            axis.set_title(title, fontsize="small")
        for axis in list(axes.flat)[len(panels):]:
            axis.axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path
