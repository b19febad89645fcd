"""The MLflow pyfunc that wraps a checkpoint: what the registry stores and `cxr predict` loads.

It takes images already decoded and resized to the size recorded in the model's metadata
(`image_size`), so the same pyfunc answers `mlflow models serve` requests.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd


class CxrClassifier(mlflow.pyfunc.PythonModel):
    """(N, S, S) uint8 grey images → a table of positive-class probability and label at the stored threshold."""

    # The logged signature (a uint8 tensor) describes the input; MLflow's type-hint validation does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.models import load_checkpoint

        self.model, state = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.labels = state["labels"]
        self.threshold = float((context.model_config or {}).get("threshold", 0.5))
        self.temperature = float((context.model_config or {}).get("temperature", 1.0))
        self.image_size = int(state["image_size"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        import torch

        from pipeline.models import apply_temperature, predict_proba

        images = np.asarray(model_input)
        if images.ndim == 2:
            images = images[None]
        if images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}), got {images.shape}")
        probability = apply_temperature(predict_proba(self.model, images.astype(np.uint8), torch.device("cpu"))[:, -1], self.temperature)
        labels = np.where(probability >= self.threshold, self.labels[-1], self.labels[0])
        return pd.DataFrame({"probability": probability.astype(np.float64), "label": labels})
