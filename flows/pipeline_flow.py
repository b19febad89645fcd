"""The whole pipeline as one Prefect flow: each stage is a task calling the same function DVC's stage calls.

Tasks pass file paths and small result objects, never the MLflow active run (it is thread-local):
train writes the run id to models/run.json and later stages read it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from pipeline.config import Config, load_config
from pipeline.paths import ProjectPaths


@task(name="ingest")
def ingest_task(paths: ProjectPaths, config: Config):
    from pipeline.ingest import ingest_stage

    return ingest_stage(paths, config)


@task(name="validate")
def validate_task(paths: ProjectPaths, config: Config):
    from pipeline.validate import validate_stage

    return validate_stage(paths, config)


@task(name="rebalance")
def rebalance_task(paths: ProjectPaths, config: Config):
    from pipeline.rebalance import rebalance_stage

    return rebalance_stage(paths, config.rebalance)


@task(name="train (with batch augmentation)")
def train_task(paths: ProjectPaths, config: Config):
    from pipeline.train import train_stage

    return train_stage(paths, config)


@task(name="evaluate")
def evaluate_task(paths: ProjectPaths, config: Config):
    from pipeline.evaluate import evaluate_stage

    return evaluate_stage(paths, config)


@task(name="register", retries=2, retry_delay_seconds=5)  # the tracking server is the one part that can fail transiently
def register_task(paths: ProjectPaths, config: Config):
    from pipeline.register import register_stage

    return register_stage(paths, config)


@flow(name="cxr-pipeline", log_prints=True)
def cxr_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """ingest → validate → rebalance → train → evaluate → register, reading params.yaml plus overrides."""
    params = Path(params_path).resolve()
    config = load_config(params, overrides or [])
    paths = ProjectPaths(params.parent)
    logger = get_run_logger()

    ingested = ingest_task(paths, config)
    logger.info("ingest: %d images, quarantined %s", ingested.n_images, ingested.quarantine_reasons)
    gate = validate_task(paths, config)
    logger.info("validate: gate %s", "passed" if gate.passed else "failed")
    rebalance_task(paths, config)
    trained = train_task(paths, config)
    evaluated = evaluate_task(paths, config)
    registered = register_task(paths, config)
    logger.info("register: %s v%d (%s)", registered.model_name, registered.version, registered.reason)
    return {
        "run_id": trained.run_id,
        "test": evaluated.metrics["test"],
        "model_version": registered.version,
        "champion": registered.is_champion,
    }
