"""Label sets (data.task): binary, multiclass and multilabel, from params to the served model.

Two tiny projects run every real stage function once each (module fixtures): a 3-class Kermany-style folder
(normal / bacteria / virus, the class taken from the file name's subtype) and a multilabel CSV table
(NIH-style `A|B` cells, `No Finding` meaning none). The films are drawn here with a mark per label, so a
one-epoch model has something to find.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipeline.config import RebalanceConfig, load_config
from pipeline.errors import CxrError
from pipeline.predict import load_model
from pipeline.tracking import client
from tests.conftest import run_all_stages, tiny_params_text

MULTICLASS_LABELS = ["normal", "bacteria", "virus"]
MULTILABEL_LABELS = ["effusion", "nodule", "pneumonia"]


def draw_film(path: Path, marks: set[str], seed: int, size: int = 48) -> None:
    """A noisy grey film with a bright mark for each label it carries (each label has its own place)."""
    rng = np.random.default_rng(seed)
    film = rng.normal(100, 18, (size, size))
    if "bacteria" in marks or "pneumonia" in marks:
        film[size // 2 : size // 2 + 12, 6:18] += 90  # a dense patch low on the left
    if "virus" in marks:
        film[8:40:6, :] += 60  # diffuse streaks across both lungs
    if "effusion" in marks:
        film[-8:, :] += 80  # fluid at the bases
    if "nodule" in marks:
        film[8:14, size - 16 : size - 10] += 110  # a small round spot high on the right
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(film, 0, 255).astype(np.uint8)).save(path)


def write_params(root: Path, data: dict, **sections: dict) -> Path:
    """The tiny params (32 px, 1 epoch) with `data` keys (and whole other keys) replaced."""
    params = yaml.safe_load(tiny_params_text())
    params["data"].update(data)
    for section, values in sections.items():
        params[section].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_kermany_project(root: Path, patients_per_class: int = 14) -> Path:
    """NORMAL/ and PNEUMONIA/ folders as Kermany's, pneumonia films named person<N>_<bacteria|virus>_<k>.png."""
    seed = 0
    for patient in range(patients_per_class):
        for film in range(2):
            seed += 1
            draw_film(root / "data/raw/kermany/NORMAL" / f"normal{patient}_{film}.png", set(), seed)
            for subtype in ("bacteria", "virus"):
                seed += 1
                number = patient if subtype == "bacteria" else 100 + patient
                draw_film(root / "data/raw/kermany/PNEUMONIA" / f"person{number}_{subtype}_{film}.png", {subtype}, seed)
    return write_params(root, {"sources": ["data/raw/kermany"], "task": "multiclass", "labels": MULTICLASS_LABELS,
                               "class_from": "subtype"})


FINDING_SETS = ["No Finding", "Effusion", "Nodule", "Pneumonia", "Effusion|Pneumonia"]


def write_table_project(root: Path, patients_per_set: int = 8) -> Path:
    """An NIH-style table: `Finding Labels` cells with '|' between findings and `No Finding` for none."""
    rows, seed = [], 0
    for number, finding in enumerate(FINDING_SETS * patients_per_set):
        for film in range(2):
            seed += 1
            name = f"{number:05d}_{film:03d}.png"
            draw_film(root / "data/raw/nih/images" / name, {part.lower() for part in finding.split("|")}, seed)
            rows.append({"Image Index": name, "Finding Labels": finding, "Patient ID": number})
    pd.DataFrame(rows).to_csv(root / "data/raw/nih/Data_Entry_2017.csv", index=False)
    source = {"path": "data/raw/nih/Data_Entry_2017.csv", "format": "nih", "image_root": "data/raw/nih/images"}
    return write_params(root, {"sources": [source], "task": "multilabel", "labels": MULTILABEL_LABELS})


@pytest.fixture(scope="module")
def multiclass_project(tmp_path_factory):
    return run_all_stages(write_kermany_project(tmp_path_factory.mktemp("multiclass")))


@pytest.fixture(scope="module")
def multilabel_project(tmp_path_factory):
    return run_all_stages(write_table_project(tmp_path_factory.mktemp("multilabel")))


# --- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.labels=[normal, bacteria, virus]"], "data.task binary needs exactly two labels"),
        (["data.task=multiclass"], "data.task multiclass needs three or more labels"),
        (["data.task=multilabel", "data.labels=[effusion]"], "at least 2 items"),
        (["data.task=multilabel", "data.labels=[a, b]", "data.class_from=subtype"], "needs data.task binary or multiclass"),
        (["data.labels=[normal, 'a|b']"], "contain '|'"),
        (["data.task=multiclass", "data.labels=[a, b, c]", "register.gate_metric=test_sensitivity"], "defined for binary tasks only"),
    ],
)
def test_label_sets_that_do_not_fit_the_task_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(CxrError, match=message) as error:
        load_config(tmp_path / "params.yaml", overrides)
    assert "\n" not in str(error.value)


def test_the_default_task_is_binary_with_the_last_label_positive(tmp_path):
    from pipeline.tasks import task_for

    data = load_config(tmp_path / "params.yaml").data
    assert (data.task, data.labels, data.class_from) == ("binary", ["normal", "pneumonia"], "label")
    assert task_for(data.task, data.labels).positive == "pneumonia"


# --- sources, splits, rebalance, losses, metrics ------------------------------------------------------


def test_nih_findings_become_label_sets_with_no_finding_as_none(tmp_path):
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    params = write_table_project(tmp_path, patients_per_set=4)
    ingest_stage(ProjectPaths(tmp_path), load_config(params))
    manifest = pd.read_parquet(tmp_path / "data/interim/manifest.parquet")
    assert Counter(manifest["label"]) == {"": 8, "effusion": 8, "nodule": 8, "pneumonia": 8, "effusion|pneumonia": 8}
    assert (manifest["label_index"] == -1).all()
    # stratified on the label set: every finding reaches val and test, no patient straddles splits
    held = manifest[manifest["label"] != ""].groupby("split")["label"].agg(lambda sets: set("|".join(sets).split("|")))
    assert all(held[split] == set(MULTILABEL_LABELS) for split in ("train", "val", "test"))
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1


def test_class_from_subtype_reads_kermany_file_names_and_quarantines_unknown_subtypes(tmp_path):
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    params = write_kermany_project(tmp_path, patients_per_class=3)
    draw_film(tmp_path / "data/raw/kermany/PNEUMONIA/person9_fungus_0.png", {"virus"}, 999)
    config = load_config(params, ["data.subtype_pattern='_(bacteria|virus|fungus)_'"])
    ingest_stage(ProjectPaths(tmp_path), config)
    manifest = pd.read_parquet(tmp_path / "data/interim/manifest.parquet")
    assert Counter(manifest["label"]) == {"normal": 6, "bacteria": 6, "virus": 6}
    assert list(manifest["label_index"]) == [MULTICLASS_LABELS.index(label) for label in manifest["label"]]
    quarantine = pd.read_csv(tmp_path / "data/interim/quarantine.csv")
    assert quarantine["reason"].tolist() == ["label_not_in_set"] and "subtype 'fungus'" in quarantine["message"][0]


def test_a_multilabel_npz_reads_one_column_per_label(tmp_path):
    from pipeline.config import DataConfig, SourceSpec
    from pipeline.sources import read_source

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "chest.npz", train_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=np.uint8))
    data = DataConfig(task="multilabel", labels=MULTILABEL_LABELS)
    items, _ = read_source(SourceSpec(path="chest.npz"), tmp_path, data)
    assert [item.label for item in items] == ["", "effusion|pneumonia", "nodule"]
    with pytest.raises(CxrError, match="has 3 columns; a multilabel task needs one per label"):
        read_source(SourceSpec(path="chest.npz"), tmp_path, DataConfig(task="multilabel", labels=["effusion", "nodule"]))


def test_combined_rebalance_works_for_three_classes():
    from pipeline.rebalance import rebalance_indices

    labels = np.array(["normal"] * 10 + ["bacteria"] * 30 + ["virus"] * 50)
    chosen = rebalance_indices(np.arange(90), labels, RebalanceConfig(method="combined"))
    assert Counter(labels[chosen]) == {"normal": 25, "bacteria": 25, "virus": 25}  # up to 0.5 x 50, then down to equal


def test_sigmoid_focal_loss_with_gamma_zero_is_weighted_binary_cross_entropy():
    from pipeline.losses import SigmoidFocalLoss, balanced_positive_weights

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3, generator=generator) * 3
    targets = (torch.rand(12, 3, generator=generator) > 0.6).float()
    weight = balanced_positive_weights(targets.numpy())
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    assert torch.allclose(SigmoidFocalLoss(0.0, weight)(logits, targets), expected, atol=1e-6)
    assert SigmoidFocalLoss(2.0)(logits, targets) < F.binary_cross_entropy_with_logits(logits, targets)
    counts = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert balanced_positive_weights(counts).tolist() == [1.0, 3.0, 1.0]  # negatives / positives; no positives: 1


def test_macro_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from pipeline.tasks import task_for

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 200)
    probability = rng.dirichlet([1, 1, 1], 200) + np.eye(3)[truth] * 0.5
    probability /= probability.sum(axis=1, keepdims=True)
    scores = task_for("multiclass", ["a", "b", "c"]).quick_metrics(truth, probability, None)
    assert scores["auc"] == pytest.approx(roc_auc_score(truth, probability, multi_class="ovr", average="macro"))
    hot = rng.integers(0, 2, (200, 3))
    probability = hot * 0.3 + rng.random((200, 3)) * 0.7
    scores = task_for("multilabel", ["a", "b", "c"]).quick_metrics(hot, probability, {"a": 0.5, "b": 0.6, "c": 0.7})
    assert scores["auc"] == pytest.approx(roc_auc_score(hot, probability, average="macro"))


def test_accuracy_on_hand_worked_examples():
    from pipeline.tasks import task_for

    # Multiclass: the most probable class is right for films 1 and 3, wrong for 2 (says a, is b) and 4 (says b, is c).
    truth = np.array([0, 1, 2, 2])
    probability = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    assert task_for("multiclass", ["a", "b", "c"]).quick_metrics(truth, probability, None)["accuracy"] == 2 / 4

    # Multilabel at a 0.5, b 0.6, c 0.7 (a probability equal to its threshold is positive):
    #   film 1: a .9→1 ✓  b .5→0 ✓   c .8→1 ✓
    #   film 2: a .4→0 ✓  b .6→1 ✓   c .2→0 ✓
    #   film 3: a .5→1 ✓  b .59→0 ✗  c .1→0 ✓
    #   film 4: a .6→1 ✗  b .1→0 ✓   c .69→0 ✗
    # 9 of 12 decisions right: 0.75 per label on average (exact-match accuracy would be 2 of 4, 0.5).
    hot = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    probability = np.array([[0.9, 0.5, 0.8], [0.4, 0.6, 0.2], [0.5, 0.59, 0.1], [0.6, 0.1, 0.69]])
    scores = task_for("multilabel", ["a", "b", "c"]).quick_metrics(hot, probability, {"a": 0.5, "b": 0.6, "c": 0.7})
    assert scores["accuracy"] == pytest.approx(9 / 12)


# --- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow  # end to end: every stage on a tiny project
def test_a_three_class_folder_project_trains_evaluates_and_registers(multiclass_project):
    project = multiclass_project
    manifest = pd.read_parquet(project.paths.manifest)
    assert set(manifest["label"]) == set(MULTICLASS_LABELS)
    metrics = json.loads(project.paths.metrics.read_text())
    test = metrics["test"]
    assert metrics["task"] == "multiclass" and metrics["threshold"] is None and metrics["threshold_method"] == "argmax"
    assert set(test["per_label"]) == set(MULTICLASS_LABELS)
    matrix = np.array(test["confusion"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == test["n"]
    assert test["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert 0 <= test["auc"] <= 1 and set(test["ci95"]["per_label_auc"]) == set(MULTICLASS_LABELS)
    assert project.results["register"].is_champion and project.results["register"].gate_metric == "test_auc"

    run = client(project.paths).get_run(project.results["train"].run_id)
    assert 0 <= run.data.metrics["val_auc"] <= 1 and "test_auc_bacteria" in run.data.metrics
    served = load_model("models:/cxr-pneumonia@champion", project.paths)
    films = np.load(project.paths.images)[:6]
    table = served.predict(films)
    probabilities = table[[f"probability_{label}" for label in MULTICLASS_LABELS]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert list(table["label"]) == [MULTICLASS_LABELS[k] for k in probabilities.argmax(axis=1)]
    confusion = pd.read_csv(project.paths.confusion)
    assert set(confusion["actual"]) <= set(MULTICLASS_LABELS) and len(confusion) == test["n"]


@pytest.mark.slow  # end to end: every stage on a tiny project
def test_a_multilabel_table_project_reports_per_label_auc_and_serves_label_sets(multilabel_project):
    project = multilabel_project
    metrics = json.loads(project.paths.metrics.read_text())
    test = metrics["test"]
    assert metrics["task"] == "multilabel" and set(metrics["threshold"]) == set(MULTILABEL_LABELS)
    for label in MULTILABEL_LABELS:
        scores = test["per_label"][label]
        assert 0 <= scores["auc"] <= 1 and scores["threshold"] == metrics["threshold"][label]
        assert scores["tp"] + scores["fn"] + scores["tn"] + scores["fp"] == test["n"]
        spread = metrics["threshold_spread"][label]  # each label's threshold chosen again on resampled val patients
        assert spread is None or spread["ci95"][0] <= spread["ci95"][1]
    assert any(metrics["threshold_spread"].values())
    assert test["auc"] == pytest.approx(np.mean([test["per_label"][label]["auc"] for label in MULTILABEL_LABELS]))
    summary = json.loads(project.paths.validation_summary.read_text())
    assert set(summary["per_split"]["val"]["label_fractions"]) == set(MULTILABEL_LABELS)
    dvc_scores = json.loads(project.paths.scores.read_text())  # DVC's metrics: the macro scores, not one column per label
    assert dvc_scores["test"]["auc"] == test["auc"] and "per_label" not in dvc_scores["test"]
    assert all(isinstance(value, (int, float)) for split in dvc_scores.values() for value in split.values())

    version = client(project.paths).get_model_version("cxr-pneumonia", str(project.results["register"].version))
    assert json.loads(version.tags["threshold"]) == metrics["threshold"] and "| pneumonia |" in version.description
    served = load_model("models:/cxr-pneumonia@champion", project.paths)
    films = np.load(project.paths.images)[:8]
    table = served.predict(films)
    for _, row in table.iterrows():
        called = [label for label in MULTILABEL_LABELS if row[f"probability_{label}"] >= metrics["threshold"][label]]
        assert row["label"] == "|".join(called)


@pytest.mark.slow  # end to end: every stage on a tiny project
def test_the_report_and_predict_speak_the_task(multiclass_project, multilabel_project, tmp_path):
    from pipeline.predict import expand_inputs, load_model, predict_files

    for project, labels in ((multiclass_project, MULTICLASS_LABELS), (multilabel_project, MULTILABEL_LABELS)):
        page = project.results["report"].read_text()
        assert "<h3>Per label</h3>" in page and "macro AUC" in page and "top label" in page
        assert page.count("data:image/png;base64,") >= 4 + 2  # the plots and Grad-CAM overlays of top labels
        model = load_model("models:/cxr-pneumonia@champion", project.paths)
        files = expand_inputs([project.paths.root / "data" / "raw"])[:3]
        for prediction in predict_files(model, files, explain_dir=tmp_path / project.config.data.task):
            answer = prediction.as_dict()
            assert set(answer["probabilities"]) == set(labels) and Path(answer["explanation"]).exists()
            assert all(part in labels for part in answer["label"].split("|") if part)
    from tests.test_cli import cxr

    out = cxr("predict", str(files[0]), cwd=multilabel_project.paths.root)  # as a user reads it: every label's probability
    assert out.returncode == 0, out.stderr
    assert all(f"\t{label}=" in out.stdout for label in MULTILABEL_LABELS)


# These register a second version, so each builds a project of its own: the shared ones stay as built.


@pytest.mark.slow  # end to end: every stage on a tiny project
def test_a_temperature_scaled_multiclass_version_goes_through_the_gate_and_is_served_scaled(tmp_path):
    from pipeline.evaluate import evaluate_stage
    from pipeline.metrics import apply_temperature
    from pipeline.models import load_checkpoint, predict_proba
    from pipeline.register import register_stage
    from pipeline.tasks import task_for

    project = run_all_stages(write_kermany_project(tmp_path))
    config = load_config(project.params, ["evaluate.temperature_scaling=true", "register.min_gate_films=5"])  # a tiny test split
    temperature = evaluate_stage(project.paths, config).metrics["temperature"]
    result = register_stage(project.paths, config)
    assert result.version == 2 and "vs champion v1" in result.reason  # compared on the same films by macro AUC
    served = load_model("models:/cxr-pneumonia/2", project.paths)
    films = np.load(project.paths.images)[:5]
    network, _ = load_checkpoint(project.paths.checkpoint)
    probability = predict_proba(network, films, torch.device("cpu"), task_for("multiclass", MULTICLASS_LABELS).activation)
    expected = apply_temperature(probability, temperature, softmax=True)
    table = served.predict(films)
    assert np.allclose(table[[f"probability_{label}" for label in MULTICLASS_LABELS]].to_numpy(), expected, atol=1e-6)


@pytest.mark.slow  # end to end: every stage on a tiny project
def test_multilabel_thresholds_reach_a_target_sensitivity_and_new_ones_make_a_version_compared_label_by_label(tmp_path):
    from pipeline.evaluate import evaluate_stage
    from pipeline.predictions import load_predictions, read_predictions
    from pipeline.register import register_stage
    from pipeline.tasks import task_for

    project = run_all_stages(write_table_project(tmp_path))
    config = load_config(project.params, ["evaluate.threshold_method=sensitivity", "evaluate.target_sensitivity=0.9"])
    result = evaluate_stage(project.paths, config)
    assert result.metrics["threshold_method"] == "sensitivity"
    task = task_for("multilabel", MULTILABEL_LABELS)
    val, threshold = read_predictions(load_predictions(project.paths.predictions, "val"), task, project.paths.predictions)
    assert threshold == pytest.approx(result.metrics["threshold"], rel=1e-6)  # predictions.csv keeps 9 digits
    for k, label in enumerate(MULTILABEL_LABELS):
        positives = val.probability[val.truth[:, k] == 1, k]
        assert (positives >= threshold[label] - 1e-6).mean() >= 0.9
        assert result.metrics["val"]["per_label"][label]["sensitivity"] >= 0.9

    config = load_config(project.params, ["evaluate.threshold_method=fixed", "evaluate.threshold=0.5",
                                          "register.gate_metric=test_accuracy", "register.min_gate_films=5"])
    thresholds = evaluate_stage(project.paths, config).metrics["threshold"]
    assert thresholds == {label: 0.5 for label in MULTILABEL_LABELS}
    registered = register_stage(project.paths, config)
    assert registered.version == 2 and "test_accuracy" in registered.reason and "vs champion v1" in registered.reason
    served = load_model("models:/cxr-pneumonia/2", project.paths)
    assert served.metadata.metadata["threshold"] == thresholds and served.metadata.metadata["task"] == "multilabel"
