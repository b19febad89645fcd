"""Which registered version is `champion`, and why: the gate, promotion, rollback and their history.

The gate scores the current champion on the same films as the challenger (the project's current
val/test split) and compares `register.gate_metric`: the alias moves only if the challenger is not
worse by more than `register.margin`. Every move is appended to a history kept as a tag on the
registered model, so `cxr rollback` knows where to go back and an auditor can read who moved what.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from pipeline.errors import CxrError
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    challenger_value: float | None
    champion_value: float | None
    difference_ci95: list[float] | None
    reason: str


def current_champion(client, name: str):  # -> ModelVersion | None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def gate(paths: ProjectPaths, gate_metric: str, margin: float, champion, rounds: int = 1000, seed: int = 0) -> GateDecision:
    """Challenger (this project's predictions.csv) against the champion scored on the same films, each at its
    own operating point (threshold, thresholds per label, or most probable class)."""
    from pipeline.files import read_json
    from pipeline.predictions import load_predictions, read_predictions
    from pipeline.tasks import task_for

    split, metric = gate_metric.split("_", 1)
    predictions = load_predictions(paths.predictions, split)
    metrics = read_json(paths.metrics, "`cxr evaluate`")
    ours_task = task_for(metrics["task"], metrics["labels"])
    ours_scored, our_threshold = read_predictions(predictions, ours_task, paths.predictions)
    theirs_task, champion_probability, their_threshold = _score_champion(paths, champion, predictions["store_index"].to_numpy())
    if (theirs_task.name, theirs_task.labels) != (ours_task.name, ours_task.labels):
        return GateDecision(False, None, None, None, f"champion v{champion.version} is a {theirs_task.name} model of "
                            f"{theirs_task.labels}, this one a {ours_task.name} model of {ours_task.labels}: the gate "
                            "cannot compare them; `cxr promote` decides by hand")
    truth, challenger = ours_scored.truth, ours_scored.probability
    ours = ours_task.quick_metrics(truth, challenger, our_threshold)[metric]
    theirs = ours_task.quick_metrics(truth, champion_probability, their_threshold)[metric]
    if ours is None or theirs is None:
        return GateDecision(False, ours, theirs, None, f"{gate_metric} is undefined on this {split} split (one class only)")
    interval = _paired_difference_interval(ours_task, truth, challenger, champion_probability, our_threshold,
                                           their_threshold, metric, rounds, seed)
    promote = ours >= theirs - margin
    verdict = "within the margin of or better than" if promote else f"worse by more than {margin:g} than"
    reason = (f"{gate_metric} {ours:.4f} vs champion v{champion.version} {theirs:.4f} on the same {len(truth)} {split} films "
              f"(difference 95% CI {format_metric(interval[0], 3)} to {format_metric(interval[1], 3)}): {verdict} the champion")
    return GateDecision(promote, ours, theirs, interval, reason)


def move_champion(client, name: str, version: int, reason: str) -> None:
    """Give `version` the champion alias and record the move; the challenger alias leaves it."""
    client.set_registered_model_alias(name, CHAMPION, str(version))
    model = client.get_registered_model(name)
    if str(model.aliases.get(CHALLENGER)) == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)
    history = _history(client, name)
    history.append({"version": int(version), "reason": reason, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-50:]))
    log.info("registry: %s version %s is @champion (%s)", name, version, reason)


def promote(client, name: str, version: int, reason: str) -> None:
    """A person's decision to make `version` the champion (`cxr promote`)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise CxrError(f"{name} has no version {version}; `mlflow ui` or the registry lists the versions") from None
    move_champion(client, name, version, f"promoted by hand: {reason}")


def rollback(client, name: str, reason: str) -> int:
    """Move the champion back to the version that held it before the current one (`cxr rollback`)."""
    history = _history(client, name)
    champion = current_champion(client, name)
    if champion is None:
        raise CxrError(f"{name} has no champion to roll back")
    earlier = [entry["version"] for entry in history if entry["version"] != int(champion.version)]
    if not earlier:
        raise CxrError(f"{name} has had no champion before version {champion.version}; nothing to roll back to")
    target = earlier[-1]
    move_champion(client, name, target, f"rollback from v{champion.version}: {reason}")
    return target


def _history(client, name: str) -> list[dict]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _score_champion(paths: ProjectPaths, champion, store_index: np.ndarray):  # -> tuple[Task, np.ndarray, Threshold]
    """The champion's task, its probabilities for the given films (through the registered pyfunc as it is served)
    and its operating point."""
    import mlflow

    from pipeline import tracking
    from pipeline.tasks import task_for

    with tracking.fluent_store(paths):
        model = mlflow.pyfunc.load_model(f"models:/{champion.name}/{champion.version}")
    metadata = model.metadata.metadata
    size = int(metadata["image_size"])
    images = np.load(paths.images, mmap_mode="r")
    if images.shape[1:] != (size, size):
        from pipeline.imaging import resize

        batch = np.stack([resize(np.asarray(images[i]), size) for i in store_index])  # the champion was trained at another size
    else:
        batch = np.asarray(images[store_index])
    task = task_for(metadata["task"], metadata["labels"])
    return task, task.served_probability(model.predict(batch)), metadata["threshold"]


def _paired_difference_interval(task, truth, ours, theirs, our_threshold, their_threshold, metric, rounds,
                                seed) -> list[float] | None:
    """95 % interval of (challenger - champion) over paired resamples of the same films."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(rounds):
        pick = rng.integers(0, len(truth), len(truth))
        a = task.quick_metrics(truth[pick], ours[pick], our_threshold)[metric]
        b = task.quick_metrics(truth[pick], theirs[pick], their_threshold)[metric]
        if a is not None and b is not None:
            differences.append(a - b)
    if len(differences) < rounds // 2:
        return None
    return [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))]
