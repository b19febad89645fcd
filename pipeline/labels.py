"""How a multilabel film's set of labels is written in the manifest: joined by '|' in `data.labels` order.

'effusion|pneumonia'; '' for a film with none of them (e.g. NIH's "No Finding"). The set string is also the
stratum the patient split and the rebalance sampler use (the label powerset). Binary and multiclass films
carry their one class as `label` (pipeline.tasks reads both forms).

Imports only numpy: the served model (pipeline.serving) uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

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
