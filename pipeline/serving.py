"""The MLflow pyfunc that wraps a checkpoint: what the registry stores and `cxr predict` loads.

It takes images already decoded and resized to the size recorded in the model's metadata
(`image_size`), so the same pyfunc answers `mlflow models serve` requests. The operating point chosen on
validation (a threshold, or one per label) and the temperature travel in the model's `model_config`; what
the answer table holds is the task's (pipeline.tasks: Task.serving_table).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd


class CxrClassifier(mlflow.pyfunc.PythonModel):
    """(N, S, S) uint8 grey images → a table of label(s) and probabilities at the stored operating point."""

    # The logged signature (a uint8 tensor) describes the input; MLflow's type-hint validation does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.models import load_checkpoint
        from pipeline.tasks import task_for

        self.model, state = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.task = task_for(state["task"], state["labels"])
        threshold = context.model_config["threshold"]  # a float, {label: float} (multilabel) or None (multiclass)
        self.threshold = float(threshold) if isinstance(threshold, (int, float)) else threshold
        self.temperature = float(context.model_config["temperature"])
        self.image_size = int(state["image_size"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        from pipeline.models import predict_proba

        images = np.asarray(model_input)
        if images.ndim == 2:
            images = images[None]
        if images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}), got {images.shape}")
        probability = predict_proba(self.model, images.astype(np.uint8), torch.device("cpu"), self.task.activation)
        probability = self.task.apply_temperature(probability, self.temperature)
        return self.task.serving_table(probability, self.threshold)
