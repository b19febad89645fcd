"""Cross-validation: folds by patient and stratified, one real training per fold, a summary and MLflow runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.crossval import assign_folds, crossval_stage
from pipeline.errors import CxrError
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths
from tests.conftest import write_tiny_project


def test_folds_keep_patients_together_and_each_label_in_every_fold():
    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(60) for _ in range(int(rng.integers(1, 4)))]
    label_of = {p: ("pneumonia" if int(p[1:]) % 3 else "normal") for p in set(patients)}
    frame = pd.DataFrame({"patient_hash": patients, "label": [label_of[p] for p in patients]})

    fold_of = assign_folds(frame, 5, seed=0)

    assert set(fold_of) == {0, 1, 2, 3, 4}
    assert (frame.assign(fold=fold_of).groupby("patient_hash")["fold"].nunique() == 1).all()
    per_fold = frame.assign(fold=fold_of).groupby("fold")["label"].value_counts().unstack()
    assert (per_fold > 0).all().all()
    assert assign_folds(frame, 5, seed=0).equals(fold_of)  # seeded
    assert not assign_folds(frame, 5, seed=1).equals(fold_of)  # and the seed decides the folds


def test_a_film_in_train_and_its_near_copy_in_val_fall_in_one_fold(tmp_path):
    """MedMNIST's val is drawn by image: a film's copy can sit in val while it sits in train. Ingest keeps the source's
    split, so only the folds can keep them together: pooled, grouped as one pseudo-patient, one fold."""
    from pipeline.crossval import fold_groups
    from tests.test_splits import near_copy_films

    films, near, labels = near_copy_films()
    np.savez(tmp_path / "medmnist.npz", train_images=films, train_labels=labels.reshape(-1, 1),
             val_images=near, val_labels=labels[:16].reshape(-1, 1))
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [medmnist.npz]\nvalidation:\n  near_duplicate_distance: 8\n")
    paths, config = ProjectPaths(tmp_path), load_config(params)
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    pooled = manifest[manifest["split"].isin(["train", "val"])].set_index("path", drop=False)
    pairs = [(f"train/{i}", f"val/{i}") for i in range(16) if f"train/{i}" in pooled.index]  # the others were carved to test
    assert len(pairs) >= 8

    def together(frame: pd.DataFrame) -> int:
        fold_of = pd.Series(assign_folds(frame, 5, seed=0).to_numpy(), index=frame.index)
        return sum(fold_of[film] == fold_of[copy] for film, copy in pairs)

    assert together(pooled) < len(pairs)  # each film its own patient: copies are scattered over the folds
    grouped = fold_groups(paths, config, pooled)
    assert together(grouped) == len(pairs)
    assert grouped["patient_hash"].nunique() == len(pooled) - len(pairs)
    assert fold_groups(paths, load_config(params, ["data.group_near_duplicates=false"]), pooled) is pooled


def test_a_label_held_by_fewer_patients_than_folds_is_refused():
    # 6 films of `normal`, but from 2 patients: some folds would validate without a single normal film
    frame = pd.DataFrame({"patient_hash": ["a", "a", "a", "b", "b", "b"] + [f"p{i}" for i in range(10)],
                          "label": ["normal"] * 6 + ["pneumonia"] * 10})
    with pytest.raises(CxrError, match="'normal' is held by 2 patient"):
        assign_folds(frame, 5, seed=0)


def test_multilabel_folds_accept_rare_label_sets_and_reach_every_label():
    rng = np.random.default_rng(1)
    sets = ["", "effusion", "pneumonia", "effusion|pneumonia", "nodule", "effusion|nodule|pneumonia"]
    weights = [0.5, 0.2, 0.2, 0.06, 0.035, 0.005]
    frame = pd.DataFrame({"patient_hash": [f"p{i}" for i in range(300)], "label": rng.choice(sets, 300, p=weights)})
    assert frame["label"].value_counts().min() < 5  # a label set rarer than the folds

    fold_of = assign_folds(frame, 5, seed=0)

    for label in ("effusion", "pneumonia", "nodule"):
        carriers = frame["label"].str.split("|").apply(lambda found, label=label: label in found)
        assert set(fold_of[carriers]) == {0, 1, 2, 3, 4}, label


def test_crossval_trains_every_fold_and_writes_the_summary(tmp_path):
    from pipeline.tracking import client as tracking_client

    params = write_tiny_project(tmp_path / "project", n=60)
    config = load_config(params)
    paths = ProjectPaths(params.parent)
    ingest_stage(paths, config)

    result = crossval_stage(paths, config, folds=3)

    summary = json.loads((paths.reports / "crossval.json").read_text())
    assert summary["folds"] == 3 and len(summary["per_fold"]) == 3
    assert summary["patients_known"] is True and summary["patient_caveat"] is None  # the demo names every patient
    manifest = pd.read_parquet(paths.manifest)
    pooled = int(manifest["split"].isin(["train", "val"]).sum())
    assert sum(fold["n_val"] for fold in summary["per_fold"]) == pooled  # every pooled film held out once
    # Each fold's headline AUC is what its MLflow run logged at its last epoch (history.csv keeps 6 digits).
    client = tracking_client(paths)
    logged = []
    for fold in summary["per_fold"]:
        history = client.get_metric_history(fold["run_id"], "val_auc")
        last_step = max(metric.step for metric in history)
        [last] = [metric.value for metric in history if metric.step == last_step]
        assert fold["val_auc"] == pytest.approx(last, rel=1e-5), fold["fold"]
        logged.append(last)
    assert summary["val_auc"]["mean"] == pytest.approx(np.mean(logged), rel=1e-5)
    for fold in result.folds:  # the headline is the last epoch's score, never above the best epoch's
        assert fold.val_auc <= fold.best_val_auc + 1e-6  # history.csv keeps 6 significant digits
    for fold in range(3):
        fold_root = paths.models / "crossval" / f"fold-{fold}"
        assert (fold_root / "models" / "checkpoint.pt").exists()
        assert not (fold_root / "mlruns.db").exists()  # the folds log to the project's store
    experiment = client.get_experiment_by_name(config.tracking.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`crossval.fold` != ''")
    assert sorted(run.data.tags["crossval.fold"] for run in runs) == ["1/3", "2/3", "3/3"]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no process-wide setting left behind for the next project
