"""Source adapters: every kind of labelled input becomes the same list of `SourceItem`s.

As in torchxrayvision, one interface covers all sources, so ingest never cares where a film came
from. Kinds: a folder with one subfolder per class (optionally under train/val/test, the Kermany
layout), a CSV table with path,label[,patient_id,split], and a MedMNIST-style .npz.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import CxrError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SourceItem:
    """One film to ingest. Exactly one of `file` and `pixels` is set.

    `patient_id` is raw (from a table or file name); ingest hashes it and never writes it.
    """

    source: str
    path: str
    label: str | None
    split: str | None = None
    patient_id: str | None = None
    file: Path | None = None
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class Rejected:
    """A file or row that a source lists but that cannot be used, for quarantine.csv."""

    source: str
    path: str
    reason: str
    message: str


def read_source(spec: str, root: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    """Dispatch on what the path is: a folder, a .csv table or a .npz archive."""
    path = (root / spec) if not Path(spec).is_absolute() else Path(spec)
    if not path.exists():
        raise CxrError(f"data.sources: '{spec}' does not exist (run `cxr demo-data` for the demo set, or fix the path)")
    if path.is_dir():
        return _read_folder(spec, path, data)
    if path.suffix.lower() == ".csv":
        return _read_table(spec, path, data)
    if path.suffix.lower() == ".npz":
        return _read_npz(spec, path, data), []
    raise CxrError(f"data.sources: '{spec}' is neither a folder, a .csv table nor a .npz archive")


def _visible_files(folder: Path) -> list[Path]:
    """Files under a folder, sorted, skipping hidden ones and symlinks that lead outside it."""
    top = folder.resolve()
    files = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.resolve().is_relative_to(top):
            files.append(path)
    return files


def _read_folder(spec: str, folder: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subfolders and all(p.name.lower() in SPLITS for p in subfolders):
        groups = [(split_dir.name.lower(), class_dir) for split_dir in subfolders for class_dir in sorted(split_dir.iterdir()) if class_dir.is_dir()]
    else:
        groups = [(None, class_dir) for class_dir in subfolders]
    if not groups:
        raise CxrError(f"data.sources: '{spec}' has no class subfolders; expected e.g. {spec}/{data.labels[0]}/ and {spec}/{data.labels[-1]}/")
    pattern = re.compile(data.patient_pattern)
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    for split, class_dir in groups:
        label = class_dir.name.lower()
        for file in _visible_files(class_dir):
            rel = file.relative_to(folder).as_posix()
            if label not in data.labels:
                rejected.append(Rejected(spec, rel, "label_not_in_set", f"{spec}/{rel}: folder '{class_dir.name}' is not one of data.labels {data.labels}"))
                continue
            match = pattern.match(file.name)
            items.append(SourceItem(source=spec, path=rel, label=label, split=split, patient_id=match.group(1) if match else None, file=file))
    return items, rejected


def _read_table(spec: str, table: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    import pandas as pd

    try:
        frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise CxrError(f"{spec}: could not read the CSV table ({exc})") from None
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise CxrError(f"{spec}: missing column(s) {sorted(missing)}; a label table needs path,label[,patient_id,split]")
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        rel = row["path"].strip()
        label = row["label"].strip().lower()
        split = row.get("split", "").strip().lower() or None
        file = (table.parent / rel).resolve()
        where = f"{spec} line {row_number}"
        if not rel:
            rejected.append(Rejected(spec, f"line {row_number}", "missing_path", f"{where}: empty path"))
        elif label not in data.labels:
            rejected.append(Rejected(spec, rel, "label_not_in_set", f"{where}: label '{row['label']}' is not one of data.labels {data.labels}"))
        elif split is not None and split not in SPLITS:
            rejected.append(Rejected(spec, rel, "bad_split", f"{where}: split '{split}' is not one of {list(SPLITS)}"))
        elif not file.is_relative_to(table.parent.resolve()):
            rejected.append(Rejected(spec, rel, "outside_source", f"{where}: path leads outside the table's folder"))
        else:
            patient = row.get("patient_id", "").strip() or None
            items.append(SourceItem(source=spec, path=rel, label=label, split=split, patient_id=patient, file=file))
    return items, rejected


def _read_npz(spec: str, archive: Path, data: DataConfig) -> list[SourceItem]:
    """MedMNIST layout: {split}_images (N,H,W[,C]) uint8 and {split}_labels (N,1) class indices."""
    try:
        arrays = np.load(archive)
    except Exception as exc:
        raise CxrError(f"{spec}: could not read the .npz archive ({exc})") from None
    items: list[SourceItem] = []
    with arrays:
        present = [split for split in SPLITS if f"{split}_images" in arrays.files]
        if not present:
            raise CxrError(f"{spec}: expected arrays named train_images/train_labels (and val_, test_), found {arrays.files}")
        for split in present:
            if f"{split}_labels" not in arrays.files:
                raise CxrError(f"{spec}: has {split}_images but no {split}_labels")
            images = arrays[f"{split}_images"]
            labels = arrays[f"{split}_labels"].reshape(len(images), -1)[:, 0]
            for index, (pixels, label_index) in enumerate(zip(images, labels)):
                if not 0 <= int(label_index) < len(data.labels):
                    raise CxrError(f"{spec}: {split}_labels[{index}] = {label_index} is outside data.labels {data.labels}")
                if pixels.ndim == 3:
                    pixels = pixels.mean(axis=-1).astype(np.uint8)
                items.append(SourceItem(source=spec, path=f"{split}/{index}", label=data.labels[int(label_index)], split=split, pixels=pixels))
    return items
