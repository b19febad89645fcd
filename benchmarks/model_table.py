"""README results table: model x image size -> validation AUC and accuracy (mean ± sd over seeds) on PneumoniaMNIST.

Why it exists: issue #4 asks for a results table from real runs, each row with the command that reproduces it.
A table written by hand drifts from the code; this one is produced by the pipeline's own stages
(pipeline.stages: ingest, validate, rebalance, train) with the params.yaml defaults plus `--set` overrides,
exactly as `cxr pipeline` would run them, so a row is what a user gets.

Each image size is ingested (and passed through the data-quality gate) once in a temporary project; every
model and seed then rebalances and trains there. A seed sets `train.seed` and `rebalance.seed` (weights,
batch order, augmentation, resampling); the split (`data.seed`) stays fixed so every run is scored on the same
validation films. Validation metrics are the kept checkpoint's (train.keep: the last epoch's, or with `--set
train.keep=best` the best on validation AUC), accuracy at 0.5 (as training
scores validation: Task.validation_scores in pipeline.tasks). Training time is the wall time of the train stage;
on a shared machine it is only as good as the machine was idle, so the CPU share other processes took is
measured (from /proc/stat) and reported.

Run it from the repository root:

    .venv/bin/python benchmarks/model_table.py                                  # seed_cnn and resnet18 at 28 px, seeds 0 1 2
    .venv/bin/python benchmarks/model_table.py --models cnn_gru vit --sizes 28 64
    .venv/bin/python benchmarks/model_table.py --help
"""

from __future__ import annotations

import os

os.environ.setdefault("CXR_DEID_KEY", "benchmark-key-0123456789abcdef0123456789")  # before pipeline imports: no key file is written

import argparse
import logging
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import BUSY_WARNING, cpu_snapshot, others_cpu_s  # noqa: E402
from pipeline.config import Config, TrainConfig, load_config  # noqa: E402
from pipeline.errors import CxrError  # noqa: E402
from pipeline.paths import ProjectPaths  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
DEFAULT_PARAMS = REPO / "params.yaml"
MODEL_NAMES = typing.get_args(TrainConfig.model_fields["model"].annotation)  # read from the config: no torch import


@dataclass(frozen=True)
class Run:
    model: str
    size: int
    seed: int
    val_auc: float  # of the model the checkpoint keeps (train.keep)
    val_accuracy: float
    epoch: int  # its epoch
    epochs_run: int
    train_s: float
    others_share: float  # share of the machine's CPU other processes took while this run trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Print the README results table for PneumoniaMNIST: for every --models x --sizes, validation AUC and "
            "accuracy (mean ± sd over --seeds) and the mean training time per run, with the command that "
            "reproduces the row. Runs the pipeline's own stages (ingest, validate, rebalance, train) with the "
            "params.yaml defaults plus --set overrides in a temporary project; nothing in the repository changes."
        ),
        epilog=(
            "Time: a run costs what `cxr train` costs; on 2 CPU cores with the tuned defaults, about 20-30 s for "
            "seed_cnn or cnn_gru at 28 px, about 2 min for vit at 28 px or cnn_gru at 64 px, about 10 min for "
            "resnet18 at 28 px (one thread); plus about 30 s per size to ingest and validate. Run it on an otherwise "
            "idle machine (or add --set train.num_threads=1 on a shared one: two threads slow down many times when "
            f"another process holds a core); rows where other processes took more than {BUSY_WARNING:.0%} of the "
            "CPU are flagged."
        ),
    )
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["seed_cnn", "resnet18"],
                        help="train.model values, one row each per size (default: seed_cnn resnet18)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[28],
                        help="data.image_size values; each is ingested once (default: 28, PneumoniaMNIST's native size)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="train.seed and rebalance.seed values averaged in a row (default: 0 1 2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the PneumoniaMNIST train+val .npz (default: ../shared/data/pneumoniamnist/"
                             "pneumoniamnist_trainval.npz from the repository root)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                        help="params file whose values are the defaults (default: the repository's params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every run, as `cxr --set` does, e.g. --set train.epochs=5 (repeatable)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.exit(2, f"model_table: the PneumoniaMNIST archive {args.data} is missing; "
                       "put pneumoniamnist_trainval.npz there or pass --data PATH\n")
    if not args.params.is_file():
        parser.exit(2, f"model_table: the params file {args.params} is missing; pass --params PATH\n")
    if min(args.sizes) < 28:
        parser.error("--sizes must be at least 28 (PneumoniaMNIST's films are 28 px)")
    return args


# --- running the stages --------------------------------------------------------------------------


def new_project(folder: Path, params: Path) -> ProjectPaths:
    """A fresh project holding a copy of the params file (relative paths in it resolve against the copy)."""
    folder.mkdir(parents=True)
    shutil.copyfile(params, folder / "params.yaml")
    return ProjectPaths(folder)


def run_config(paths: ProjectPaths, data: Path, size: int, overrides: list[str], model: str | None = None,
               seed: int | None = None) -> Config:
    """The project's params with the data source, size, user overrides, then the row's model and seed."""
    settings = [f"data.sources=[{data.resolve()}]", f"data.image_size={size}", *overrides]
    if model is not None:
        settings.append(f"train.model={model}")
    if seed is not None:
        settings += [f"train.seed={seed}", f"rebalance.seed={seed}"]
    return load_config(paths.root / "params.yaml", settings)


def prepare_size(paths: ProjectPaths, data: Path, size: int, overrides: list[str]) -> None:
    """Ingest at one image size and pass the data-quality gate (a failed blocking check raises CxrError)."""
    from pipeline.stages import run_stages

    run_stages(paths, run_config(paths, data, size, overrides), until="validate")


def train_run(paths: ProjectPaths, data: Path, size: int, model: str, seed: int, overrides: list[str]) -> Run:
    """Rebalance and train one model with one seed; the kept model's validation scores and the training time."""
    from pipeline.stages import stage

    config = run_config(paths, data, size, overrides, model, seed)
    stage("rebalance").run(paths, config)
    cpu = cpu_snapshot()
    start = time.perf_counter()
    result = stage("train").run(paths, config)
    seconds = time.perf_counter() - start
    share = others_cpu_s(cpu) / (seconds * (os.cpu_count() or 1))
    return Run(model, size, seed, result.val_auc, result.val_accuracy, result.epoch, result.epochs_run, seconds, share)


# --- the table -----------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sample sd; a single seed shows no sd)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def reproduce_command(model: str, size: int, seeds: list[int], overrides: list[str], data: Path, params: Path) -> str:
    """The command line that reruns exactly one row (--data and --params only where they are not the defaults)."""
    parts = ["python", "benchmarks/model_table.py", "--models", model, "--sizes", str(size),
             "--seeds", *map(str, seeds)]
    if data.resolve() != DEFAULT_DATA.resolve():
        parts += ["--data", str(data)]
    if params.resolve() != DEFAULT_PARAMS.resolve():
        parts += ["--params", str(params)]
    for override in overrides:
        parts += ["--set", override]
    return shlex.join(parts)


def table_rows(runs: list[Run], seeds: list[int], overrides: list[str], data: Path, params: Path) -> list[str]:
    """One markdown row per (model, size), in the order they ran."""
    rows = []
    for model, size in dict.fromkeys((run.model, run.size) for run in runs):
        group = [run for run in runs if run.model == model and run.size == size]
        rows.append(
            f"| {model} | {size} | {mean_sd([r.val_auc for r in group])} | {mean_sd([r.val_accuracy for r in group])} "
            f"| {statistics.mean(r.train_s for r in group):.0f} | `{reproduce_command(model, size, seeds, overrides, data, params)}` |"
        )
    return rows


def print_table(runs: list[Run], seeds: list[int], overrides: list[str], data: Path, params: Path) -> None:
    print("| model | image size | val AUC (mean ± sd) | val accuracy (mean ± sd) | training time per run (mean, s) | reproduce |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table_rows(runs, seeds, overrides, data, params)))
    print(f"\n{len(seeds)} seed(s) per row ({' '.join(map(str, seeds))}); accuracy at threshold 0.5; "
          f"{os.cpu_count()} CPU cores; Python {sys.version.split()[0]}")
    worst = max(runs, key=lambda r: r.others_share)
    print(f"other processes took at most {worst.others_share:.0%} of the machine's CPU during a run")
    for run in runs:
        if run.others_share > BUSY_WARNING:
            print(f"WARNING: {run.model} {run.size} px seed {run.seed}: other processes took {run.others_share:.0%} "
                  "of the CPU while it trained; its time may be inflated")


def report_run(run: Run) -> None:
    """One line per finished run on stderr, so a long table shows progress (and partial results survive)."""
    print(f"{run.model} {run.size} px seed {run.seed}: val AUC {run.val_auc:.4f}, accuracy {run.val_accuracy:.4f} "
          f"(epoch {run.epoch} of {run.epochs_run}), {run.train_s:.0f} s, others {run.others_share:.0%}",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-model-table-") as tmp:
            for size in args.sizes:
                paths = new_project(Path(tmp) / f"{size}px", args.params)
                prepare_size(paths, args.data, size, args.overrides)
                for model in args.models:
                    for seed in args.seeds:
                        runs.append(train_run(paths, args.data, size, model, seed, args.overrides))
                        report_run(runs[-1])
    except CxrError as exc:
        raise SystemExit(f"model_table: {exc}") from None
    print_table(runs, args.seeds, args.overrides, args.data, args.params)


if __name__ == "__main__":
    main()
