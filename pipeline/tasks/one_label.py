"""What binary and multiclass tasks share: one class per film, its position as label_index, a softmax."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.errors import CxrError
from pipeline.labels import UNLABELLED
from pipeline.tasks.base import Task, in_split_order

if TYPE_CHECKING:
    from pipeline.config import SourceSpec, TrainConfig


class OneLabelPerFilm(Task):
    """Binary and multiclass: each film has one class, `label_index` is its position, outputs are a softmax."""

    def label_from_cell(self, raw: str, spec: SourceSpec, subtype_class: str | None = None) -> str | None:
        """One label: the cell's (split on label_separator when given) mapped through label_map; None when it names
        none or several. With data.class_from: subtype, `subtype_class` names the class whatever the cell says."""
        parts = [part.strip() for part in raw.split(spec.label_separator)] if spec.label_separator else [raw]
        mapped = {spec.label_map.get(part, part.lower() if not spec.label_map else None) for part in parts} - {None}
        if subtype_class:
            mapped = {subtype_class}
        return self._one_of(mapped & set(self.labels))

    def _one_of(self, mapped: set[str]) -> str | None:
        return mapped.pop() if len(mapped) == 1 else None

    def labels_from_npz(self, columns: np.ndarray, where: str) -> list[str]:
        """One class index per film ((N,) or (N, 1)), or one-hot rows with one column per label (argmax where each
        row holds exactly one 1); anything else, a missing, fractional or out-of-range index included, is refused
        naming the first row."""
        if columns.shape[1] == 1:
            index = columns[:, 0]
        elif columns.shape[1] == len(self.labels):
            hot = np.asarray(columns, dtype=float)
            not_one_hot = np.flatnonzero(~(np.isin(hot, (0, 1)).all(axis=1) & (hot.sum(axis=1) == 1)))
            if len(not_one_hot):
                row = not_one_hot[0]
                raise CxrError(f"{where}[{row}] = {columns[row].tolist()}: a one-hot row needs exactly one 1 among "
                               f"{len(self.labels)} columns (data.labels {self.labels})")
            index = hot.argmax(axis=1)
        else:
            raise CxrError(f"{where} has {columns.shape[1]} columns: expected one class index per film, or one-hot rows "
                           f"with one column per label of data.labels {self.labels}")
        values = np.asarray(index, dtype=float)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= len(self.labels)))
        if len(bad):
            raise CxrError(f"{where}[{bad[0]}] = {index[bad[0]]} is not a class index of data.labels {self.labels} "
                           f"(0 to {len(self.labels) - 1})")
        return [self.labels[int(value)] for value in values]

    def label_index(self, labels: pd.Series) -> pd.Series:
        return labels.map({label: i for i, label in enumerate(self.labels)}).fillna(-1).astype(int)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        return rows["label_index"].to_numpy().astype(np.int64)

    def label_rows(self, manifest: pd.DataFrame) -> pd.DataFrame:
        return manifest[["image_id", "split", "label"]]

    def label_counts(self, manifest: pd.DataFrame) -> pd.DataFrame:
        manifest = manifest[manifest["split"] != UNLABELLED]
        counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(columns=self.labels, fill_value=0)
        return in_split_order(counts)

    def activation(self, logits):
        import torch

        return torch.softmax(logits, dim=1)

    def loss(self, settings: TrainConfig, train_targets: np.ndarray):
        from torch import nn

        from pipeline.losses import FocalLoss, balanced_class_weights

        weight = balanced_class_weights(train_targets, len(self.labels)) if settings.class_weights == "balanced" else None
        if settings.loss == "focal":
            return FocalLoss(settings.focal_gamma, weight)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=settings.label_smoothing)

    def validation_scores(self, targets: np.ndarray, probability: np.ndarray) -> dict[str, float]:
        """val_loss is plain cross-entropy whatever train.loss is, so runs compare."""
        val_loss = float(-np.log(probability[np.arange(len(targets)), targets] + 1e-7).mean())
        return self._validation_row(val_loss, self.quick_validation(targets, probability))

    @abstractmethod
    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        """AUC and accuracy of validation targets (class indices) and (N, K) probabilities, as training reads them."""
