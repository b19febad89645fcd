"""data/interim/manifest.parquet: one row per stored film; ingest writes it, every later stage reads it.

The file carries the task and its labels, in order, in its own metadata. A film's `label_index` means a
position in that list, and a model's outputs mean those labels: read with other labels (data.labels reordered or
renamed in params.yaml, a checkpoint trained on another set), every number downstream would be silently wrong.
So each stage reads the manifest through `read_manifest`, which refuses a mismatch in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.errors import CxrError
from pipeline.files import atomic_path

METADATA_KEY = b"cxr.labels"
REVIEW_KEY = b"cxr.label_review"  # the label decisions it was built with (pipeline.overrides.review_record)
PARAMS = "params.yaml (data.task, data.labels)"
ROW_GROUP = 65_536  # rows converted to Arrow and written at a time: a 200,000-film manifest is never copied whole


def write_manifest(path: Path, manifest: pd.DataFrame, task: str, labels: list[str], review: dict | None = None) -> None:
    """The manifest with its task and labels in the Parquet metadata, written atomically; `review` says which label
    decisions it was built with (a command rewriting a manifest passes on what it read: label_review)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(manifest, preserve_index=False)  # types from every row, a column at a time
    described = json.dumps({"task": task, "labels": list(labels)}).encode()
    extra = {REVIEW_KEY: json.dumps(review, sort_keys=True).encode()} if review is not None else {}
    schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: described, **extra})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, max(len(manifest), 1), ROW_GROUP):  # one row group converted at a time, not a copy of all
            writer.write_table(pa.Table.from_pandas(manifest.iloc[start : start + ROW_GROUP], schema=schema,
                                                    preserve_index=False))


def manifest_labels(path: Path) -> tuple[str, list[str]]:
    """The task and labels the manifest was ingested with."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise CxrError(f"{path} is missing: run `cxr ingest` first")
    described = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    if described is None:
        raise CxrError(f"{path} does not say which labels it was ingested with: run `cxr ingest` again")
    found = json.loads(described)
    return found["task"], list(found["labels"])


def label_review(path: Path) -> dict | None:
    """The label decisions the manifest was built with (file, sha256, labels changed and kept, films excluded), or
    None for a manifest written before ingest recorded them."""
    import pyarrow.parquet as pq

    recorded = (pq.read_schema(path).metadata or {}).get(REVIEW_KEY)
    return json.loads(recorded) if recorded is not None else None


REVIEW_TAGS = ("data.overrides_sha256", "data.labels_changed_by_review", "data.labels_kept_by_review",
               "data.films_excluded_by_review")


def review_tags(path: Path) -> dict[str, str]:
    """label_review as the training run's tags (REVIEW_TAGS; register copies them to the model version): the
    overrides file's sha256 ('none' without one), labels review changed and kept, films it excluded. None of them
    for a manifest ingested before decisions were recorded."""
    review = label_review(path)
    if review is None:
        return {}
    values = (review["sha256"] or "none", review["labels_changed"], review["labels_kept"], review["films_excluded"])
    return {tag: str(value) for tag, value in zip(REVIEW_TAGS, values)}


def check_labels(path: Path, task: str, labels: list[str], expected_by: str = PARAMS) -> None:
    """Refuse, in one line, a manifest ingested for another task or other labels (or the same in another order);
    `expected_by` names who expects `task` and `labels` (params.yaml, a checkpoint, metrics.json)."""
    found_task, found_labels = manifest_labels(path)
    if (found_task, found_labels) != (task, list(labels)):
        raise CxrError(f"{path} was ingested as a {found_task} task with labels {found_labels}, but {expected_by} "
                       f"says {task} with {list(labels)}: run `cxr ingest` again, or restore the labels")


def read_manifest(path: Path, task: str, labels: list[str], columns: list[str] | None = None,
                  expected_by: str = PARAMS) -> pd.DataFrame:
    """The manifest's rows (or `columns` of them), once check_labels accepts it."""
    check_labels(path, task, labels, expected_by)
    return pd.read_parquet(path, columns=columns)
