"""Report: one self-contained HTML page per run, reports/report.html, that a hospital reviewer can open offline.

Everything is inside the file (images as data URIs, CSS inline, no script, no link to a server or the web):
the data summary and gate results, the metrics with their intervals, the plots, the registry decision, and
Grad-CAM overlays for a few true and false positives and negatives of the test split. This module gathers
them as plain data; pipeline/templates/report.html.j2 lays them out. The model and its training data are described
as the checkpoint and its training run say (pipeline.provenance), not as today's params.yaml does.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.documents import (count_rows, describe_ece, describe_intervals, describe_operating_point, describe_threshold,
                                describe_threshold_spread, describe_tta,
                                headline_rows, per_label_rows, render, subgroup_tables)
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_json
from pipeline.manifest import read_manifest
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths
from pipeline.provenance import TrainedModel
from pipeline.tasks import Task

log = logging.getLogger(__name__)

PLOTS = ("roc", "pr", "calibration", "confusion")
EXAMPLES = 8  # Grad-CAM examples, spread over the task's groups (binary: 2 each of TP, FP, TN, FN)


def report_stage(paths: ProjectPaths, config: Config) -> Path:
    """Write reports/report.html from the files the earlier stages left and the training run; returns its path."""
    from pipeline import tracking
    from pipeline.provenance import trained_model

    page = render("report.html.j2", **report_context(paths, config, trained_model(paths, tracking.client(paths))))
    report = paths.reports / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(page)
    log.info("report: %s", report)
    return report


def report_context(paths: ProjectPaths, config: Config, trained: TrainedModel) -> dict:
    """What the report shows, as plain data (report.html.j2 lays it out): tables as lists of rows, figures as
    (data URI, caption) pairs, explanations None when there are no predictions to explain. The model, its sources
    and its provenance come from `trained`; config gives only the registered model's name."""
    from pipeline.tasks import task_for

    metrics = read_json(paths.metrics, "`cxr evaluate`")
    gate = read_json(paths.validation_summary, "`cxr validate`")
    task = task_for(metrics["task"], metrics["labels"])  # the evaluated model's, not today's params
    return {
        "title": f"{config.registry.model_name}: {trained.model} at {trained.image_size} px",
        "sources": trained.sources,
        "params_hash": trained.params_hash,  # run ids and commits stay out: the same inputs give the same page
        "data": _data(paths, task, gate),
        "gate": {"passed": bool(gate.get("passed")),
                 "checks": [{"name": name, "severity": result["severity"], "success": bool(result["success"])}
                            for name, result in gate.get("checks", {}).items()]},
        "metrics": _metrics(metrics),
        "plots": [_figure((paths.plots / f"{name}.png").read_bytes(), name) for name in PLOTS if (paths.plots / f"{name}.png").exists()],
        "explanations": _explanations(paths, task),
        "registry": json.loads(paths.registered.read_text()) if paths.registered.exists() else None,
    }


def _data(paths: ProjectPaths, task: Task, gate: dict) -> dict:
    from pipeline.labels import UNLABELLED

    manifest = read_manifest(paths.manifest, task.name, task.labels, ["split", "label"], "metrics.json's model")
    counts = task.label_counts(manifest)
    quarantine = pd.read_csv(paths.quarantine) if paths.quarantine.exists() else pd.DataFrame(columns=["reason"])
    reasons = Counter(quarantine["reason"])
    duplicates = gate.get("duplicates", {})
    labels, rows = count_rows(counts)
    return {
        "labels": labels,
        "counts": rows,
        "unlabelled": int((manifest["split"] == UNLABELLED).sum()),
        "quarantined": sum(reasons.values()),
        "reasons": sorted(reasons.items()),
        "duplicates": {key: duplicates.get(key, 0)
                       for key in ("exact_within_split", "exact_cross_split", "near_cross_split", "dropped_by_dedupe")},
        "patient_leakage": gate.get("patient_leakage", 0),
        "review": _review(gate.get("label_review")),
    }


def _review(review: dict | None) -> dict | None:
    """What the data section says about labels a reviewer changed (data/labels/overrides.csv): None when review
    changed none; the changed films per split, and `test` > 0 flags test labels that differ from the source's."""
    if not review or not review.get("changed"):
        return None
    per_split = {split: sum(cell["changed"] for cell in labels.values()) for split, labels in review["per_split"].items()}
    return {"changed": review["changed"], "reviewed": review["reviewed"], "test": review.get("test_changed", 0),
            "per_split": sorted((split, n) for split, n in per_split.items() if n)}


def _metrics(metrics: dict) -> dict:
    test = metrics["test"]
    header, per_label = per_label_rows(metrics)
    return {
        "n": test.get("n"),
        "operating_point": describe_operating_point(metrics),
        "threshold_method": describe_threshold(metrics),
        "threshold_spread": describe_threshold_spread(metrics),
        "tta": describe_tta(metrics),
        "patients_known": metrics.get("patients_known"),
        "patient_caveat": metrics.get("patient_caveat"),
        "headline": headline_rows(metrics),
        "per_label_header": header,
        "per_label_rows": per_label,
        "intervals": describe_intervals(metrics),
        "ece": describe_ece(metrics),
        "val_auc": format_metric(metrics.get("val", {}).get("auc"), 3),
        "min_subgroup_patients": test["min_subgroup_patients"],
        "subgroups": subgroup_tables(metrics),
        "external": [{"source": source, "n": site["n"], "n_patients": site["n_patients"],
                      "rows": [[k, format_metric(site[k], 3), format_metric(shift, 3)] for k, shift in site["shift_from_internal_test"].items()]}
                     for source, site in metrics.get("external", {}).items()],
    }


def _explanations(paths: ProjectPaths, task: Task) -> dict | None:
    """Grad-CAM overlays for a few test films of each outcome, as the task picks them (Task.examples: binary the
    surest true and false positives and negatives, for the positive label; multiclass and multilabel the most
    confident films whose top label is right and wrong, for that label). None without predictions; `error` says
    why when the model cannot be explained."""
    from pipeline.explain import grad_cam, overlay_png
    from pipeline.models import load_checkpoint
    from pipeline.predictions import load_predictions, read_predictions

    if not paths.predictions.exists():
        return None
    test = load_predictions(paths.predictions, "test")
    scored, threshold = read_predictions(test, task, paths.predictions)
    network, _ = load_checkpoint(paths.checkpoint)
    images = np.load(paths.images, mmap_mode="r")
    figures = []
    try:
        for group in task.examples(scored, threshold, EXAMPLES):
            if not len(group.positions):
                continue
            rows = test.iloc[group.positions]
            films = np.asarray(images[rows["store_index"].to_numpy()])
            heat = grad_cam(network, films, class_index=group.class_index)
            for film, map_, image_id, caption in zip(films, heat, rows["image_id"], group.captions):
                figures.append(_figure(overlay_png(film, map_, caption), f"{caption} (image {image_id})"))
    except CxrError as exc:  # e.g. a model family Grad-CAM cannot explain yet
        return {"error": str(exc), "heading": "", "note": "", "figures": []}
    heading, note = task.evidence()
    return {"error": None, "heading": heading, "note": note, "figures": figures}


def _figure(png: bytes, caption: str) -> tuple[str, str]:
    """A PNG as (data URI, caption): the page carries its images inside."""
    return f"data:image/png;base64,{base64.b64encode(png).decode()}", caption
