"""The MLflow pyfunc that wraps a checkpoint: what the registry stores, `mlflow models serve` runs and `cxr predict`
loads.

Its signature's input is a table whose column `image` holds base64-encoded file bytes (DICOM, PNG or JPEG): the
model decodes them with the function ingest decoded the training films with (pipeline.imaging.decode_bytes) and
resizes them to the size recorded in its metadata (`image_size`), so no caller re-implements the LUTs, MONOCHROME1
or the resize and drifts from training. Each row's answer is a probability, or `out_of_scope` with a reason (a film
outside the training data's contract, pipeline.scope), or `error` with a reason (a broken or too-large file): one
bad row never fails the others. As before it took bytes, it also takes (N, S, S) uint8 arrays already resized
(`{"inputs": arrays}` over REST, which MLflow hands over as the `image` column; in this process through
ServedModel, below); they carry no header and are judged by their pixels only.

A film that passes its header is judged by its pixels (pipeline.ood: the network's out-of-distribution score
against the threshold set on validation, and a blank check); every answer table carries its `ood_score` (None where
none was computed: an error, a film refused by its header, a model registered before scores were stored).

Over REST a request in which no film could be read (each row an `error`: a truncated DICOM, a header declaring an
absurd size, bytes that are not base64) is the client's mistake: predict raises an MlflowException with
INVALID_PARAMETER_VALUE, which MLflow's scoring server answers with HTTP 400 and the reasons; a request with at least
one readable film answers 200, its bad rows with their `error`. Each answer is appended to the monitoring log
(pipeline.monitoring; where $CXR_MONITOR_LOG says).

The operating point chosen on validation (a threshold, or one per label), the temperature, the test-time views
(pipeline.tta), the scope and the decode limits travel in the model's `model_config`; what the answer table holds is the task's (pipeline.tasks:
Task.serving_table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"  # the input column: base64-encoded file bytes
log = logging.getLogger(__name__)


class CxrClassifier(mlflow.pyfunc.PythonModel):
    """A table of base64 file bytes, or (N, S, S) uint8 grey images → a table of label(s) and probabilities at the
    stored operating point."""

    # The logged signature (a string column) describes the input; MLflow's type-hint validation does not apply.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pipeline.imaging import DecodeLimits
        from pipeline.models import load_checkpoint
        from pipeline.monitoring import ModelIdentity, log_path
        from pipeline.ood import Statistics
        from pipeline.scope import Scope
        from pipeline.tasks import task_for

        self.model, state = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.task = task_for(state["task"], state["labels"])
        config = context.model_config
        threshold = config["threshold"]  # a float, {label: float} (multilabel) or None (multiclass)
        self.threshold = float(threshold) if isinstance(threshold, (int, float)) else threshold
        self.temperature = float(config["temperature"])
        self.image_size = int(state["image_size"])
        self.crop = config.get("crop", "none")  # data.crop it was trained with; a model registered before: squeeze
        self.tta = list(config.get("tta") or [])  # evaluate.tta's views, as evaluate scored it; before: none
        self.scope = Scope.from_dict(config.get("scope"), config.get("ood"))
        self.limits = DecodeLimits(**config.get("limits", {}))
        self.identity, self.monitor_log = ModelIdentity.from_config(config), log_path(None)
        self.ood = Statistics.load(Path(context.artifacts["ood"])) if "ood" in context.artifacts else None

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from pipeline.monitoring import LOG_ENV, table_records, try_append

        files = isinstance(model_input, pd.DataFrame) and IMAGE_COLUMN in model_input.columns
        table = self.answer_files(list(model_input[IMAGE_COLUMN])) if files else self.classify(np.asarray(model_input))
        if self.monitor_log is None and not getattr(self, "_warned", False) and _in_scoring_server():
            self._warned = True
            log.warning("%s is not set: the served model's answers are not logged for `cxr monitor`", LOG_ENV)
        try_append(self.monitor_log, table_records(table, self.identity))
        if files and len(table) and table["error"].astype(bool).all():
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            reasons = "; ".join(table["error"][:5]) + ("; ..." if len(table) > 5 else "")
            raise MlflowException(f"no film in the request could be read: {reasons}", error_code=INVALID_PARAMETER_VALUE)
        return table

    def classify(self, images: np.ndarray) -> pd.DataFrame:
        """(N, S, S) uint8 images at the model's size → the task's answer table, judged by their pixels only (arrays
        have no header): `out_of_scope` says why a row has no answer, `ood_score` is each row's score."""
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        self.check_shape(images)
        refused = [""] * len(images)
        ready, scores = self.judge_pixels(list(enumerate(images.astype(np.uint8))), refused)
        return self.answer_table(ready, refused).assign(ood_score=scores)

    def check_shape(self, images: np.ndarray) -> None:
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape (N, {self.image_size}, {self.image_size}), got {images.shape}")

    def judge_pixels(self, ready: list[tuple[int, np.ndarray]], refused: list[str]) -> tuple[list[tuple[int, np.ndarray]], list]:
        """The out-of-distribution check of the rows that passed their header (pipeline.ood, pipeline.scope): the
        rows still to classify, and every row's score (None where none was computed). A refused row's reason goes
        into `refused`. A model registered before scores were stored judges nothing here."""
        from pipeline.ood import judge_images
        from pipeline.scope import out_of_scope

        scores: list = [None] * len(refused)
        if self.ood is None or not ready:
            return ready, scores
        kept = []
        for (row, pixels), judged in zip(ready, judge_images(self.model, self.ood, np.stack([p for _, p in ready]))):
            scores[row] = judged.score
            refused[row] = out_of_scope(None, self.scope, judged) or ""
            if not refused[row]:
                kept.append((row, pixels))
        return kept, scores

    def answer_table(self, ready: list[tuple[int, np.ndarray]], unanswered: list[str]) -> pd.DataFrame:
        """The task's table for len(unanswered) rows: probabilities for the `ready` rows, None (JSON's null) in
        every other row's label and probabilities (MLflow writes NaN as a bare NaN, which JSON lacks)."""
        n = len(unanswered)
        probability = np.full((n, len(self.task.labels)), np.nan)
        if ready:
            probability[[row for row, _ in ready]] = self.probabilities(np.stack([pixels for _, pixels in ready]))
        table = self.task.serving_table(probability, self.threshold)
        answered = np.zeros(n, dtype=bool)
        answered[[row for row, _ in ready]] = True
        if not answered.all():
            table = table.astype(object).where(pd.DataFrame({c: answered for c in table.columns}), None)
        return table.assign(out_of_scope=unanswered)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 images at the model's size → (N, K) calibrated probabilities."""
        from pipeline.tta import tta_probabilities

        if images.ndim == 2:
            images = images[None]
        self.check_shape(images)
        probability = tta_probabilities(self.model, images.astype(np.uint8), self.task.activation, self.tta)
        return self.task.apply_temperature(probability, self.temperature)

    def answer_files(self, contents: list) -> pd.DataFrame:
        """One answer per file: decode (as ingest does), judge its scope, resize, classify the ones in scope. Rows
        not classified have no label and NaN probabilities, and say why in `out_of_scope` or `error`."""
        from pipeline.imaging import UnreadableImage, decode_bytes, stored_film
        from pipeline.scope import decode_refusal, out_of_scope

        n = len(contents)
        refused, errors = [""] * n, [""] * n
        ready: list[tuple[int, np.ndarray]] = []
        for row, content in enumerate(contents):
            name = f"row {row}"
            if isinstance(content, (list, np.ndarray)):  # an image already resized ({"inputs": arrays} over REST)
                pixels = np.asarray(content)
                if pixels.shape == (self.image_size, self.image_size):
                    ready.append((row, pixels.astype(np.uint8)))  # no header to judge
                else:
                    errors[row] = f"wrong_shape: {name}: an image array must be {self.image_size}x{self.image_size}, got {pixels.shape}"
                continue
            try:
                image = decode_bytes(file_bytes(content, name), name, limits=self.limits, size=self.image_size)
                pixels = stored_film(image.film, self.image_size, self.crop, name).pixels
            except UnreadableImage as exc:
                refused[row] = decode_refusal(exc) or ""
                errors[row] = "" if refused[row] else f"{exc.reason}: {exc}"
                continue
            reason = out_of_scope(image, self.scope)
            if reason is not None:
                refused[row] = reason
                continue
            ready.append((row, pixels))
        ready, scores = self.judge_pixels(ready, refused)
        return self.answer_table(ready, refused).assign(error=errors, ood_score=scores)


@dataclass(frozen=True)
class ServedModel:
    """A registered model loaded in this process. `predict` takes what the signature shows (a table of base64 file
    bytes, checked against it by MLflow) or, as before the model took bytes, (N, S, S) uint8 arrays at its size,
    which MLflow's signature check would refuse: those go straight to the model's own `classify`."""

    pyfunc: object  # mlflow.pyfunc.PyFuncModel

    @property
    def metadata(self):  # -> mlflow.models.Model
        return self.pyfunc.metadata

    def unwrap_python_model(self):  # -> pipeline.serving.CxrClassifier
        return self.pyfunc.unwrap_python_model()

    def classify_all(self, images: np.ndarray) -> pd.DataFrame:
        """(N, S, S) uint8 arrays → the answer table with every film classified, none judged by its pixels: the
        champion gate compares two models on the same test films, whatever either would refuse."""
        python_model = self.pyfunc.unwrap_python_model()
        if not hasattr(python_model, "answer_table"):  # registered before pixels were judged: arrays were never refused
            return self.predict(images)
        images = np.asarray(images, dtype=np.uint8)
        return python_model.answer_table(list(enumerate(images)), [""] * len(images))

    def predict(self, model_input) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            return self.pyfunc.predict(model_input)
        classify = getattr(self.pyfunc.unwrap_python_model(), "classify", None)
        if classify is None:  # a version registered before the bytes form: its signature is the array
            return self.pyfunc.predict(model_input)
        return classify(np.asarray(model_input))


def _in_scoring_server() -> bool:
    """True under `mlflow models serve` (its scoring server sets this variable), not in `cxr register`'s check of
    the input example nor in a Python caller."""
    import os

    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def file_bytes(content, name: str) -> bytes:
    """A row's file bytes: base64 text (the signature's form, and what JSON carries), or raw bytes."""
    import base64
    import binascii

    from pipeline.imaging import UnreadableImage

    if isinstance(content, (bytes, bytearray)):
        return bytes(content)
    if not isinstance(content, str):
        raise UnreadableImage("not_base64", f"{name}: expected base64-encoded file bytes, got {type(content).__name__}")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise UnreadableImage("not_base64", f"{name}: not valid base64") from None
