"""Patient-level, label-stratified train/val/test splits.

Images of one patient never straddle splits: that leak is what inflates many published chest
X-ray results. Sources that bring their own split keep it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import SplitFractions


def split_patients(frame: pd.DataFrame, fractions: SplitFractions, seed: int) -> pd.Series:
    """Assign train/val/test to every row by patient, stratified on each patient's most common label.

    `frame` needs columns patient_hash and label; returns one split name per row. The label is the class, or for
    a multilabel task the film's label set (pipeline.labels), so multilabel splits are stratified on the label
    powerset; a combination held by fewer than three patients stays in train.
    """
    patient_label = patient_labels(frame)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(patient_label.unique()):
        patients = np.array(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        for patient, split in zip(patients, _split_names(len(patients), fractions)):
            assignment[patient] = split
    return frame["patient_hash"].map(assignment)


def carve_from_train(frame: pd.DataFrame, target: str, fraction: float, seed: int) -> pd.Series:
    """For a source that brings no `target` split (e.g. MedMNIST without test): move `fraction` of train patients to it."""
    splits = frame["split"].copy()
    patient_label = patient_labels(frame[frame["split"] == "train"])
    rng = np.random.default_rng(seed)
    moved: set[str] = set()
    for label in sorted(patient_label.unique()):
        patients = np.array(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        moved.update(patients[: int(round(len(patients) * fraction))])
    splits[frame["patient_hash"].isin(moved) & (frame["split"] == "train")] = target
    return splits


def patient_labels(frame: pd.DataFrame) -> pd.Series:
    """Each patient's most common label, patients in order of first appearance.

    That order comes from the sorted source files, not from the keyed hashes, so the same data and
    seed give the same split whatever de-identification key a site uses.
    """
    majority = frame.groupby("patient_hash", sort=False)["label"].agg(lambda labels: labels.value_counts().index[0])
    return majority.reindex(pd.unique(frame["patient_hash"]))


def _split_names(n: int, fractions: SplitFractions) -> list[str]:
    """n split names in train, val, test order; val and test get at least one patient when n >= 3."""
    n_val = int(round(n * fractions.val))
    n_test = int(round(n * fractions.test))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = max(n - n_val - n_test, 0)
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
