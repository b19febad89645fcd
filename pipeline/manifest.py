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
PARAMS = "params.yaml (data.task, data.labels)"


def write_manifest(path: Path, manifest: pd.DataFrame, task: str, labels: list[str]) -> None:
    """The manifest with its task and labels in the Parquet metadata, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(manifest, preserve_index=False)
    described = json.dumps({"task": task, "labels": list(labels)}).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: described})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


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
