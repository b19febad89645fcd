"""The stage table: every stage of the pipeline, once, in the order they run.

`cxr <stage>`, the Prefect flow (`cxr pipeline`), the tests and the benchmarks read this table; dvc.yaml
spells the same stages out for DVC, and a test checks that it agrees with this table (order, command and
outputs). Every stage function takes the project's paths and its config and returns a small result object.

`Stage.run` holds the project lock (pipeline.lock) while the stage runs, so every way of running a stage
(`cxr <stage>`, `dvc repro`, the flow, `run_stages`) waits for another run writing the same project, and runs
it under `privacy.umask` (pipeline.privacy), so the outputs that hold films are private to their owner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.evaluate import evaluate_stage
from pipeline.ingest import ingest_stage
from pipeline.lock import project_lock
from pipeline.paths import ProjectPaths
from pipeline.privacy import private_umask
from pipeline.rebalance import rebalance_stage
from pipeline.register import register_stage
from pipeline.report import report_stage
from pipeline.train import train_stage
from pipeline.validate import validate_stage


@dataclass(frozen=True)
class Stage:
    """One step: the function `cxr <name>`, the DVC stage and the flow's task all call, and what it writes."""

    name: str
    run: Callable[[ProjectPaths, Config], Any]
    outputs: tuple[str, ...]  # files and folders it writes, relative to the project root, as dvc.yaml lists them
    retries: int = 0  # reruns the flow allows after a fault that is not the user's (a dropped tracking server)
    resumes: bool = False  # a rerun continues where the failed run stopped (run(..., resume=True))

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", _holding_the_project_lock(self.run))

    @property
    def command(self) -> str:
        return f"cxr {self.name}"


def _holding_the_project_lock(function: Callable[..., Any]) -> Callable[..., Any]:
    """The stage function, run while holding its project's lock under privacy.umask (the same function to callers:
    name, module, docs)."""

    @functools.wraps(function)
    def run(paths: ProjectPaths, config: Config, **options: Any) -> Any:
        with project_lock(paths.root), private_umask(config.privacy.mask):
            return function(paths, config, **options)

    return run


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest_stage, (
        "data/interim/manifest.parquet", "data/interim/images.npy", "data/interim/quarantine.csv",
        "data/interim/dropped_duplicates.csv", "data/splits.parquet")),
    Stage("validate", validate_stage, (
        "reports/validation/results.json", "reports/validation/data_docs", "reports/validation/summary.json",
        "reports/validation/counts.json")),
    Stage("rebalance", rebalance_stage, ("data/processed/train_index.npy",)),
    # A retry resumes from the last epoch's state, so a dropped tracking server costs one epoch at most.
    Stage("train", train_stage, ("models/checkpoint.pt", "models/run.json", "reports/plots/history.csv"),
          retries=1, resumes=True),
    Stage("evaluate", evaluate_stage, (
        "reports/metrics.json", "reports/scores.json", "reports/predictions.csv",
        *(f"reports/plots/{plot}.{kind}" for plot in ("roc", "pr", "calibration", "confusion") for kind in ("png", "csv")))),
    # Registering is idempotent (the same checkpoint reuses its version), so a retry cannot add a copy.
    Stage("register", register_stage, ("models/registered.json", "models/model_card.md"), retries=2),
    Stage("report", report_stage, ("reports/report.html",)),
)


def stage(name: str) -> Stage:
    """The stage called `name`."""
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise CxrError(f"no stage named '{name}'; the stages are {', '.join(s.name for s in STAGES)}")


def run_stages(paths: ProjectPaths, config: Config, until: str | None = None) -> dict[str, Any]:
    """Run the stages in order in this process (through `until`, or all of them); each stage's result by name."""
    last = stage(until).name if until else STAGES[-1].name
    results: dict[str, Any] = {}
    with project_lock(paths.root):  # no other run writes between two of these stages
        for each in STAGES:
            results[each.name] = each.run(paths, config)
            if each.name == last:
                break
    return results
