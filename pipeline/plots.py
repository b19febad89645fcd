"""Evaluation plots, each written twice: a CSV that `dvc plots` draws and a PNG for people and MLflow.

ROC and precision-recall curves are one-vs-rest, one per label, for multiclass and multilabel tasks (their CSVs
then start with a `label` column); a binary task has the positive label's curve alone, as before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path


def write_evaluation_plots(
    folder: Path, task: str, labels: list[str], truth: np.ndarray, probability: np.ndarray, threshold,
    calibration: list[dict],
) -> list[Path]:
    """ROC, precision-recall, reliability (calibration) and confusion for the test split; returns the PNG paths.

    `truth`, `probability` and `threshold` are shaped as pipeline.evaluate.Scored and its operating point.
    """
    import matplotlib

    matplotlib.use("Agg")
    from sklearn.metrics import precision_recall_curve, roc_curve

    roc_rows, pr_rows, roc_lines, pr_lines = [], [], [], []
    for name, y, p in _one_vs_rest(task, labels, truth, probability):
        two_classes = len(np.unique(y)) == 2
        fpr, tpr, cuts = roc_curve(y, p) if two_classes else ([0, 1], [0, 1], [1, 0])
        precision, recall, _ = precision_recall_curve(y, p) if two_classes else ([1, 0], [0, 1], None)
        roc_rows.append(pd.DataFrame({"label": name, "fpr": fpr, "tpr": tpr, "threshold": np.minimum(cuts, 1.0)}))
        pr_rows.append(pd.DataFrame({"label": name, "recall": recall, "precision": precision}))
        roc_lines.append((name, fpr, tpr))
        pr_lines.append((name, recall, precision))
    _write_csv(folder / "roc.csv", _labelled(pd.concat(roc_rows), task))
    _write_csv(folder / "pr.csv", _labelled(pd.concat(pr_rows), task))
    _write_csv(folder / "calibration.csv", pd.DataFrame({key: [row[key] for row in calibration] for key in ("predicted", "observed", "count")}))
    actual, predicted, names = _decisions(task, labels, truth, probability, threshold)
    _write_csv(folder / "confusion.csv", pd.DataFrame({"actual": actual, "predicted": predicted}))

    return [
        _line_plot(folder / "roc.png", roc_lines, "ROC, test split", "False positive rate (1 - specificity)",
                   "True positive rate (sensitivity)", diagonal=True),
        _line_plot(folder / "pr.png", pr_lines, "Precision-recall, test split", "Recall (sensitivity)",
                   "Precision (PPV)", diagonal=False),
        _line_plot(folder / "calibration.png", [("model", [row["predicted"] for row in calibration], [row["observed"] for row in calibration])],
                   "Reliability, test split", "Mean predicted probability", "Observed fraction positive", diagonal=True),
        _confusion_plot(folder / "confusion.png", task, labels, actual, predicted, names, threshold),
    ]


def _one_vs_rest(task: str, labels: list[str], truth: np.ndarray, probability: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, 0/1 truth, probability) per curve: the positive label alone for binary, every label otherwise."""
    if task == "binary":
        return [("model", truth, probability)]
    hot = (truth[:, None] == np.arange(len(labels))).astype(int) if task == "multiclass" else truth
    return [(label, hot[:, k], probability[:, k]) for k, label in enumerate(labels)]


def _labelled(frame: pd.DataFrame, task: str) -> pd.DataFrame:
    """Binary curve CSVs keep their two columns (what `dvc plots` draws); the others name each row's label."""
    return frame.drop(columns="label") if task == "binary" else frame


def _decisions(task: str, labels: list[str], truth: np.ndarray, probability: np.ndarray, threshold):
    """Actual and predicted names per film (multilabel: per film and label, '<label>' or 'no <label>') and the
    names in display order."""
    if task == "binary":
        names = np.array([labels[0], labels[-1]])
        return names[truth], names[(probability >= threshold).astype(int)], list(names)
    if task == "multiclass":
        names = np.array(labels)
        return names[truth], names[probability.argmax(axis=1)], labels
    cut = np.array([threshold[label] for label in labels])
    said = lambda yes, label: label if yes else f"no {label}"  # noqa: E731
    actual = [said(truth[i, k], label) for i in range(len(truth)) for k, label in enumerate(labels)]
    predicted = [said(probability[i, k] >= cut[k], label) for i in range(len(truth)) for k, label in enumerate(labels)]
    return actual, predicted, [name for label in labels for name in (label, f"no {label}")]


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


def _confusion_plot(path: Path, task: str, labels: list[str], actual, predicted, names: list[str], threshold) -> Path:
    """One matrix (binary, multiclass), or a 2x2 matrix per label at its threshold (multilabel)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    if task != "multilabel":
        figure, axis = plt.subplots(figsize=(4.5 + 0.4 * max(0, len(names) - 2),) * 2)
        ConfusionMatrixDisplay.from_predictions(actual, predicted, labels=names, ax=axis, colorbar=False)
        how = f"threshold {threshold:g}" if task == "binary" else "most probable class"
        axis.set_title(f"Confusion, test split ({how})")
    else:
        columns = min(3, len(labels))
        rows = -(-len(labels) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
        pairs = np.array(list(zip(actual, predicted))).reshape(-1, len(labels), 2)
        for k, (label, axis) in enumerate(zip(labels, axes.flat)):
            ConfusionMatrixDisplay.from_predictions(pairs[:, k, 0], pairs[:, k, 1], labels=[label, f"no {label}"], ax=axis,
                                                    colorbar=False)
            axis.set_title(f"{label} (threshold {threshold[label]:.2f})", fontsize="small")
        for axis in list(axes.flat)[len(labels):]:
            axis.axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)
    return path
