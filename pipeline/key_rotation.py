"""`cxr key rotate --new-key-file NEW`: move a project from its de-identification key to a new one.

Pseudonyms (patient_hash, and image_id once it is keyed) cannot be translated from one key to another: the raw
patient IDs are needed, and no output stores them. So the sources are listed again and each film's patient ID is
read where ingest reads it (a DICOM's header only, never its pixels; a table's column; the file name), and hashed
with both keys: the old pseudonym finds the rows, the new one replaces it. Nothing is decoded.

Rewritten: the manifest (patient_hash, image_id, redacted paths), dropped_duplicates.csv (image_id, paths), the
redacted paths data/labels/overrides.csv names films by, the
redaction hashes in quarantine.csv (removed: they were made with the old key), the split registry (patient_hash,
key_check; every split kept), and erasures of patients whose films are still listed (carried to the new key, so
they stay skipped). Then the new key replaces the old key file in one atomic rename (CXR_DEID_KEY cannot be
rewritten: the user sets it). The registry is written last, then the key: a run interrupted in between is finished
by running it again (a registry already under the new key just installs it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pipeline import config as settings
from pipeline.config import Config
from pipeline.deid import install_key_file, key_check, load_key, read_key_file
from pipeline.erasures import append_erasure, erased_patients
from pipeline.errors import CxrError
from pipeline.files import atomic_path, read_text_csv
from pipeline.lock import project_lock
from pipeline.manifest import label_review, manifest_labels, write_manifest
from pipeline.overrides import read_overrides, write_overrides
from pipeline.paths import ProjectPaths
from pipeline.privacy import private_umask
from pipeline.sources import read_source
from pipeline.splits import read_registry, write_registry
from pipeline.tasks import task_for

log = logging.getLogger(__name__)

OLD_KEY_TOKEN = re.compile(r"redacted-[0-9a-f]+")  # pipeline.deid.redact's mark, with a hash under the old key


@dataclass(frozen=True)
class Rotation:
    n_films: int  # manifest rows re-pseudonymised
    n_patients: int  # split registry rows re-pseudonymised
    n_absent_dropped: int  # registry rows dropped with --drop-absent (no film listed any more)
    n_erasures_carried: int
    n_erasures_lost: int  # erased patients with no film listed any more: their erasure cannot follow the key
    key_file: Path | None  # where the new key now is; None when CXR_DEID_KEY supplies the key


@dataclass(frozen=True)
class _Film:
    """One listed film under both keys."""

    source: str
    old_path: str  # the path as ingest redacts it under each key
    new_path: str
    old_id: str
    new_id: str
    old_patient: str
    new_patient: str


def rotate_key(paths: ProjectPaths, config: Config, new_key_file: Path, drop_absent: bool = False) -> Rotation:
    """Re-pseudonymise the project from its current key to the key in `new_key_file`, then install that key."""
    old = load_key(paths.root, config.deid.key_scope, strict=False)  # a short old key is what rotating retires
    new = read_key_file(new_key_file)
    if new == old:
        raise CxrError(f"{new_key_file} holds the current de-identification key; give a new one")
    with project_lock(paths.root), private_umask(config.privacy.mask):
        registry = read_registry(paths.split_registry)
        rotated = registry is not None and len(registry) > 0 and set(registry["key_check"]) == {key_check(new)}
        counts = (0, 0, 0, 0, 0) if rotated else _repseudonymise(paths, config, old, new, registry, drop_absent)
        key_file = _install(paths, config, new, new_key_file)
    rotation = Rotation(*counts, key_file=key_file)
    log.info("key rotate: %d films and %d recorded patients moved to the new key%s; every split kept",
             rotation.n_films, rotation.n_patients,
             f" ({rotation.n_absent_dropped} patients with no listed film dropped from the registry)" if rotation.n_absent_dropped else "")
    if rotation.n_erasures_lost:
        log.warning("key rotate: %d erased patients have no film in data.sources any more, so their erasure cannot follow "
                    "the key: should their files come back, `cxr forget` them again", rotation.n_erasures_lost)
    log.info("key rotate: the next ingest writes every output again from the decode cache (nothing is decoded); models "
             "trained before must be trained again to be registered, and the champion gate cannot compare a champion "
             "registered under the old key (`cxr promote` decides)")
    return rotation


def _repseudonymise(paths: ProjectPaths, config: Config, old: bytes, new: bytes, registry: pd.DataFrame | None,
                    drop_absent: bool) -> tuple[int, int, int, int, int]:
    if registry is not None and len(registry) and (registry["key_check"] != key_check(old)).any():
        raise CxrError(f"{paths.split_registry} was not written with the current de-identification key, so its "
                       "pseudonyms cannot be found; rotate from the key it was written with")
    films = _listed_films(paths, config, old, new)
    by_id = {film.old_id: film for film in films} | {film.new_id: film for film in films}
    pseudonyms = {film.old_patient: film.new_patient for film in films}
    n_films = _rewrite_manifest(paths, by_id)
    _rewrite_duplicates(paths.dropped_duplicates, by_id)
    _rewrite_overrides(paths, config, films)
    _strip_old_tokens(paths.quarantine)
    carried = lost = 0
    for pseudonym in erased_patients(paths.erasures, key_check(old)):
        if pseudonym in pseudonyms:
            append_erasure(paths.erasures, {"patient_hash": pseudonyms[pseudonym], "key_check": key_check(new),
                                            "carried_from_key": key_check(old)})
            carried += 1
        else:
            lost += 1
    n_patients = dropped = 0
    if registry is not None:
        absent = ~registry["patient_hash"].isin(list(pseudonyms))
        if absent.any() and not drop_absent:
            raise CxrError(f"{int(absent.sum())} patients recorded in {paths.split_registry} have no film in "
                           "data.sources any more, so their pseudonyms cannot be carried to the new key: bring their "
                           "films back, or pass --drop-absent (they would be split afresh should they return)")
        kept = registry[~absent]
        kept = kept.assign(patient_hash=kept["patient_hash"].map(pseudonyms), key_check=key_check(new))
        write_registry(paths.split_registry, kept.reset_index(drop=True))
        n_patients, dropped = len(kept), int(absent.sum())
    return n_films, n_patients, dropped, carried, lost


def _listed_films(paths: ProjectPaths, config: Config, old: bytes, new: bytes) -> list[_Film]:
    """Every film data.sources lists, with its image_id, pseudonym and redacted path under both keys (DICOM headers
    only are read, as ingest reads them: the same identities redact the same paths)."""
    from pipeline.deid import NO_IDENTITY
    from pipeline.imaging import read_identity
    from pipeline.ingest import image_id_of, patient_of, run_redactor

    items, rejected = [], []
    for spec in config.data.sources:
        listed, refused = read_source(spec, paths.root, config.data)
        items += listed
        rejected += refused
    identities = {key: [read_identity(item.file, key) if item.file is not None else NO_IDENTITY for item in items]
                  for key in (old, new)}
    redactors = {key: run_redactor(items, identities[key], rejected, key) for key in (old, new)}
    return [_Film(item.source, redactors[old].path(item.path), redactors[new].path(item.path), image_id_of(item, old),
                  image_id_of(item, new), patient_of(item, identities[old][i].patient, old),
                  patient_of(item, identities[new][i].patient, new))
            for i, item in enumerate(items)]


def _rewrite_manifest(paths: ProjectPaths, by_id: dict[str, _Film]) -> int:
    if not paths.manifest.exists():
        return 0
    task, labels = manifest_labels(paths.manifest)
    manifest = pd.read_parquet(paths.manifest)
    films = [by_id.get(image_id) for image_id in manifest["image_id"]]
    unknown = [f"{source}/{path}" for film, source, path, patient in zip(films, manifest["source"], manifest["path"],
                                                                        manifest["patient_hash"])
               if film is None or patient not in (film.old_patient, film.new_patient)]
    if unknown:
        raise CxrError(f"{len(unknown)} films of {paths.manifest} (e.g. {unknown[0]}) are no longer listed by "
                       "data.sources, or changed since they were ingested: run `cxr ingest` first, then rotate")
    rotated = manifest.assign(image_id=[film.new_id for film in films], patient_hash=[film.new_patient for film in films],
                              path=[_rekeyed_path(written, film) for written, film in zip(manifest["path"], films)])
    write_manifest(paths.manifest, rotated, task, labels, label_review(paths.manifest))
    return len(rotated)


def _rewrite_duplicates(path: Path, by_id: dict[str, _Film]) -> None:
    """dropped_duplicates.csv under the new key; a row whose film is no longer listed goes (ingest lists it again)."""
    if not path.exists():
        return
    dropped = read_text_csv(path)
    films = [by_id.get(image_id) for image_id in dropped["image_id"]]
    listed = [film is not None for film in films]
    films = [film for film in films if film is not None]
    dropped = dropped[listed].assign(image_id=[film.new_id for film in films],
                                     path=[_rekeyed_path(w, film) for w, film in zip(dropped.loc[listed, "path"], films)])
    with atomic_path(path) as tmp:
        dropped.to_csv(tmp, index=False)


def _rewrite_overrides(paths: ProjectPaths, config: Config, films: list[_Film]) -> None:
    """data/labels/overrides.csv names films by their redacted paths: each listed film's under the new key. A row
    naming no listed film is left as it is (the next ingest refuses it by its line); the file is rewritten only
    when a path changes."""
    task = task_for(config.data.task, config.data.labels)
    decisions = read_overrides(paths.label_overrides, task, paths.label_overrides.relative_to(paths.root).as_posix()).decisions
    new_paths = {(film.source, film.old_path): film.new_path for film in films}
    rekeyed = [replace(d, path=new_paths.get((d.source, d.path), d.path)) for d in decisions.values()]
    if any(d.path != before.path for d, before in zip(rekeyed, decisions.values())):
        write_overrides(paths.label_overrides, rekeyed, task)


def _rekeyed_path(written: str, film: _Film) -> str:
    """The film's path as ingest redacts it under the new key, when it was written as ingest redacted it under the old
    one; else the written path with its redaction hashes removed (no raw identifier can come back this way)."""
    if written in (film.old_path, film.new_path):
        return film.new_path
    return OLD_KEY_TOKEN.sub("redacted", written)


def _strip_old_tokens(path: Path) -> None:
    """quarantine.csv keeps its rows; the old key's redaction hashes go (the next ingest writes it under the new key)."""
    if not path.exists():
        return
    table = read_text_csv(path)
    for column in ("path", "message"):
        if column in table.columns:
            table[column] = table[column].str.replace(OLD_KEY_TOKEN, "redacted", regex=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def _install(paths: ProjectPaths, config: Config, new: bytes, given: Path) -> Path | None:
    """Put the new key where load_key finds it; None (with what to do) when CXR_DEID_KEY supplies the key."""
    if settings.deid_key_from_env() is not None:
        log.warning("key rotate: CXR_DEID_KEY supplies the key, so set it to the new key (the content of %s) before the "
                    "next run: until then, runs refuse the project (its split registry is under the new key)", given)
        return None
    key_file = settings.deid_key_file(paths.root, config.deid.key_scope)
    install_key_file(key_file, new)
    log.info("key rotate: the new key replaced %s (the old key is gone); %s is no longer needed once backed up",
             key_file, given)
    return key_file
