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

    The run ends FINISHED, or FAILED when training raises (a killed process leaves it RUNNING, and a resume
    reopens it). Only rank 0 talks to MLflow; under torchrun the other ranks receive the id from it.
    """
    from mlflow.entities import RunTag
    from mlflow.tracking.context.registry import resolve_tags

    from pipeline import tracking
    from pipeline.manifest import review_tags

    if not world.is_main:
        yield distributed.broadcast(None, world)
        return
    client = tracking.client(paths)
    if state is None:
        experiment = tracking.experiment_id(client, config.tracking.experiment, paths)
        # resolve_tags: the user, source and git tags mlflow.start_run would set
        run = client.create_run(experiment, run_name=f"{config.train.model}-{config.data.image_size}px", tags=resolve_tags())
    else:
        run = _reopen_run(client, state["run_id"], train_state_path(paths))
    run_id = run.info.run_id
    try:
        tracking.write_run_info(paths, run_id, run.info.experiment_id)
        if state is None:
            _log_params(client, run_id, config)
            _log_gate_summary(client, run_id, paths)
            _log_environment(client, run_id)
            _log_datasets(client, run_id, paths, config)
            client.log_batch(run_id, tags=[RunTag(key, value) for key, value in {
                **tracking.data_version_tags(paths, [spec.path for spec in config.data.sources]),
                **_split_registry_tags(paths),
                **review_tags(paths.manifest),
                **_provenance_tags(paths, config),
                "device": str(device),
                "world_size": str(world.size),  # processes trained together under torchrun
            }.items()])
        yield distributed.broadcast(run_id, world)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _reopen_run(client, run_id: str, state_path: Path):  # -> mlflow.entities.Run
    """The interrupted run, so one MLflow run holds every epoch (a killed run is still RUNNING; that is fine)."""
    from mlflow.exceptions import MlflowException

    try:
        client.update_run(run_id, status="RUNNING")
        return client.get_run(run_id)
    except MlflowException as exc:
        raise CxrError(f"{state_path}: MLflow run {run_id} cannot be reopened ({exc}); run `cxr train` without --resume") from None


def _log_gate_summary(client, run_id: str, paths: ProjectPaths) -> None:
    """The data gate's counts (duplicates, leakage) belong to the run trained on that data."""
    import json

    from pipeline import tracking

    if not paths.validation_summary.exists():
        return
    summary = json.loads(paths.validation_summary.read_text())
    counts = {f"gate.duplicates.{k}": v for k, v in summary.get("duplicates", {}).items() if isinstance(v, int)}
    counts["gate.patient_leakage"] = summary.get("patient_leakage", 0)
    tracking.log_metrics(client, run_id, counts)
    client.log_artifact(run_id, str(paths.validation_summary), artifact_path="validation")


def _log_datasets(client, run_id: str, paths: ProjectPaths, config: Config) -> None:
    """The manifest's splits as the run's dataset inputs (pipeline.tracking.log_splits_as_datasets)."""
    from pipeline import tracking
    from pipeline.manifest import read_manifest

    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels, ["split", *tracking.DATASET_COLUMNS])
    tracking.log_splits_as_datasets(client, run_id, paths, manifest)


def _split_registry_tags(paths: ProjectPaths) -> dict[str, str]:
    """The split registry the run trained under (its sha256) and, when `cxr ingest --reassign-splits` has
    reshuffled it, when and how many patients: test scores of runs on either side of a reshuffle do not compare."""
    from pipeline.files import sha256_of
    from pipeline.splits import read_registry, reassignment

    registry = read_registry(paths.split_registry)
    if registry is None:
        return {}
    tags = {"data.splits_sha256": sha256_of(paths.split_registry)}
    reshuffle = reassignment(registry)
    if reshuffle is not None:
        when, n_patients = reshuffle
        tags["data.splits_reassigned"] = f"{when} ({n_patients} patients)"
    return tags


def _log_params(client, run_id: str, config: Config) -> None:
    """Every param of the run, as text: register compares them with params.yaml and the documents show them."""
    from mlflow.entities import Param

    from pipeline.provenance import logged_params

    client.log_batch(run_id, params=[Param(key, value) for key, value in logged_params(config).items()])


def _provenance_tags(paths: ProjectPaths, config: Config) -> dict[str, str]:
    """What the run was made from, taken now rather than at register time: the code's commit and whether tracked
    files differed from it, the params hash, the lock file the environment was installed from, the train index."""
    from pipeline import tracking
    from pipeline.files import sha256_of
    from pipeline.provenance import lock_sha256

    dirty = tracking.git_dirty(paths.root)
    return {
        "git.commit": tracking.git_commit(paths.root) or "unknown",
        "git.dirty": "unknown" if dirty is None else str(dirty).lower(),
        "params_sha256": config.params_hash(),
        "requirements_lock_sha256": lock_sha256(),
        "data.train_index_sha256": sha256_of(paths.train_index),
    }


def _log_environment(client, run_id: str) -> None:
    """Every installed distribution and its version (the `pip freeze` form) as environment/pip-freeze.txt."""
    import tempfile

    from pipeline.provenance import installed_distributions

    with tempfile.TemporaryDirectory() as scratch:
        frozen = Path(scratch) / "pip-freeze.txt"
        frozen.write_text(installed_distributions())
        client.log_artifact(run_id, str(frozen), artifact_path="environment")
