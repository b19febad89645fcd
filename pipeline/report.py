"""Report: one self-contained HTML page per run, reports/report.html, that a hospital reviewer can open offline.

Everything is inside the file (images as data URIs, CSS inline, no script, no link to a server or the web):
the data summary and gate results, the metrics with their intervals, the plots, the registry decision, and
Grad-CAM overlays for a few true and false positives and negatives of the test split.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.documents import describe_operating_point, describe_threshold, headline_rows, per_label_rows
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_json
from pipeline.metrics import format_metric
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)

PLOTS = ("roc", "pr", "calibration", "confusion")
PER_OUTCOME = 2  # Grad-CAM examples for each of TP, FP, TN, FN
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
.ok { color: #1a7f37; } .fail { color: #c62828; font-weight: bold; } .warn { color: #b26a00; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 320px; border: 1px solid #ddd; } .note { color: #555; font-size: 0.9em; }
"""


def report_stage(paths: ProjectPaths, config: Config) -> Path:
    """Write reports/report.html from the files the earlier stages left; returns its path."""
    metrics = read_json(paths.metrics, "`cxr evaluate`")
    gate = read_json(paths.validation_summary, "`cxr validate`")
    registered = json.loads(paths.registered.read_text()) if paths.registered.exists() else None
    sections = [
        _data_section(paths, config, gate),
        _metrics_section(metrics),
        _plots_section(paths),
        _explanations_section(paths, config),
        _registry_section(registered),
    ]
    title = f"{config.registry.model_name}: {config.train.model} at {config.data.image_size} px"
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>Sources: {html.escape(', '.join(s.path for s in config.data.sources))}. "
            f"Self-contained: open this file in any browser, offline.</p>{''.join(sections)}</body></html>")
    report = paths.reports / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(page)
    log.info("report: %s", report)
    return report


def _data_section(paths: ProjectPaths, config: Config, gate: dict) -> str:
    from pipeline.labels import UNLABELLED, label_counts

    manifest = pd.read_parquet(paths.manifest, columns=["split", "label"])
    counts = label_counts(manifest, config.data.task, config.data.labels)
    quarantine = pd.read_csv(paths.quarantine) if paths.quarantine.exists() else pd.DataFrame(columns=["reason"])
    reasons = Counter(quarantine["reason"])
    checks = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{result['severity']}</td>"
        f"<td class='{'ok' if result['success'] else ('fail' if result['severity'] == 'blocking' else 'warn')}'>"
        f"{'pass' if result['success'] else 'FAIL'}</td></tr>"
        for name, result in gate.get("checks", {}).items()
    )
    duplicates = gate.get("duplicates", {})
    return (
        "<h2>Data</h2>" + _table(["split", *counts.columns], [[split, *map(int, counts.loc[split])] for split in counts.index])
        + (f"<p>Unlabelled films (kept for prediction, never trained on): {int((manifest['split'] == UNLABELLED).sum())}.</p>"
           if (manifest["split"] == UNLABELLED).any() else "")
        + f"<p>Quarantined files: {sum(reasons.values())}"
        + (" (" + ", ".join(f"{html.escape(r)} {n}" for r, n in sorted(reasons.items())) + ")" if reasons else "") + ". "
        + f"Exact duplicates within splits {duplicates.get('exact_within_split', 0)}, across splits "
        + f"{duplicates.get('exact_cross_split', 0)}, near-duplicate pairs across splits {duplicates.get('near_cross_split', 0)}, "
        + f"dropped copies {duplicates.get('dropped_by_dedupe', 0)}; patients in more than one split {gate.get('patient_leakage', 0)}.</p>"
        + f"<h2>Data-quality gate: {'passed' if gate.get('passed') else 'FAILED'}</h2>"
        + f"<table><tr><th>check</th><th>severity</th><th>result</th></tr>{checks}</table>"
    )


def _metrics_section(metrics: dict) -> str:
    test = metrics["test"]
    point = describe_operating_point(metrics)
    header, per_label = per_label_rows(metrics)
    section = (f"<h2>Test metrics (n = {test.get('n')}, {html.escape(point)})</h2>"
               + f"<p>Operating point: {html.escape(point)} ({html.escape(describe_threshold(metrics))}); "
               "the registered model decides at it.</p>"
               + _table(["metric", "value", "95 % bootstrap CI"], headline_rows(metrics))
               + (f"<h3>Per label</h3>{_table(header, per_label)}" if per_label else "")
               + f"<p>Expected calibration error {format_metric(test.get('ece'), 3)}. "
               f"Validation AUC {format_metric(metrics.get('val', {}).get('auc'), 3)}.</p>")
    for column, groups in test.get("subgroups", {}).items():
        section += f"<h3>By {html.escape(column)}</h3>" + _table(
            [column, "n", "AUC", "accuracy", "sensitivity", "specificity"],
            [[value, g["n"], *(format_metric(g.get(k), 3) for k in ("auc", "accuracy", "sensitivity", "specificity"))] for value, g in groups.items()])
    for source, site in metrics.get("external", {}).items():
        shift = site["shift_from_internal_test"]
        section += f"<h3>External validation: {html.escape(source)} (n = {site['n']})</h3>" + _table(
            ["metric", "value", "shift from internal test"],
            [[k, format_metric(site[k], 3), format_metric(shift[k], 3)] for k in shift])
    return section


def _plots_section(paths: ProjectPaths) -> str:
    figures = [_figure(paths.plots / f"{name}.png", name) for name in PLOTS if (paths.plots / f"{name}.png").exists()]
    return "<h2>Plots (test split)</h2><div class='grid'>" + "".join(figures) + "</div>"


def _explanations_section(paths: ProjectPaths, config: Config) -> str:
    """Grad-CAM overlays for a few films of each outcome; where the evidence the model used lies.

    binary: up to PER_OUTCOME true and false positives and negatives, explained for the positive label.
    multiclass and multilabel: the most confident films whose top label is right and wrong, explained for that label.
    """
    from pipeline.explain import grad_cam, write_overlay
    from pipeline.models import load_checkpoint

    if not paths.predictions.exists():
        return ""
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
        return f"<h2>Grad-CAM</h2><p class='note'>{html.escape(str(exc))}</p>"
    if state["task"] == "binary":
        positive = html.escape(state["labels"][-1])
        heading, note = f"evidence of {positive}", f"Bright: regions that raised the {positive} score."
    else:
        heading, note = "evidence of the top label", "Bright: regions that raised the score of the film's most probable label."
    return (f"<h2>Grad-CAM: where the model found {heading}</h2><p class='note'>{note} A map shows where the model "
            "looked, not whether it was right.</p><div class='grid'>" + "".join(figures) + "</div>")


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


def _registry_section(registered: dict | None) -> str:
    if registered is None:
        return "<h2>Registry</h2><p>Not registered yet (run `cxr register`).</p>"
    alias = "champion" if registered["is_champion"] else "challenger"
    return (f"<h2>Registry</h2><p>{html.escape(registered['model_name'])} version {registered['version']} is "
            f"<b>@{alias}</b>: {html.escape(registered['reason'])}.</p>")


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
