"""The MLflow run training logs to: opened new with params, tags and the data gate's counts, or reopened on resume.

Its id goes to models/run.json, where evaluate and register find the run to add to. Only rank 0 talks to MLflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import distributed
from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.paths import ProjectPaths
from pipeline.training.state import train_state_path


@contextmanager
def tracked_run(paths: ProjectPaths, config: Config, state: dict | None, device,
                world: distributed.World) -> Iterator[str]:
    """The MLflow run training logs to, new (with params and tags) or reopened on resume; yields its id.

    Only rank 0 talks to MLflow; under torchrun the other ranks receive the id from it.
    """
    import mlflow

    from pipeline import tracking

    if not world.is_main:
        yield distributed.broadcast(None, world)
        return
    tracking.connect(paths.root)
    if state is None:
        experiment = tracking.experiment_id(config.tracking.experiment, paths.root)
        run_name = f"{config.train.model}-{config.data.image_size}px"
        active_run = mlflow.start_run(experiment_id=experiment, run_name=run_name)
    else:
        active_run = _reopen_run(state["run_id"], train_state_path(paths))
    with active_run as run:
        run_id = run.info.run_id
        tracking.write_run_info(paths, run_id, run.info.experiment_id)
        if state is None:
            _log_params(run_id, config)
            _log_gate_summary(run_id, paths)
            mlflow.set_tags({
                **tracking.data_version_tags(paths, [spec.path for spec in config.data.sources]),
                "git.commit": tracking.git_commit(paths.root) or "unknown",
                "device": str(device),
                "world_size": str(world.size),  # processes trained together under torchrun
            })
        yield distributed.broadcast(run_id, world)


def _reopen_run(run_id: str, state_path: Path):  # -> mlflow.ActiveRun
    """The interrupted run, so one MLflow run holds every epoch (a killed run is still RUNNING; that is fine)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.start_run(run_id=run_id)
    except MlflowException as exc:
        raise CxrError(f"{state_path}: MLflow run {run_id} cannot be reopened ({exc}); run `cxr train` without --resume") from None


def _log_gate_summary(run_id: str, paths: ProjectPaths) -> None:
    """The data gate's counts (duplicates, leakage) belong to the run trained on that data."""
    import json

    import mlflow

    if not paths.validation_summary.exists():
        return
    summary = json.loads(paths.validation_summary.read_text())
    counts = {f"gate.duplicates.{k}": v for k, v in summary.get("duplicates", {}).items() if isinstance(v, int)}
    counts["gate.patient_leakage"] = summary.get("patient_leakage", 0)
    mlflow.log_metrics(counts, run_id=run_id)
    mlflow.MlflowClient().log_artifact(run_id, str(paths.validation_summary), artifact_path="validation")


def _log_params(run_id: str, config: Config) -> None:
    """Every param of the run, as text (long values cut to 500 characters)."""
    import mlflow

    params = {key: str(value)[:500] for key, value in config.as_flat_dict().items()}
    mlflow.log_params(params, run_id=run_id)
