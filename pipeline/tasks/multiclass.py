"""Multiclass: three or more classes, one per film; the most probable class is the answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.tasks.base import ExampleFilms, Scored, Threshold
from pipeline.tasks.one_label import OneLabelPerFilm

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig


class Multiclass(OneLabelPerFilm):
    """Three or more classes, one per film: the most probable class is the answer."""

    name = "multiclass"
    softmax_rows = True

    @classmethod
    def label_problem(cls, labels: list[str]) -> str | None:
        if len(labels) < 3:
            return f"data.task multiclass needs three or more labels, got {labels}; with two set data.task: binary"
        return None

    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        return self.quick_metrics(targets, probability, None)

    def operating_point(self, val: Scored, settings: EvaluateConfig) -> None:
        return None

    def threshold_method(self, settings: EvaluateConfig) -> str:
        return "argmax"

    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        """Macro AUC, accuracy, each class one-vs-rest at the most probable class, and the confusion matrix."""
        from pipeline.metrics import decision_metrics, rank_auc

        truth, probability = scored.truth, scored.probability
        predicted, hot = probability.argmax(axis=1), self._one_vs_rest(truth)
        per_label = {label: {"auc": rank_auc(hot[:, k], probability[:, k]), **decision_metrics(hot[:, k], predicted == k)}
                     for k, label in enumerate(self.labels)}
        confusion = np.zeros((len(self.labels), len(self.labels)), dtype=int)
        np.add.at(confusion, (truth, predicted), 1)
        return {**self.quick_metrics(truth, probability, threshold), "n": int(len(truth)), "per_label": per_label,
                "confusion": {"rows": "actual", "columns": "predicted", "labels": self.labels, "matrix": confusion.tolist()}}

    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        """The macro one-vs-rest AUC and the accuracy of the most probable class."""
        from pipeline.metrics import macro_auc, one_hot

        truth, probability = np.asarray(truth), np.asarray(probability, dtype=float)
        if not len(truth):
            return {"auc": None, "accuracy": None}
        return {"auc": macro_auc(one_hot(truth, probability.shape[1]), probability),
                "accuracy": float((probability.argmax(axis=1) == truth).mean())}

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int, patients: np.ndarray) -> dict:
        return self._per_label_intervals(scored, threshold, rounds, seed, patients)

    def calibration_inputs(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        """The most probable class's probability against being right."""
        return (scored.probability.argmax(axis=1) == scored.truth).astype(int), scored.probability.max(axis=1)

    def decisions(self, scored: Scored, threshold: Threshold) -> tuple[list[str], list[str]]:
        names = np.array(self.labels)
        return list(names[scored.truth]), list(names[scored.probability.argmax(axis=1)])

    def confusion_panels(self, scored: Scored, threshold: Threshold) -> list[tuple[str, list[str], list[str], list[str]]]:
        actual, predicted = self.decisions(scored, threshold)
        return [("Confusion, test split (most probable class)", actual, predicted, self.labels)]

    def describe_point(self, threshold: Threshold) -> str:
        return "most probable class"

    def threshold_metrics(self, threshold: Threshold) -> dict[str, float]:
        return {}

    def prediction_column_names(self) -> list[str]:
        return ["truth", *(f"probability_{label}" for label in self.labels)]

    def prediction_columns(self, scored: Scored, threshold: Threshold) -> dict[str, Any]:
        return {"truth": scored.truth, **self._probability_columns(scored.probability)}

    def read_prediction_columns(self, frame: pd.DataFrame) -> tuple[Scored, Threshold]:
        probability = frame[[f"probability_{label}" for label in self.labels]].to_numpy(dtype=float)
        return Scored(frame["truth"].to_numpy(dtype=int), probability), None

    def serving_table(self, probability: np.ndarray, threshold: Threshold) -> pd.DataFrame:
        """`label` (the most probable class) and `probability_<label>` for every class."""
        predicted = list(np.array(self.labels)[probability.argmax(axis=1)])
        columns = {name: column.astype(np.float64) for name, column in self._probability_columns(probability).items()}
        return pd.DataFrame({"label": predicted, **columns})

    def answer(self, row: dict) -> dict:
        """The most probable class, its probability, and every class's."""
        answer = super().answer(row)
        return answer | {"probability": answer["probabilities"][answer["label"]]}

    def intended_use(self) -> str:
        named = ", ".join(f"**{label}**" for label in self.labels)
        return f"assigns each chest radiograph to one of {named} (the most probable class)."

    def decision_rule(self, point: str, how: str) -> str:
        return "the prediction is the most probable class."

    def examples(self, scored: Scored, threshold: Threshold, total: int) -> list[ExampleFilms]:
        top = scored.probability.argmax(axis=1)
        return self._by_confidence(scored, top == scored.truth, [self.labels[k] for k in scored.truth], total)

    def _one_vs_rest(self, truth: np.ndarray) -> np.ndarray:
        from pipeline.metrics import one_hot

        return one_hot(truth, len(self.labels))
