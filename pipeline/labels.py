"""How a film's label is written in the manifest and turned into training targets, for each `data.task`.

binary and multiclass: `label` is the film's one class and `label_index` its position in `data.labels`.
multilabel: `label` is the film's set of labels joined by '|' in `data.labels` order ('effusion|pneumonia';
'' for a film with none of them, e.g. NIH's "No Finding") and `label_index` is -1; the set string is also
the stratum the patient split and the rebalance sampler use (the label powerset).

Imports only numpy and pandas: the served model (pipeline.serving) uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

SEPARATOR = "|"
UNLABELLED = "unlabelled"  # the split of films from unlabelled sources (kept for prediction, never trained on)


def join_labels(found: Iterable[str], labels: list[str]) -> str:
    """A set of labels as the manifest writes it: those in `labels`, in that order, joined by '|'."""
    chosen = set(found)
    return SEPARATOR.join(label for label in labels if label in chosen)


def split_labels(text: str) -> list[str]:
    """A manifest label string back to its labels ('' is the empty set)."""
    return [part for part in str(text).split(SEPARATOR) if part]


def multi_hot(texts: Iterable[str], labels: list[str]) -> np.ndarray:
    """(N, K) float32 0/1, one column per label in `labels` order: the targets of a multilabel model."""
    column = {label: k for k, label in enumerate(labels)}
    texts = list(texts)
    hot = np.zeros((len(texts), len(labels)), dtype=np.float32)
    for row, text in enumerate(texts):
        for part in split_labels(text):
            if part in column:
                hot[row, column[part]] = 1.0
    return hot


def targets(rows: pd.DataFrame, task: str, labels: list[str]) -> np.ndarray:
    """Training and scoring targets for manifest rows: class indices (N,) int64, or multi-hot (N, K) for multilabel."""
    if task == "multilabel":
        return multi_hot(rows["label"], labels)
    return rows["label_index"].to_numpy().astype(np.int64)


def label_counts(manifest: pd.DataFrame, task: str, labels: list[str]) -> pd.DataFrame:
    """Films per labelled split (rows) carrying each label (columns, in `labels` order); multilabel adds `(none)`."""
    manifest = manifest[manifest["split"] != UNLABELLED]
    if task == "multilabel":
        hot = pd.DataFrame(multi_hot(manifest["label"], labels).astype(int), columns=labels, index=manifest.index)
        hot["(none)"] = (hot.sum(axis=1) == 0).astype(int)
        counts = hot.groupby(manifest["split"]).sum()
    else:
        counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(columns=labels, fill_value=0)
    order = {split: rank for rank, split in enumerate(("train", "val", "test"))}
    return counts.loc[sorted(counts.index, key=lambda split: (order.get(split, len(order)), split))]
