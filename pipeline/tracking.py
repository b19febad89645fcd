"""MLflow set-up: the tracking store, the experiment, and the run id that links train → evaluate → register.

MLflow's active run is thread-local, so stages never rely on it: the run id travels in
models/run.json and every call names it explicitly.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from pipeline import config
from pipeline.errors import CxrError
from pipeline.files import md5_of, read_json, sha256_of, write_json
from pipeline.paths import ProjectPaths


def connect(root: Path) -> str:
    """Point MLflow at the project's store (SQLite under the root unless MLFLOW_TRACKING_URI says otherwise)."""
    import mlflow

    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    uri = config.tracking_uri(root)
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that so the next project in this process
    # (a test, a Prefect worker) still gets its own default store.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def experiment_id(name: str, root: Path) -> str:
    """The experiment's id, creating it (with artifacts under mlartifacts/) the first time."""
    import mlflow

    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(name, artifact_location=config.artifact_location(root))


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
    kept as well (older runs have only that).
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
