"""Register: log the trained model to MLflow as a pyfunc and decide whether it becomes `champion`.

The alias moves only when the new version beats the current champion on `register.metric`
(validation), or when there is no champion yet. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import sha256_of, write_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

CHAMPION = "champion"
SERVING_MODULES = ("__init__.py", "errors.py", "models.py", "serving.py", "mlflow_model.py")


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: int
    is_champion: bool
    metric: str
    value: float | None
    previous_champion: int | None
    previous_value: float | None
    reason: str


def register_stage(paths: ProjectPaths, config: Config) -> RegisterResult:
    """Log checkpoint + signature + input example as a new registered version; move the alias if it earned it.

    Idempotent: the same checkpoint and threshold from the same run reuse the version already registered
    (a rerun, or a Prefect retry after a dropped connection, does not add a copy).
    """
    import mlflow

    from pipeline import tracking

    if not paths.checkpoint.exists():
        raise CxrError(f"{paths.checkpoint} is missing: run `cxr train` first")
    tracking.connect(paths.root)
    run_id = tracking.read_run_id(paths)
    client = mlflow.MlflowClient()
    name, metric = config.registry.model_name, config.registry.metric
    value = _run_metric(client, run_id, f"best_{metric}")

    fingerprint = f"{sha256_of(paths.checkpoint)}@{config.evaluate.threshold}"
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}' and tags.fingerprint='{fingerprint}'")
    if existing:
        version = int(existing[0].version)
    else:
        version = _log_model(paths, config, run_id)
        client.set_model_version_tag(name, str(version), "fingerprint", fingerprint)
    previous = _current_champion(client, name)
    previous_value = _run_metric(client, previous.run_id, f"best_{metric}") if previous else None
    if previous is None:
        promote, reason = True, "no champion yet"
    elif int(previous.version) == version:
        promote, reason = True, "already champion"
    elif value is not None and (previous_value is None or value > previous_value):
        promote, reason = True, f"{metric} {value:.4f} beats champion v{previous.version} ({format_metric(previous_value)})"
    else:
        promote, reason = False, f"{metric} {format_metric(value)} does not beat champion v{previous.version} ({format_metric(previous_value)})"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "decision", reason)

    result = RegisterResult(name, version, promote, metric, value,
                            int(previous.version) if previous else None, previous_value, reason)
    write_json(paths.registered, asdict(result))
    log.info("register: %s version %d%s (%s)", name, version, " is now @champion" if promote else " registered, champion unchanged", reason)
    return result


def _log_model(paths: ProjectPaths, config: Config, run_id: str) -> int:
    """Log the pyfunc (with the code it runs, so it loads anywhere) into the training run and register it."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.models import load_checkpoint

    _, state = load_checkpoint(paths.checkpoint)  # describe the model that was trained, not today's params
    size, labels, threshold = int(state["image_size"]), list(state["labels"]), config.evaluate.threshold
    example = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (1, size, 1))  # a grey ramp: no patient pixels in the registry
    output = pd.DataFrame({"probability": [0.5], "label": [labels[-1]]})
    with tempfile.TemporaryDirectory() as scratch:
        package = _serving_package(Path(scratch))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(package / "mlflow_model.py"),
                artifacts={"checkpoint": str(paths.checkpoint)},
                code_paths=[str(package)],
                pip_requirements=serving_requirements(),
                signature=infer_signature(example, output),
                input_example=example,
                model_config={"threshold": threshold},
                metadata={"image_size": size, "labels": labels, "threshold": threshold},
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
        shutil.copy2(source / module, package / module)
    return package


def _current_champion(client, name: str):  # -> ModelVersion | None
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _run_metric(client, run_id: str, key: str) -> float | None:
    value = client.get_run(run_id).data.metrics.get(key)
    return None if value is None or np.isnan(value) else float(value)
