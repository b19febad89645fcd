"""Predict: classify DICOM/PNG/JPEG files with a registered model (the `champion` by default).

Each file is decoded and resized exactly as at ingest, to the size recorded in the model's
metadata; a file that cannot be read gets its own error entry and the others go on, and one outside the model's
scope (a CT, a lateral view, a colour photograph: pipeline.scope, by header; a photograph or a slice saved as PNG,
noise, a blank image: pipeline.ood, by the network's out-of-distribution score, which the model computes) gets
`out_of_scope` with a reason, never a probability.
With `explain_dir`, each classified file also gets a Grad-CAM overlay PNG (see `pipeline.explain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import CxrError
from pipeline.explain import grad_cam, network_to_explain, overlay_paths, write_overlay
from pipeline.imaging import DecodeLimits, UnreadableImage, decode_file, looks_like_image, stored_film
from pipeline.paths import ProjectPaths
from pipeline.scope import Scope, decode_refusal, out_of_scope
from pipeline.serving import ServedModel


@dataclass(frozen=True)
class Prediction:
    """One file's answer. binary: `label` and the positive label's `probability`. multiclass: the most probable
    class, its `probability`, and every class's in `probabilities`. multilabel: `label` holds the labels called
    present ('|'-joined, '' for none), `probabilities` every label's, `probability` is None."""

    path: str
    label: str | None = None
    probability: float | None = None
    error: str | None = None
    explanation: str | None = None  # the Grad-CAM overlay PNG, when one was asked for
    probabilities: dict[str, float] | None = None  # multiclass and multilabel: per label
    out_of_scope: str | None = None  # why the model does not answer for this film (then no label or probability)
    ood_score: float | None = None  # the out-of-distribution score (pipeline.ood), where the model computed one

    def as_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        scored = {} if self.ood_score is None else {"ood_score": self.ood_score}
        if self.out_of_scope is not None:
            return {"path": self.path, "out_of_scope": self.out_of_scope, **scored}
        result: dict = {"path": self.path, "label": self.label, **scored}
        if self.probability is not None:
            result["probability"] = self.probability
        if self.probabilities is not None:
            result["probabilities"] = self.probabilities
        if self.explanation is not None:
            result["explanation"] = self.explanation
        return result


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and folders expanded to the image files inside them (sorted; a README is skipped)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += [p for p in sorted(item.rglob("*")) if p.is_file() and not p.name.startswith(".") and looks_like_image(p)]
        else:
            files.append(item)
    return files


def load_model(model_uri: str, paths: ProjectPaths) -> ServedModel:
    """Load a pyfunc from the project's tracking store; a missing model is a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    try:
        with tracking.fluent_store(paths):
            return ServedModel(mlflow.pyfunc.load_model(model_uri))
    except MlflowException as exc:
        raise CxrError(f"could not load model '{model_uri}' ({str(exc).splitlines()[0]}); run `cxr pipeline` to register one, or pass --model") from None


def predict_files(model, files: list[Path], batch_size: int = 64, explain_dir: Path | None = None,
                  limits: DecodeLimits = DecodeLimits()) -> list[Prediction]:
    """Decode, crop and resize as the model records (its size and data.crop), predict in batches; keep input order.

    With `explain_dir`, write a Grad-CAM overlay there for each classified file (of the positive class, or for
    multiclass and multilabel models of each film's most probable label); without it nothing extra runs. A model
    that cannot be explained (vit) fails here, before any prediction.
    """
    from pipeline.tasks import task_for

    metadata = model.metadata.metadata
    size, task = int(metadata["image_size"]), task_for(metadata["task"], metadata["labels"])
    crop = metadata.get("crop", "none")  # as the model was trained (data.crop); registered before it was recorded: none
    scope = Scope.from_dict(metadata.get("scope"))  # the header's; the model judges the pixels (pipeline.serving)
    network = network_to_explain(model) if explain_dir is not None else None
    results: list[Prediction | None] = [None] * len(files)
    ready: list[tuple[int, np.ndarray]] = []
    for position, file in enumerate(files):
        try:
            image = decode_file(file, limits=limits, size=size)
            pixels = stored_film(image.film, size, crop, str(file)).pixels
        except UnreadableImage as exc:
            blank = decode_refusal(exc)
            results[position] = Prediction(path=str(file), out_of_scope=blank) if blank else \
                Prediction(path=str(file), error=f"{exc.reason}: {exc}")
            continue
        reason = out_of_scope(image, scope)
        if reason is not None:
            results[position] = Prediction(path=str(file), out_of_scope=reason)
        else:
            ready.append((position, pixels))
    overlays = overlay_paths([files[position] for position, _ in ready], explain_dir) if explain_dir is not None else []
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        images = np.stack([pixels for _, pixels in chunk])
        table = model.predict(images)
        refused = [str(reason or "") for reason in table.get("out_of_scope", [""] * len(chunk))]
        scores = [None if s is None or s != s else round(float(s), 4) for s in table.get("ood_score", [None] * len(chunk))]
        explanations: list[str | None] = [None] * len(chunk)
        answered = np.array([not reason for reason in refused], dtype=bool)
        if network is not None and answered.any():
            written = iter(write_explanations(network, images[answered], table[answered].reset_index(drop=True),
                                              [p for p, keep in zip(overlays[start : start + len(chunk)], answered) if keep], task))
            explanations = [next(written) if keep else None for keep in answered]
        for (position, _), row, reason, score, explanation in zip(chunk, table.to_dict("records"), refused, scores, explanations):
            if reason:
                results[position] = Prediction(path=str(files[position]), out_of_scope=reason, ood_score=score)
            else:
                results[position] = Prediction(path=str(files[position]), explanation=explanation, ood_score=score,
                                               **task.answer(row))
    return [r for r in results if r is not None]


def monitor_answers(model: ServedModel, answers: list[Prediction], root: Path) -> bool:
    """Append one record per answer to the monitoring log ($CXR_MONITOR_LOG, else the project's
    reports/monitoring/predictions.jsonl): the answer kind, reason code, label, probability and OOD score, never the
    path (pipeline.monitoring). A log that cannot be written is a warning; False then, or when logging is off."""
    from pipeline.monitoring import ModelIdentity, log_path, prediction_records, project_log, try_append

    identity = ModelIdentity.from_config(model.pyfunc.model_config)
    if identity.run_id is None:  # a model registered before its identity travelled in model_config
        identity = ModelIdentity(identity.model, model.metadata.run_id)
    return try_append(log_path(project_log(root)), prediction_records(answers, identity))


def write_explanations(network, images: np.ndarray, table, paths: list[Path], task) -> list[str]:
    """One Grad-CAM overlay per image, captioned with the prediction; returns the paths. Which label each map
    explains is the task's (Task.explained): binary models show the evidence for the positive class, multiclass
    and multilabel ones for each film's most probable label.

    An all-zero map is said in the caption: an overlay without colour could otherwise pass for a failure.
    """
    explained, shown, class_index = task.explained(table)
    heat_maps = grad_cam(network, images, class_index=class_index)
    for image, heat, label, target, p, path in zip(images, heat_maps, table["label"], explained, shown, paths):
        evidence = f"evidence for {target}" if heat.max() > 0 else f"no evidence for {target}"
        said = label if label else "none of the labels"
        write_overlay(image, heat, path, caption=f"{said}  P({target}) {p:.3f}\nGrad-CAM: {evidence}")
    return [str(path) for path in paths]
