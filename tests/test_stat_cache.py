"""The stat fast path: an unchanged archive re-ingests without reading a file, and every change is still seen.

"Not read" is checked with Python's audit hooks (tests/file_access.py): every `open` of a source file, by any
library, is recorded.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import stat_cache
from pipeline.config import load_config
from pipeline.demo_data import write_demo_data
from pipeline.errors import CxrError
from pipeline.ingest import _outputs, ingest_stage
from pipeline.paths import ProjectPaths
from pipeline.stages import stage
from pipeline.stat_cache import FileHashes
from tests.conftest import source_files
from tests.file_access import opened_during

KEY = b"k" * 32


def _project(root: Path, n: int = 30) -> tuple[ProjectPaths, object, Path]:
    raw = root / "data" / "raw" / "demo"
    write_demo_data(raw, n=n, seed=7, size=64)
    params = root / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  num_workers: 1\n")
    _age_past_the_racy_window(raw)
    return ProjectPaths(root), load_config(params), raw


def _age_past_the_racy_window(folder: Path) -> None:
    """Hashes taken within RACY_NS of a file's last change are not trusted: wait until that is past."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in folder.rglob("*") if p.is_file())
    wait = (newest + stat_cache.RACY_NS - time.time_ns()) / 1e9 + 0.1
    if wait > 0:
        time.sleep(wait)


def _outputs_bytes(paths: ProjectPaths) -> list[bytes]:
    return [path.read_bytes() for path in _outputs(paths)]


def test_an_unchanged_archive_reingests_without_opening_a_source_file(tmp_path):
    paths, config, raw = _project(tmp_path)
    first = ingest_stage(paths, config)
    written = _outputs_bytes(paths)
    stamps = [path.stat().st_mtime_ns for path in _outputs(paths)]

    second, opened = opened_during(lambda: ingest_stage(paths, config), raw)

    assert opened == []
    assert second.n_decoded == 0 and second.n_images == first.n_images
    assert second.split_counts == first.split_counts and second.quarantine_reasons == first.quarantine_reasons
    assert _outputs_bytes(paths) == written
    assert [path.stat().st_mtime_ns for path in _outputs(paths)] == stamps  # not even rewritten


def test_adding_a_film_opens_only_it_and_the_dicom_headers(tmp_path):
    """PNG and JPEG films come from the decode cache unopened; DICOMs' headers are read for the patient id (never cached)."""
    from PIL import Image

    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    added = raw / "normal" / "new900_1.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(added)

    result, opened = opened_during(lambda: ingest_stage(paths, config), raw)

    assert result.n_decoded == 1 and str(added.resolve()) in opened
    films = [p for p in opened if Path(p).suffix in (".png", ".jpg") and not Path(p).name.startswith("broken")]
    assert films == [str(added.resolve())]
    assert any(p.endswith(".dcm") for p in opened)


def test_a_film_rewritten_in_place_with_its_size_and_mtime_restored_is_read_again(tmp_path):
    """Same path, size, inode and mtime: only the ctime (which no program can set back) tells, and it is checked."""
    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    before = pd.read_parquet(paths.manifest)
    before.index = source_files(paths, config, before)
    film = next(p for p in sorted(raw.rglob("*.dcm")) if p in before.index)
    old = film.stat()
    with film.open("r+b") as handle:  # the last bytes are pixel data: invert them
        handle.seek(-4096, os.SEEK_END)
        tail = handle.read()
        handle.seek(-4096, os.SEEK_END)
        handle.write(bytes(255 - b for b in tail))
    os.utime(film, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = film.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)

    result = ingest_stage(paths, config)

    after = pd.read_parquet(paths.manifest)
    after.index = source_files(paths, config, after)
    assert result.n_decoded == 1
    assert after.loc[film, "sha256"] != before.loc[film, "sha256"]


def test_a_hash_taken_within_the_racy_window_is_not_trusted(tmp_path, monkeypatch):
    """Like git's racily clean entries: a write in the same timestamp tick as the hashed one would keep the stat."""
    monkeypatch.setattr(stat_cache, "RACY_NS", 300_000_000)
    film = tmp_path / "film.png"
    film.write_bytes(b"first")
    table = tmp_path / "file_hashes.parquet"

    fresh = FileHashes.load(table, KEY)
    fresh.key_of(film)
    fresh.save()
    assert FileHashes.load(table, KEY).known == {}  # hashed right after it changed: read again next time

    time.sleep(0.4)
    aged = FileHashes.load(table, KEY)
    digest = aged.key_of(film)
    aged.save()
    again = FileHashes.load(table, KEY)
    assert again.key_of(film) == digest and again.n_hashed == 0


def test_a_table_of_sha256s_from_before_content_keys_is_not_trusted(tmp_path, monkeypatch):
    """file_hashes.parquet once held sha256s; the decode cache is keyed by BLAKE3 now, so an old table is dropped
    and its files hashed again (with the new key), rather than its sha256s taken for content keys."""
    import pyarrow.parquet as pq

    from pipeline.files import content_key

    monkeypatch.setattr(stat_cache, "RACY_NS", 0)
    film = tmp_path / "film.png"
    film.write_bytes(b"first")
    table = tmp_path / "file_hashes.parquet"
    hashes = FileHashes.load(table, KEY)
    assert hashes.key_of(film) == content_key(b"first")
    hashes.save()
    assert FileHashes.load(table, KEY).key_of(film) == content_key(b"first")  # remembered, in the new table

    old = pq.read_table(table).rename_columns(["path_hmac", "size", "mtime_ns", "ctime_ns", "inode", "sha256"])
    pq.write_table(old, table)
    before = FileHashes.load(table, KEY)
    assert before.known == {} and before.remembered(film) is None  # read again, not trusted
    assert before.key_of(film) == content_key(b"first") and before.n_hashed == 1


def test_what_ingest_reads_changing_reruns_it(tmp_path, monkeypatch):
    """A deleted output, a changed param and another de-identification key each rerun ingest in full."""
    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    written = _outputs_bytes(paths)

    paths.images.unlink()
    ingest_stage(paths, config)
    assert _outputs_bytes(paths) == written  # written again, from the decode cache

    smaller = load_config(paths.root / "params.yaml", ["data.image_size=16"])
    ingest_stage(paths, smaller)
    assert np.load(paths.images).shape[1:] == (16, 16)

    patients = pd.read_parquet(paths.manifest)["patient_hash"]
    monkeypatch.setenv("CXR_DEID_KEY", "another key, 0123456789abcdef0123456789")  # not hidden by the fast path: the split registry refuses it
    with pytest.raises(CxrError, match="another de-identification key"):
        ingest_stage(paths, smaller)
    ingest_stage(paths, smaller, reassign_splits=True)
    assert not pd.read_parquet(paths.manifest)["patient_hash"].isin(patients).any()


def test_an_output_rewritten_with_the_same_bytes_is_still_recognised(tmp_path):
    """DVC may move an output into its cache and link or copy it back: a new stat, the same bytes."""
    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    copy = paths.images.with_name("copy.npy")
    shutil.copyfile(paths.images, copy)
    os.replace(copy, paths.images)

    result, opened = opened_during(lambda: ingest_stage(paths, config), raw)
    assert opened == [] and result.n_decoded == 0


def test_the_ingest_record_covers_every_output_the_stage_table_declares(tmp_path):
    paths = ProjectPaths(tmp_path)
    assert {str(path) for path in _outputs(paths)} == {str(tmp_path / output) for output in stage("ingest").outputs}


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_a_damaged_hash_table_or_record_means_reading_the_files_again(tmp_path, damage):
    paths, config, raw = _project(tmp_path, n=20)
    ingest_stage(paths, config)
    written = _outputs_bytes(paths)
    for name in ("file_hashes.parquet", "last_ingest.json"):
        table = paths.decode_cache / name
        table.write_bytes(b"not a table" if damage == "garbage" else table.read_bytes()[: table.stat().st_size // 2])

    result = ingest_stage(paths, config)
    assert result.n_decoded == 0 and _outputs_bytes(paths) == written


def test_reassigning_splits_writes_the_outputs_again_even_when_nothing_changed(tmp_path):
    """--reassign-splits on unchanged data must not be answered by the fast path: the registry is rewritten."""
    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    before = paths.split_registry.read_bytes()
    ingest_stage(paths, config, reassign_splits=True)
    assert paths.split_registry.read_bytes() != before  # rewritten (it records the reassignment)


def test_an_edited_split_registry_reruns_ingest(tmp_path):
    """The registry is an ingest output: a registry restored from another version (here: one patient moved by
    hand) is what the next ingest splits by, not ignored because the films did not change."""
    paths, config, raw = _project(tmp_path)
    ingest_stage(paths, config)
    registry = pd.read_parquet(paths.split_registry)
    moved = registry["patient_hash"].iloc[0]
    target = "test" if registry["split"].iloc[0] != "test" else "train"
    registry.loc[registry.index[0], "split"] = target
    registry.to_parquet(paths.split_registry, index=False)
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    assert set(manifest.loc[manifest["patient_hash"] == moved, "split"]) == {target}
