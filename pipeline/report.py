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
        _data_section(paths, gate),
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


def _data_section(paths: ProjectPaths, gate: dict) -> str:
    manifest = pd.read_parquet(paths.manifest, columns=["split", "label"])
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
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
        + f"<p>Quarantined files: {sum(reasons.values())}"
        + (" (" + ", ".join(f"{html.escape(r)} {n}" for r, n in sorted(reasons.items())) + ")" if reasons else "") + ". "
        + f"Exact duplicates within splits {duplicates.get('exact_within_split', 0)}, across splits "
        + f"{duplicates.get('exact_cross_split', 0)}, near-duplicate pairs across splits {duplicates.get('near_cross_split', 0)}, "
        + f"dropped copies {duplicates.get('dropped_by_dedupe', 0)}; patients in more than one split {gate.get('patient_leakage', 0)}.</p>"
        + f"<h2>Data-quality gate: {'passed' if gate.get('passed') else 'FAILED'}</h2>"
        + f"<table><tr><th>check</th><th>severity</th><th>result</th></tr>{checks}</table>"
    )


def _metrics_section(metrics: dict) -> str:
    test, ci = metrics["test"], metrics["test"].get("ci95", {})
    rows = [[name, format_metric(test.get(name), 3),
             f"{format_metric((ci.get(name) or [None])[0], 3)} to {format_metric((ci.get(name) or [None, None])[1], 3)}"]
            for name in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")]
    section = (f"<h2>Test metrics (n = {test.get('n')}, threshold {metrics.get('threshold')})</h2>"
               + _table(["metric", "value", "95 % bootstrap CI"], rows)
               + f"<p>Expected calibration error {format_metric(test.get('ece'), 3)}. "
               f"Validation AUC {format_metric(metrics.get('val', {}).get('auc'), 3)}.</p>")
    for column, groups in test.get("subgroups", {}).items():
        section += f"<h3>By {html.escape(column)}</h3>" + _table(
            [column, "n", "AUC", "accuracy", "sensitivity", "specificity"],
            [[value, g["n"], *(format_metric(g[k], 3) for k in ("auc", "accuracy", "sensitivity", "specificity"))] for value, g in groups.items()])
    for source, site in metrics.get("external", {}).items():
        shift = site["shift_from_internal_test"]
        section += f"<h3>External validation: {html.escape(source)} (n = {site['n']})</h3>" + _table(
            ["metric", "value", "shift from internal test"],
            [[k, format_metric(site[k], 3), format_metric(shift[k], 3)] for k in ("auc", "accuracy", "sensitivity", "specificity")])
    return section


def _plots_section(paths: ProjectPaths) -> str:
    figures = [_figure(paths.plots / f"{name}.png", name) for name in PLOTS if (paths.plots / f"{name}.png").exists()]
    return "<h2>Plots (test split)</h2><div class='grid'>" + "".join(figures) + "</div>"


def _explanations_section(paths: ProjectPaths, config: Config) -> str:
    """Grad-CAM overlays for up to PER_OUTCOME films of each outcome; where the evidence the model used lies."""
    from pipeline.explain import grad_cam, write_overlay
    from pipeline.models import load_checkpoint

    if not paths.predictions.exists():
        return ""
    predictions = pd.read_csv(paths.predictions)
    test = predictions[predictions["split"] == "test"]
    predicted = test["probability"] >= test["threshold"]
    outcomes = {
        "true positive": test[predicted & (test["truth"] == 1)], "false positive": test[predicted & (test["truth"] == 0)],
        "true negative": test[~predicted & (test["truth"] == 0)], "false negative": test[~predicted & (test["truth"] == 1)],
    }
    network, _ = load_checkpoint(paths.checkpoint)
    images = np.load(paths.images, mmap_mode="r")
    figures = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for outcome, rows in outcomes.items():
                rows = rows.sort_values("probability", ascending=outcome.endswith("negative"), kind="stable").head(PER_OUTCOME)
                if rows.empty:
                    continue
                films = np.asarray(images[rows["store_index"].to_numpy()])
                heat = grad_cam(network, films)
                for film, map_, row in zip(films, heat, rows.itertuples()):
                    caption = f"{outcome}, p={row.probability:.2f}"
                    path = Path(scratch) / f"{row.image_id}.png"
                    write_overlay(film, map_, path, caption)
                    figures.append(_figure(path, f"{caption} (image {row.image_id})"))
    except CxrError as exc:  # e.g. a model family Grad-CAM cannot explain yet
        return f"<h2>Grad-CAM</h2><p class='note'>{html.escape(str(exc))}</p>"
    return ("<h2>Grad-CAM: where the model found evidence of pneumonia</h2>"
            "<p class='note'>Bright: regions that raised the pneumonia score. A map shows where the model looked, "
            "not whether it was right.</p><div class='grid'>" + "".join(figures) + "</div>")


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
