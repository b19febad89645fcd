"""Rebalancing with imbalanced-learn samplers over training indices."""

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline.config import RebalanceConfig
from pipeline.paths import ProjectPaths
from pipeline.rebalance import rebalance_indices, rebalance_stage

INDEX = np.arange(100, 140)
LABELS = np.array(["normal"] * 10 + ["pneumonia"] * 30)


@pytest.mark.parametrize(("method", "expected"), [("none", (10, 30)), ("random_over", (30, 30)), ("random_under", (10, 10))])
def test_methods_give_the_expected_class_counts(method, expected):
    chosen = rebalance_indices(INDEX, LABELS, RebalanceConfig(method=method))
    label_of = dict(zip(INDEX, LABELS))
    counts = Counter(label_of[i] for i in chosen)
    assert (counts["normal"], counts["pneumonia"]) == expected
    assert set(chosen) <= set(INDEX)


def test_same_seed_same_index_and_other_seed_differs():
    first = rebalance_indices(INDEX, LABELS, RebalanceConfig(method="random_under", seed=1))
    again = rebalance_indices(INDEX, LABELS, RebalanceConfig(method="random_under", seed=1))
    other = rebalance_indices(INDEX, LABELS, RebalanceConfig(method="random_under", seed=2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_stage_writes_only_training_indices(tiny_project, tmp_path):
    paths = ProjectPaths(tmp_path)  # a project of its own holding the shared project's manifest: the shared one is left as it is
    paths.interim.mkdir(parents=True)
    shutil.copyfile(tiny_project.paths.manifest, paths.manifest)
    config = tiny_project.config.model_copy(update={"rebalance": RebalanceConfig(method="random_over")})
    result = rebalance_stage(paths, config)
    chosen = np.load(paths.train_index)
    manifest = pd.read_parquet(paths.manifest)
    train = set(manifest.loc[manifest["split"] == "train", "store_index"])
    assert set(chosen) <= train
    assert result.after["normal"] == result.after["pneumonia"] == result.before["pneumonia"]
