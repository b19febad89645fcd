"""Binary: two labels, the last positive; one probability, a threshold chosen on validation, the full table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.tasks.base import (ExampleFilms, LabelBalance, Scored, Threshold, spread_on_validation,
                                 threshold_on_validation)
from pipeline.tasks.one_label import OneLabelPerFilm

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig


class Binary(OneLabelPerFilm):
    """Two labels, the last positive: one probability, a threshold, the full table of metrics."""

    name = "binary"
    headline = ("auc", "accuracy", "sensitivity", "specificity")
    table_metrics = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")

    @classmethod
    def label_problem(cls, labels: list[str]) -> str | None:
        if len(labels) != 2:
            return (f"data.task binary needs exactly two labels (the last is the positive one), got {labels}; "
                    "for three or more classes set data.task: multiclass (or multilabel)")
        return None

    @property
    def positive(self) -> str:
        """The label whose probability the model reports (the last one, 'pneumonia' by default)."""
        return self.labels[-1]

    def metric_title(self, metric: str) -> str:
        return "AUC" if metric == "auc" else metric

    def _one_of(self, mapped: set[str]) -> str | None:
        if len(mapped) > 1 and self.positive in mapped:  # NIH "Pneumonia|Effusion" → pneumonia
            return self.positive
        return super()._one_of(mapped)

    def label_balance(self, manifest: pd.DataFrame) -> LabelBalance:
        """The positive label's fraction in each split (the other label is its complement)."""
        positive = (manifest["label"] == self.positive).groupby(manifest["split"])
        table = pd.DataFrame({"split": positive.size().index.astype(str), "n_images": positive.size().to_numpy(),
                              "positive_fraction": positive.mean().to_numpy()})
        return LabelBalance(table, "split", "positive_fraction", "splits", f"split(s) with a '{self.positive}' fraction")

    def split_summaries(self, manifest: pd.DataFrame) -> dict[str, dict]:
        """Each split's size and positive fraction (the other label's is its complement)."""
        positive = (manifest["label"] == self.positive).groupby(manifest["split"])
        return {str(split): {"n": int(n), "positive_fraction": float(fraction)}
                for split, n, fraction in zip(positive.size().index, positive.size(), positive.mean())}

    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        from pipeline.metrics import binary_metrics

        return binary_metrics(targets == len(self.labels) - 1, probability[:, -1], 0.5)

    def scored(self, rows: pd.DataFrame, probability: np.ndarray) -> Scored:
        """Truth is 1 for the positive label; the probability is the positive label's."""
        return Scored((self.targets(rows) == len(self.labels) - 1).astype(int), probability[:, -1])

    def operating_point(self, val: Scored, settings: EvaluateConfig) -> float:
        return threshold_on_validation(val.truth, val.probability, settings, self.positive)

    def threshold_spread(self, val: Scored, settings: EvaluateConfig, patients: np.ndarray) -> dict | None:
        return spread_on_validation(val.truth, val.probability, settings, patients)

    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        from pipeline.metrics import binary_metrics

        return binary_metrics(scored.truth, scored.probability, threshold)

    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        from pipeline.metrics import threshold_metrics

        return threshold_metrics(truth, probability, threshold)

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int, patients: np.ndarray) -> dict:
        from pipeline.metrics import bootstrap_intervals

        return bootstrap_intervals(scored.truth, scored.probability, threshold, rounds, seed, clusters=patients)

    def calibration_inputs(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        return scored.truth, scored.probability

    def curves(self, scored: Scored) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return [("model", scored.truth, scored.probability)]

    def curve_table(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The positive label's curve alone: two columns, what `dvc plots` draws."""
        return frame.drop(columns="label")

    def decisions(self, scored: Scored, threshold: Threshold) -> tuple[list[str], list[str]]:
        names = np.array([self.labels[0], self.labels[-1]])
        return list(names[scored.truth]), list(names[(scored.probability >= threshold).astype(int)])

    def confusion_panels(self, scored: Scored, threshold: Threshold) -> list[tuple[str, list[str], list[str], list[str]]]:
        actual, predicted = self.decisions(scored, threshold)
        return [(f"Confusion, test split (threshold {threshold:g})", actual, predicted, [self.labels[0], self.labels[-1]])]

    def describe_point(self, threshold: Threshold) -> str:
        return f"{threshold:.4f}"

    def threshold_metrics(self, threshold: Threshold) -> dict[str, float]:
        return {"threshold": threshold}

    def prediction_column_names(self) -> list[str]:
        return ["truth", "probability", "threshold"]

    def prediction_columns(self, scored: Scored, threshold: Threshold) -> dict[str, Any]:
        return {"truth": scored.truth, "probability": scored.probability, "threshold": threshold}

    def read_prediction_columns(self, frame: pd.DataFrame) -> tuple[Scored, Threshold]:
        threshold = float(frame["threshold"].iloc[0]) if len(frame) else 0.5
        return Scored(frame["truth"].to_numpy(dtype=int), frame["probability"].to_numpy(dtype=float)), threshold

    def serving_table(self, probability: np.ndarray, threshold: Threshold) -> pd.DataFrame:
        """`probability` of the positive label and `label`: positive at or above `threshold`, else the other."""
        positive = probability[:, -1].astype(np.float64)
        return pd.DataFrame({"probability": positive, "label": np.where(positive >= threshold, self.labels[-1], self.labels[0])})

    def served_probability(self, table: pd.DataFrame) -> np.ndarray:
        return table["probability"].to_numpy(dtype=float)

    def answer(self, row: dict) -> dict:
        return {"label": str(row["label"]), "probability": round(float(row["probability"]), 6), "probabilities": None}

    def explained(self, table: pd.DataFrame) -> tuple[list[str], list[float], int | None]:
        """Always the positive class: the same class for every film keeps the maps comparable."""
        return [self.positive] * len(table), [float(p) for p in table["probability"]], -1

    def intended_use(self) -> str:
        return f"ranks chest radiographs by the probability of **{self.positive}** against **{self.labels[0]}**."

    def decision_rule(self, point: str, how: str) -> str:
        return f"decision threshold {point} ({how}), stored with the model and used wherever it is served."

    def evidence(self) -> tuple[str, str]:
        return f"evidence of {self.positive}", f"Bright: regions that raised the {self.positive} score."

    def examples(self, scored: Scored, threshold: Threshold, total: int) -> list[ExampleFilms]:
        """The surest true and false positives and negatives, explained for the positive label."""
        predicted = scored.probability >= threshold
        truth = scored.truth == 1
        outcomes = {"true positive": predicted & truth, "false positive": predicted & ~truth,
                    "true negative": ~predicted & ~truth, "false negative": ~predicted & truth}
        groups = []
        for outcome, chosen in outcomes.items():
            positions = np.flatnonzero(chosen)
            key = scored.probability[positions] if outcome.endswith("negative") else -scored.probability[positions]
            picked = positions[np.argsort(key, kind="stable")][: total // len(outcomes)]
            groups.append(ExampleFilms(picked, [f"{outcome}, p={scored.probability[i]:.2f}" for i in picked], -1))
        return groups
