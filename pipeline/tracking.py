"""MLflow set-up: the project's tracking store, the experiment, and the run id that links train → evaluate → register.

Every call names its store: stages talk to MLflow through `client(paths)`, an MlflowClient bound to the
project's store, and never through MLflow's process-wide tracking URI, so two projects in one process (tests,
a Prefect worker, cross-validation folds) do not log into each other's store. The calls MLflow offers only in
its fluent, process-wide form (logging and loading a pyfunc model) run inside `fluent_store(paths)`, which sets
that URI for the call and restores it after.

MLflow's active run is thread-local, so stages never rely on it either: the run id travels in
models/run.json and every call names it explicitly.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import config
from pipeline.errors import CxrError
from pipeline.files import md5_of, read_json, sha256_of, write_json
from pipeline.paths import ProjectPaths

QUIET = ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent")
# MLflow 3's UI opens an experiment by this tag: the classic runs table (and its Dataset column) for this value,
# its GenAI traces view when the tag is absent and nothing says otherwise.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI
DATASET_COLUMNS = ("label", "format", "modality", "view", "source")  # what a split's dataset shows: nothing identifying


def store_uri(paths: ProjectPaths) -> str:
    """The project's store: MLFLOW_TRACKING_URI when set, else SQLite under the project (pipeline.config)."""
    return config.tracking_uri(paths.tracking_root)


def client(paths: ProjectPaths):  # -> mlflow.MlflowClient
    """An MlflowClient for the project's tracking store and model registry."""
    import mlflow

    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = store_uri(paths)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def fluent_store(paths: ProjectPaths) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to the project's store for the calls inside, and restored after.

    Only for what MLflow has no client form of (mlflow.pyfunc.log_model, mlflow.pyfunc.load_model, downloading
    a registered model). MLflow's scoped setter puts its own setting back, but exports the URI to the environment
    while it is set and removes it after, so the environment variables it touches are put back here as they were
    (a user's MLFLOW_TRACKING_URI included). Process-wide while it lasts: not for calls on several threads at once.
    """
    import os

    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no download bars in `cxr predict`'s output
    try:
        with _use_tracking_uri(store_uri(paths)):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def experiment_id(client, name: str, paths: ProjectPaths) -> str:
    """The experiment's id, creating it (with artifacts under mlartifacts/) the first time, tagged as a model
    training experiment (an experiment made before the tag existed gets it too)."""
    existing = client.get_experiment_by_name(name)
    if existing is None:
        return client.create_experiment(name, artifact_location=config.artifact_location(paths.tracking_root),
                                        tags=dict([EXPERIMENT_KIND]))
    if existing.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(existing.experiment_id, *EXPERIMENT_KIND)
    return existing.experiment_id


def describe_run(client, run_id: str, text: str) -> None:
    """The run's one-line description, as the UI shows it under the run's name."""
    client.set_tag(run_id, NOTE_TAG, text)


def log_splits_as_datasets(client, run_id: str, paths: ProjectPaths, manifest) -> None:
    """Each split of the manifest as an MLflow dataset input of the run (context: the split), so the runs table's
    Dataset column and the run page name the data. The digest is the manifest's md5, the data version dvc.lock
    records (MLflow caps digests at 36 characters, so not the sha256); the sha256 goes along as an input tag.
    Only the schema and row count of DATASET_COLUMNS leave the project: no film, path or patient."""
    import warnings

    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    digest, sha256 = md5_of(paths.manifest), sha256_of(paths.manifest)
    source = paths.manifest.relative_to(paths.root).as_posix()  # the project's own path, where `dvc checkout` puts it
    inputs = []
    for split, rows in manifest.groupby("split", sort=True):
        with warnings.catch_warnings():  # a relative path reads as either local-source kind; both are the same
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(rows[list(DATASET_COLUMNS)].reset_index(drop=True), source=source,
                                              name=f"manifest-{split}", digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, str(split)),
                                                                      InputTag("data.manifest_sha256", sha256)]))
    client.log_inputs(run_id, datasets=inputs)


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Several metrics in one request, as mlflow.log_metrics sends them."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def write_run_info(paths: ProjectPaths, run_id: str, experiment: str) -> None:
    write_json(paths.run_info, {"run_id": run_id, "experiment_id": experiment})


def read_run_id(paths: ProjectPaths) -> str:
    """The MLflow run that `cxr train` opened; evaluate and register log into the same run."""
    run_id = read_json(paths.run_info, "`cxr train`").get("run_id")
    if not run_id:
        raise CxrError(f"{paths.run_info} has no run_id: run `cxr train` again")
    return run_id


def data_version_tags(paths: ProjectPaths, sources: list[str]) -> dict[str, str]:
    """The data a run trained on, as DVC versions it, so a run can be traced back to `dvc checkout`-able data.

    `data.dvc_md5.images` and `data.dvc_md5.manifest` are the md5s dvc.lock records for the ingest stage's
    outputs; a source tracked with `dvc add` also gets the md5 from its .dvc file. The manifest's sha256 is
    kept as well: the registry's tags and the model card name the data by it.
    """
    import yaml

    tags = {
        "data.manifest_sha256": sha256_of(paths.manifest),
        "data.dvc_md5.manifest": md5_of(paths.manifest),
        "data.dvc_md5.images": md5_of(paths.images),
    }
    for source in sources:
        dvc_file = (paths.root / source).with_name(Path(source).name + ".dvc")
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
            if outs[0].get("md5"):
                tags[f"data.dvc_md5.source.{Path(source).name}"] = str(outs[0]["md5"])
    return tags


def git_commit(root: Path) -> str | None:
    """The commit of the code that produced a run, for the audit trail (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# What a run writes or records on its own, so never makes the work tree dirty: params.yaml (the run logs every param
# and register compares them), dvc.lock and the outputs (DVC versions them, the run tags their md5s).
NOT_CODE = ("params.yaml", "dvc.lock", "data", "models", "reports")


def git_dirty(root: Path) -> bool | None:
    """Whether a tracked file differs from git.commit, so the commit alone does not give back the code that ran
    (None outside git).

    Only tracked files count (`git status --porcelain --untracked-files=no`): `dvc repro` leaves untracked outputs
    in a clean clone. Tracked params.yaml, dvc.lock and outputs under data/, models/ and reports/ (committed in a
    fork to record a result) do not count either: a run rewrites them, and records them by other means.
    """
    excluded = [f":(exclude){path}" for path in NOT_CODE]
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded],
                             cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None
