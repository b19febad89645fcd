"""Cross-validation: k-fold estimates of validation AUC and accuracy over train+val pooled.

Why: on a small or easy validation split the score saturates (PneumoniaMNIST's 524 films give val AUC
near 1 for most reasonable models), so one number cannot tell two settings apart. Pooling train and
val and training k times, each time holding out one fold, gives a mean and a spread.

Each fold's score is its model after the last epoch (train.epochs, or where early stopping ended), on that
fold: the best epoch's score is kept too, but it was picked on the same films and is optimistic.

Each fold is a small project under models/crossval/fold-<k>/ that reuses the project's image store (a
symbolic link, never a copy) and runs the same rebalance and train stages as `cxr train`: the fold's
films are `val`, the other folds' are `train`, and the test split stays untouched and unused. Folds are
drawn by patient (no patient in two folds; films without a patient ID grouped with their near-duplicates first,
data.group_near_duplicates) and stratified on the label, seeded with data.seed. Every
fold is its own MLflow run in the project's experiment, tagged `crossval.fold`, and the summary goes to
reports/crossval.json. The fold checkpoints are kept (models/crossval/fold-<k>/models/checkpoint.pt), each with
a stamp (fold.json) saying what it learned from, so `cxr audit-labels` (pipeline.label_audit) reuses a fold's model
only while its films, labels and training params are still those (`fold_model`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import Config
from pipeline.errors import CxrError
from pipeline.files import sha256_of, write_json
from pipeline.labels import split_labels
from pipeline.manifest import label_review, manifest_labels, read_manifest, write_manifest
from pipeline.paths import ProjectPaths
from pipeline.splits import patient_knowledge, patient_labels

log = logging.getLogger(__name__)

FOLD_STAMP = "fold.json"  # in each fold project: the key of what its checkpoint learned from, and the checkpoint's hash
# The params the rebalance and train stages read: a change to any of them makes a kept fold model stale.
TRAINING_PARAMS = ("data.task", "data.labels", "data.image_size", "rebalance.", "augment.", "train.")
SPEED_ONLY = ("train.num_threads",)  # changes how fast a fold trains, not what it learns (as a resume allows)
# The manifest columns that say which films a fold trains and validates on, with which labels.
FOLD_COLUMNS = ["image_id", "sha256", "store_index", "split", "label"]


@dataclass(frozen=True)
class FoldResult:
    fold: int
    n_train: int
    n_val: int
    val_auc: float  # after the last epoch: the held-out estimate
    val_accuracy: float  # after the last epoch, at 0.5 (as training scores validation)
    best_val_auc: float  # the best epoch's: picked on this same fold, so optimistic
    best_epoch: int
    run_id: str


@dataclass(frozen=True)
class CrossvalResult:
    folds: list[FoldResult]
    summary_path: Path

    def mean_sd(self, metric: str) -> tuple[float, float]:
        """Mean and sample standard deviation of a FoldResult field over the folds."""
        values = np.array([getattr(fold, metric) for fold in self.folds], dtype=float)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def crossval_stage(paths: ProjectPaths, config: Config, folds: int = 5) -> CrossvalResult:
    """Train `folds` times on train+val, each fold held out once; write reports/crossval.json.

    Holds the project lock throughout (the fold projects inside it run their stages unlocked, under it)."""
    from pipeline.lock import project_lock

    with project_lock(paths.root):
        return _crossval(paths, config, folds)


def _crossval(paths: ProjectPaths, config: Config, folds: int) -> CrossvalResult:
    from pipeline.rebalance import rebalance_stage
    from pipeline.train import train_stage

    if folds < 2:
        raise CxrError(f"crossval: --folds must be at least 2, not {folds}")
    if not paths.manifest.exists() or not paths.images.exists():
        raise CxrError(f"{paths.manifest} or {paths.images} is missing: run `cxr ingest` first")
    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels)
    pooled = manifest["split"].isin(["train", "val"])
    fold_of = assign_folds(fold_groups(paths, config, manifest[pooled]), folds, config.data.seed)

    client = tracking.client(paths)
    results = []
    for fold in range(folds):
        fold_paths, key = _fold_project(paths, config, manifest, pooled, fold_of, fold)
        log.info("crossval: fold %d of %d (%d train, %d val films)", fold + 1, folds,
                 int((fold_of != fold).sum()), int((fold_of == fold).sum()))
        rebalance_stage(fold_paths, config)
        trained = train_stage(fold_paths, config)
        client.set_tag(trained.run_id, "crossval.fold", f"{fold + 1}/{folds}")
        _stamp(fold_paths, key, trained.run_id)
        if config.train.ensemble == 1:
            last = pd.read_csv(fold_paths.history).iloc[-1]
            auc, accuracy = float(last["val_auc"]), float(last["val_accuracy"])
        else:  # history.csv's last row is the last member's: score the ensemble the fold registers instead
            auc, accuracy = trained.val_auc, trained.val_accuracy
        results.append(FoldResult(fold, int((fold_of != fold).sum()), int((fold_of == fold).sum()), auc, accuracy,
                                  trained.best_val_auc, trained.best_epoch, trained.run_id))
    result = CrossvalResult(results, paths.reports / "crossval.json")
    _write_summary(result, config, folds, patient_knowledge(paths.manifest))
    return result


def fold_groups(paths: ProjectPaths, config: Config, pooled: pd.DataFrame) -> pd.DataFrame:
    """The pooled train+val rows with the patient_hash folds are drawn by: with data.group_near_duplicates, films
    without a patient ID grouped with their near-duplicates (pipeline.splits.pseudo_patients) across train and val.

    Ingest groups only within a source's own split (MedMNIST's val is its own, drawn by image), so a film in train
    and its copy in val are two pseudo-patients there; pooled here, they would otherwise land in two folds and
    the held-out fold would score films its model trained on. The fold projects keep the manifest's pseudonyms.
    """
    from pipeline.phash import phash
    from pipeline.splits import pseudo_patients

    if not config.data.group_near_duplicates or "patient_from" not in pooled:
        return pooled
    images = np.load(paths.images, mmap_mode="r")
    grouped = pseudo_patients(pooled[["patient_hash", "patient_from"]], phash(images[pooled["store_index"].to_numpy()]),
                              config.validation.near_duplicate_distance, {}, pd.Series(None, index=pooled.index))
    merged = int((grouped["patient_hash"] != pooled["patient_hash"]).sum())
    if merged:
        log.info("crossval: %d film(s) without a patient ID join a near-duplicate's pseudo-patient for the folds", merged)
    return pooled.assign(patient_hash=grouped["patient_hash"].to_numpy())


def assign_folds(frame: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """A fold number per row: patients never straddle folds, and each fold holds about 1/folds of each label.

    Patients are stratified on their (majority) label, or label set for multilabel; sets held by fewer than
    `folds` patients share one stratum, as a real multilabel archive always has rare combinations.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    stratum_of = patient_labels(frame).astype(str)
    _check_labels_per_fold(stratum_of, folds)
    sizes = stratum_of.value_counts()
    stratum_of = stratum_of.where(stratum_of.map(sizes) >= folds, "(rare label sets)")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    strata = frame["patient_hash"].map(stratum_of).to_numpy()
    fold_of = np.full(len(frame), -1)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(frame)), strata, frame["patient_hash"].to_numpy())):
        fold_of[held_out] = fold
    return pd.Series(fold_of, index=frame.index)


def _check_labels_per_fold(stratum_of: pd.Series, folds: int) -> None:
    """Every label must reach every fold's validation, or that fold's AUC is undefined."""
    patients_per_label = Counter(label for labels in stratum_of for label in split_labels(labels) or ["(none)"])
    label, patients = min(patients_per_label.items(), key=lambda item: item[1])
    if patients < folds:
        raise CxrError(f"crossval: label {label!r} is held by {patients} patient(s) in train+val, fewer than --folds {folds}")


def fold_model(paths: ProjectPaths, config: Config, manifest: pd.DataFrame, pooled: pd.Series, fold_of: pd.Series,
               fold: int, folds: int, purpose: str) -> tuple[ProjectPaths, bool]:
    """The fold project whose checkpoint has not seen fold `fold`'s films: kept when its stamp matches what it would
    learn from now (films, labels, fold assignment and training params) and the checkpoint is the one stamped, else
    trained again (an MLflow run tagged crossval.fold and crossval.for=`purpose`). Returns it and whether it trained."""
    from pipeline.rebalance import rebalance_stage
    from pipeline.train import train_stage

    fold_paths, key = _fold_project(paths, config, manifest, pooled, fold_of, fold)
    if fold_paths.checkpoint.exists():
        stamp = _read_stamp(fold_paths.models / FOLD_STAMP)
        if stamp.get("key") == key and stamp.get("checkpoint_sha256") == sha256_of(fold_paths.checkpoint):
            log.info("%s: fold %d of %d: keeping its model (%s)", purpose, fold + 1, folds, fold_paths.checkpoint)
            return fold_paths, False
    log.info("%s: fold %d of %d: training (%d train, %d held-out films)", purpose, fold + 1, folds,
             int((fold_of != fold).sum()), int((fold_of == fold).sum()))
    rebalance_stage(fold_paths, config)
    trained = train_stage(fold_paths, config)
    client = tracking.client(paths)
    client.set_tag(trained.run_id, "crossval.fold", f"{fold + 1}/{folds}")
    client.set_tag(trained.run_id, "crossval.for", purpose)
    _stamp(fold_paths, key, trained.run_id)
    return fold_paths, True


def fold_key(fold_manifest: pd.DataFrame, config: Config) -> str:
    """A hash of what a fold's model learns from: each film's content, store position, split and label, and the
    training params. Why not the manifest file's hash: ingest rewrites it with columns training never reads."""
    params = {name: value for name, value in config.as_flat_dict().items()
              if name.startswith(TRAINING_PARAMS) and name not in SPEED_ONLY}
    digest = hashlib.sha256(fold_manifest[FOLD_COLUMNS].to_csv(index=False).encode())
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read_stamp(path: Path) -> dict:
    """A fold's stamp, or {} when it is missing or unreadable (the fold is then trained again, never trusted)."""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _stamp(fold_paths: ProjectPaths, key: str, run_id: str) -> None:
    write_json(fold_paths.models / FOLD_STAMP, {"key": key, "checkpoint_sha256": sha256_of(fold_paths.checkpoint),
                                                "run_id": run_id})


def _fold_project(paths: ProjectPaths, config: Config, manifest: pd.DataFrame, pooled: pd.Series,
                  fold_of: pd.Series, fold: int) -> tuple[ProjectPaths, str]:
    """models/crossval/fold-<k>/: the manifest with this fold as val and the others as train, the image store
    linked, and the project's MLflow store as its own. Returns it and the fold's key (fold_key)."""
    fold_paths = ProjectPaths(paths.models / "crossval" / f"fold-{fold}", store_root=paths.tracking_root)
    fold_paths.interim.mkdir(parents=True, exist_ok=True)
    fold_manifest = manifest.copy()
    fold_manifest.loc[pooled, "split"] = np.where(fold_of == fold, "val", "train")
    write_manifest(fold_paths.manifest, fold_manifest, *manifest_labels(paths.manifest), label_review(paths.manifest))
    fold_paths.images.unlink(missing_ok=True)
    fold_paths.images.symlink_to(paths.images.resolve())
    return fold_paths, fold_key(fold_manifest, config)


def _how_folds_were_scored(config: Config) -> str:
    """crossval.json's `scored`: which model stood for each fold."""
    if config.train.ensemble == 1:
        return ("each fold's model after the last epoch, on that fold; accuracy at 0.5; best_val_auc is the best "
                "epoch's, chosen on the same fold and so optimistic")
    if config.train.keep == "last":
        return "each fold's deep ensemble (train.ensemble members, each at its last epoch), on that fold; accuracy at 0.5"
    return ("each fold's deep ensemble (train.ensemble members, each at its best epoch, chosen on the same fold and so "
            "optimistic), on that fold; accuracy at 0.5")


def _write_summary(result: CrossvalResult, config: Config, folds: int, patients: dict) -> None:
    """reports/crossval.json, with patients_known and the caveat (pipeline.splits.patient_knowledge): folds drawn
    by film share patients as validation does."""
    auc, auc_sd = result.mean_sd("val_auc")
    accuracy, accuracy_sd = result.mean_sd("val_accuracy")
    best, best_sd = result.mean_sd("best_val_auc")
    write_json(result.summary_path, {
        "folds": folds,
        "scored": _how_folds_were_scored(config),
        "model": config.train.model,
        "image_size": config.data.image_size,
        "seed": config.data.seed,
        "val_auc": {"mean": auc, "sd": auc_sd},
        "val_accuracy": {"mean": accuracy, "sd": accuracy_sd},
        "best_val_auc": {"mean": best, "sd": best_sd},
        "per_fold": [fold.__dict__ for fold in result.folds],
        "patients_known": patients["patients_known"],
        "patient_caveat": patients["patient_caveat"],
    })
    if patients["patient_caveat"]:
        log.warning("crossval: %s", patients["patient_caveat"])
    log.info("crossval: %d folds, val AUC %.4f ± %.4f, val accuracy %.4f ± %.4f (mean ± sd) → %s",
             folds, auc, auc_sd, accuracy, accuracy_sd, result.summary_path)
