"""`cxr forget PSEUDONYM`: remove one patient's films from everything ingest keeps, and record the erasure.

What goes: the patient's rows of the manifest, their films in the image store (images.npy, rows renumbered), every
copy of their pixels in the decode cache (all image sizes: shards are rewritten without them), the instances a
DICOMweb label table retrieved for them (data/cache/dicomweb/: found by the pseudonym of their header), their copies listed
in dropped_duplicates.csv, their row of the split registry, and the two files that number the old image store's
rows, the training index and reports/predictions.csv (`cxr rebalance` and `cxr evaluate` write them again). The erasure is appended to data/erasures.jsonl (pseudonym, key
check, counts: no identifier) before anything is removed, so an interrupted run is finished by running it again,
and the next ingest skips the patient's source files, if they are still there, as quarantine reason `erased`.

What stays, and is said: the source files (never modified: the user removes them), and derived outputs and copies
that outlive the project's own files: models trained on the films, report.html and Grad-CAM overlays, MLflow
artifacts, DVC's cache and remotes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.decode_cache import DecodeCache
from pipeline.deid import key_check, load_key
from pipeline.erasures import append_erasure, erased_patients
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_text_csv
from pipeline.lock import project_lock
from pipeline.manifest import label_review, manifest_labels, write_manifest
from pipeline.paths import ProjectPaths
from pipeline.privacy import private_umask
from pipeline.splits import read_registry, write_registry

log = logging.getLogger(__name__)

PSEUDONYM = re.compile(r"^[0-9a-f]{20}$")  # pipeline.deid.patient_hash


@dataclass(frozen=True)
class Erasure:
    patient_hash: str
    n_films: int  # manifest rows and image store rows removed
    n_cached: int  # decode cache films removed, all image sizes together
    n_duplicates: int  # rows removed from dropped_duplicates.csv
    in_registry: bool  # whether the split registry held the patient
    left_behind: list[str]  # outputs that may still hold the films (for the user to rebuild or remove)


def forget_patient(paths: ProjectPaths, config: Config, pseudonym: str) -> Erasure:
    """Erase the patient `pseudonym` (their manifest patient_hash) from the project's data; see the module docstring."""
    pseudonym = pseudonym.strip().lower()
    if not PSEUDONYM.match(pseudonym):
        raise CxrError(f"'{pseudonym}' is not a patient pseudonym (20 hex characters, the manifest's patient_hash)")
    check = key_check(load_key(paths.root, config.deid.key_scope))  # a weak or exposed key: refused before writing
    with project_lock(paths.root), private_umask(config.privacy.mask):
        manifest = pd.read_parquet(paths.manifest) if paths.manifest.exists() else None
        registry = read_registry(paths.split_registry)
        films = manifest[manifest["patient_hash"] == pseudonym] if manifest is not None else pd.DataFrame()
        in_registry = registry is not None and bool((registry["patient_hash"] == pseudonym).any())
        if registry is not None and in_registry and (registry["key_check"] != check).any():
            raise CxrError(f"{paths.split_registry} was written with another de-identification key than the current "
                           "one, so its pseudonyms are not this key's; use that key again")
        already = pseudonym in erased_patients(paths.erasures, check)
        if films.empty and not in_registry and not already:
            raise CxrError(f"no patient {pseudonym} in {paths.manifest} or {paths.split_registry} (pseudonyms are the "
                           "manifest's patient_hash column, made with the current de-identification key)")
        pixels = set(films["sha256"]) if not films.empty else set()
        append_erasure(paths.erasures, {"patient_hash": pseudonym, "key_check": check, "films": len(films),
                                        "in_registry": in_registry})
        n_cached = sum(DecodeCache(folder).forget_films(pixels) for folder in sorted(paths.decode_cache.glob("decoded-*"))
                       if folder.is_dir()) if pixels else 0
        n_retrieved = _forget_retrieved(paths, config, pseudonym)
        if not films.empty:
            _rewrite_store(paths, manifest, films.index)
        n_duplicates = _drop_duplicates_of(paths.dropped_duplicates, pixels)
        if in_registry:
            write_registry(paths.split_registry, registry[registry["patient_hash"] != pseudonym].reset_index(drop=True))
        if not films.empty:  # both number image store rows that moved (and list the erased films)
            paths.train_index.unlink(missing_ok=True)
            paths.predictions.unlink(missing_ok=True)
    erasure = Erasure(pseudonym, len(films), n_cached, n_duplicates, in_registry, _left_behind(paths))
    log.info("forget: patient %s erased: %d films from the manifest and image store, %d from the decode cache, %d "
             "listed duplicates%s; recorded in %s", pseudonym, erasure.n_films, erasure.n_cached, erasure.n_duplicates,
             ", their split registry row" if in_registry else "", paths.erasures)
    log.info("forget: the next ingest skips their source files (quarantine reason `erased`); delete those files to "
             "remove the films for good")
    if n_retrieved:
        log.info("forget: deleted %d instance(s) retrieved from a DICOMweb server for them; remove their rows from the "
                 "label table, or the next ingest retrieves them again (and quarantines them as `erased`)", n_retrieved)
    if erasure.left_behind:
        log.warning("forget: these may still hold the patient's films: %s; rerun the pipeline (`dvc repro` or `cxr "
                    "pipeline`) to rebuild them, and `dvc gc` to drop old versions from DVC's cache (and its remotes)",
                    ", ".join(erasure.left_behind))
    return erasure


def _forget_retrieved(paths: ProjectPaths, config: Config, pseudonym: str) -> int:
    """Delete the DICOMweb-retrieved instances whose header's patient is `pseudonym` (headers only are read); how many."""
    from pipeline.imaging import read_identity
    from pipeline.sources import retrieved_folder

    folder = retrieved_folder(paths.root)
    if not folder.is_dir():
        return 0
    key = load_key(paths.root, config.deid.key_scope)
    theirs = [file for file in sorted(folder.glob("*.dcm")) if read_identity(file, key).patient == pseudonym]
    for file in theirs:
        file.unlink()
    return len(theirs)


def _rewrite_store(paths: ProjectPaths, manifest: pd.DataFrame, removed: pd.Index) -> None:
    """The image store and manifest without the removed rows, store_index renumbered to match."""
    task, labels = manifest_labels(paths.manifest)
    images = np.load(paths.images, mmap_mode="r")
    if len(images) != len(manifest):
        raise CxrError(f"{paths.images} holds {len(images)} films but the manifest {len(manifest)}: run `cxr ingest` "
                       "again first")
    kept = manifest.drop(index=removed)
    with atomic_path(paths.images) as tmp, tmp.open("wb") as handle:
        np.save(handle, np.asarray(images[kept["store_index"].to_numpy()]))
    del images
    write_manifest(paths.manifest, kept.assign(store_index=np.arange(len(kept))).reset_index(drop=True), task, labels,
                   label_review(paths.manifest))


def _drop_duplicates_of(path: Path, pixels: set[str]) -> int:
    """Remove the rows of dropped_duplicates.csv that were copies of the erased films; how many."""
    if not pixels or not path.exists():
        return 0
    dropped = read_text_csv(path)
    gone = dropped["sha256"].isin(pixels)
    if gone.any():
        with atomic_path(path) as tmp:
            dropped[~gone].to_csv(tmp, index=False)
    return int(gone.sum())


def _left_behind(paths: ProjectPaths) -> list[str]:
    """Outputs built from the old image store that may show or embed the erased films."""
    candidates = [paths.reports / "report.html", paths.checkpoint, paths.root / "mlartifacts",
                  paths.root / ".dvc" / "cache"]
    return [str(path.relative_to(paths.root)) for path in candidates if path.exists()]
