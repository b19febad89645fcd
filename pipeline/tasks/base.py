"""The Task interface every task implements, the shapes it passes around, and what several tasks share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

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
    thresholds_per_label: ClassVar[bool] = False  # the operating point is one threshold per label
    softmax_rows: ClassVar[bool] = False  # probabilities are rows of a softmax (temperature scales them as such)

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

    def label_balance(self, manifest: pd.DataFrame) -> LabelBalance:
        """The fractions the data gate keeps within validation.class_ratio: each label's in each split."""
        return _label_pair_balance(self.label_counts(manifest), manifest, self.labels)

    def split_summaries(self, manifest: pd.DataFrame) -> dict[str, dict]:
        """Each split's entry in the gate's summary.json (splits in sorted order): its size and how its labels are
        spread (every label's fraction)."""
        counts, sizes = self.label_counts(manifest), manifest.groupby("split").size()
        fractions = _label_fractions(counts, manifest, self.labels)
        return {str(split): {"n": int(sizes[split]), "label_fractions": fractions.get(split, {})} for split in sorted(sizes.index)}

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

        return fit_temperature(val.truth, val.probability, softmax=self.softmax_rows)

    def apply_temperature(self, probability: np.ndarray, temperature: float) -> np.ndarray:
        from pipeline.metrics import apply_temperature

        return apply_temperature(probability, temperature, softmax=self.softmax_rows)

    @abstractmethod
    def operating_point(self, val: Scored, settings: EvaluateConfig) -> Threshold:
        """The operating point, chosen on the validation split."""

    def threshold_method(self, settings: EvaluateConfig) -> str:
        return settings.threshold_method

    def threshold_spread(self, val: Scored, settings: EvaluateConfig, patients: np.ndarray) -> dict | None:
        """How far the operating point moves over validation's patient resamples (metrics.threshold_spread); None
        where nothing is chosen (a fixed threshold, or the most probable class)."""
        return None

    @abstractmethod
    def describe_point(self, threshold: Threshold) -> str:
        """The operating point in words: '0.4231', 'effusion 0.31, pneumonia 0.42' or 'most probable class'."""

    @abstractmethod
    def threshold_metrics(self, threshold: Threshold) -> dict[str, float]:
        """The operating point as MLflow metrics (none when there is no threshold)."""

    @abstractmethod
    def metrics(self, scored: Scored, threshold: Threshold) -> dict:
        """One split's metrics at the operating point."""

    @abstractmethod
    def quick_metrics(self, truth: np.ndarray, probability: np.ndarray, threshold: Threshold) -> dict[str, float | None]:
        """The headline metrics without counts or scikit-learn, for the thousands of calls a bootstrap makes."""

    @abstractmethod
    def intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int, patients: np.ndarray) -> dict:
        """95 % bootstrap intervals of the metrics, resampling `patients` (one pseudonym per film): films of one
        patient are correlated, so they are drawn together (pipeline.metrics.bootstrap)."""

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

    @abstractmethod
    def prediction_column_names(self) -> list[str]:
        """The names of the columns prediction_columns writes."""

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

    @staticmethod
    def _validation_row(val_loss: float, scores: dict) -> dict[str, float]:
        """The row training logs: an undefined AUC (one class in validation) as NaN, which never wins an epoch."""
        return {"val_loss": val_loss, "val_auc": scores["auc"] if scores["auc"] is not None else float("nan"),
                "val_accuracy": scores["accuracy"]}

    def _one_vs_rest(self, truth: np.ndarray) -> np.ndarray:
        """(N, K) 0/1 truth, one column per label."""
        return truth

    def _per_label_intervals(self, scored: Scored, threshold: Threshold, rounds: int, seed: int, patients: np.ndarray) -> dict:
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

        intervals = bootstrap(score, len(truth), rounds, seed, clusters=patients)
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


# --- what several tasks share ----------------------------------------------------------------------


def threshold_on_validation(truth: np.ndarray, probability: np.ndarray, settings: EvaluateConfig, label: str) -> float:
    """One label's threshold from its validation scores, as evaluate.threshold_method says (pipeline.metrics)."""
    from pipeline.metrics import choose_threshold

    return choose_threshold(truth, probability, settings.threshold_method, settings.threshold,
                            settings.target_sensitivity, label)


def spread_on_validation(truth: np.ndarray, probability: np.ndarray, settings: EvaluateConfig,
                         patients: np.ndarray) -> dict | None:
    """One label's threshold spread over validation's patient resamples, chosen as threshold_on_validation does."""
    from pipeline.metrics import threshold_spread

    return threshold_spread(truth, probability, settings.threshold_method, settings.bootstrap_rounds, settings.seed,
                            clusters=patients, fixed=settings.threshold, target_sensitivity=settings.target_sensitivity)


def in_split_order(counts: pd.DataFrame) -> pd.DataFrame:
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
