"""reports/predictions.csv: the validation and test probabilities of every film, per film, without identifiers.

evaluate writes it; the champion gate scores the challenger from it and the report picks films to explain from
it. Columns: `split`, `image_id`, `store_index`, then the task's own (pipeline.tasks):
- binary: `truth` (1 = the positive label), `probability` (of the positive label), `threshold`;
- multiclass: `truth` (the class index) and `probability_<label>` for every class;
- multilabel: `truth_<label>`, `probability_<label>` and `threshold_<label>` for every label.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.tasks import Scored, Task, Threshold


def prediction_rows(split: str, rows: pd.DataFrame, task: Task, scored: Scored, threshold: Threshold) -> pd.DataFrame:
    """One split's rows of predictions.csv, for the manifest `rows` that were scored."""
    frame = {"split": split, "image_id": rows["image_id"].to_numpy(), "store_index": rows["store_index"].to_numpy()}
    return pd.DataFrame(frame | task.prediction_columns(scored, threshold))


def write_predictions(path: Path, parts: list[pd.DataFrame]) -> None:
    """The splits' rows in one file; probabilities to 9 significant digits (float32 precision, kept exactly)."""
    with atomic_path(path) as tmp:
        pd.concat(parts).to_csv(tmp, index=False, float_format="%.9g")


def load_predictions(path: Path, split: str) -> pd.DataFrame:
    """The rows of one split, numbered from 0."""
    if not path.exists():
        raise CxrError(f"{path} is missing: run `cxr evaluate` first")
    predictions = pd.read_csv(path, dtype={"split": str, "image_id": str})  # an id may look like a number (files.read_text_csv)
    return predictions[predictions["split"] == split].reset_index(drop=True)


def read_predictions(predictions: pd.DataFrame, task: Task, where: Path) -> tuple[Scored, Threshold]:
    """predictions.csv rows back to truth, probabilities and the operating point, as `task` (the model's, from
    metrics.json) wrote them; rows written for another task or other labels are an error naming the file."""
    missing = [column for column in task.prediction_column_names() if column not in predictions.columns]
    if missing:
        raise CxrError(f"{where} was not written for this {task.name} model of {task.labels} (no column "
                       f"{missing[0]}): run `cxr evaluate` again")
    return task.read_prediction_columns(predictions)
