"""Ingest: every source in `data.sources` → manifest, image store and quarantine list.

Outputs (see pipeline.paths): manifest.parquet (one row per usable film, no raw patient
identifier), images.npy (uint8, N×S×S, row i = manifest.store_index i), quarantine.csv (every
file that could not be used, with a reason code and a message a person understands).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, SourceFilters
from pipeline.deid import load_key, patient_hash, redact
from pipeline.errors import CxrError
from pipeline.files import atomic_path
from pipeline.imaging import DecodedImage, UnreadableImage, check_usable, decode_file, pixel_sha256, resize
from pipeline.paths import ProjectPaths
from pipeline.sources import UNLABELLED, Rejected, SourceItem, read_source
from pipeline.splits import carve_from_train, split_patients

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "store_index", "image_id", "split", "label", "label_index", "patient_hash", "sha256", "format",
    "source", "path", "subtype", "width", "height", "bits_stored", "modality", "photometric", "view", "body_part",
    "mean_intensity", "std_intensity",
]
QUARANTINE_COLUMNS = ["source", "path", "reason", "message"]


@dataclass(frozen=True)
class IngestResult:
    n_images: int
    split_counts: dict[str, int]
    quarantine_reasons: dict[str, int]
    manifest_path: Path
    images_path: Path
    quarantine_path: Path


def ingest_stage(paths: ProjectPaths, config: Config) -> IngestResult:
    """Read, decode, de-identify, split and store every source; quarantine what cannot be used."""
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    for spec in config.data.sources:
        source_items, source_rejected = read_source(spec, paths.root, config.data)
        items += source_items
        rejected += source_rejected
    key = load_key()
    rows, images, decode_rejected = _decode_all(items, config.data.image_size, key, config.data.filters)
    rejected += decode_rejected
    if not rows:
        raise CxrError(f"ingest: none of the {len(items)} files in data.sources could be used; see {paths.quarantine}")

    manifest = pd.DataFrame(rows)
    manifest = _assign_splits(manifest, config)
    manifest["label_index"] = manifest["label"].map({label: i for i, label in enumerate(config.data.labels)}).fillna(-1).astype(int)
    manifest["label"] = manifest["label"].fillna("")
    manifest["store_index"] = np.arange(len(manifest))
    manifest = manifest[MANIFEST_COLUMNS]
    quarantine = pd.DataFrame([r.__dict__ for r in rejected], columns=QUARANTINE_COLUMNS)

    with atomic_path(paths.images) as tmp:
        with tmp.open("wb") as handle:
            np.save(handle, np.stack(images))
    with atomic_path(paths.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    with atomic_path(paths.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)

    result = IngestResult(
        n_images=len(manifest),
        split_counts={split: int((manifest["split"] == split).sum()) for split in ("train", "val", "test", UNLABELLED)
                      if split != UNLABELLED or (manifest["split"] == split).any()},
        quarantine_reasons=dict(sorted(Counter(quarantine["reason"]).items())),
        manifest_path=paths.manifest,
        images_path=paths.images,
        quarantine_path=paths.quarantine,
    )
    _log_summary(result)
    return result


def _decode_all(items: list[SourceItem], size: int, key: bytes, filters: SourceFilters) -> tuple[list[dict], list[np.ndarray], list[Rejected]]:
    """Decode and resize each film; a failure becomes a quarantine entry and the run goes on."""
    from tqdm import tqdm

    rows: list[dict] = []
    images: list[np.ndarray] = []
    rejected: list[Rejected] = []
    for item in tqdm(items, desc="ingest", unit="img", disable=None):
        try:
            row, pixels = _decode_item(item, size, key, filters)
        except UnreadableImage as exc:
            path = redact(item.path, exc.identifiers, key)
            rejected.append(Rejected(item.source, path, exc.reason, redact(_relative_message(exc, item), exc.identifiers, key)))
            continue
        except Exception as exc:  # an unforeseen decoder failure must cost one file, not the run
            message = f"{item.source}/{item.path}: unexpected {type(exc).__name__} while decoding"
            rejected.append(Rejected(item.source, item.path, "decode_failed", message))
            continue
        rows.append(row)
        images.append(pixels)
    return rows, images, rejected


def _decode_item(item: SourceItem, size: int, key: bytes, filters: SourceFilters) -> tuple[dict, np.ndarray]:
    if item.file is not None:
        decoded = decode_file(item.file)
        _check_filters(decoded, filters, f"{item.source}/{item.path}")
        original = decoded.pixels
    else:
        original = np.asarray(item.pixels, dtype=np.uint8)
        check_usable(original, f"{item.source}/{item.path}")
        decoded = None
    # DICOM header PatientID wins over a table or file name; without any, the film is its own patient.
    patient = (decoded.patient_id if decoded else None) or item.patient_id or f"{item.source}/{item.path}"
    stored = resize(original, size)
    row = {
        "image_id": hashlib.sha256(f"{item.source}/{item.path}".encode()).hexdigest()[:16],
        "split": item.split,
        "label": item.label,
        "patient_hash": patient_hash(patient, key),
        "sha256": pixel_sha256(original),
        "format": decoded.format if decoded else "npz",
        "source": item.source,
        "path": redact(item.path, decoded.identifiers, key) if decoded else item.path,
        "subtype": item.subtype,
        "width": int(original.shape[1]),
        "height": int(original.shape[0]),
        "bits_stored": decoded.bits_stored if decoded else 8,
        "modality": decoded.modality if decoded else "",
        "photometric": decoded.photometric if decoded else "",
        "view": decoded.view if decoded else "",
        "body_part": decoded.body_part if decoded else "",
        "mean_intensity": float(stored.mean()),
        "std_intensity": float(stored.std()),
    }
    return row, stored


def _check_filters(decoded: DecodedImage, filters: SourceFilters, name: str) -> None:
    """data.filters keeps e.g. only CR/DX chest PA/AP; a header field that is absent never filters a film out."""
    for reason, value, allowed in (
        ("filtered_modality", decoded.modality, filters.modalities),
        ("filtered_view", decoded.view, filters.views),
        ("filtered_body_part", decoded.body_part, filters.body_parts),
    ):
        if value and allowed and value.upper() not in {a.upper() for a in allowed}:
            raise UnreadableImage(reason, f"{name}: {value} is not in data.filters ({', '.join(allowed)})", decoded.identifiers)


def _relative_message(exc: UnreadableImage, item: SourceItem) -> str:
    """Quarantine messages name the file relative to its source, like the path column."""
    message = str(exc)
    if item.file is not None:
        message = message.replace(str(item.file), f"{item.source}/{item.path}")
    return message


def _assign_splits(manifest: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Patient-level split where a source has none; carve val or test from train where a source lacks them."""
    manifest = manifest.copy()
    unsplit = manifest["split"].isna()
    if unsplit.any():
        manifest.loc[unsplit, "split"] = split_patients(manifest[unsplit], config.data.split, config.data.seed)
    for source, rows in manifest.groupby("source"):
        if unsplit[rows.index].any() or "train" not in set(rows["split"]):
            continue
        for target in ("test", "val"):
            rows = manifest.loc[rows.index]
            if target in set(rows["split"]):
                continue
            fraction = getattr(config.data.split, target)
            manifest.loc[rows.index, "split"] = carve_from_train(rows, target, fraction, config.data.seed)
            log.info("ingest: %s has no %s split; carved %d images from its train split (stratified, seed %d)",
                     source, target, int((manifest.loc[rows.index, "split"] == target).sum()), config.data.seed)
    return manifest


def _log_summary(result: IngestResult) -> None:
    splits = " / ".join(f"{name} {count}" for name, count in result.split_counts.items())
    log.info("ingest: %d images (%s) → %s", result.n_images, splits, result.manifest_path)
    if result.quarantine_reasons:
        reasons = ", ".join(f"{reason} {count}" for reason, count in result.quarantine_reasons.items())
        log.info("ingest: %d files quarantined (%s) → %s", sum(result.quarantine_reasons.values()), reasons, result.quarantine_path)
