"""Multilabel: any number of findings per film, none included; a sigmoid and a threshold chosen per label."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.errors import CxrError
from pipeline.labels import UNLABELLED, join_labels, multi_hot, split_labels
from pipeline.tasks.base import (ExampleFilms, Scored, Task, Threshold, in_split_order, spread_on_validation,
                                 threshold_on_validation)

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig, SourceSpec, TrainConfig


class Multilabel(Task):
    """Any number of findings per film: a sigmoid and a threshold per label."""

    name = "multilabel"
    one_label_per_film = False
    thresholds_per_label = True
    label_rows_noun = "label(s) of images"

    def label_from_cell(self, raw: str, spec: SourceSpec, subtype_class: str | None = None) -> str | None:
        """The set of labels the cell names ('' for none of them), split on label_separator ('|' unless given); a
        part label_map does not name is read as its own lowercase name, and parts outside the labels (NIH's
        "No Finding", findings not studied) add nothing."""
        parts = [part.strip() for part in raw.split(spec.label_separator or "|")]
        return join_labels({spec.label_map.get(part, part.lower()) for part in parts}, self.labels)

    def labels_from_npz(self, columns: np.ndarray, where: str) -> list[str]:
        """(N, K) 0/1 columns in labels order (ChestMNIST); another width, or a value other than 0 and 1 (a missing
        one included), is refused naming the first row."""
        if columns.shape[1] != len(self.labels):
            raise CxrError(f"{where} has {columns.shape[1]} columns; a multilabel task needs one per label of "
                           f"data.labels {self.labels}")
        bad = np.flatnonzero(~np.isin(np.asarray(columns, dtype=float), (0, 1)).all(axis=1))
        if len(bad):
            raise CxrError(f"{where}[{bad[0]}] = {columns[bad[0]].tolist()}: each label's column holds 0 or 1")
        return [join_labels((label for label, on in zip(self.labels, row) if on), self.labels) for row in columns]

    def label_index(self, labels: pd.Series) -> pd.Series:
        """-1 for every film: its set of labels is `label`."""
        return pd.Series(-1, index=labels.index)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        return multi_hot(rows["label"], self.labels)

    def label_rows(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """A film's set split into its labels; a film with none gives no row."""
        rows = manifest[["image_id", "split"]].assign(label=manifest["label"].map(split_labels)).explode("label")
        return rows.dropna(subset=["label"]).reset_index(drop=True)

    def label_counts(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """Adds `(none)`: the films carrying none of the labels."""
        manifest = manifest[manifest["split"] != UNLABELLED]
        hot = pd.DataFrame(multi_hot(manifest["label"], self.labels).astype(int), columns=self.labels, index=manifest.index)
        hot["(none)"] = (hot.sum(axis=1) == 0).astype(int)
        return in_split_order(hot.groupby(manifest["split"]).sum())

    def activation(self, logits):
        import torch

        return torch.sigmoid(logits)

    def loss(self, settings: TrainConfig, train_targets: np.ndarray):
        """Binary cross-entropy with logits, or its focal form; `balanced` is a positive weight per label."""
        from torch import nn

        from pipeline.losses import SigmoidFocalLoss, balanced_positive_weights

        pos_weight = balanced_positive_weights(train_targets) if settings.class_weights == "balanced" else None
        if settings.loss == "focal":
            return SigmoidFocalLoss(settings.focal_gamma, pos_weight)
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def validation_scores(self, targets: np.ndarray, probability: np.ndarray) -> dict[str, float]:
        """val_loss is binary cross-entropy per label whatever train.loss is, so runs compare."""
        p = np.clip(probability, 1e-7, 1 - 1e-7)
        val_loss = float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())
        return self._validation_row(val_loss, self.quick_metrics(targets, probability, 0.5))

    def operating_point(self, val: Scored, settings: EvaluateConfig) -> dict[str, float]:
        """One threshold per label, each chosen as a binary task's."""
        return {label: threshold_on_validation(val.truth[:, k], val.probability[:, k], settings, label) for k, label in enumerate(self.labels)}

    def threshold_spread(self, val: Scored, settings: EvaluateConfig, patients: np.ndarray) -> dict | None:
        """Each label's threshold spread; None when every threshold is fixed."""
        spreads = {label: spread_on_validation(val.truth[:, k], val.probability[:, k], settings, patients)
                   for k, label in enumerate(self.labels)}
        return spreads if any(spread is not None for spread in spreads.values()) else None

    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        """Macro AUC, mean per-label accuracy, and each label's binary table at its threshold."""
        from pipeline.metrics import binary_metrics

        truth, probability = scored.truth, scored.probability
        cut = self._cut(threshold)
        per_label = {label: {"threshold": float(cut[k]), **binary_metrics(truth[:, k], probability[:, k], cut[k])}
                     for k, label in enumerate(self.labels)}
        return {**self.quick_metrics(truth, probability, threshold), "n": int(len(truth)), "per_label": per_label}

    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        """The macro AUC over labels and the mean per-label accuracy at the threshold(s)."""
        from pipeline.metrics import macro_auc

        truth, probability = np.asarray(truth), np.asarray(probability, dtype=float)
        if not len(truth):
            return {"auc": None, "accuracy": None}
        predicted = probability >= self._cut(threshold)
        return {"auc": macro_auc(truth, probability), "accuracy": float((predicted == (truth == 1)).mean())}

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int, patients: np.ndarray) -> dict:
        return self._per_label_intervals(scored, threshold, rounds, seed, patients)

    def calibration_inputs(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        """Every label's probability, pooled."""
        return scored.truth.ravel(), scored.probability.ravel()

    def decisions(self, scored: Scored, threshold: Threshold) -> tuple[list[str], list[str]]:
        """Per film and label: '<label>' or 'no <label>'."""
        cut = self._cut(threshold)
        truth, probability = scored.truth, scored.probability
        actual = [_said(truth[i, k], label) for i in range(len(truth)) for k, label in enumerate(self.labels)]
        predicted = [_said(probability[i, k] >= cut[k], label) for i in range(len(truth)) for k, label in enumerate(self.labels)]
        return actual, predicted

    def confusion_panels(self, scored: Scored, threshold: Threshold) -> list[tuple[str, list[str], list[str], list[str]]]:
        """A 2x2 matrix per label at its threshold."""
        actual, predicted = self.decisions(scored, threshold)
        n = len(self.labels)
        return [(f"{label} (threshold {threshold[label]:.2f})", actual[k::n], predicted[k::n], [label, f"no {label}"])
                for k, label in enumerate(self.labels)]

    def describe_point(self, threshold: Threshold) -> str:
        return ", ".join(f"{label} {threshold[label]:.4f}" for label in self.labels)

    def threshold_metrics(self, threshold: Threshold) -> dict[str, float]:
        return {f"threshold_{label}": threshold[label] for label in self.labels}

    def prediction_column_names(self) -> list[str]:
        return [f"{kind}_{label}" for kind in ("truth", "probability", "threshold") for label in self.labels]

    def prediction_columns(self, scored: Scored, threshold: Threshold) -> dict[str, Any]:
        return ({f"truth_{label}": scored.truth[:, k].astype(int) for k, label in enumerate(self.labels)}
                | self._probability_columns(scored.probability)
                | {f"threshold_{label}": threshold[label] for label in self.labels})

    def read_prediction_columns(self, frame: pd.DataFrame) -> tuple[Scored, Threshold]:
        probability = frame[[f"probability_{label}" for label in self.labels]].to_numpy(dtype=float)
        truth = frame[[f"truth_{label}" for label in self.labels]].to_numpy(dtype=int)
        threshold = {label: float(frame[f"threshold_{label}"].iloc[0]) for label in self.labels} if len(frame) else None
        return Scored(truth, probability), threshold

    def serving_table(self, probability: np.ndarray, threshold: Threshold) -> pd.DataFrame:
        """`label`: the labels at or above their own thresholds, joined by '|' ('' for none); `probability_<label>`
        for every label."""
        cut = self._cut(threshold)
        predicted = [join_labels(np.array(self.labels)[row >= cut], self.labels) for row in probability]
        columns = {name: column.astype(np.float64) for name, column in self._probability_columns(probability).items()}
        return pd.DataFrame({"label": predicted, **columns})

    def intended_use(self) -> str:
        named = ", ".join(f"**{label}**" for label in self.labels)
        return f"flags each of {named} on chest radiographs independently (a film can have several, or none)."

    def decision_rule(self, point: str, how: str) -> str:
        return (f"a label is called present at or above its threshold {point} ({how}), stored with the model and "
                "used wherever it is served.")

    def examples(self, scored: Scored, threshold: Threshold, total: int) -> list[ExampleFilms]:
        top = scored.probability.argmax(axis=1)
        right = scored.truth[np.arange(len(top)), top] == 1
        truths = [join_labels((label for label, on in zip(self.labels, row) if on), self.labels) or "none"
                  for row in scored.truth]
        return self._by_confidence(scored, right, truths, total)

    def _cut(self, threshold: Threshold) -> np.ndarray:
        """The operating point as one threshold per label, in labels order (a single number applies to all)."""
        if isinstance(threshold, dict):
            return np.array([threshold[label] for label in self.labels], dtype=float)
        return np.asarray(threshold, dtype=float)


def _said(yes: bool, label: str) -> str:
    return label if yes else f"no {label}"
