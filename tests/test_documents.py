"""Documents rendered from templates: a name that reads as markup is shown, never run; a missing value fails loudly."""

import json
import shutil

import jinja2
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.documents import headline_rows, render
from pipeline.manifest import write_manifest
from pipeline.paths import ProjectPaths
from pipeline.provenance import TrainedModel
from pipeline.register import model_card, model_card_context
from pipeline.report import report_context

HOSTILE = "<script>alert(1)</script> & co"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"


@pytest.fixture(scope="module")
def hostile(tiny_project, tmp_path_factory):
    """A copy of the tiny project's outputs whose source, a label and the registry's reason are written as markup
    (the source as its training run would have logged it)."""
    root = tmp_path_factory.mktemp("hostile") / "project"
    shutil.copytree(tiny_project.paths.root, root, ignore=shutil.ignore_patterns("raw", "mlruns*", "mlartifacts"))
    paths = ProjectPaths(root)
    config = load_config(root / "params.yaml")
    trained = TrainedModel(run_id="r", model="cnn_gru", image_size=32, task="multilabel", labels=[HOSTILE, "pneumonia"],
                           sources=[f"data/raw/{HOSTILE}"], dedupe="drop", params_hash="p", git_commit=HOSTILE,
                           git_dirty="unknown", params={})

    metrics = json.loads(paths.metrics.read_text())  # a multilabel operating point, so labels reach every table
    labels = [HOSTILE, "pneumonia"]
    scores = {"tp": 3, "fn": 2, "auc": 0.8, "sensitivity": 0.6, "specificity": 0.7}
    metrics |= {"task": "multilabel", "labels": labels, "threshold": {HOSTILE: 0.31, "pneumonia": 0.42},
                "threshold_method": "youden"}
    metrics["test"]["per_label"] = {label: {**scores, "threshold": metrics["threshold"][label]} for label in labels}
    metrics["test"]["subgroups"] = {"view": {HOSTILE: {"n": 3, "n_patients": 2, "auc": 0.5, "accuracy": 0.6,
                                                       "ci95": {"auc": [0.2, 0.8], "accuracy": [0.3, 0.9]}}}}
    paths.metrics.write_text(json.dumps(metrics))
    predictions = pd.read_csv(paths.predictions)  # the same films, written as that multilabel model's would be
    other = {"truth": 1 - predictions["truth"], "probability": 1 - predictions["probability"]}
    predictions = predictions[["split", "image_id", "store_index"]].assign(**{
        **{f"truth_{HOSTILE}": other["truth"], "truth_pneumonia": predictions["truth"]},
        **{f"probability_{HOSTILE}": other["probability"], "probability_pneumonia": predictions["probability"]},
        **{f"threshold_{label}": value for label, value in metrics["threshold"].items()}})
    predictions.to_csv(paths.predictions, index=False)
    manifest = pd.read_parquet(paths.manifest)  # ingested for that model's labels, as `cxr ingest` would write it
    write_manifest(paths.manifest, manifest, "multilabel", labels)
    registered = json.loads(paths.registered.read_text()) | {"reason": HOSTILE}
    paths.registered.write_text(json.dumps(registered))
    return paths, config, metrics, trained


def _card(hostile) -> str:
    return model_card(*_card_arguments(hostile), GUARD)


def _card_arguments(hostile) -> tuple:
    paths, _, metrics, trained = hostile
    tags = {"git.commit": HOSTILE, "params_sha256": "p", "data.manifest_sha256": "m"}
    return paths, trained, "cxr-pneumonia", 1, tags, metrics


GUARD = {"scope": {"modalities": ["CR", HOSTILE], "views": ["PA"], "body_parts": ["CHEST"]},
         "ood": {"method": "mahalanobis", "threshold": 12.345, "validation_scores": [1.0, 2.0], "min_layout_spread": 3.0,
                 "n_train": 59, "n_features": 128, "probes": ["ct_slice", "photograph"], "probes_answered": ["ct_slice"]}}


def test_report_escapes_source_label_and_reason_names(hostile):
    paths, config, _, trained = hostile
    page = render("report.html.j2", **report_context(paths, config, trained))
    assert "<script" not in page and "alert(1)</script>" not in page
    assert f"Sources: data/raw/{ESCAPED}." in page
    assert f"<td>{ESCAPED}</td>" in page  # the per-label and subgroup tables
    assert f"Operating point: {ESCAPED} 0.3100, pneumonia 0.4200" in page
    assert f"</b>: {ESCAPED}.</p>" in page  # the registry's reason
    assert page.count(ESCAPED) >= 6


def test_model_card_shows_names_as_written(hostile):
    card = _card(hostile)
    assert f"Sources: data/raw/{HOSTILE}." in card
    assert f"| {HOSTILE} | 5 | 0.800 |" in card
    assert f"Code commit `{HOSTILE}`" in card
    assert "&lt;" not in card and "&amp;" not in card


def test_model_card_states_the_out_of_scope_guard_and_warns_when_its_self_check_let_an_image_through(hostile):
    card = _card(hostile)
    guard = card[card.index("## Out-of-scope guard"):card.index("## Limits")]
    assert f"modalities CR, {HOSTILE}; views PA" in guard and "refused above 12.35" in guard
    assert "Self-check at registration: 1 of 2 non-chest test images refused" in guard
    assert "**Warning: the guard would answer ct_slice.** Fitted on 59\ntraining films" in guard
    passed = model_card(*_card_arguments(hostile), GUARD | {"ood": GUARD["ood"] | {"probes_answered": []}})
    assert "2 of 2 non-chest test images refused" in passed and "Warning: the guard" not in passed


def test_model_card_and_flow_summary_share_one_metrics_table(hostile):
    metrics = hostile[2]
    table = render("metrics_table.md.j2", headline=headline_rows(metrics))
    assert table.startswith("| metric | value | 95 % CI |\n|---|---|---|\n| macro AUC |")
    assert table in _card(hostile)


def test_a_missing_value_raises_instead_of_rendering_blank(hostile):
    paths, config, metrics, trained = hostile
    context = report_context(paths, config, trained)
    for broken in ({k: v for k, v in context.items() if k != "registry"},
                   context | {"metrics": {k: v for k, v in context["metrics"].items() if k != "val_auc"}}):
        with pytest.raises(jinja2.UndefinedError):
            render("report.html.j2", **broken)
    card = model_card_context(paths, trained, "cxr-pneumonia", 1, {"git.commit": "c", "params_sha256": "p",
                                                                   "data.manifest_sha256": "m"}, metrics)
    del card["ece"]
    with pytest.raises(jinja2.UndefinedError, match="ece"):
        render("model_card.md.j2", **card)
    with pytest.raises(jinja2.UndefinedError, match="headline"):
        render("metrics_table.md.j2")
