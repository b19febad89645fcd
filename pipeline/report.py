"""Report: one self-contained HTML page per run, reports/report.html, that a hospital reviewer can open offline.

Everything is inside the file (images as data URIs, CSS inline, no script, no link to a server or the web):
the data summary and gate results, the metrics with their intervals, the plots, the registry decision, and
Grad-CAM overlays for a few true and false positives and negatives of the test split. This module gathers
them as plain data; pipeline/templates/report.html.j2 lays them out.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.documents import count_rows, describe_operating_point, describe_threshold, headline_rows, per_label_rows, render
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

PLOTS = ("roc", "pr", "calibration", "confusion")
PER_OUTCOME = 2  # Grad-CAM examples for each of TP, FP, TN, FN


def report_stage(paths: ProjectPaths, config: Config) -> Path:
    """Write reports/report.html from the files the earlier stages left; returns its path."""
    page = render("report.html.j2", **report_context(paths, config))
    report = paths.reports / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(page)
    log.info("report: %s", report)
    return report


def report_context(paths: ProjectPaths, config: Config) -> dict:
    """What the report shows, as plain data (report.html.j2 lays it out): tables as lists of rows, figures as
    (data URI, caption) pairs, explanations None when there are no predictions to explain."""
    metrics = read_json(paths.metrics, "`cxr evaluate`")
    gate = read_json(paths.validation_summary, "`cxr validate`")
    return {
        "title": f"{config.registry.model_name}: {config.train.model} at {config.data.image_size} px",
        "sources": [source.path for source in config.data.sources],
        "data": _data(paths, config, gate),
        "gate": {"passed": bool(gate.get("passed")),
                 "checks": [{"name": name, "severity": result["severity"], "success": bool(result["success"])}
                            for name, result in gate.get("checks", {}).items()]},
        "metrics": _metrics(metrics),
        "plots": [_figure(paths.plots / f"{name}.png", name) for name in PLOTS if (paths.plots / f"{name}.png").exists()],
        "explanations": _explanations(paths),
        "registry": json.loads(paths.registered.read_text()) if paths.registered.exists() else None,
    }


def _data(paths: ProjectPaths, config: Config, gate: dict) -> dict:
    from pipeline.labels import UNLABELLED, label_counts

    manifest = pd.read_parquet(paths.manifest, columns=["split", "label"])
    counts = label_counts(manifest, config.data.task, config.data.labels)
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
    }


def _metrics(metrics: dict) -> dict:
    test = metrics["test"]
    header, per_label = per_label_rows(metrics)
    return {
        "n": test.get("n"),
        "operating_point": describe_operating_point(metrics),
        "threshold_method": describe_threshold(metrics),
        "headline": headline_rows(metrics),
        "per_label_header": header,
        "per_label_rows": per_label,
        "ece": format_metric(test.get("ece"), 3),
        "val_auc": format_metric(metrics.get("val", {}).get("auc"), 3),
        "subgroups": [{"column": column,
                       "rows": [[value, g["n"], *(format_metric(g.get(k), 3) for k in ("auc", "accuracy", "sensitivity", "specificity"))]
                                for value, g in groups.items()]}
                      for column, groups in test.get("subgroups", {}).items()],
        "external": [{"source": source, "n": site["n"],
                      "rows": [[k, format_metric(site[k], 3), format_metric(shift, 3)] for k, shift in site["shift_from_internal_test"].items()]}
                     for source, site in metrics.get("external", {}).items()],
    }


def _explanations(paths: ProjectPaths) -> dict | None:
    """Grad-CAM overlays for a few films of each outcome; where the evidence the model used lies.

    binary: up to PER_OUTCOME true and false positives and negatives, explained for the positive label.
    multiclass and multilabel: the most confident films whose top label is right and wrong, explained for that label.
    None without predictions; `error` says why when the model cannot be explained.
    """
    from pipeline.explain import grad_cam, write_overlay
    from pipeline.models import load_checkpoint

    if not paths.predictions.exists():
        return None
    predictions = pd.read_csv(paths.predictions)
    network, state = load_checkpoint(paths.checkpoint)
    examples = _examples(predictions[predictions["split"] == "test"].reset_index(drop=True), list(state["labels"]))
    images = np.load(paths.images, mmap_mode="r")
    figures = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for rows, class_index in examples:
                if rows.empty:
                    continue
                films = np.asarray(images[rows["store_index"].to_numpy()])
                heat = grad_cam(network, films, class_index=class_index)
                for film, map_, row in zip(films, heat, rows.itertuples()):
                    path = Path(scratch) / f"{row.image_id}.png"
                    write_overlay(film, map_, path, row.caption)
                    figures.append(_figure(path, f"{row.caption} (image {row.image_id})"))
    except CxrError as exc:  # e.g. a model family Grad-CAM cannot explain yet
        return {"error": str(exc), "positive": None, "figures": []}
    positive = state["labels"][-1] if state["task"] == "binary" else None
    return {"error": None, "positive": positive, "figures": figures}


def _examples(test: pd.DataFrame, labels: list[str]) -> list[tuple[pd.DataFrame, int | None]]:
    """Films to explain, as (rows with store_index, image_id and a caption, the class Grad-CAM explains)."""
    from pipeline.evaluate import read_predictions
    from pipeline.labels import join_labels

    task, _, scored, _ = read_predictions(test)
    if task == "binary":
        predicted = test["probability"] >= test["threshold"]
        outcomes = {
            "true positive": predicted & (test["truth"] == 1), "false positive": predicted & (test["truth"] == 0),
            "true negative": ~predicted & (test["truth"] == 0), "false negative": ~predicted & (test["truth"] == 1),
        }
        examples = []
        for outcome, chosen in outcomes.items():
            rows = test[chosen].sort_values("probability", ascending=outcome.endswith("negative"), kind="stable").head(PER_OUTCOME)
            examples.append((rows.assign(caption=[f"{outcome}, p={p:.2f}" for p in rows["probability"]]), -1))
        return examples
    top, confidence = scored.probability.argmax(axis=1), scored.probability.max(axis=1)
    if task == "multiclass":
        right, truths = top == scored.truth, [labels[k] for k in scored.truth]
    else:
        right = scored.truth[np.arange(len(top)), top] == 1
        truths = [join_labels((label for label, on in zip(labels, row) if on), labels) or "none" for row in scored.truth]
    captions = [f"top {labels[k]} p={p:.2f}, truth {truth}" for k, p, truth in zip(top, confidence, truths)]
    framed = test.assign(caption=captions, confidence=confidence, right=right)
    return [(framed[framed["right"] == outcome].sort_values("confidence", ascending=False, kind="stable").head(2 * PER_OUTCOME), None)
            for outcome in (True, False)]


def _figure(path: Path, caption: str) -> tuple[str, str]:
    """A PNG as (data URI, caption): the page carries its images inside."""
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}", caption
