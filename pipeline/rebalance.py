"""Rebalance: an imbalanced-learn sampler chooses which training images (and how often) an epoch sees.

Sampling indices, not pixels, keeps the image store untouched and the choice inspectable:
data/processed/train_index.npy lists store indices, repeated where oversampled.

The sampler balances the manifest's `label` column: the class for binary and multiclass tasks, and for
multilabel tasks the label set ('effusion|pneumonia', '' for none), i.e. the label powerset. Balancing
combinations over-repeats rare ones; for many labels prefer `rebalance.method: none` with
`train.class_weights: balanced` (a positive weight per label).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, RebalanceConfig
from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.manifest import read_manifest
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceResult:
    method: str
    before: dict[str, int]
    after: dict[str, int]
    index_path: Path


def rebalance_indices(store_index: np.ndarray, labels: np.ndarray, settings: RebalanceConfig) -> np.ndarray:
    """Store indices after resampling, sorted so the file does not depend on sampler internals."""
    if settings.method == "none":
        return np.sort(store_index)
    if settings.method == "combined":
        return np.sort(combined_resample(store_index, labels, settings))
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    sampler_class = RandomOverSampler if settings.method == "random_over" else RandomUnderSampler
    sampler = sampler_class(random_state=settings.seed)
    chosen, _ = sampler.fit_resample(store_index.reshape(-1, 1), labels)
    return np.sort(chosen[:, 0])


def combined_resample(store_index: np.ndarray, labels: np.ndarray, settings: RebalanceConfig) -> np.ndarray:
    """Oversample each minority class to `over_ratio` of the majority, then undersample each larger class to
    (smallest class) / `under_ratio`.

    Between the two plain samplers: random_over repeats each minority film many times (the model can
    memorise them) and random_under throws most of the majority away; this repeats less and drops less.
    With 10:30 and the defaults 0.5 and 1.0: 15:30 after oversampling, then 15:15. The targets are counts per
    class, so the same rule serves any number of classes (imbalanced-learn's float ratios take two only).
    Copies of indices only, never synthetic films (SMOTE-style interpolation between chest films makes
    images no scanner produces).
    """
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    chosen, chosen_labels = store_index.reshape(-1, 1), labels
    counts = Counter(chosen_labels)
    floor = int(max(counts.values()) * settings.over_ratio)
    raise_to = {label: floor for label, count in counts.items() if count < floor}
    if raise_to:
        over = RandomOverSampler(sampling_strategy=raise_to, random_state=settings.seed)
        chosen, chosen_labels = over.fit_resample(chosen, chosen_labels)
    counts = Counter(chosen_labels)
    ceiling = int(min(counts.values()) / settings.under_ratio)
    lower_to = {label: ceiling for label, count in counts.items() if count > ceiling}
    if lower_to:
        under = RandomUnderSampler(sampling_strategy=lower_to, random_state=settings.seed)
        chosen, chosen_labels = under.fit_resample(chosen, chosen_labels)
    return chosen[:, 0]


def rebalance_stage(paths: ProjectPaths, config: Config) -> RebalanceResult:
    """Resample the training split of the manifest (rebalance.method) and write the chosen store indices."""
    settings = config.rebalance
    if not paths.manifest.exists():
        raise CxrError(f"{paths.manifest} is missing: run `cxr ingest` first")
    manifest = read_manifest(paths.manifest, config.data.task, config.data.labels, ["store_index", "split", "label"])
    train = manifest[manifest["split"] == "train"]
    if train["label"].nunique() < 2:
        raise CxrError("rebalance: every film of the training split has the same label (or label set); "
                       "add films of the other labels to data.sources")
    chosen = rebalance_indices(train["store_index"].to_numpy(), train["label"].to_numpy(), settings)
    with atomic_path(paths.train_index) as tmp:
        with tmp.open("wb") as handle:
            np.save(handle, chosen.astype(np.int64))
    label_of = dict(zip(train["store_index"], train["label"]))
    result = RebalanceResult(
        method=settings.method,
        before=dict(sorted(Counter(train["label"]).items())),
        after=dict(sorted(Counter(label_of[i] for i in chosen).items())),
        index_path=paths.train_index,
    )
    log.info("rebalance (%s): train %s → %s → %s", result.method, result.before, result.after, result.index_path)
    return result
