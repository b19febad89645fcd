"""`cxr audit-labels`: out-of-fold probabilities from the crossval fold models, cleanlab, the review page."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.crossval import fold_key
from pipeline.label_audit import COLUMNS, audit_labels_stage, conflicting_duplicates, label_quality
from pipeline.paths import ProjectPaths
from pipeline.tasks import task_for
from tests.conftest import tiny_params_text, write_tiny_project
from tests.test_cli import cxr
from tests.test_report import CHROMIUM, _evaluate_in_page

FLIPS = 4
TRAIN, VAL, TEST = 240, 60, 30
OPACITY, NOISE = 50, 20  # grey levels: faint enough that one epoch does not already rank every film right
# 12 epochs: with the default recipe (one-cycle, class weights, augmentation) 4-epoch fold models were unsure enough
# that cleanlab flagged only 2-3 of the 4 flips on some CPUs and seeds; at 12, eight seeds here flagged all four
AUDIT_SETTINGS = ["train.model=seed_cnn", "train.epochs=12", "train.lr=0.003", "train.num_threads=1",
                  "data.image_size=28"]


def write_flippable_npz(path, flips: int, seed: int = 0) -> list[str]:
    """A MedMNIST-style archive of 28 px films a small CNN tells apart in two epochs (a `pneumonia` film carries a
    bright round opacity over a noisy chest-like gradient), with `flips` training labels flipped (half each way);
    the manifest paths of the flipped films."""
    rng = np.random.default_rng(seed)
    n = TRAIN + VAL + TEST
    truth = rng.permutation(np.arange(n) % 2)
    y, x = np.mgrid[:28, :28]
    images = 70 + 2.0 * y[None] + rng.normal(0, NOISE, (n, 28, 28))
    for i in np.flatnonzero(truth):
        cy, cx = rng.integers(9, 20, 2)
        images[i] += OPACITY * (((y - cy) ** 2 + (x - cx) ** 2) < 30)
    given = truth.copy()
    flipped = np.concatenate([rng.choice(np.flatnonzero(truth[:TRAIN] == value), flips // 2, replace=False)
                              for value in (0, 1)])
    given[flipped] = 1 - given[flipped]
    images = np.clip(images, 0, 255).astype(np.uint8)
    np.savez(path, train_images=images[:TRAIN], train_labels=given[:TRAIN, None],
             val_images=images[TRAIN:TRAIN + VAL], val_labels=given[TRAIN:TRAIN + VAL, None],
             test_images=images[TRAIN + VAL:], test_labels=given[TRAIN + VAL:, None])
    return [f"train/{i}" for i in sorted(flipped)]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A generated archive with FLIPS training labels flipped, ingested and audited with 3 folds through the CLI;
    the project, its config, the flipped films' manifest paths and the CLI's output."""
    from pipeline.ingest import ingest_stage

    root = tmp_path_factory.mktemp("audit") / "project"
    root.mkdir()
    flipped = write_flippable_npz(root / "films.npz", FLIPS)
    params = root / "params.yaml"
    params.write_text(tiny_params_text())
    settings = [*AUDIT_SETTINGS, "data.sources=[films.npz]"]
    config = load_config(params, settings)
    paths = ProjectPaths(root)
    ingest_stage(paths, config)
    out = cxr("audit-labels", "--params", str(params), "--folds", "3", "--top", "6",
              *[arg for setting in settings for arg in ("--set", setting)])
    assert out.returncode == 0, out.stderr
    return paths, config, flipped, out


@pytest.mark.slow  # the module fixture ingests and audits a 330-film archive with 3 fold models
def test_flipped_labels_rank_near_the_top_with_their_true_label_suggested(audited):
    paths, _, flipped, out = audited
    issues = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    assert list(issues.columns) == COLUMNS
    assert issues["score"].is_monotonic_increasing  # most suspicious first
    assert set(issues["split"]) <= {"train", "val"}
    head = issues.head(2 * FLIPS)  # among 300 films, the flips come first
    found = head[head["path"].isin(flipped)]
    # at least 3 of 4: whether a fold model is sure enough of each flip differs between CPUs (float summation order),
    # so the test does not ask for every one (the issue's bar is 60 % in the first 120 rows; the benchmark measures it)
    assert len(found) >= FLIPS - 1, (flipped, issues.head(12).to_string())
    for _, row in found.iterrows():  # the model that never saw the film says the class it was flipped from
        assert row["label"] != row["suggested_label"]
    assert "label issue(s) among" in out.stdout and "label_issues.csv" in out.stdout and "label_review.html" in out.stdout


@pytest.mark.slow  # the module fixture ingests and audits a 330-film archive with 3 fold models
def test_the_audit_is_its_own_tagged_mlflow_run_with_the_counts(audited):
    from pipeline.tracking import client as tracking_client

    paths, config, _, _ = audited
    issues = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    client = tracking_client(paths)
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    # pytest-randomly may run the tests that audit this project again first: the latest audit wrote the CSV read
    # above, the first one (the fixture's) trained every fold
    runs = client.search_runs([experiment], filter_string="tags.`cxr.audit` = 'labels'", order_by=["attributes.start_time ASC"])
    first, run = runs[0], runs[-1]
    assert first.data.metrics["folds_trained"] == 3
    metrics = run.data.metrics
    assert metrics["label_issues"] == len(issues)
    assert metrics["label_issues.train"] + metrics["label_issues.val"] == len(issues)
    assert metrics["label_issues.given.normal"] == (issues["label"] == "normal").sum()
    assert metrics["label_issues.given.normal"] + metrics["label_issues.given.pneumonia"] == len(issues)
    assert run.data.params["folds"] == "3"
    folds = client.search_runs([experiment], filter_string="tags.`crossval.for` = 'audit-labels'")
    assert {r.data.tags["crossval.fold"] for r in folds} == {"1/3", "2/3", "3/3"}  # a fold trained again is one of them


@pytest.mark.slow  # the module fixture ingests and audits a 330-film archive with 3 fold models
def test_the_review_page_is_self_contained_with_a_film_an_overlay_and_the_commands(audited):
    paths, _, _, _ = audited
    page = (paths.reports / "label_review.html").read_text()
    issues = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    shown = min(6, len(issues))
    assert not re.search(r"""(src|href)=['"]?(https?:|//|file:)""", page)
    assert "<script" not in page
    assert page.count('src="data:image/png;base64,') == 2 * shown  # each film and its Grad-CAM
    for path in issues["path"].head(shown):
        assert f"cxr review accept {path} --reason" in page
        assert f"cxr review exclude {path} --reason" in page
    assert issues["path"].iloc[shown] not in page if len(issues) > shown else True


@pytest.mark.slow  # the module fixture ingests and audits a 330-film archive with 3 fold models
def test_kept_fold_models_are_reused_and_a_missing_one_is_trained_again(audited):
    paths, config, _, _ = audited
    before = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    (paths.models / "crossval" / "fold-1" / "models" / "checkpoint.pt").unlink()

    result = audit_labels_stage(paths, config, folds=3, top=6)

    assert result.folds_trained == 1
    assert (paths.models / "crossval" / "fold-1" / "models" / "checkpoint.pt").exists()
    again = audit_labels_stage(paths, config, folds=3, top=6)
    assert again.folds_trained == 0
    pd.testing.assert_frame_equal(again.issues, result.issues)
    assert set(before.columns) == set(result.issues.columns)


@pytest.mark.slow  # the module fixture ingests and audits a 330-film archive with 3 fold models
def test_a_film_a_reviewer_decided_is_not_suggested_again(audited):
    """`cxr review reject` keeps a flipped film's given label: the next ingest marks it `override` and the next
    audit (same folds: the labels did not change) leaves it out. The project is put back afterwards."""
    from pipeline.ingest import ingest_stage
    from pipeline.review import review

    paths, config, flipped, _ = audited
    before = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    decided = next(path for path in before["path"] if path in flipped)
    try:
        review(paths, config, "reject", [decided], "checked the film: the given label stands", reviewer="test")
        ingest_stage(paths, config)
        again = audit_labels_stage(paths, config, folds=3, top=6)
        assert again.folds_trained == 0
        assert decided not in set(again.issues["path"])
        assert set(again.issues["path"]) == set(before["path"]) - {decided}
    finally:
        paths.label_overrides.unlink(missing_ok=True)
        ingest_stage(paths, config)
        audit_labels_stage(paths, config, folds=3, top=6)


def test_the_fold_key_changes_with_labels_and_training_params_only():
    frame = pd.DataFrame({"image_id": ["a", "b"], "sha256": ["1", "2"], "store_index": [0, 1],
                          "split": ["train", "val"], "label": ["normal", "pneumonia"], "width": [28, 28]})
    from pipeline.config import Config

    config = Config()
    key = fold_key(frame, config)
    assert fold_key(frame.assign(width=[64, 64]), config) == key  # a column training never reads
    assert fold_key(frame.assign(label=["pneumonia", "pneumonia"]), config) != key
    assert fold_key(frame.assign(split=["val", "train"]), config) != key
    changed = Config.model_validate({**config.model_dump(by_alias=True), "train": {**config.train.model_dump(), "lr": 0.5}})
    assert fold_key(frame, changed) != key
    reported = Config.model_validate({**config.model_dump(by_alias=True),
                                      "evaluate": {**config.evaluate.model_dump(), "bootstrap_rounds": 777}})
    assert fold_key(frame, reported) == key  # evaluate never shapes a fold's model
    threads = Config.model_validate({**config.model_dump(by_alias=True), "train": {**config.train.model_dump(), "num_threads": 1}})
    assert fold_key(frame, threads) == key  # speed only


def test_confident_learning_flags_the_contradicted_label_in_each_task():
    rng = np.random.default_rng(0)
    # multiclass: 60 films whose out-of-fold model agrees with the label, then one it confidently contradicts
    task = task_for("multiclass", ["normal", "bacteria", "virus"])
    given = np.r_[np.arange(60) % 3, 0]
    probability = np.full((61, 3), 0.1)
    probability[np.arange(60), np.arange(60) % 3] = 0.8
    probability[:60] += rng.uniform(0, 0.05, (60, 3))
    probability[60] = [0.01, 0.01, 0.98]  # surer of `virus` than of any film labelled so
    films = pd.DataFrame({"label": [task.labels[k] for k in given], "label_index": given})
    score, flagged, suggested = label_quality(task, films, probability)
    assert flagged[60] and flagged.sum() == 1
    assert score.argmin() == 60 and suggested[60] == "virus"

    # multilabel: the last film is labelled 'effusion' alone, but the model is sure of pneumonia and not effusion
    task = task_for("multilabel", ["effusion", "pneumonia"])
    sets = ["effusion", "pneumonia", "effusion|pneumonia", ""] * 15 + ["effusion"]
    hot = np.array([[("effusion" in s.split("|")), ("pneumonia" in s.split("|"))] for s in sets], dtype=float)
    probability = np.clip(np.abs(hot - 0.2) + rng.uniform(-0.05, 0.05, hot.shape), 0, 1)
    probability[60] = [0.01, 0.99]
    score, flagged, suggested = label_quality(task, pd.DataFrame({"label": sets}), probability)
    assert flagged[60] and score.argmin() == 60 and suggested[60] == "pneumonia"
    assert flagged.sum() == 1


def test_near_duplicates_are_named_only_when_they_carry_another_label():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    images[1] = np.clip(images[0].astype(int) + 3, 0, 255)  # film 0, brighter: another label
    images[3] = images[2]  # an identical copy with the same label: not a label conflict
    films = pd.DataFrame({"store_index": np.arange(40), "path": [f"f{i}.png" for i in range(40)],
                          "label": ["normal", "pneumonia"] + ["normal"] * 38})

    duplicate_of = conflicting_duplicates(films, images, max_distance=4)

    assert duplicate_of[0] == "f1.png" and duplicate_of[1] == "f0.png"
    assert (duplicate_of[2:] == "").all()


def test_audit_labels_without_an_ingested_project_is_one_line(tmp_path):
    params = write_tiny_project(tmp_path / "project", n=20)
    out = cxr("audit-labels", "--params", str(params))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "run `cxr ingest` first" in out.stderr
    assert "Traceback" not in out.stderr


def test_audit_labels_help_names_its_outputs():
    out = cxr("audit-labels", "--help")
    assert out.returncode == 0
    for word in ("label_issues.csv", "label_review.html", "--folds", "--top", "cleanlab", "--set"):
        assert word in out.stdout, word


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_every_review_thumbnail_loads_in_headless_chromium(audited, tmp_path):
    paths, _, _, _ = audited
    images = json.loads(_evaluate_in_page(
        (paths.reports / "label_review.html").resolve().as_uri(),
        "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth]))", tmp_path))
    assert len(images) >= 2
    assert all(complete and width > 0 for complete, width in images), images


def test_the_benchmark_refuses_a_missing_archive_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "benchmarks/label_audit.py", "--data", str(tmp_path / "none.npz")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "none.npz is missing" in done.stderr and "Traceback" not in done.stderr
