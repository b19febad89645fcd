"""Register: log the trained model to MLflow as a pyfunc, with its tags and model card, and run the champion gate.

The `champion` alias moves only when the new version is not worse than the champion, scored on the same
films, by more than `register.margin` on `register.gate_metric` (pipeline.champion); otherwise the new
version gets the `challenger` alias and the run says why. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.champion import CHALLENGER, current_champion, gate, move_champion
from pipeline.config import Config
from pipeline.documents import (count_rows, describe_operating_point, describe_threshold, headline_rows, per_label_rows,
                                render)
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_json, sha256_of, write_json
from pipeline.manifest import check_labels, read_manifest
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

# What the served model imports (a test checks the list against the imports): files, and the tasks package.
SERVING_MODULES = ("__init__.py", "errors.py", "labels.py", "tasks", "metrics.py", "losses.py", "models.py", "serving.py",
                   "mlflow_model.py")


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: int
    is_champion: bool
    gate_metric: str
    value: float | None  # the new version's gate metric
    previous_champion: int | None
    previous_value: float | None  # the previous champion's, on the same films
    difference_ci95: list[float] | None
    reason: str


def register_stage(paths: ProjectPaths, config: Config) -> RegisterResult:
    """Log checkpoint + signature + input example as a new registered version; move the alias if it earned it.

    Idempotent: the same checkpoint and threshold from the same run reuse the version already registered
    (a rerun, or a Prefect retry after a dropped connection, does not add a copy).
    """
    from pipeline import tracking

    if not paths.checkpoint.exists():
        raise CxrError(f"{paths.checkpoint} is missing: run `cxr train` first")
    metrics = read_json(paths.metrics, "`cxr evaluate`")
    if metrics.get("checkpoint_sha256") != sha256_of(paths.checkpoint):
        raise CxrError(f"{paths.metrics} describes another checkpoint than {paths.checkpoint}: run `cxr evaluate` first")
    check_labels(paths.manifest, metrics["task"], metrics["labels"], "metrics.json's model")  # before anything is registered
    run_id = tracking.read_run_id(paths)
    client = tracking.client(paths)
    name, settings = config.registry.model_name, config.registry

    fingerprint = f"{sha256_of(paths.checkpoint)}@{json.dumps(metrics['threshold'], sort_keys=True)}@{metrics['temperature']}"
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}' and tags.fingerprint='{fingerprint}'")
    if existing:
        version = int(existing[0].version)
    else:
        version = _log_model(paths, config, run_id)
        client.set_model_version_tag(name, str(version), "fingerprint", fingerprint)
        _describe_version(client, paths, config, name, version, run_id, metrics)

    previous = current_champion(client, name)
    split, metric = settings.gate_metric.split("_", 1)
    own_value = metrics[split].get(metric)
    if previous is None:
        decision_value, previous_value, interval, promote, reason = own_value, None, None, True, "no champion yet"
    elif int(previous.version) == version:
        decision_value, previous_value, interval, promote, reason = own_value, own_value, None, True, "already champion"
    else:
        decision = gate(paths, settings.gate_metric, settings.margin, previous, config.evaluate.bootstrap_rounds, config.evaluate.seed)
        decision_value, previous_value, interval = decision.challenger_value, decision.champion_value, decision.difference_ci95
        promote, reason = decision.promote, decision.reason
    if promote and (previous is None or int(previous.version) != version):
        move_champion(client, name, version, reason)
    elif not promote:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), "decision", reason)

    result = RegisterResult(name, version, promote, settings.gate_metric, decision_value,
                            int(previous.version) if previous else None, previous_value, interval, reason)
    write_json(paths.registered, asdict(result))
    state = " is now @champion" if promote else " is @challenger, champion unchanged"
    log.info("register: %s version %d%s (%s)", name, version, state, reason)
    return result


def _describe_version(client, paths: ProjectPaths, config: Config, name: str, version: int, run_id: str, metrics: dict) -> None:
    """Tags an auditor filters on, and a model card (markdown) as the version's description and a run artifact."""
    run = client.get_run(run_id)
    params_hash = config.params_hash()
    test = metrics["test"]
    tags = {
        "data.manifest_sha256": run.data.tags.get("data.manifest_sha256", "unknown"),
        "git.commit": run.data.tags.get("git.commit", "unknown"),
        "params_sha256": params_hash,
        "threshold": json.dumps(metrics["threshold"]),  # a number; {label: number} for multilabel; null for multiclass
        "threshold_method": describe_threshold(metrics),
        "test_metrics": json.dumps({k: test.get(k) for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "n")
                                    if k in test}),
        "test_ci95": json.dumps(test.get("ci95", {})),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    card = model_card(paths, config, name, version, tags, metrics)
    client.update_model_version(name, str(version), description=card)
    with atomic_path(paths.models / "model_card.md") as tmp:
        tmp.write_text(card)
    client.log_artifact(run_id, str(paths.models / "model_card.md"), artifact_path="model")


def model_card(paths: ProjectPaths, config: Config, name: str, version: int, tags: dict, metrics: dict) -> str:
    """A short, honest model card: what the model is for, what it saw, how good it is, and its limits."""
    return render("model_card.md.j2", **model_card_context(paths, config, name, version, tags, metrics))


def model_card_context(paths: ProjectPaths, config: Config, name: str, version: int, tags: dict, metrics: dict) -> dict:
    """What the model card says, as plain data (model_card.md.j2 lays it out)."""

    from pipeline.tasks import task_for

    task = task_for(metrics["task"], metrics["labels"])
    manifest = read_manifest(paths.manifest, task.name, task.labels, ["split", "label", "format"], "metrics.json's model")
    count_labels, counts = count_rows(task.label_counts(manifest))
    per_label_header, per_label = per_label_rows(metrics)
    return {
        "name": name,
        "version": version,
        "intended_use": task.intended_use(),
        "model": config.train.model,
        "image_size": config.data.image_size,
        "operating_point_sentence": task.decision_rule(describe_operating_point(metrics), describe_threshold(metrics)),
        "git_commit": tags["git.commit"],
        "params_hash": tags["params_sha256"],
        "data_version": tags["data.manifest_sha256"],
        "sources": [source.path for source in config.data.sources],
        "formats": sorted(set(manifest["format"])),
        "dedupe": config.data.dedupe,
        "count_labels": count_labels,
        "counts": counts,
        "operating_point": describe_operating_point(metrics),
        "n": metrics["test"].get("n"),
        "headline": headline_rows(metrics),
        "per_label_header": per_label_header,
        "per_label_rows": per_label,
        "ece": format_metric(metrics["test"].get("ece"), 3),
    }


def _log_model(paths: ProjectPaths, config: Config, run_id: str) -> int:
    """Log the pyfunc (with the code it runs, so it loads anywhere) into the training run and register it."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline import tracking
    from pipeline.models import load_checkpoint
    from pipeline.tasks import task_for

    _, state = load_checkpoint(paths.checkpoint)  # describe the model that was trained, not today's params
    metrics = read_json(paths.metrics, "`cxr evaluate`")  # the operating point evaluate chose on validation
    size, labels, threshold = int(state["image_size"]), list(state["labels"]), metrics["threshold"]
    task = task_for(state["task"], labels)
    temperature = float(metrics["temperature"])
    example = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (1, size, 1))  # a grey ramp: no patient pixels in the registry
    output = task.serving_table(np.full((1, len(labels)), 0.5), threshold)
    with tempfile.TemporaryDirectory() as scratch:
        package = _serving_package(Path(scratch))
        with tracking.fluent_store(paths), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(package / "mlflow_model.py"),
                artifacts={"checkpoint": str(paths.checkpoint)},
                code_paths=[str(package)],
                pip_requirements=serving_requirements(),
                signature=infer_signature(example, output),
                input_example=example,
                model_config={"threshold": threshold, "temperature": temperature},
                metadata={"image_size": size, "labels": labels, "task": task.name, "threshold": threshold, "temperature": temperature},
                registered_model_name=config.registry.model_name,
            )
    return int(info.registered_model_version)


def serving_requirements() -> list[str]:
    """What the logged model needs where it is served: the versions installed here (the model ships its own code)."""
    from importlib.metadata import version

    packages = ("torch", "numpy", "pandas", "mlflow", "monai", "einops")
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]  # no local tag such as +cpu


def _serving_package(folder: Path) -> Path:
    """A copy of just the modules the pyfunc runs, so the model loads without this project installed."""
    import pipeline

    source = Path(pipeline.__file__).parent
    package = folder / "pipeline"
    package.mkdir(parents=True)
    for module in SERVING_MODULES:
        if (source / module).is_dir():
            shutil.copytree(source / module, package / module, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source / module, package / module)
    return package
