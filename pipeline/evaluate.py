"""Evaluate: choose the operating point on validation, then score the checkpoint on the held-out test split.

Writes reports/metrics.json (every number, with subgroups and intervals), reports/scores.json (its headline numbers:
the DVC metrics), ROC, PR, reliability and confusion data as CSV (DVC plots) and as
PNG (MLflow artifacts), reports/predictions.csv (per film: what the champion gate and the report read), and
logs the metrics into the run that `cxr train` opened. What is scored, and how the operating point is chosen,
follows the task the checkpoint was trained for (pipeline.tasks).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, EvaluateConfig
from pipeline.documents import describe_threshold
from pipeline.dvc_watch import check_sources_watched
from pipeline.errors import CxrError
from pipeline.files import sha256_of, write_json
from pipeline.manifest import read_manifest
from pipeline.metrics import SUBGROUP_METRICS, TOO_SMALL, format_metric
from pipeline.paths import ProjectPaths
from pipeline.splits import patient_knowledge
from pipeline.tasks import Scored, Task, Threshold

log = logging.getLogger(__name__)


# Manifest columns a model may do better or worse on (sex and age_band from DICOM headers, pipeline.imaging).
SUBGROUP_COLUMNS = ("source", "view", "modality", "format", "sex", "age_band")


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    plot_paths: list[Path]


def evaluate_stage(paths: ProjectPaths, config: Config) -> EvaluateResult:
    """The operating point chosen on validation, test and validation metrics at it, plots, and their MLflow logging."""
    from pipeline.metrics import calibration_table, describe_bootstrap
    from pipeline.models import describe_network, load_checkpoint
    from pipeline.plots import write_evaluation_plots
    from pipeline.predictions import prediction_rows, write_predictions
    from pipeline.tasks import task_for

    model, state = load_checkpoint(paths.checkpoint)
    task = task_for(state["task"], state["labels"])
    manifest = read_manifest(paths.manifest, task.name, task.labels,
                             ["store_index", "image_id", "split", "label", "label_index", "patient_hash",
                              *SUBGROUP_COLUMNS],
                             expected_by=f"the model in {paths.checkpoint}")
    images = np.load(paths.images, mmap_mode="r")
    settings = config.evaluate
    rows = {split: _split_rows(manifest, split) for split in ("val", "test")}
    views = tta_views(settings)
    raw = {split: score_films(model, task, part, np.asarray(images[part["store_index"].to_numpy()]), views)
           for split, part in rows.items()}
    temperature = task.fit_temperature(raw["val"]) if settings.temperature_scaling else 1.0
    scored = {split: Scored(s.truth, task.apply_temperature(s.probability, temperature)) for split, s in raw.items()}
    # On the calibrated validation probabilities: the threshold is served together with the temperature.
    threshold = task.operating_point(scored["val"], settings)

    method = task.threshold_method(settings)
    metrics: dict = {"task": task.name, "labels": task.labels, "threshold": threshold, "threshold_method": method}
    if method == "sensitivity":
        metrics["target_sensitivity"] = settings.target_sensitivity
    # How well validation pins the operating point down: the threshold chosen again on resampled val patients.
    metrics["threshold_spread"] = task.threshold_spread(scored["val"], settings, rows["val"]["patient_hash"].to_numpy())
    metrics |= {"temperature": temperature, "tta": views, "model": state["model"], "epoch": state["epoch"],
                "checkpoint_sha256": sha256_of(paths.checkpoint)}
    metrics |= patient_knowledge(paths.manifest)  # patients_known and the caveat every report repeats
    for split in ("val", "test"):
        metrics[split] = task.metrics(scored[split], threshold)
    test, patients = scored["test"], rows["test"]["patient_hash"].to_numpy()
    metrics["test"] |= {"n_patients": _count_patients(patients), "ci_method": describe_bootstrap(settings.bootstrap_rounds),
                        "ci95": task.intervals(test, threshold, settings.bootstrap_rounds, settings.seed, patients)}
    calibration, metrics["test"]["ece"] = calibration_table(*task.calibration_inputs(test), settings.calibration_bins)
    metrics["test"]["ci95"]["ece"] = _calibration_interval(task, test, patients, settings)
    metrics["test"]["min_subgroup_patients"] = settings.min_subgroup_patients
    metrics["test"]["subgroups"] = subgroup_metrics(rows["test"], task, test, threshold, settings)
    if settings.external:
        check_sources_watched(paths.root, [spec.path for spec in settings.external], "evaluate.external")
        metrics["external"] = {spec.path: _external_metrics(paths, config, spec, model, task, int(state["image_size"]),
                                                          metrics["test"], threshold, temperature)
                               for spec in settings.external}
    plot_paths = write_evaluation_plots(paths.plots, task, test, threshold, calibration)
    write_json(paths.metrics, metrics)
    write_json(paths.scores, headline_scores(metrics))
    write_predictions(paths.predictions, [prediction_rows(split, rows[split], task, scored[split], threshold) for split in ("val", "test")])
    _log_to_mlflow(paths, task, metrics, plot_paths, f"{describe_network(state)}, {state['image_size']} px: {_headline(task, metrics)}")
    _log_summary(task, metrics, paths.metrics)
    return EvaluateResult(metrics, paths.metrics, plot_paths)


# What reports/scores.json (the DVC metrics file) keeps of each split: numbers only, and few, since `dvc exp show`
# makes a column of every leaf. Subgroups, per-label scores, counts and how things were chosen stay in metrics.json.
HEADLINE_SCORES = {"test": ("auc", "accuracy", "sensitivity", "specificity", "ece", "n"), "val": ("auc", "accuracy")}


def headline_scores(metrics: dict) -> dict:
    """metrics.json's headline numbers and the test AUC's 95 % interval; a score the task lacks is left out."""
    scores = {split: {name: metrics[split][name] for name in names if _is_number(metrics[split].get(name))}
              for split, names in HEADLINE_SCORES.items()}
    interval = metrics["test"].get("ci95", {}).get("auc")
    if isinstance(interval, list):
        scores["test"] |= {"auc_ci95_low": interval[0], "auc_ci95_high": interval[1]}
    return scores


def _split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise CxrError(f"evaluate: the {split} split is empty; add data or raise data.split.{split}")
    return rows


def tta_views(settings: EvaluateConfig) -> list[dict]:
    """evaluate.tta as plain data: what metrics.json records and register stores with the model (pipeline.tta)."""
    return [view.model_dump() for view in settings.tta]


def score_films(model, task: Task, rows: pd.DataFrame, images: np.ndarray, views: list[dict]) -> Scored:
    """The model's probabilities for `images` (averaged over the test-time `views`, as the served model averages
    them) and the targets of their manifest `rows` (label, label_index)."""
    from pipeline.tta import tta_probabilities

    return task.scored(rows, tta_probabilities(model, images, task.activation, views))


def _count_patients(patients: np.ndarray) -> int:
    return int(len(np.unique(patients)))


def _calibration_interval(task: Task, test: Scored, patients: np.ndarray, settings: EvaluateConfig) -> list[float] | None:
    """The patient-clustered 95 % interval of the expected calibration error. One number, as the documents show
    ECE as one number; the reliability curve's bins stay points (calibration.csv gives each bin's count)."""
    from pipeline.metrics import bootstrap, calibration_table

    def score(pick: np.ndarray) -> dict[str, float | None]:
        return {"ece": calibration_table(*task.calibration_inputs(test.subset(pick)), settings.calibration_bins)[1]}

    return bootstrap(score, len(patients), settings.bootstrap_rounds, settings.seed, clusters=patients)["ece"]


def subgroup_metrics(test_rows: pd.DataFrame, task: Task, test: Scored, threshold: Threshold,
                      settings: EvaluateConfig) -> dict:
    """Test metrics per value of each subgroup column that holds two or more values (e.g. PA vs AP films, F vs M)."""
    patients = test_rows["patient_hash"].to_numpy()
    groups: dict = {}
    for column in SUBGROUP_COLUMNS:
        values = test_rows[column].fillna("").astype(str).to_numpy()
        kinds = sorted(set(values) - {""})
        if len(kinds) < 2:
            continue
        groups[column] = {kind: _subgroup(task, test.subset(values == kind), patients[values == kind], threshold, settings)
                          for kind in kinds}
    return groups


def _subgroup(task: Task, scored: Scored, patients: np.ndarray, threshold: Threshold, settings: EvaluateConfig) -> dict:
    """One subgroup's films and patients, and its metrics with patient-clustered 95 % intervals; under
    evaluate.min_subgroup_patients only the counts and "n too small": a number there would read as a finding."""
    counts = {"n": int(len(patients)), "n_patients": _count_patients(patients)}
    if counts["n_patients"] < settings.min_subgroup_patients:
        return counts | {"note": TOO_SMALL}
    scores = task.metrics(scored, threshold)
    shown = [name for name in SUBGROUP_METRICS if name in scores]
    intervals = task.intervals(scored, threshold, settings.bootstrap_rounds, settings.seed, patients)
    return counts | {name: scores[name] for name in shown} | {"ci95": {name: intervals.get(name) for name in shown}}


# The MLflow metric prefix of each split evaluate scores: validation's takes `eval_` so it never shares a key with the
# per-epoch `val_auc` / `val_accuracy` training logs (those are at 0.5, these at the chosen operating point).
MLFLOW_PREFIX = {"val": "eval_val", "test": "test"}


def _log_to_mlflow(paths: ProjectPaths, task: Task, metrics: dict, plot_paths: list[Path], description: str) -> None:
    """Every numeric metric of val (as `eval_val_*`) and test (per-label ones as `test_auc_<label>`), the intervals,
    the threshold(s) as metrics and how they were chosen as a tag (a tag: a rerun may choose another way), the files,
    and the run's one-line description."""
    from pipeline import tracking

    client = tracking.client(paths)
    run_id = tracking.read_run_id(paths)
    flat: dict[str, float] = {}
    for split, prefix in MLFLOW_PREFIX.items():
        flat |= {f"{prefix}_{name}": value for name, value in metrics[split].items() if _is_number(value)}
        for label, scores in metrics[split].get("per_label", {}).items():
            flat |= {f"{prefix}_{name}_{_metric_name(label)}": scores[name] for name in ("auc", "sensitivity", "specificity")
                     if _is_number(scores.get(name))}
    intervals = metrics["test"]["ci95"]
    flat |= {f"test_{name}_ci95_{end}": bound for name, interval in intervals.items() if isinstance(interval, list)
             for end, bound in zip(("low", "high"), interval)}
    flat |= {_metric_name(name): value for name, value in task.threshold_metrics(metrics["threshold"]).items()}
    tracking.log_metrics(client, run_id, flat)
    client.set_tag(run_id, "threshold_method", describe_threshold(metrics))
    client.set_tag(run_id, "patients_known", json.dumps(metrics.get("patients_known")))
    if metrics.get("patient_caveat"):
        client.set_tag(run_id, "patient_caveat", metrics["patient_caveat"])
        description += f". Caveat: {metrics['patient_caveat']}"
    client.log_artifact(run_id, str(paths.metrics), artifact_path="evaluation")
    for plot in plot_paths:
        client.log_artifact(run_id, str(plot), artifact_path="evaluation")
    tracking.describe_run(client, run_id, description)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_name(label: str) -> str:
    """A label as MLflow metric names allow it (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", label)


def _headline(task: Task, metrics: dict) -> str:
    """The test AUC with its interval and the task's other headline metrics, in one line."""
    test = metrics["test"]
    auc_ci = test["ci95"]["auc"] or [None, None]
    headline = (f"test {task.metric_title('auc')} {format_metric(test['auc'])} "
                f"(95% CI {format_metric(auc_ci[0], 3)} to {format_metric(auc_ci[1], 3)})")
    return headline + "".join(f", {task.metric_title(name)} {format_metric(test[name], 3)}" for name in task.headline[1:])


def _log_summary(task: Task, metrics: dict, where: Path) -> None:
    test = metrics["test"]
    if metrics.get("patient_caveat"):
        log.warning("evaluate: %s", metrics["patient_caveat"])
    log.info("evaluate: operating point %s (%s); %s (n=%d films of %d patients) → %s", task.describe_point(metrics["threshold"]),
             describe_threshold(metrics), _headline(task, metrics), test["n"], test["n_patients"], where)


def _external_metrics(paths: ProjectPaths, config: Config, spec, model, task: Task, size: int, internal: dict,
                      threshold: Threshold, temperature: float) -> dict:
    """Score a labelled source the model never saw, decoded exactly as at ingest, at the internal operating point
    (threshold and temperature from validation), and its shift from the internal test."""
    from pipeline.decode_cache import Decoded
    from pipeline.deid import load_key
    from pipeline.imaging import limits_of, resize
    from pipeline.ingest import decode_items, patient_of
    from pipeline.metrics import describe_bootstrap
    from pipeline.sources import read_source

    items, rejected = read_source(spec, paths.root, config.data)
    labelled = [item for item in items if item.label is not None]
    files = [item for item in labelled if item.file is not None]
    key = load_key(paths.root, config.deid.key_scope)
    decoded = dict(zip(map(id, files), decode_items([item.file for item in files], size, key, config.data.num_workers,
                                                    limits_of(config.data), config.data.crop)))
    images, read, patients = [], [], []
    for item in labelled:
        outcome = decoded.get(id(item))
        if item.file is None:
            images.append(resize(np.asarray(item.pixels, dtype=np.uint8), size, config.data.crop))
        elif isinstance(outcome, Decoded):
            images.append(outcome.pixels)
        else:
            continue
        read.append(item.label)
        # Pseudonyms group films for the bootstrap as raw IDs would.
        patients.append(patient_of(item, outcome.identity.patient if isinstance(outcome, Decoded) else None, key))
    if not images:
        raise CxrError(f"evaluate.external: none of the films in '{spec.path}' could be read")
    rows = pd.DataFrame({"label": read})
    rows["label_index"] = task.label_index(rows["label"])
    raw = score_films(model, task, rows, np.stack(images), tta_views(config.evaluate))
    scored = Scored(raw.truth, task.apply_temperature(raw.probability, temperature))
    scores = task.metrics(scored, threshold)
    rounds, clusters = config.evaluate.bootstrap_rounds, np.asarray(patients)
    scores |= {"n_patients": _count_patients(clusters), "ci_method": describe_bootstrap(rounds),
               "ci95": task.intervals(scored, threshold, rounds, config.evaluate.seed, clusters)}
    scores["unreadable"] = len(labelled) - len(images) + len(rejected)
    scores["shift_from_internal_test"] = {
        name: (scores[name] - internal[name]) if scores[name] is not None and internal.get(name) is not None else None
        for name in ("auc", "accuracy", "sensitivity", "specificity") if name in scores
    }
    log.info("evaluate: external %s: AUC %s (internal test %s), n=%d", spec.path, format_metric(scores["auc"]),
             format_metric(internal.get("auc")), scores["n"])
    return scores
