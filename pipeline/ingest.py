"""Ingest: every source in `data.sources` → manifest, image store and quarantine list.

Three steps, so Prefect can fan the middle one out over a cluster: plan (list sources, find what
the decode cache lacks) → decode (parallel, pure) → finish (cache, split, de-duplicate, write).

Identifiers die in the decoder: workers return a DICOM's identity as keyed pseudonyms (pipeline.deid.Identity)
and name a failed film `{file}`, never by its path. Finish learns every identifier of the run (headers, a
table's patient column, data.patient_pattern) and redacts them from every path it writes, sibling files' too.

Outputs (see pipeline.paths): manifest.parquet (one row per usable film, no raw patient
identifier), images.npy (uint8, N×S×S, row i = manifest.store_index i), quarantine.csv (every
file that could not be used, with a reason code and a message a person understands).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config, Crop, DedupeMode, SourceFilters
from pipeline.decode_cache import CACHE_VERSION, FILE, DecodeCache, Decoded, Failure
from pipeline.deid import Identity, Redactor, key_check, load_key, patient_hash
from pipeline.dvc_watch import check_sources_watched
from pipeline.erasures import erased_patients
from pipeline.errors import CxrError
from pipeline.files import FILM_BUFFER_BYTES, atomic_path, content_key, shown_path, write_npy_rows
from pipeline.imaging import (DecodeLimits, StoredFilm, UnreadableImage, check_size, decode_content, limits_of,
                              pixel_sha256, read_film, read_identity, stored_film)
from pipeline.manifest import write_manifest
from pipeline.overrides import EXCLUDED, Overrides, check_all_found, exclusion_message, labelled, read_overrides, review_record
from pipeline.paths import ProjectPaths
from pipeline.sources import UNLABELLED, Rejected, SourceItem, read_source
from pipeline.splits import BRIDGING, assign_splits, pseudo_patients, read_registry, write_registry
from pipeline.stat_cache import FileHashes, Seen, before_reading, code_fingerprint, record_ingest, unchanged_ingest
from pipeline.tasks import task_for

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "store_index", "image_id", "split", "label", "label_index", "label_original", "label_source", "patient_hash", "patient_from", "sha256", "format",
    "source", "path", "subtype", "width", "height", "bits_stored", "modality", "photometric", "view", "body_part",
    "sex", "age_band", "mean_intensity", "std_intensity",
]
QUARANTINE_COLUMNS = ["source", "path", "reason", "message"]
PHASH_BATCH = 1024  # spooled films read back and stacked at a time for the perceptual hashes (4 MB at 64 px)


@dataclass(frozen=True)
class IngestResult:
    n_images: int
    split_counts: dict[str, int]
    quarantine_reasons: dict[str, int]
    n_decoded: int  # films decoded this run; the others came from the decode cache
    n_dropped_duplicates: int
    manifest_path: Path
    images_path: Path
    quarantine_path: Path
    n_patients_recorded: int = 0  # patients in the split registry (data/splits.parquet), this run's new ones included
    seconds: dict[str, float] = field(default_factory=dict, compare=False)  # wall time per step: listing, hashing, decoding, finishing


@dataclass
class IngestPlan:
    """Everything the sources list, and which files the decode cache does not hold yet."""

    items: list[SourceItem]
    rejected: list[Rejected]
    keys: list[str | None]  # each file item's content key (pipeline.files.content_key); None: an array or a missing file
    todo: list[SourceItem]  # file items to decode, in the order decode_items returns their outcomes
    fingerprint: str = ""  # of everything the outputs are made from (pipeline.stat_cache)
    unchanged: IngestResult | None = None  # the last ingest's result, when its outputs are this plan's: nothing to do
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of listing and hashing (`cxr ingest --profile`)
    overrides: Overrides = field(default_factory=lambda: Overrides(""))  # a reviewer's decisions (pipeline.overrides)
    # Items (by position) whose files were not hashed ahead, as the decode cache was empty: their decoders hash the
    # bytes they read (one read per film, not two), and finish learns their keys, stat (taken here) and fingerprint.
    unread: dict[int, Seen] = field(default_factory=dict)


def ingest_stage(paths: ProjectPaths, config: Config, reassign_splits: bool = False) -> IngestResult:
    """Read, decode (in parallel, through the cache), de-identify, split and store every source.

    `reassign_splits` reshuffles every patient's split deliberately (see pipeline.splits.assign_splits), so the
    outputs are written again even when nothing else changed.
    """
    plan = plan_ingest(paths, config, keep_unchanged=not reassign_splits)
    key = load_key(paths.root, config.deid.key_scope)
    started = time.perf_counter()
    with PixelSpool(paths.images.parent, config.data.image_size) as spool:  # decoded films wait on disk, not in memory
        with DecodeCheckpoint(paths, config, plan, key) as checkpoint:  # stopped early: what was decoded stays decoded
            outcomes = decode_items([item.file for item in plan.todo], config.data.image_size, key,
                                    config.data.num_workers, limits_of(config.data), config.data.crop, spool, checkpoint)
        decoding = time.perf_counter() - started
        result = finish_ingest(paths, config, plan, outcomes, reassign_splits)
    finishing = time.perf_counter() - started - decoding
    return replace(result, seconds={**plan.seconds, "decoding": decoding, "finishing": finishing})


def plan_ingest(paths: ProjectPaths, config: Config, keep_unchanged: bool = True) -> IngestPlan:
    """List every source and find which files the decode cache does not hold yet.

    Files whose stat is unchanged are not read (their hash is remembered), and when nothing ingest reads has
    changed since the last ingest and its outputs are intact (and `keep_unchanged`), the plan says so and
    nothing is decoded or written.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    deid_key = load_key(paths.root, config.deid.key_scope)  # a weak or exposed key is refused before anything is written
    check_sources_watched(paths.root, [spec.path for spec in config.data.sources], "data.sources")
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    for spec in config.data.sources:
        source_items, source_rejected = read_source(spec, paths.root, config.data)
        items += source_items
        rejected += source_rejected
    listed = time.perf_counter()
    overrides = read_overrides(paths.label_overrides, task_for(config.data.task, config.data.labels),
                               paths.label_overrides.relative_to(paths.root).as_posix())  # refused before any decoding
    hashes = FileHashes.load(paths.decode_cache / "file_hashes.parquet", deid_key)
    files = [item.file for item in items]
    keys = [hashes.remembered(file) if file is not None else None for file in files]  # unchanged stat: not read
    unknown = [i for i, (file, key) in enumerate(zip(files, keys)) if file is not None and key is None]
    cache = DecodeCache.for_size(paths.decode_cache, config.data.image_size, config.data.crop) if unknown else None
    unread: dict[int, Seen] = {}
    if cache is not None and cache.is_empty():  # nothing a hash could find: the decoders hash what they read
        unread = {i: seen for i in unknown if (seen := before_reading(files[i])) is not None}
    elif unknown:
        workers = config.data.num_workers or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:  # BLAKE3 releases the GIL: threads hash in parallel
            hashed = tqdm(pool.map(hashes.key_of, [files[i] for i in unknown]), total=len(unknown), desc="hashing",
                          unit="file", disable=None, leave=False)
            for i, key in zip(unknown, hashed):
                keys[i] = key
    hashes.save()
    log.info("ingest: hashed %d of %d files; the others are unchanged since they were hashed", hashes.n_hashed,
             len(files) - files.count(None))
    fingerprint = "" if unread else _fingerprint(config, items, rejected, keys, deid_key, overrides.sha256)  # unread: finish makes it
    previous = (unchanged_ingest(paths.decode_cache / "last_ingest.json", fingerprint, _outputs(paths))
                if keep_unchanged and fingerprint else None)
    seconds = {"listing": listed - started, "hashing": time.perf_counter() - listed}  # hashing: with the cache checks
    if previous is not None:
        result = IngestResult(**{**previous, "split_counts": dict(previous["split_counts"])}, n_decoded=0,
                              manifest_path=paths.manifest, images_path=paths.images, quarantine_path=paths.quarantine)
        return IngestPlan(items, rejected, keys, [], fingerprint, result, seconds, overrides)
    cache = cache or DecodeCache.for_size(paths.decode_cache, config.data.image_size, config.data.crop)
    cache.drop_unreadable(keys)
    todo, queued = [], set()
    for item, key in zip(items, keys):  # byte-identical files are decoded once; the others come from the cache
        if item.file is not None and not cache.has(key) and key not in queued:
            todo.append(item)
            if key is not None:
                queued.add(key)
    seconds["hashing"] = time.perf_counter() - listed
    return IngestPlan(items, rejected, keys, todo, fingerprint, seconds=seconds, overrides=overrides, unread=unread)


def _outputs(paths: ProjectPaths) -> list[Path]:
    """Every file finish_ingest writes (the stage table's ingest outputs; a test checks they agree)."""
    return [paths.manifest, paths.images, paths.quarantine, paths.dropped_duplicates, paths.split_registry]


def _fingerprint(config: Config, items: list[SourceItem], rejected: list[Rejected], keys: list[str | None],
                 deid_key: bytes, overrides_sha256: str | None = None) -> str:
    """A keyed hash (HMAC-SHA256) of everything ingest's outputs are made from: the data params, the code, the
    de-identification key (another key, another fingerprint), each listed film's place, patient, label and
    bytes, and the label decisions file. Keyed, so the recorded fingerprint cannot confirm a guess at a path or a
    patient ID."""
    digest = hmac.new(deid_key, b"cxr ingest fingerprint", hashlib.sha256)

    def add(value) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode() + b"\n")

    add(config.data.model_dump(mode="json", exclude={"num_workers", "checkpoint_every"}))  # speed, never outputs
    add(config.validation.near_duplicate_distance)  # data.group_near_duplicates groups by it
    add([CACHE_VERSION, code_fingerprint()])
    for item, key in zip(items, keys):
        pixels = None
        if item.pixels is not None:
            array = np.ascontiguousarray(item.pixels)
            pixels = [array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()]
        add([item.source, item.path, item.label, item.split, item.patient_id, item.subtype, item.file, key, pixels])
    add([rejected_item.__dict__ for rejected_item in rejected])
    add(overrides_sha256)
    return digest.hexdigest()


def decode_items(files: list[Path], size: int, key: bytes, workers: int = 0, limits: DecodeLimits = DecodeLimits(),
                 crop: Crop = "none", spool: PixelSpool | None = None,
                 checkpoint: DecodeCheckpoint | None = None) -> list[Decoded | Failure]:
    """Decode films over `workers` local processes (0: one per core) with a progress bar; outcomes keep input order.

    With a `spool`, each decoded film's pixels go to it as they come back and its outcome carries a SpooledFilm:
    an archive's films are then never all in memory at once (ingest); without one, the pixels are returned.
    A `checkpoint` (whose plan.todo lists `files`) is handed each outcome as it comes back.
    Only the files' locations, the de-identification key and the decoding limits go to the workers (local
    processes of this user); only pixels, technical fields and pseudonyms come back.
    """
    from tqdm import tqdm

    if not files:
        return []
    keep = spool.keep if spool is not None else _as_is
    workers = min(workers or os.cpu_count() or 1, max(len(files), 1))
    if workers <= 1 or len(files) < 8:
        outcomes = (decode_one(file, size, key, limits, crop) for file in tqdm(files, desc="decoding", unit="img", disable=None))
        return _kept(outcomes, len(files), keep, checkpoint)
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    # Small chunks: a worker left without work while the other finishes a long last chunk wastes a core.
    chunk = max(1, min(16, len(files) // (workers * 16)))
    with ProcessPoolExecutor(max_workers=workers) as pool:  # the settings travel once a chunk, not once a file
        try:
            outcomes = pool.map(partial(decode_one, size=size, key=key, limits=limits, crop=crop), files, chunksize=chunk)
            shown = tqdm(outcomes, total=len(files), desc=f"decoding ({workers} workers)", unit="img", disable=None)
            return _kept(shown, len(files), keep, checkpoint)
        except BaseException:  # interrupted: the chunks running end, the queued ones never start
            pool.shutdown(cancel_futures=True)
            raise


def _kept(outcomes: Iterable[Decoded | Failure], total: int, keep, checkpoint: DecodeCheckpoint | None) -> list:
    """The outcomes, each through `keep` (a spool's, or as it is) and then shown to the checkpoint."""
    kept = []
    for position, outcome in enumerate(_logged_progress(outcomes, total)):
        kept.append(keep(outcome))
        if checkpoint is not None:
            checkpoint.keep(position, kept[-1])
    return kept


def _as_is(outcome: Decoded | Failure) -> Decoded | Failure:
    return outcome


def _logged_progress(outcomes: Iterable, total: int, steps: int = 10) -> Iterator:
    """The outcomes, logging "decoded n of total" every tenth of the way: tqdm's bar reaches a terminal only, and a
    long ingest in a Prefect task run or a cron job's log would otherwise say nothing for an hour."""
    every = max(1, -(-total // steps))
    for done, outcome in enumerate(outcomes, 1):
        if done % every == 0 and done < total:
            log.info("ingest: decoded %d of %d new files", done, total)
        yield outcome


def decode_one(file: Path, size: int, key: bytes, limits: DecodeLimits = DecodeLimits(),
               crop: Crop = "none") -> Decoded | Failure:
    """Decode and resize one film file (cropped to its central square first with `crop` center), decoded at the
    resolution `size` keeps (pipeline.imaging: the served model decodes with the same `size` and `crop`). Never
    raises: one bad file must not stop a run (or a worker).

    What it returns may cross a process, task or network boundary (and be persisted by Prefect or spilled by
    Dask), so it holds the header's identity as pseudonyms only and names the film `{file}`, not by its path.
    """
    file_key = None
    try:
        data = read_film(file)
        file_key = content_key(data)  # hashed as read: ingest never reads a new film twice
        decoded = decode_content(data, file, key, limits, size)
        stored = stored_film(decoded.film, size, crop, str(file), decoded.identity)
    except UnreadableImage as exc:
        message = shown_path(Redactor(exc.identity.hashes, key).text(str(exc).replace(str(file), FILE)))
        return Failure(exc.reason, message, exc.identity, file_key)
    except Exception as exc:  # an unforeseen decoder failure costs one file, not the run
        return Failure("decode_failed", f"{FILE}: unexpected {type(exc).__name__} while decoding", file_key=file_key)
    header = {"bits_stored": decoded.bits_stored, "modality": decoded.modality, "photometric": decoded.photometric,
              "view": decoded.view, "body_part": decoded.body_part, "sex": decoded.sex, "age_band": decoded.age_band}
    return Decoded(stored.pixels, _decoded_fields(stored, decoded.format, header, (decoded.height, decoded.width)),
                   decoded.identity, file_key)


def decode_at_size(item: SourceItem, size: int, key: bytes, limits: DecodeLimits = DecodeLimits(),
                   crop: Crop = "none") -> Decoded | Failure:
    """One listed film decoded exactly as ingest stores it, at any size and crop: the champion gate feeds each
    model the raw films at its own image size and crop. Never raises, like decode_one."""
    if item.file is None:
        return _cached_or_array(item, None, None, size, key, crop)
    return decode_one(item.file, size, key, limits, crop)


def image_id_of(item: SourceItem, key: bytes) -> str:
    """The manifest's image_id of a listed film: a keyed hash (HMAC-SHA256) of where it is, so a manifest row leads
    back to its file, but a guessed path (an MRN folder) cannot be confirmed without the key. The one place an
    image_id is made: a new key makes new ones."""
    return hmac.new(key, f"cxr image id\x00{item.source}/{item.path}".encode(), hashlib.sha256).hexdigest()[:16]


def _decoded_fields(stored: StoredFilm, kind: str, header: dict, shape: tuple[int, int]) -> dict:
    """The manifest fields decoding yields (and the decode cache keeps): nothing that identifies a patient (sex
    and an age band are kept; the age, like the birth date, never is). `shape` is the film's own (height, width).

    sha256 hashes the stored pixels, what the model sees: films the model cannot tell apart are duplicates
    however their files differ (a byte copy, a lossless re-encode, a copy saved larger), and hashing 4 KB
    instead of the decoded film takes its cost off every film's decode.
    """
    height, width = shape
    return {
        "sha256": pixel_sha256(stored.pixels),
        "format": kind,
        "width": int(width),
        "height": int(height),
        **header,
        "mean_intensity": stored.mean,
        "std_intensity": stored.std,
    }


def finish_ingest(paths: ProjectPaths, config: Config, plan: IngestPlan, outcomes: list[Decoded | Failure],
                  reassign_splits: bool = False) -> IngestResult:
    """Cache the new decodes; build, split, de-duplicate and write the manifest, image store and quarantine list,
    recording each new patient's split in the split registry.

    `outcomes` (decode_items', in plan.todo order) is consumed: the list is emptied. Their films are best spooled
    already (decode_items with a spool); any that are not, and every film from the cache, are spooled here as they
    settle, so an archive's films are never all in memory at once: images.npy is written from the spools."""
    if plan.unchanged is not None and not reassign_splits:
        log.info("ingest: the %d listed files and the data params are as at the last ingest, whose outputs are "
                 "intact: kept them as they are", len(plan.items))
        _log_summary(plan.unchanged)
        return plan.unchanged
    key = load_key(paths.root, config.deid.key_scope)
    erased = erased_patients(paths.erasures, key_check(key))
    cache = DecodeCache.for_size(paths.decode_cache, config.data.image_size, config.data.crop)
    fresh = {id(item): outcome for item, outcome in zip(plan.todo, outcomes)}
    outcomes.clear()  # consumed: a film not spooled yet is freed once spooled below
    plan = _with_keys_read(paths, config, plan, fresh, key)
    cache.add(_cache_entries([(item, fresh[id(item)]) for item in plan.todo], key, erased))  # a checkpoint's: skipped
    settled: list[Decoded | Failure] = []
    spool = PixelSpool(paths.images.parent, config.data.image_size)
    forgotten: list[tuple[SourceItem, Decoded]] = []
    repaired: list[tuple[SourceItem, Decoded | Failure]] = []
    for item, file_key in zip(plan.items, plan.keys):
        outcome = fresh.pop(id(item), None) or _cached_or_array(item, file_key, cache, config.data.image_size, key, config.data.crop)
        if outcome is None:  # the cache held it damaged (it warned), or its bytes changed since the plan: decode it again
            outcome = decode_one(item.file, config.data.image_size, key, limits_of(config.data), config.data.crop)
            repaired.append((item, outcome))
        if _erased(item, outcome, key, erased):
            forgotten.append((item, outcome))  # its near copies are its pseudo-patient's: dropped with it below
            outcome = _erasure_failure(item, outcome, key, erased)
        if isinstance(outcome, Decoded):
            outcome = _apply_filters(outcome, config.data.filters)
        settled.append(spool.keep(outcome))
    cache.add(_cache_entries(repaired, key, erased))
    # Only now does the run know every identifier: a PNG beside a DICOM in an MRN folder is redacted too.
    redactor = run_redactor(plan.items, [outcome.identity for outcome in settled], plan.rejected, key)
    columns: dict[str, list] = {}  # the manifest, a list per column: no dict per film (a KB each at archive scale)
    stored: list[SpooledFilm] = []  # each manifest row's film, where a spool holds it
    rejected = [Rejected(r.source, redactor.path(r.path), r.reason, redactor.text(r.message)) for r in plan.rejected]
    overrides, n_excluded = plan.overrides, 0
    listed = {(r.source, r.path) for r in rejected}
    for item, outcome in zip(plan.items, settled):
        path = redactor.path(item.path)
        listed.add((item.source, path))
        if isinstance(outcome, Failure):
            message = redactor.text(outcome.message).replace(FILE, f"{item.source}/{path}")
            rejected.append(Rejected(item.source, path, outcome.reason, message))
            continue
        decision = overrides.find(item.source, path)
        if decision is not None and decision.exclude:
            message = redactor.text(exclusion_message(decision, f"{item.source}/{path}", overrides.shown))
            rejected.append(Rejected(item.source, path, EXCLUDED, message))
            n_excluded += 1
            continue
        stored.append(outcome.pixels)
        where = f"{overrides.shown} line {decision.line}: {item.source}/{path}" if decision else ""
        for column, value in {**_manifest_row(item, outcome, key, path), **labelled(decision, item.label, where)}.items():
            columns.setdefault(column, []).append(value)
    check_all_found(overrides, listed, [spec.path for spec in config.data.sources], redactor.text)
    if not stored:
        raise CxrError(f"ingest: none of the {len(plan.items)} files in data.sources could be used; see {paths.quarantine}")

    manifest = pd.DataFrame(columns)  # every row has every column: a missing one is a length mismatch here
    del columns, settled  # per-film lists and outcomes: at archive scale, hundreds of MB the steps below can reuse
    in_store = np.ones(len(stored), dtype=bool)  # of the films in `stored`, the ones still in the manifest
    registry = read_registry(paths.split_registry)
    if config.data.group_near_duplicates:
        recorded = {} if registry is None or reassign_splits else dict(zip(registry["patient_hash"], registry["split"]))
        # Erased films join the grouping (then leave with their group): their copies were that pseudo-patient's too.
        extra = pd.DataFrame([_manifest_row(item, decoded, key, "") for item, decoded in forgotten],
                             columns=manifest.columns)
        pooled = pd.concat([manifest, extra], ignore_index=True)
        hashes = _perceptual_hashes([*stored, *(decoded.pixels for _, decoded in forgotten)])
        pooled = pseudo_patients(pooled, hashes, config.validation.near_duplicate_distance, recorded, pooled["split"],
                                 set(erased), _earlier_pseudo_patients(paths.manifest) if recorded else None)
        manifest, gone = _drop_erased_groups(pooled.iloc[:len(manifest)], erased, rejected)
        in_store &= ~gone
        manifest, gone = _drop_bridging(manifest, rejected)
        in_store[in_store] = ~gone
    manifest["split"], registry = assign_splits(
        manifest, registry, config.data.split, config.data.seed, key_check(key),
        reassign=reassign_splits, where=paths.split_registry.relative_to(paths.root).as_posix())
    manifest["label_index"] = task_for(config.data.task, config.data.labels).label_index(manifest["label"])
    manifest["label"] = manifest["label"].fillna("")
    manifest["label_original"] = manifest["label_original"].fillna("")
    keep = _rows_to_keep(manifest, config.data.dedupe)
    dropped = manifest[~keep]
    manifest = manifest[keep].reset_index(drop=True)
    manifest["store_index"] = np.arange(len(manifest))
    manifest = manifest[MANIFEST_COLUMNS]
    quarantine = pd.DataFrame([r.__dict__ for r in rejected], columns=QUARANTINE_COLUMNS)

    # The registry first: a patient recorded but not yet in a manifest is harmless, the reverse is not.
    registry_written = write_registry(paths.split_registry, registry)
    with atomic_path(paths.images) as tmp, tmp.open("wb", buffering=FILM_BUFFER_BYTES) as handle, spool:  # streamed: never all in memory
        in_store[in_store] = keep.to_numpy()  # of the films in the manifest, the ones dedupe kept
        films = (np.asarray(film) for film, kept in zip(stored, in_store) if kept)  # read back one at a time
        write_npy_rows(handle, films, (len(manifest), config.data.image_size, config.data.image_size))
    review = review_record(overrides, manifest["label"], manifest["label_original"], manifest["label_source"], n_excluded)
    write_manifest(paths.manifest, manifest, config.data.task, config.data.labels, review)
    with atomic_path(paths.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)
    with atomic_path(paths.dropped_duplicates) as tmp:
        dropped[["image_id", "split", "label", "sha256", "source", "path"]].to_csv(tmp, index=False)

    result = IngestResult(
        n_images=len(manifest),
        split_counts={split: int((manifest["split"] == split).sum()) for split in ("train", "val", "test", UNLABELLED)
                      if split != UNLABELLED or (manifest["split"] == split).any()},
        quarantine_reasons=dict(sorted(Counter(quarantine["reason"]).items())),
        n_decoded=len(plan.todo) + len(repaired),
        n_dropped_duplicates=len(dropped),
        manifest_path=paths.manifest,
        images_path=paths.images,
        quarantine_path=paths.quarantine,
        n_patients_recorded=len(registry),
    )
    if plan.fingerprint:
        recorded = {"n_images": result.n_images, "split_counts": list(result.split_counts.items()),  # pairs keep their order
                    "quarantine_reasons": result.quarantine_reasons, "n_dropped_duplicates": result.n_dropped_duplicates,
                    "n_patients_recorded": result.n_patients_recorded}
        record_ingest(paths.decode_cache / "last_ingest.json", plan.fingerprint, _outputs(paths), recorded)
    _log_summary(result)
    if reassign_splits:
        log.warning("ingest: --reassign-splits: every patient's split was decided again and %s rewritten; training "
                    "runs on it are tagged data.splits_reassigned", paths.split_registry)
    elif registry_written:
        log.info("ingest: %d patients in the split registry → %s", len(registry), paths.split_registry)
    return result


class DecodeCheckpoint:
    """Films decoded this run, handed to the decode cache while decoding goes on: every `data.checkpoint_every`
    films, and, when the `with` block around decoding ends in Ctrl-C or an error, those still waiting. An ingest
    that is interrupted, killed or loses its machine keeps what it decoded, and the next run decodes only the rest. It caches what finish_ingest
    would (_cache_entries), only sooner, and records the hashes the decoders took of files the plan did not read,
    so the next run need not read those files again."""

    def __init__(self, paths: ProjectPaths, config: Config, plan: IngestPlan, key: bytes) -> None:
        self.every = config.data.checkpoint_every
        self.todo = plan.todo
        self.key = key
        self.where = (paths.decode_cache, config.data.image_size, config.data.crop)  # of the cache, DecodeCache.for_size
        self.cache: DecodeCache | None = None  # read at the first save: most ingests decode fewer films than `every`
        self.hashes = paths.decode_cache / "file_hashes.parquet"
        self.erased = erased_patients(paths.erasures, key_check(key))
        self.unread = {id(plan.items[position]): seen for position, seen in plan.unread.items()}
        self.waiting: list[tuple[SourceItem, Decoded | Failure]] = []
        self.saved = 0  # outcomes handed to the cache so far
        # The flow's decode task keeps outcomes in its thread while the flow's thread may rescue: one at a time.
        self._lock = threading.Lock()

    def keep(self, position: int, outcome: Decoded | Failure) -> None:
        """Note the outcome of plan.todo[position] (its film spooled, best); save when `every` are waiting."""
        if not self.every:
            return
        with self._lock:
            self.waiting.append((self.todo[position], outcome))
            if len(self.waiting) >= self.every:
                self._save()

    def _save(self) -> None:
        """Cache the waiting outcomes (one new shard), then the hashes their decoders took of unread files. They
        wait until both are written: a save interrupted halfway is done again whole (the cache skips what it has)."""
        if not self.waiting:
            return
        if self.cache is None:
            self.cache = DecodeCache.for_size(*self.where)
        self.cache.add(_cache_entries(self.waiting, self.key, self.erased))
        FileHashes.add_to(self.hashes, self.key, [(item.file, self.unread[id(item)], outcome.file_key)
                                                  for item, outcome in self.waiting
                                                  if id(item) in self.unread and outcome.file_key is not None])
        self.saved += len(self.waiting)
        self.waiting = []

    def __enter__(self) -> DecodeCheckpoint:
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        if kind is not None:
            self._rescue()
        self.cache = None  # its copy of the cache's index (finish reads its own): at archive scale, tens of MB

    def _rescue(self) -> None:
        """Save what waits as decoding stops early, and say what was kept. A failure to save is only logged: the
        interruption is what the user must see."""
        try:
            with self._lock:
                self._save()
        except Exception as exc:  # e.g. the disk that filled up and stopped decoding
            log.warning("ingest: the films decoded before it stopped could not be cached (%s: %s)", type(exc).__name__, exc)
            return
        if self.saved:
            log.warning("ingest: stopped after decoding %d of %d new files; those are in the decode cache (%s), so "
                        "the next ingest decodes only the other %d", self.saved, len(self.todo), self.cache.folder,
                        len(self.todo) - self.saved)


class SpooledFilm:
    """A film's pixels where a PixelSpool holds them: what a Decoded carries instead of its array once spooled.

    numpy reads it as the array (`np.asarray(film)` reads its row back), so the decode cache and the image store
    take it as they take pixels; pickled, it travels as the array (a Prefect result or a Dask transfer never holds
    a file handle). 56 bytes a film, against 4 KB of pixels at 64 px."""

    __slots__ = ("spool", "row")

    def __init__(self, spool: PixelSpool, row: int) -> None:
        self.spool = spool
        self.row = row

    @property
    def shape(self) -> tuple[int, int]:
        return self.spool.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pixels = self.spool.film(self.row)
        return pixels if dtype is None or np.dtype(dtype) == pixels.dtype else pixels.astype(dtype)

    def __reduce__(self):
        return np.asarray(self).__reduce__()


class PixelSpool:
    """Films of one ingest in an anonymous temporary file beside the outputs, each read back by its row when
    needed, rather than in memory: a 200,000-film ingest at 64 px would otherwise hold 800 MB of pixels (more with
    numpy's per-array overhead) from decoding until images.npy is written. Plain file I/O, not a memory map, whose
    pages would count in the process's resident memory."""

    def __init__(self, folder: Path, size: int) -> None:
        import tempfile

        folder.mkdir(parents=True, exist_ok=True)
        # Deleted when closed, or if we die. Its buffer holds 256 films at 64 px: films are written a system call per
        # MiB, and read back in order (the decode cache, images.npy) a system call per MiB too: a seek to a film the
        # buffer already holds makes none.
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".images-spool-", buffering=FILM_BUFFER_BYTES)
        self.shape = (size, size)
        self.count = 0
        self._width = size * size
        self._at_end = True  # whether the file position is the end (keep writes there, film reads move it)

    def keep(self, outcome: Decoded | Failure) -> Decoded | Failure:
        """A decoded film with its pixels spooled (row `count`), carrying a SpooledFilm instead; a failure, or a film
        a spool already holds, passes through."""
        if not isinstance(outcome, Decoded) or isinstance(outcome.pixels, SpooledFilm):
            return outcome
        pixels = np.ascontiguousarray(outcome.pixels, dtype=np.uint8)
        if pixels.shape != self.shape:
            raise ValueError(f"a stored film of shape {pixels.shape}, not {self.shape}")
        if not self._at_end:
            self.file.seek(0, os.SEEK_END)
            self._at_end = True
        self.file.write(pixels.data)
        self.count += 1
        return replace(outcome, pixels=SpooledFilm(self, self.count - 1))

    def film(self, row: int) -> np.ndarray:
        """The film of `row`, read back (a fresh array of its own)."""
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} of a spool of {self.count} films")
        self.file.seek(row * self._width)
        self._at_end = False
        pixels = bytearray(self._width)
        if self.file.readinto(pixels) != self._width:
            raise ValueError(f"the spool ends before row {row}")
        return np.frombuffer(pixels, dtype=np.uint8).reshape(self.shape)

    def __enter__(self) -> PixelSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _with_keys_read(paths: ProjectPaths, config: Config, plan: IngestPlan, fresh: dict[int, Decoded | Failure],
                    key: bytes) -> IngestPlan:
    """The plan with each decoded file's key as its decoder read it: filled in where the plan did not read the file
    (plan.unread; those hashes are remembered in the file-hash table, so the next run reads none of these files),
    and put right where the file changed or vanished after the plan hashed it. The fingerprint is made again
    whenever a key moved: it must be of what the outputs are made from, or a file that was away while it was
    decoded would be `missing_file` in outputs the next run keeps as unchanged once the file is back."""
    keys = list(plan.keys)
    for position, item in enumerate(plan.items):
        outcome = fresh.get(id(item))
        if outcome is not None:
            keys[position] = outcome.file_key
    if keys == plan.keys and not plan.unread:
        return plan
    learned = [(plan.items[position].file, seen, keys[position]) for position, seen in plan.unread.items()
               if keys[position] is not None]
    FileHashes.add_to(paths.decode_cache / "file_hashes.parquet", key, learned)
    return replace(plan, keys=keys, fingerprint=_fingerprint(config, plan.items, plan.rejected, keys, key, plan.overrides.sha256), unread={})


def _cached_or_array(item: SourceItem, file_key: str | None, cache: DecodeCache | None, size: int,
                     key: bytes, crop: Crop = "none") -> Decoded | Failure | None:
    """A film from the decode cache (a DICOM's identity re-read from its header: never cached), or an array from a
    .npz (no cache needed); None when the cache no longer holds an existing file's film."""
    if item.file is None:
        original = np.asarray(item.pixels, dtype=np.uint8)
        try:
            check_size(original.shape[:2], FILE)
            stored = stored_film(original, size, crop, FILE)
        except UnreadableImage as exc:
            return Failure(exc.reason, str(exc))
        no_header = {"bits_stored": 8, "modality": "", "photometric": "", "view": "", "body_part": "", "sex": "", "age_band": ""}
        return Decoded(stored.pixels, _decoded_fields(stored, "npz", no_header, original.shape[:2]))
    cached = cache.get(file_key) if file_key else None
    if cached is None:
        return None if file_key and item.file.is_file() else Failure("missing_file", f"{FILE}: no such file")
    if isinstance(cached, Decoded) and cached.fields["format"] != "dicom":
        return cached  # PNG and JPEG carry no identity: not opened again
    identity = read_identity(item.file, key)
    if isinstance(cached, Failure):
        return Failure(cached.reason, cached.message, identity)
    return Decoded(cached.pixels, cached.fields, identity)


def _cache_entries(decoded: Iterable[tuple[SourceItem, Decoded | Failure]], key: bytes,
                   erased: dict[str, str]) -> list[tuple[str, Decoded | Failure]]:
    """What the decode cache keeps of films decoded this run: each outcome under the content key of the bytes its
    decoder read, never under the key the plan hashed before. A file rewritten, or moved away, between the two
    would otherwise leave its new pixels, or a `missing_file`, under its old content's key, served to a byte copy
    of the old content or to the file once it is back. A failure whose file was never read is not cached, nor is
    a film of a patient `cxr forget` erased."""
    return [(outcome.file_key, outcome) for item, outcome in decoded
            if outcome.file_key is not None and not _erased(item, outcome, key, erased)]


def _erased(item: SourceItem, outcome: Decoded | Failure, key: bytes, erased: dict[str, str]) -> bool:
    """Whether a decoded film belongs to a patient `cxr forget` erased: never cached, stored or split again."""
    return bool(erased) and isinstance(outcome, Decoded) and patient_of(item, outcome.identity.patient, key) in erased


def _drop_erased_groups(manifest: pd.DataFrame, erased: dict[str, str],
                        rejected: list[Rejected]) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest without the films of an erased pseudo-patient (`cxr forget` of a near-duplicate group's
    pseudonym), which are quarantined as `erased`, and which rows went: the film whose own pseudonym it was is
    caught before decoding, its copies only once grouped again."""
    gone = manifest["patient_hash"].isin(list(erased)).to_numpy()
    for row in manifest[gone].itertuples():
        rejected.append(Rejected(row.source, row.path, "erased", f"{row.source}/{row.path}: patient {row.patient_hash} was "
                                 f"erased by `cxr forget` on {erased[row.patient_hash]} (data/erasures.jsonl); remove "
                                 "their source files"))
    return manifest[~gone].reset_index(drop=True), gone


def _earlier_pseudo_patients(manifest_path: Path) -> dict[str, str]:
    """image_id -> patient_hash of the last ingest's manifest: which pseudo-patient each film joined then (the
    registry knows a near-duplicate group by one pseudonym only). Empty without a readable manifest: then a film
    the registry does not know by its own pseudonym counts as new (joining its group's split, or quarantined where
    the group sits in two splits), so nothing moves either way."""
    if not manifest_path.exists():
        return {}
    try:
        earlier = pd.read_parquet(manifest_path, columns=["image_id", "patient_hash"])
    except (OSError, ValueError, KeyError):  # damaged, or written before these columns
        return {}
    return dict(zip(earlier["image_id"], earlier["patient_hash"]))


def _drop_bridging(manifest: pd.DataFrame, rejected: list[Rejected]) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest without the new films that link near-duplicate groups recorded in different splits
    (pipeline.splits.pseudo_patients), which are quarantined, and which rows went."""
    gone = (manifest["bridges"] != "").to_numpy()
    for row in manifest[gone].itertuples():
        rejected.append(Rejected(row.source, row.path, BRIDGING, (
            f"{row.source}/{row.path}: a near-duplicate (data.group_near_duplicates) of films the split registry "
            f"keeps in {row.bridges.replace('/', ' and ')}: in either split it would be a near-duplicate of a film in "
            "the other; remove it, or `cxr ingest --reassign-splits` to regroup them")))
    return manifest[~gone].reset_index(drop=True), gone


def _perceptual_hashes(films: list) -> np.ndarray:
    """Perceptual hashes of `films` (arrays or SpooledFilms), in one set (the hashes are relative to their set):
    spooled films are read back in batches, never all in memory."""
    from pipeline.phash import phash_batches

    def batches():  # -> Iterator[np.ndarray]
        for start in range(0, len(films), PHASH_BATCH):
            yield np.stack([np.asarray(film) for film in films[start : start + PHASH_BATCH]])

    return phash_batches(batches())


def _erasure_failure(item: SourceItem, decoded: Decoded, key: bytes, erased: dict[str, str]) -> Failure:
    pseudonym = patient_of(item, decoded.identity.patient, key)
    return Failure("erased", f"{FILE}: patient {pseudonym} was erased by `cxr forget` on {erased[pseudonym]} "
                             "(data/erasures.jsonl); remove their source files", decoded.identity)


def run_redactor(items: list[SourceItem], identities: list[Identity], rejected: list[Rejected], key: bytes) -> Redactor:
    """A Redactor for every identifier this run learned: each header's (`identities`, as pseudonyms), each table
    patient column's and each data.patient_pattern match (items' and rejected rows' patient_id), and each UID a
    table names a film by (`identifiers`: a row whose instance is missing has no header to learn it from)."""
    values = [value for each in (*items, *rejected) for value in (each.patient_id, *each.identifiers) if value]
    return Redactor.from_values(values, key, frozenset().union(*(identity.hashes for identity in identities)))


def patient_of(item: SourceItem, header_patient: str | None, key: bytes) -> str:
    """A film's patient pseudonym: the DICOM header's (`header_patient`, Identity.patient) wins over a table's or
    the file name's patient ID; without any, the film is its own patient. Splits and every bootstrap group films
    by it."""
    return header_patient or patient_hash(item.patient_id or f"{item.source}/{item.path}", key)


def patient_origin(item: SourceItem, header_patient: str | None) -> str:
    """Where patient_of found the film's patient (pipeline.splits.KNOWN_PATIENT): `header`, `source` (a table's column
    or the file name) or `film` (nowhere: the film is its own patient, so other films of that person may sit in
    other splits). Reports say so wherever validation and test may share patients with train."""
    return "header" if header_patient else "source" if item.patient_id else "film"


def _manifest_row(item: SourceItem, decoded: Decoded, key: bytes, redacted_path: str) -> dict:
    return {
        "image_id": image_id_of(item, key),
        "split": item.split,
        "label": item.label,
        "patient_hash": patient_of(item, decoded.identity.patient, key),
        "patient_from": patient_origin(item, decoded.identity.patient),
        "source": item.source,
        "path": redacted_path,
        "subtype": item.subtype,
        **decoded.fields,
    }


def _apply_filters(decoded: Decoded, filters: SourceFilters) -> Decoded | Failure:
    """data.filters keeps e.g. only CR/DX chest PA/AP; a header field that is absent never filters a film out."""
    for reason, column, allowed in (
        ("filtered_modality", "modality", filters.modalities),
        ("filtered_view", "view", filters.views),
        ("filtered_body_part", "body_part", filters.body_parts),
    ):
        value = decoded.fields[column]
        if value and allowed and value.upper() not in {a.upper() for a in allowed}:
            return Failure(reason, f"{FILE}: {value} is not in data.filters ({', '.join(allowed)})", decoded.identity)
    return decoded


SPLIT_PRIORITY = {"train": 0, "val": 1, "test": 2, UNLABELLED: 3}


def _rows_to_keep(manifest: pd.DataFrame, mode: DedupeMode) -> pd.Series:
    """With data.dedupe=drop, one copy of each identical film (sha256) survives: the first in train, else val, else test.

    Copies across splits leak test data into training; copies within a split over-weight one film.
    """
    if mode == "report":
        return pd.Series(True, index=manifest.index)
    priority = manifest["split"].map(SPLIT_PRIORITY).fillna(9)
    order = manifest.assign(_priority=priority).sort_values(["_priority"], kind="stable")
    return ~order.duplicated("sha256").reindex(manifest.index)


def _log_summary(result: IngestResult) -> None:
    splits = " / ".join(f"{name} {count}" for name, count in result.split_counts.items())
    log.info("ingest: %d images (%s) → %s", result.n_images, splits, result.manifest_path)
    log.info("ingest: decoded %d new files; the others came from the decode cache", result.n_decoded)
    if result.n_dropped_duplicates:
        log.info("ingest: dropped %d identical copies (data.dedupe=drop) → %s", result.n_dropped_duplicates, "data/interim/dropped_duplicates.csv")
    if result.quarantine_reasons:
        reasons = ", ".join(f"{reason} {count}" for reason, count in result.quarantine_reasons.items())
        log.info("ingest: %d files quarantined (%s) → %s", sum(result.quarantine_reasons.values()), reasons, result.quarantine_path)
