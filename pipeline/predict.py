"""Predict: classify DICOM/PNG/JPEG files with a registered model (the `champion` by default).

Each file is decoded and resized exactly as at ingest, to the size recorded in the model's
metadata; a file that cannot be read gets its own error entry and the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import CxrError
from pipeline.imaging import UnreadableImage, decode_file, looks_like_image, resize


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probability": self.probability}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and folders expanded to the image files inside them (sorted; a README is skipped)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += [p for p in sorted(item.rglob("*")) if p.is_file() and not p.name.startswith(".") and looks_like_image(p)]
        else:
            files.append(item)
    return files


def load_model(model_uri: str, root: Path):  # -> mlflow.pyfunc.PyFuncModel
    """Load a pyfunc from the project's tracking store; a missing model is a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    tracking.connect(root)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise CxrError(f"could not load model '{model_uri}' ({str(exc).splitlines()[0]}); run `cxr pipeline` to register one, or pass --model") from None


def predict_files(model, files: list[Path], batch_size: int = 64) -> list[Prediction]:
    """Decode, resize to the model's recorded size, predict in batches; keep input order."""
    size = int(model.metadata.metadata["image_size"])
    results: list[Prediction | None] = [None] * len(files)
    ready: list[tuple[int, np.ndarray]] = []
    for position, file in enumerate(files):
        try:
            ready.append((position, resize(decode_file(file).pixels, size)))
        except UnreadableImage as exc:
            results[position] = Prediction(path=str(file), error=f"{exc.reason}: {exc}")
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        table = model.predict(np.stack([pixels for _, pixels in chunk]))
        for (position, _), probability, label in zip(chunk, table["probability"], table["label"]):
            results[position] = Prediction(path=str(files[position]), label=str(label), probability=round(float(probability), 6))
    return [r for r in results if r is not None]
