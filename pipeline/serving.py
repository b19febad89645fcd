"""The MLflow pyfunc that wraps a checkpoint: what the registry stores and `cxr predict` loads.

It takes images already decoded and resized to the size recorded in the model's metadata
(`image_size`), so the same pyfunc answers `mlflow models serve` requests. The operating point chosen on
validation (a threshold, or one per label) and the temperature travel in the model's `model_config`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd


def prediction_table(task: str, labels: list[str], probability: np.ndarray, threshold) -> pd.DataFrame:
    """What the served model answers for (N, K) probabilities, one row per image.

    binary: `probability` (of the positive label) and `label` (positive at or above `threshold`, else the other).
    multiclass: `label` (the most probable class) and `probability_<label>` for every class.
    multilabel: `label` (the labels at or above their own thresholds, joined by '|'; '' for none) and
    `probability_<label>` for every label.
    """
    from pipeline.labels import join_labels

    if task == "binary":
        positive = probability[:, -1].astype(np.float64)
        return pd.DataFrame({"probability": positive, "label": np.where(positive >= threshold, labels[-1], labels[0])})
    if task == "multiclass":
        predicted = list(np.array(labels)[probability.argmax(axis=1)])
    else:
        cut = np.array([threshold[label] for label in labels], dtype=float)
        predicted = [join_labels(np.array(labels)[row >= cut], labels) for row in probability]
    columns = {f"probability_{label}": probability[:, k].astype(np.float64) for k, label in enumerate(labels)}
    return pd.DataFrame({"label": predicted, **columns})


class CxrClassifier(mlflow.pyfunc.PythonModel):
    """(N, S, S) uint8 grey images → a table of label(s) and probabilities at the stored operating point."""

    # The logged signature (a uint8 tensor) describes the input; MLflow's type-hint validation does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.models import load_checkpoint

        self.model, state = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.labels, self.task = list(state["labels"]), state["task"]
        settings = context.model_config or {}
        threshold = settings.get("threshold", 0.5)  # a float, {label: float} (multilabel) or None (multiclass)
        self.threshold = float(threshold) if isinstance(threshold, (int, float)) else threshold
        self.temperature = float(settings.get("temperature", 1.0))
        self.image_size = int(state["image_size"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        from pipeline.models import apply_temperature, predict_proba

        images = np.asarray(model_input)
        if images.ndim == 2:
            images = images[None]
        if images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}), got {images.shape}")
        probability = predict_proba(self.model, images.astype(np.uint8), torch.device("cpu"), multilabel=self.task == "multilabel")
        probability = apply_temperature(probability, self.temperature, multiclass=self.task == "multiclass")
        return prediction_table(self.task, self.labels, probability, self.threshold)
