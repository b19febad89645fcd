"""reports/predictions.csv: what evaluate writes is what the gate and the report read back, for every task."""

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import CxrError
from pipeline.predictions import load_predictions, prediction_rows, read_predictions, write_predictions
from pipeline.tasks import Scored, task_for

RNG = np.random.default_rng(0)
ROWS = pd.DataFrame({"image_id": [f"id{k}" for k in range(6)], "store_index": np.arange(10, 16)})
SCORED = {
    "binary": (Scored(RNG.integers(0, 2, 6), RNG.random(6)), 0.4321),
    "multiclass": (Scored(RNG.integers(0, 3, 6), RNG.dirichlet([1, 1, 1], 6)), None),
    "multilabel": (Scored(RNG.integers(0, 2, (6, 2)), RNG.random((6, 2))), {"effusion": 0.3, "nodule": 0.7}),
}
LABELS = {"binary": ["normal", "pneumonia"], "multiclass": ["normal", "bacteria", "virus"], "multilabel": ["effusion", "nodule"]}


@pytest.mark.parametrize("name", list(SCORED))
def test_what_evaluate_writes_reads_back_for_every_task(name, tmp_path):
    task, (scored, threshold) = task_for(name, LABELS[name]), SCORED[name]
    path = tmp_path / "predictions.csv"
    write_predictions(path, [prediction_rows("val", ROWS, task, scored, threshold),
                             prediction_rows("test", ROWS.iloc[:3], task, scored.subset(np.arange(6) < 3), threshold)])
    val = load_predictions(path, "val")
    again, threshold_again = read_predictions(val, task, path)
    assert list(val["image_id"]) == list(ROWS["image_id"]) and len(load_predictions(path, "test")) == 3
    np.testing.assert_array_equal(again.truth, scored.truth)
    np.testing.assert_allclose(again.probability, scored.probability, rtol=1e-8)  # 9 significant digits
    assert threshold_again == threshold


def test_rows_written_for_another_task_or_labels_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "predictions.csv"
    binary = task_for("binary", LABELS["binary"])
    write_predictions(path, [prediction_rows("test", ROWS, binary, *SCORED["binary"])])
    rows = load_predictions(path, "test")
    with pytest.raises(CxrError, match=f"{path} was not written for this multilabel model"):
        read_predictions(rows, task_for("multilabel", LABELS["multilabel"]), path)
    write_predictions(path, [prediction_rows("test", ROWS, task_for("multiclass", LABELS["multiclass"]), *SCORED["multiclass"])])
    with pytest.raises(CxrError, match="no column probability_covid"):
        read_predictions(load_predictions(path, "test"), task_for("multiclass", ["normal", "bacteria", "covid"]), path)


def test_a_missing_file_says_which_stage_writes_it(tmp_path):
    with pytest.raises(CxrError, match="run `cxr evaluate` first"):
        load_predictions(tmp_path / "predictions.csv", "test")
