"""Keys as secrets, `cxr key rotate`, `cxr forget` and private outputs (issue 11, items 3 and 5), on real files."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.deid import key_check, load_key, patient_hash
from pipeline.errors import CxrError
from pipeline.paths import ProjectPaths
from tests.conftest import source_files, write_tiny_project

CXR = str(Path(sys.executable).parent / "cxr")
GOOD_KEY = "a-good-key-for-these-tests-0123456789abcdef"


def _private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _without_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_DEID_KEY", raising=False)


def _key_file_case(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set up one weak or exposed key; the words its refusal must contain."""
    if case == "empty environment variable":
        monkeypatch.setenv("CXR_DEID_KEY", "")
        return "is empty"
    if case == "short environment variable":
        monkeypatch.setenv("CXR_DEID_KEY", "hunter2-short")
        return "13 characters, fewer than 32"
    _without_env_key(monkeypatch)
    key_file = tmp_path / "keys" / "deid.key"
    monkeypatch.setenv("CXR_DEID_KEY_FILE", str(key_file))
    if case == "empty file":
        _private_file(key_file, "\n")
        return "is empty"
    if case == "short file":
        _private_file(key_file, "abcde\n")
        return "5 characters, fewer than 32"
    if case == "world-readable file":
        _private_file(key_file, GOOD_KEY, 0o644)
        return "mode 644"
    if case == "group-readable file":
        _private_file(key_file, GOOD_KEY, 0o640)
        return "mode 640"
    assert case == "symlinked file"
    target = _private_file(tmp_path / "elsewhere" / "real.key", GOOD_KEY)
    key_file.parent.mkdir(parents=True)
    key_file.symlink_to(target)
    return "is a symlink"


KEY_CASES = ["empty environment variable", "short environment variable", "empty file", "short file",
             "world-readable file", "group-readable file", "symlinked file"]


@pytest.mark.parametrize("case", KEY_CASES)
def test_weak_or_exposed_keys_are_refused_before_any_output_exists(case, tmp_path, monkeypatch):
    from pipeline.ingest import ingest_stage

    params = write_tiny_project(tmp_path / "project", n=20)
    expected = _key_file_case(case, tmp_path, monkeypatch)
    before = sorted(p.relative_to(params.parent) for p in params.parent.rglob("*"))

    with pytest.raises(CxrError, match=expected) as refused:
        ingest_stage(ProjectPaths(params.parent), load_config(params))

    assert "\n" not in str(refused.value)
    assert sorted(p.relative_to(params.parent) for p in params.parent.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("case", ["short file", "symlinked file"])
def test_forget_and_rotate_refuse_an_exposed_or_short_current_key_too(case, tmp_path, monkeypatch):
    """rotate accepts a short old key (retiring it is the point), never an exposed one; forget accepts neither."""
    from pipeline.forget import forget_patient
    from pipeline.key_rotation import rotate_key

    params = write_tiny_project(tmp_path / "project", n=20)
    expected = _key_file_case(case, tmp_path, monkeypatch)
    paths, config = ProjectPaths(params.parent), load_config(params)
    with pytest.raises(CxrError, match=expected):
        forget_patient(paths, config, "0" * 20)
    new = _private_file(tmp_path / "new.key", GOOD_KEY)
    if case == "symlinked file":
        with pytest.raises(CxrError, match=expected):
            rotate_key(paths, config, new)
        assert (tmp_path / "elsewhere" / "real.key").read_text() == GOOD_KEY
    else:  # the short key is retired: the new one replaces it, in a private file
        assert rotate_key(paths, config, new).key_file == tmp_path / "keys" / "deid.key"
        assert load_key() == GOOD_KEY.encode() and (tmp_path / "keys" / "deid.key").stat().st_mode & 0o777 == 0o600
    assert not (params.parent / "data" / "interim").exists()


def test_a_new_key_file_is_0600_whatever_the_umask_and_announced_once(tmp_path, monkeypatch, caplog):
    _without_env_key(monkeypatch)
    monkeypatch.setenv("CXR_DEID_KEY_FILE", str(tmp_path / "user" / "deid.key"))
    old_umask = os.umask(0)  # the most permissive: only the explicit 0600 keeps the key private
    try:
        with caplog.at_level(logging.INFO, logger="pipeline.deid"):
            user_key = load_key()
            assert load_key() == user_key
            project_key = load_key(tmp_path / "project", "project")
    finally:
        os.umask(old_umask)
    for key_file, key in ((tmp_path / "user" / "deid.key", user_key), (tmp_path / "project" / ".cxr" / "deid.key", project_key)):
        assert oct(os.lstat(key_file).st_mode & 0o777) == "0o600"
        assert oct(os.stat(key_file.parent).st_mode & 0o777) == "0o700"
        assert key_file.read_text().strip().encode() == key and len(key) == 64
    assert user_key != project_key
    created = [record.getMessage() for record in caplog.records if "key created" in record.getMessage()]
    assert len(created) == 2 and str(tmp_path / "user" / "deid.key") in created[0]
    assert not list((tmp_path / "user").glob(".deid.key.*"))  # no temporary file left behind


def test_privacy_and_deid_params_are_checked(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("privacy:\n  umask: 077\n")  # YAML reads it as the number 63
    with pytest.raises(CxrError, match="privacy.umask.*quoted octal"):
        load_config(params)
    with pytest.raises(CxrError, match="deid.key_scope"):
        load_config(params, ["privacy.umask='027'", "deid.key_scope=team"])
    assert load_config(params, ["privacy.umask='027'"]).privacy.mask == 0o027


# --- the CLI, end to end ----------------------------------------------------------------------


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CXR_DEID_KEY", "CXR_DEID_KEY_FILE")}
    return env | {"HOME": str(tmp_path / "home")}  # a stray user-scope key would land here, not in the real home


def cxr(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CXR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _project_scoped(tmp_path: Path, n: int = 40) -> Path:
    params = write_tiny_project(tmp_path / "project", n=n)
    params.write_text(params.read_text().replace("key_scope: user", "key_scope: project"))
    assert "key_scope: project" in params.read_text()
    return params


def _dicom_patients(params: Path, manifest: pd.DataFrame, key: bytes) -> dict[int, str]:
    """Row position → the raw PatientID in the header of each DICOM film of the manifest (paths are redacted: rows
    lead back to their files through their image_id, keyed with `key`)."""
    import pydicom

    files = source_files(ProjectPaths(params.parent), load_config(params), manifest, key)
    return {position: str(pydicom.dcmread(file, stop_before_pixels=True).PatientID)
            for position, (file, kind) in enumerate(zip(files, manifest["format"])) if kind == "dicom"}


@pytest.mark.slow
def test_key_rotate_moves_manifest_and_registry_to_the_new_key_and_keeps_every_split(tmp_path):
    params = _project_scoped(tmp_path)
    root, env = params.parent, _cli_env(tmp_path)
    assert cxr("ingest", "--params", str(params), env=env, cwd=root).returncode == 0
    paths = ProjectPaths(root)
    old_key = (root / ".cxr" / "deid.key").read_text().strip().encode()
    before = pd.read_parquet(paths.manifest)
    registry_before = pd.read_parquet(paths.split_registry)
    headers = _dicom_patients(params, before, old_key)
    assert len(set(headers.values())) >= 3
    new_key_file = _private_file(tmp_path / "new.key", "rotated-key-" + "7f3a" * 10 + "\n")
    new_key = new_key_file.read_text().strip().encode()

    out = cxr("key", "rotate", "--new-key-file", str(new_key_file), "--params", str(params), env=env, cwd=root)

    assert out.returncode == 0, out.stderr
    assert (root / ".cxr" / "deid.key").read_text().strip().encode() == new_key
    assert oct(os.stat(root / ".cxr" / "deid.key").st_mode & 0o777) == "0o600"
    after = pd.read_parquet(paths.manifest)
    assert list(after["split"]) == list(before["split"])  # the same films in the same order, every split kept
    assert not set(after["image_id"]) & set(before["image_id"])  # image ids are keyed: all new
    moved = dict(zip(before["patient_hash"], after["patient_hash"]))
    assert len(set(moved.values())) == len(moved) and not set(moved) & set(moved.values())  # one to one, all new
    assert all(after.groupby("patient_hash")["split"].nunique() == 1)
    assert _dicom_patients(params, after, new_key) == headers  # the new image ids lead back to the same files
    for position, patient_id in headers.items():  # DICOM films: the new key's hash of the header's PatientID
        row = after.iloc[position]
        assert row["patient_hash"] == patient_hash(patient_id, new_key) != patient_hash(patient_id, old_key)
    registry = pd.read_parquet(paths.split_registry)
    assert set(registry["key_check"]) == {key_check(new_key)}
    assert dict(zip(registry["patient_hash"], registry["split"])) == {
        moved[patient]: split for patient, split in zip(registry_before["patient_hash"], registry_before["split"])}
    assert not pd.read_csv(paths.quarantine)["path"].str.contains(r"redacted-[0-9a-f]", regex=True).any()

    again = cxr("ingest", "--params", str(params), env=env, cwd=root)

    assert again.returncode == 0, again.stderr
    assert "decoded 0 new files" in again.stderr  # from the decode cache: rotating decoded nothing, nor did this
    final = pd.read_parquet(paths.manifest)
    assert dict(zip(final["image_id"], final["split"])) == dict(zip(after["image_id"], before["split"]))
    assert dict(zip(final["image_id"], final["patient_hash"])) == dict(zip(after["image_id"], after["patient_hash"]))
    assert pd.read_parquet(paths.split_registry)[["patient_hash", "split"]].equals(registry[["patient_hash", "split"]])

    stale = cxr("key", "rotate", "--new-key-file", str(new_key_file), "--params", str(params), env=env, cwd=root)
    assert stale.returncode == 2 and stale.stderr.startswith("error: ") and "holds the current" in stale.stderr


def _patient_to_forget(manifest: pd.DataFrame) -> str:
    counts = manifest[manifest["format"] == "dicom"].groupby("patient_hash").size()
    return str(counts[counts >= 2].index[0])


def _cached_pixels(paths: ProjectPaths) -> list[np.ndarray]:
    shards = sorted(paths.decode_cache.glob("decoded-*/shard-*.npy"))
    assert shards
    return [film for shard in shards for film in np.load(shard)]


@pytest.mark.slow
def test_forget_removes_a_patient_everywhere_records_it_and_ingest_does_not_bring_them_back(tmp_path, monkeypatch):
    from pipeline.decode_cache import DecodeCache
    from pipeline.demo_data import phi_values
    from pipeline.ingest import ingest_stage

    params = write_tiny_project(tmp_path / "project", n=40)
    root, env = params.parent, _cli_env(tmp_path) | {"CXR_DEID_KEY": GOOD_KEY}
    paths = ProjectPaths(root)
    assert cxr("ingest", "--params", str(params), env=env, cwd=root).returncode == 0
    manifest = pd.read_parquet(paths.manifest)
    images = np.load(paths.images)
    patient = _patient_to_forget(manifest)
    theirs = manifest[manifest["patient_hash"] == patient]
    others = manifest[manifest["patient_hash"] != patient]
    their_films = [images[i] for i in theirs["store_index"]]
    assert any(any(np.array_equal(film, cached) for cached in _cached_pixels(paths)) for film in their_films)

    out = cxr("forget", patient, "--params", str(params), env=env, cwd=root)

    assert out.returncode == 0, out.stderr
    assert f"{len(theirs)} films from the manifest" in out.stdout
    kept = pd.read_parquet(paths.manifest)
    kept_images = np.load(paths.images)
    assert patient not in set(kept["patient_hash"]) and len(kept) == len(others) == len(kept_images)
    assert list(kept["store_index"]) == list(range(len(kept)))
    old_store = dict(zip(manifest["image_id"], manifest["store_index"]))
    for image_id, index in zip(kept["image_id"], kept["store_index"]):
        assert np.array_equal(kept_images[index], images[old_store[image_id]])  # the others: the same film, renumbered
    assert patient not in set(pd.read_parquet(paths.split_registry)["patient_hash"])
    cached = _cached_pixels(paths)
    assert not any(np.array_equal(film, c) for film in their_films for c in cached)
    cache = DecodeCache.for_size(paths.decode_cache, 32)
    assert not cache.index["sha256"].isin(set(theirs["sha256"])).any()
    for file_key in cache.index.index[:5]:  # the rewritten shards still serve the other films, checksums intact
        assert cache.get(file_key) is not None
    record = [json.loads(line) for line in paths.erasures.read_text().splitlines()]
    assert len(record) == 1 and record[0]["patient_hash"] == patient and record[0]["films"] == len(theirs)
    assert record[0]["key_check"] == key_check(GOOD_KEY.encode()) and record[0]["at"]
    written = paths.erasures.read_text()
    assert not [value for value in phi_values(root / "data" / "raw" / "demo") if len(value) >= 4 and value in written]

    monkeypatch.setenv("CXR_DEID_KEY", GOOD_KEY)
    # Their files are decoded again (the cache no longer knows them): a checkpoint every film must not cache them
    result = ingest_stage(paths, load_config(params, ["data.checkpoint_every=1"]))
    back = pd.read_parquet(paths.manifest)
    assert patient not in set(back["patient_hash"]) and len(back) == len(kept)
    assert result.quarantine_reasons.get("erased") == len(theirs)
    quarantine = pd.read_csv(paths.quarantine)
    assert quarantine.loc[quarantine["reason"] == "erased", "message"].str.contains(patient).all()
    assert patient not in set(pd.read_parquet(paths.split_registry)["patient_hash"])
    assert not any(np.array_equal(film, c) for film in their_films for c in _cached_pixels(paths))


def test_forget_refuses_an_unknown_pseudonym_in_one_line(tmp_path):
    params = write_tiny_project(tmp_path / "project", n=20)
    out = cxr("forget", "0123456789abcdef0123", "--params", str(params), env=_cli_env(tmp_path) | {"CXR_DEID_KEY": GOOD_KEY},
              cwd=params.parent)
    assert out.returncode == 2 and out.stderr.startswith("error: no patient 0123456789abcdef0123")
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (params.parent / "data" / "erasures.jsonl").exists()


# --- private outputs ---------------------------------------------------------------------------


def _modes(root: Path, relative: list[str]) -> dict[str, int]:
    return {name: os.stat(root / name).st_mode & 0o777 for name in relative}


def test_stage_outputs_holding_films_are_private_under_the_default_umask(tmp_path):
    from pipeline.stages import stage

    params = write_tiny_project(tmp_path / "project", n=20)
    paths, config = ProjectPaths(params.parent), load_config(params)
    before = os.umask(0o022)  # a typical shell's: files 0644, readable by every local user
    try:
        stage("ingest").run(paths, config)
        assert os.umask(0o022) == 0o022  # restored once the stage ended
    finally:
        os.umask(before)
    shard = next(paths.decode_cache.glob("decoded-*/shard-*.npy")).relative_to(paths.root).as_posix()
    files = ["data/interim/images.npy", "data/interim/manifest.parquet", "data/splits.parquet", shard,
             "data/cache/last_ingest.json", "data/interim/quarantine.csv"]
    assert all(mode & 0o077 == 0 for mode in _modes(paths.root, files).values()), _modes(paths.root, files)
    folders = ["data/interim", "data/cache", str(Path(shard).parent)]
    assert all(mode == 0o700 for mode in _modes(paths.root, folders).values()), _modes(paths.root, folders)

    loose = load_config(params, ["privacy.umask='022'", "data.image_size=16"])
    stage("ingest").run(paths, loose)
    assert os.stat(paths.images).st_mode & 0o777 == 0o644  # the param decides, not a hard-coded mode


@pytest.mark.slow
def test_report_html_is_private(tiny_project):
    """The report embeds Grad-CAM overlays of test films; the session's project ran every stage through Stage.run."""
    assert os.stat(tiny_project.paths.reports / "report.html").st_mode & 0o077 == 0
