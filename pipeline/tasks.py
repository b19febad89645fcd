"""What differs between the three tasks a model can be trained for, in one place: Binary, Multiclass, Multilabel.

`task_for(data.task, labels)` picks one once (from params, a checkpoint or a registered model's metadata); the
stages then ask it and never branch on the task themselves, as torchmetrics' Binary/Multiclass/MultilabelAUROC
each own their formula and the code that uses them does not care which it holds.

- Binary: two labels, the last is positive; a 2-way softmax; the positive label's probability is called
  positive at a threshold chosen on validation; the full table (AUC, accuracy, sensitivity, ...) at it.
- Multiclass: three or more classes, one per film; a softmax; the most probable class is the prediction.
  `auc` is the macro one-vs-rest AUC, `accuracy` that of the most probable class; plus a confusion matrix and
  each class's one-vs-rest metrics.
- Multilabel: two or more findings, any number per film, none included; a sigmoid per label; one threshold per
  label chosen on validation. `auc` is the macro AUC over labels, `accuracy` the mean per-label accuracy at
  those thresholds; plus each label's table at its threshold.
`auc` and `accuracy` mean the same to the champion gate in every task.

The manifest writes a binary or multiclass film's class as `label` and its position in the labels as
`label_index`; a multilabel film's `label` is its set joined by '|' (pipeline.labels) and `label_index` is -1.

Only numpy and pandas are imported at the top (torch and scikit-learn inside the methods that need them):
the served model (pipeline.serving) imports this module too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.errors import CxrError
from pipeline.labels import UNLABELLED, join_labels, multi_hot, split_labels

if TYPE_CHECKING:
    from pipeline.config import EvaluateConfig, SourceSpec, TrainConfig

# The operating point: a float (binary), {label: float} (multilabel) or None (multiclass: the most probable class).
Threshold = float | dict[str, float] | None

SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class Scored:
    """One split's truth and probabilities, shaped as the task reads them.

    binary: truth 0/1 and the positive label's probability, both (N,). multiclass: truth the class index (N,),
    probability (N, K). multilabel: truth 0/1 and probability, both (N, K).
    """

    truth: np.ndarray
    probability: np.ndarray

    def subset(self, inside: np.ndarray) -> Scored:
        return Scored(self.truth[inside], self.probability[inside])


@dataclass(frozen=True)
class LabelBalance:
    """The data gate's class-ratio check: one fraction per row of `table` (key column `key`), each within bounds."""

    table: pd.DataFrame  # columns: key and column
    key: str
    column: str
    noun: str  # what a row is, for the gate's "n of {noun}" counts
    failure: str  # completes "{n} ... outside [min, max]"


@dataclass(frozen=True)
class ExampleFilms:
    """Films of the test split to explain with Grad-CAM: their row positions, captions, and the class explained."""

    positions: np.ndarray
    captions: list[str]
    class_index: int | None  # the output Grad-CAM explains (-1: the positive class), or None: each film's top output


class Task(ABC):
    """The labels of one task and everything that depends on how they are read."""

    name: ClassVar[str]
    # The test metrics a one-line summary shows, and those the metrics tables of documents show, in order.
    headline: ClassVar[tuple[str, ...]] = ("auc", "accuracy")
    table_metrics: ClassVar[tuple[str, ...]] = ("auc", "accuracy")
    one_label_per_film: ClassVar[bool] = True

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)

    @classmethod
    def label_problem(cls, labels: list[str]) -> str | None:
        """Why `labels` cannot be this task's data.labels (a sentence), or None when they can."""
        return None

    def metric_title(self, metric: str) -> str:
        """A metric's name as people read it ('auc' is a macro AUC unless the task is binary)."""
        return "macro AUC" if metric == "auc" else metric

    # --- labels in the manifest -----------------------------------------------------------------

    @abstractmethod
    def label_from_cell(self, raw: str, spec: SourceSpec, subtype_class: str | None = None) -> str | None:
        """A label table's cell as the manifest writes it, or None when it names no usable label."""

    @abstractmethod
    def labels_from_npz(self, columns: np.ndarray, where: str) -> list[str]:
        """MedMNIST label rows (N, columns) as manifest labels; `where` names the array in errors."""

    @abstractmethod
    def label_index(self, labels: pd.Series) -> pd.Series:
        """The manifest's label_index for each `label`."""

    @abstractmethod
    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        """Training targets of manifest rows: class indices (N,) int64, or multi-hot (N, K) float32."""

    @abstractmethod
    def label_rows(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """(image_id, split, label) rows, one per label a film carries: what the gate checks labels on."""

    label_rows_noun: ClassVar[str] = "image(s) with a label"

    @abstractmethod
    def label_counts(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """Films per labelled split (rows, in pipeline order) carrying each label (columns, in labels order)."""

    @abstractmethod
    def label_balance(self, manifest: pd.DataFrame) -> LabelBalance:
        """The fractions the data gate keeps within validation.class_ratio."""

    @abstractmethod
    def split_summary(self, manifest: pd.DataFrame, split: str) -> dict:
        """A split's entry in the gate's summary.json: its size and how its labels are spread."""

    # --- the network's outputs ------------------------------------------------------------------

    @abstractmethod
    def activation(self, logits):  # torch.Tensor -> torch.Tensor
        """Logits to probabilities."""

    @abstractmethod
    def loss(self, settings: TrainConfig, train_targets: np.ndarray):  # -> torch.nn.Module
        """The loss `train.loss` and `train.class_weights` name; weights come from the (rebalanced) training index."""

    @abstractmethod
    def validation_scores(self, targets: np.ndarray, probability: np.ndarray) -> dict[str, float]:
        """val_loss, val_auc and val_accuracy as training logs them every epoch (decisions at 0.5)."""

    # --- scoring --------------------------------------------------------------------------------

    def scored(self, rows: pd.DataFrame, probability: np.ndarray) -> Scored:
        """The targets of manifest `rows` and the model's (N, K) probabilities for them."""
        return Scored(self.targets(rows), probability)

    def fit_temperature(self, val: Scored) -> float:
        from pipeline.metrics import fit_temperature

        return fit_temperature(val.truth, val.probability)

    def apply_temperature(self, probability: np.ndarray, temperature: float) -> np.ndarray:
        from pipeline.metrics import apply_temperature

        return apply_temperature(probability, temperature)

    @abstractmethod
    def operating_point(self, val: Scored, settings: EvaluateConfig) -> Threshold:
        """The operating point, chosen on the validation split."""

    def threshold_method(self, settings: EvaluateConfig) -> str:
        return settings.threshold_method

    @abstractmethod
    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        """One split's metrics at the operating point."""

    @abstractmethod
    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        """The headline metrics without counts or scikit-learn, for the thousands of calls a bootstrap makes."""

    @abstractmethod
    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int) -> dict:
        """95 % bootstrap intervals of the metrics."""

    @abstractmethod
    def calibration_inputs(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        """What the reliability curve compares: (0/1 outcomes, probabilities)."""

    # --- plots ----------------------------------------------------------------------------------

    def curves(self, scored: Scored) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(label, 0/1 truth, probability) per ROC and precision-recall curve: one-vs-rest for every label."""
        hot = self._one_vs_rest(scored.truth)
        return [(label, hot[:, k], scored.probability[:, k]) for k, label in enumerate(self.labels)]

    def curve_table(self, frame: pd.DataFrame) -> pd.DataFrame:
        """A curve CSV as written: its rows name their label."""
        return frame

    @abstractmethod
    def decisions(self, scored: Scored, threshold: Threshold) -> tuple[list[str], list[str]]:
        """Actual and predicted names, one pair per film (multilabel: per film and label), for confusion.csv."""

    @abstractmethod
    def confusion_panels(self, scored: Scored, threshold: Threshold) -> list[tuple[str, list[str], list[str], list[str]]]:
        """(title, actual, predicted, names in display order) per confusion matrix drawn."""

    # --- predictions.csv ------------------------------------------------------------------------

    @abstractmethod
    def prediction_columns(self, scored: Scored, threshold: Threshold) -> dict[str, Any]:
        """predictions.csv's task columns (pipeline.predictions adds split, image_id and store_index)."""

    @abstractmethod
    def read_prediction_columns(self, frame: pd.DataFrame) -> tuple[Scored, Threshold]:
        """What prediction_columns wrote, back."""

    # --- serving --------------------------------------------------------------------------------

    @abstractmethod
    def serving_table(self, probability: np.ndarray, threshold: Threshold) -> pd.DataFrame:
        """What the served model answers for (N, K) probabilities, one row per image."""

    def served_probability(self, table: pd.DataFrame) -> np.ndarray:
        """The probabilities in a served table, shaped as Scored holds them."""
        return table[[f"probability_{label}" for label in self.labels]].to_numpy(dtype=float)

    def answer(self, row: dict) -> dict:
        """A served table row as `cxr predict` reports it: label, probability (or None), probabilities (or None)."""
        probabilities = {label: round(float(row[f"probability_{label}"]), 6) for label in self.labels}
        return {"label": str(row["label"]), "probability": None, "probabilities": probabilities}

    def explained(self, table: pd.DataFrame) -> tuple[list[str], list[float], int | None]:
        """For Grad-CAM of served films: the label each map explains, its probability, and the class index to
        explain (None: each film's own most probable output)."""
        probability = self.served_probability(table)
        return [self.labels[k] for k in probability.argmax(axis=1)], list(probability.max(axis=1)), None

    # --- documents ------------------------------------------------------------------------------

    @abstractmethod
    def intended_use(self) -> str:
        """What the model does, as the model card's intended use says it."""

    @abstractmethod
    def decision_rule(self, point: str, how: str) -> str:
        """How the model decides, given its operating point and how it was chosen, in words."""

    def evidence(self) -> tuple[str, str]:
        """The Grad-CAM section's heading ('where the model found ...') and its note."""
        return "evidence of the top label", "Bright: regions that raised the score of the film's most probable label."

    @abstractmethod
    def examples(self, scored: Scored, threshold: Threshold, total: int) -> list[ExampleFilms]:
        """About `total` test films worth explaining, in groups (e.g. true and false positives)."""

    # --- shared by the subclasses ---------------------------------------------------------------

    def _one_vs_rest(self, truth: np.ndarray) -> np.ndarray:
        """(N, K) 0/1 truth, one column per label."""
        return truth

    def _per_label_intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int) -> dict:
        """Bootstrap intervals of the macro AUC and accuracy (as quick_metrics computes them) and of each label's
        one-vs-rest AUC (`per_label_auc`)."""
        from pipeline.metrics import bootstrap, rank_auc

        truth, probability = np.asarray(scored.truth), np.asarray(scored.probability, dtype=float)
        hot = self._one_vs_rest(truth)

        def score(pick: np.ndarray) -> dict[str, float | None]:
            aucs = [rank_auc(hot[pick, k], probability[pick, k]) for k in range(len(self.labels))]
            defined = [auc for auc in aucs if auc is not None]
            accuracy = self.quick_metrics(truth[pick], probability[pick], threshold)["accuracy"]
            per_label = {f"auc of {label}": auc for label, auc in zip(self.labels, aucs)}  # never a label's own name
            return {"auc": float(np.mean(defined)) if defined else None, "accuracy": accuracy, **per_label}

        intervals = bootstrap(score, len(truth), rounds, seed)
        return {"auc": intervals["auc"], "accuracy": intervals["accuracy"],
                "per_label_auc": {label: intervals[f"auc of {label}"] for label in self.labels}}

    def _probability_columns(self, probability: np.ndarray) -> dict[str, np.ndarray]:
        return {f"probability_{label}": probability[:, k] for k, label in enumerate(self.labels)}

    def _by_confidence(self, scored: Scored, right: np.ndarray, truths: list[str], total: int) -> list[ExampleFilms]:
        """The most confident films whose top label is right, then wrong, explained for that label."""
        top, confidence = scored.probability.argmax(axis=1), scored.probability.max(axis=1)
        captions = [f"top {self.labels[k]} p={p:.2f}, truth {truth}" for k, p, truth in zip(top, confidence, truths)]
        groups = []
        for outcome in (True, False):
            positions = np.flatnonzero(right == outcome)
            chosen = positions[np.argsort(-confidence[positions], kind="stable")][: total // 2]
            groups.append(ExampleFilms(chosen, [captions[i] for i in chosen], None))
        return groups


class _OneLabelPerFilm(Task):
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
        outside = np.flatnonzero((columns[:, 0] < 0) | (columns[:, 0] >= len(self.labels)))
        if len(outside):
            raise CxrError(f"{where}[{outside[0]}] = {columns[outside[0], 0]} is outside data.labels {self.labels}")
        return [self.labels[int(index)] for index in columns[:, 0]]

    def label_index(self, labels: pd.Series) -> pd.Series:
        return labels.map({label: i for i, label in enumerate(self.labels)}).fillna(-1).astype(int)

    def targets(self, rows: pd.DataFrame) -> np.ndarray:
        return rows["label_index"].to_numpy().astype(np.int64)

    def label_rows(self, manifest: pd.DataFrame) -> pd.DataFrame:
        return manifest[["image_id", "split", "label"]]

    def label_counts(self, manifest: pd.DataFrame) -> pd.DataFrame:
        manifest = manifest[manifest["split"] != UNLABELLED]
        counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(columns=self.labels, fill_value=0)
        return _in_split_order(counts)

    def activation(self, logits):
        import torch

        return torch.softmax(logits, dim=1)

    def loss(self, settings: TrainConfig, train_targets: np.ndarray):
        from torch import nn

        from pipeline.losses import FocalLoss, balanced_class_weights

        weight = balanced_class_weights(train_targets, len(self.labels)) if settings.class_weights == "balanced" else None
        if settings.loss == "focal":
            return FocalLoss(settings.focal_gamma, weight)
        return nn.CrossEntropyLoss(weight=weight)

    def validation_scores(self, targets: np.ndarray, probability: np.ndarray) -> dict[str, float]:
        """val_loss is plain cross-entropy whatever train.loss is, so runs compare."""
        val_loss = float(-np.log(probability[np.arange(len(targets)), targets] + 1e-7).mean())
        scores = self.quick_validation(targets, probability)
        return {"val_loss": val_loss, "val_auc": scores["auc"] if scores["auc"] is not None else float("nan"),
                "val_accuracy": scores["accuracy"]}

    @abstractmethod
    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        """AUC and accuracy of validation targets (class indices) and (N, K) probabilities, as training reads them."""


class Binary(_OneLabelPerFilm):
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
        fraction = (manifest["label"] == self.positive).groupby(manifest["split"]).mean()
        table = pd.DataFrame({"split": fraction.index.astype(str), "positive_fraction": fraction.to_numpy()})
        return LabelBalance(table, "split", "positive_fraction", "splits", f"split(s) with a '{self.positive}' fraction")

    def split_summary(self, manifest: pd.DataFrame, split: str) -> dict:
        rows = manifest[manifest["split"] == split]
        return {"n": len(rows), "positive_fraction": float((rows["label"] == self.positive).mean())}

    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        from pipeline.metrics import binary_metrics

        return binary_metrics(targets == len(self.labels) - 1, probability[:, -1], 0.5)

    def scored(self, rows: pd.DataFrame, probability: np.ndarray) -> Scored:
        """Truth is 1 for the positive label; the probability is the positive label's."""
        return Scored((self.targets(rows) == len(self.labels) - 1).astype(int), probability[:, -1])

    def operating_point(self, val: Scored, settings: EvaluateConfig) -> float:
        return _choose(val.truth, val.probability, settings, self.positive)

    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        from pipeline.metrics import binary_metrics

        return binary_metrics(scored.truth, scored.probability, threshold)

    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        from pipeline.metrics import threshold_metrics

        return threshold_metrics(truth, probability, threshold)

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int) -> dict:
        from pipeline.metrics import bootstrap_intervals

        return bootstrap_intervals(scored.truth, scored.probability, threshold, rounds, seed)

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


class Multiclass(_OneLabelPerFilm):
    """Three or more classes, one per film: the most probable class is the answer."""

    name = "multiclass"

    @classmethod
    def label_problem(cls, labels: list[str]) -> str | None:
        if len(labels) < 3:
            return f"data.task multiclass needs three or more labels, got {labels}; with two set data.task: binary"
        return None

    def label_balance(self, manifest: pd.DataFrame) -> LabelBalance:
        return _label_pair_balance(self.label_counts(manifest), manifest, self.labels)

    def split_summary(self, manifest: pd.DataFrame, split: str) -> dict:
        return _label_fraction_summary(self.label_counts(manifest), manifest, self.labels, split)

    def quick_validation(self, targets: np.ndarray, probability: np.ndarray) -> dict:
        return self.quick_metrics(targets, probability, None)

    def fit_temperature(self, val: Scored) -> float:
        from pipeline.metrics import fit_temperature

        return fit_temperature(val.truth, val.probability, softmax=True)

    def apply_temperature(self, probability: np.ndarray, temperature: float) -> np.ndarray:
        from pipeline.metrics import apply_temperature

        return apply_temperature(probability, temperature, softmax=True)

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

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int) -> dict:
        return self._per_label_intervals(scored, threshold, rounds, seed)

    def calibration_inputs(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        """The most probable class's probability against being right."""
        return (scored.probability.argmax(axis=1) == scored.truth).astype(int), scored.probability.max(axis=1)

    def decisions(self, scored: Scored, threshold: Threshold) -> tuple[list[str], list[str]]:
        names = np.array(self.labels)
        return list(names[scored.truth]), list(names[scored.probability.argmax(axis=1)])

    def confusion_panels(self, scored: Scored, threshold: Threshold) -> list[tuple[str, list[str], list[str], list[str]]]:
        actual, predicted = self.decisions(scored, threshold)
        return [("Confusion, test split (most probable class)", actual, predicted, self.labels)]

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


class Multilabel(Task):
    """Any number of findings per film: a sigmoid and a threshold per label."""

    name = "multilabel"
    one_label_per_film = False
    label_rows_noun = "label(s) of images"

    def label_from_cell(self, raw: str, spec: SourceSpec, subtype_class: str | None = None) -> str | None:
        """The set of labels the cell names ('' for none of them), split on label_separator ('|' unless given); a
        part label_map does not name is read as its own lowercase name, and parts outside the labels (NIH's
        "No Finding", findings not studied) add nothing."""
        parts = [part.strip() for part in raw.split(spec.label_separator or "|")]
        return join_labels({spec.label_map.get(part, part.lower()) for part in parts}, self.labels)

    def labels_from_npz(self, columns: np.ndarray, where: str) -> list[str]:
        """(N, K) 0/1 columns in labels order (ChestMNIST)."""
        if columns.shape[1] != len(self.labels):
            raise CxrError(f"{where} has {columns.shape[1]} columns; a multilabel task needs one per label of "
                           f"data.labels {self.labels}")
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
        return _in_split_order(hot.groupby(manifest["split"]).sum())

    def label_balance(self, manifest: pd.DataFrame) -> LabelBalance:
        return _label_pair_balance(self.label_counts(manifest), manifest, self.labels)

    def split_summary(self, manifest: pd.DataFrame, split: str) -> dict:
        return _label_fraction_summary(self.label_counts(manifest), manifest, self.labels, split)

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
        scores = self.quick_metrics(targets, probability, 0.5)
        return {"val_loss": val_loss, "val_auc": scores["auc"] if scores["auc"] is not None else float("nan"),
                "val_accuracy": scores["accuracy"]}

    def operating_point(self, val: Scored, settings: EvaluateConfig) -> dict[str, float]:
        """One threshold per label, each chosen as a binary task's."""
        return {label: _choose(val.truth[:, k], val.probability[:, k], settings, label) for k, label in enumerate(self.labels)}

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

    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int) -> dict:
        return self._per_label_intervals(scored, threshold, rounds, seed)

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


TASKS: dict[str, type[Task]] = {task.name: task for task in (Binary, Multiclass, Multilabel)}


def task_for(name: str, labels: Sequence[str]) -> Task:
    """The task object for data.task `name` (or a checkpoint's or model's recorded task) and its labels."""
    if name not in TASKS:
        raise CxrError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    return TASKS[name](labels)


def _choose(truth: np.ndarray, probability: np.ndarray, settings: EvaluateConfig, label: str) -> float:
    from pipeline.metrics import choose_threshold

    return choose_threshold(truth, probability, settings.threshold_method, settings.threshold,
                            settings.target_sensitivity, label)


def _said(yes: bool, label: str) -> str:
    return label if yes else f"no {label}"


def _in_split_order(counts: pd.DataFrame) -> pd.DataFrame:
    order = {split: rank for rank, split in enumerate(SPLIT_ORDER)}
    return counts.loc[sorted(counts.index, key=lambda split: (order.get(split, len(order)), split))]


def _label_fractions(counts: pd.DataFrame, manifest: pd.DataFrame, labels: list[str]) -> dict[str, dict[str, float]]:
    """split → label → the fraction of the split's films carrying that label, splits in pipeline order."""
    sizes = manifest.groupby("split").size()
    return {split: {label: float(counts.loc[split, label] / sizes[split]) for label in labels} for split in counts.index}


def _label_pair_balance(counts: pd.DataFrame, manifest: pd.DataFrame, labels: list[str]) -> LabelBalance:
    """The fraction of each split's films carrying each label."""
    fractions = _label_fractions(counts, manifest, labels)
    table = pd.DataFrame([{"split_label": f"{split}/{label}", "fraction": fraction}
                          for split, row in fractions.items() for label, fraction in row.items()])
    return LabelBalance(table, "split_label", "fraction", "split/label pairs", "split/label pair(s) with a label fraction")


def _label_fraction_summary(counts: pd.DataFrame, manifest: pd.DataFrame, labels: list[str], split: str) -> dict:
    fractions = _label_fractions(counts, manifest, labels)
    return {"n": int((manifest["split"] == split).sum()), "label_fractions": fractions.get(split, {})}
