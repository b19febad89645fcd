"""Ingest on real files: demo DICOM/PNG/JPEG folders, CSV tables, MedMNIST .npz, Kermany layout."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import CxrError
from pipeline.ingest import MANIFEST_COLUMNS, ingest_stage
from pipeline.paths import ProjectPaths


def test_demo_set_is_ingested_and_broken_files_quarantined(tiny_project):
    paths = tiny_project.paths
    manifest = pd.read_parquet(paths.manifest)
    images = np.load(paths.images, mmap_mode="r")
    quarantine = pd.read_csv(paths.quarantine)

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert images.shape == (len(manifest), 32, 32) and images.dtype == np.uint8
    assert manifest["store_index"].tolist() == list(range(len(manifest)))
    assert set(manifest["format"]) == {"dicom", "png", "jpeg"}
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert dict(zip(quarantine["path"], quarantine["reason"])) == {
        "normal/broken_empty.png": "empty_file",
        "normal/broken_notes.dcm": "not_dicom",
        "pneumonia/broken_truncated.dcm": "decode_failed",
    }
    assert quarantine["message"].str.contains("broken_").all()


def test_splits_are_patient_level(tiny_project):
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    splits_per_patient = manifest.groupby("patient_hash")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert manifest["patient_hash"].nunique() < len(manifest)  # several images per patient were grouped


def test_stored_pixels_match_row_statistics(tiny_project):
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    images = np.load(tiny_project.paths.images)
    stored = images[manifest["store_index"].to_numpy()].astype(np.float64)
    assert len(manifest) > 0
    np.testing.assert_allclose(manifest["mean_intensity"], stored.mean(axis=(1, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(manifest["std_intensity"], stored.std(axis=(1, 2)), rtol=1e-9, atol=1e-9)


def _project(tmp_path, sources, extra=()):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n")
    return ProjectPaths(tmp_path), load_config(params, [f"data.sources={sources}", *extra])


def _write_png(path, value, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)


def test_csv_table_source_with_patients_and_bad_rows(tmp_path):
    for i in range(12):
        _write_png(tmp_path / "films" / f"img{i}.png", i)
    rows = [{"path": f"img{i}.png", "label": "pneumonia" if i % 3 else "NORMAL", "patient_id": f"pt{i // 2}"} for i in range(12)]
    rows += [{"path": "missing.png", "label": "normal", "patient_id": "x"}, {"path": "img99.png", "label": "covid", "patient_id": "y"}]
    pd.DataFrame(rows).to_csv(tmp_path / "films" / "labels.csv", index=False)
    paths, config = _project(tmp_path, "[films/labels.csv]")

    result = ingest_stage(paths, config)

    manifest = pd.read_parquet(paths.manifest)
    assert result.n_images == 12
    assert set(manifest["label"]) == {"normal", "pneumonia"}
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1
    assert result.quarantine_reasons == {"label_not_in_set": 1, "missing_file": 1}
    assert not manifest["patient_hash"].isin([f"pt{i}" for i in range(6)]).any()


def test_npz_source_keeps_its_splits_and_carves_a_test_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mnist.npz",
        train_images=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
        train_labels=(np.arange(40) % 4 != 0).astype(np.uint8).reshape(-1, 1),
        val_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        val_labels=(np.arange(10) % 4 != 0).astype(np.uint8).reshape(-1, 1),
    )
    paths, config = _project(tmp_path, "[mnist.npz]")

    result = ingest_stage(paths, config)

    assert result.split_counts["val"] == 10
    assert result.split_counts["test"] == 6  # 15 % of 40 train images, stratified: 1.5→2 normal, 4.5→4 pneumonia
    assert result.split_counts["train"] == 34
    assert set(pd.read_parquet(paths.manifest)["format"]) == {"npz"}


def test_kermany_layout_keeps_splits_and_reads_patient_from_file_name(tmp_path):
    root = tmp_path / "chest_xray"
    for offset, split in enumerate(("train", "val", "test")):
        _write_png(root / split / "NORMAL" / f"IM-{split}-0001.png", 10 * offset + 1)
        _write_png(root / split / "PNEUMONIA" / f"person{split}1_bacteria_1.png", 10 * offset + 2)
        _write_png(root / split / "PNEUMONIA" / f"person{split}1_virus_2.png", 10 * offset + 3)
    paths, config = _project(tmp_path, "[chest_xray]")

    result = ingest_stage(paths, config)

    manifest = pd.read_parquet(paths.manifest)
    assert result.split_counts == {"train": 3, "val": 3, "test": 3}
    train_pneumonia = manifest[(manifest["split"] == "train") & (manifest["label"] == "pneumonia")]
    assert train_pneumonia["patient_hash"].nunique() == 1  # person…1 has two films


def test_missing_source_is_a_clear_error(tmp_path):
    paths, config = _project(tmp_path, "[nowhere]")
    with pytest.raises(CxrError, match="'nowhere' does not exist"):
        ingest_stage(paths, config)


def test_source_with_no_usable_file_is_a_clear_error(tmp_path):
    (tmp_path / "data" / "normal").mkdir(parents=True)
    (tmp_path / "data" / "normal" / "a_1.png").touch()
    paths, config = _project(tmp_path, "[data]")
    with pytest.raises(CxrError, match="none of the 1 files"):
        ingest_stage(paths, config)


def test_ingest_never_modifies_the_raw_files(tiny_project, tmp_path):
    # A project of its own reads the tiny project's raw folder by absolute path: the session project's outputs
    # stay untouched, and this project's decode cache starts cold, so every film is really decoded.
    raw = (tiny_project.paths.root / "data" / "raw" / "demo").resolve()
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    paths, config = _project(tmp_path, f"[{raw.as_posix()}]")

    result = ingest_stage(paths, config)

    assert result.n_decoded > 0 and result.n_images > 0
    assert sorted(p for p in raw.rglob("*") if p.is_file()) == files
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert paths.manifest.is_file() and not paths.manifest.is_relative_to(raw)


def test_first_split_depends_on_data_and_seed_not_on_the_deid_key(tmp_path, monkeypatch):
    """Two sites with the same files and different keys: each project's first ingest splits them alike."""
    films = tmp_path / "films"
    for i in range(30):
        _write_png(films / ("pneumonia" if i % 4 else "normal") / f"p{i // 2}_{i}.png", i)
    splits = []
    for key in ("site-a-key-0123456789abcdef0123456789", "site-b-key-0123456789abcdef0123456789"):
        monkeypatch.setenv("CXR_DEID_KEY", key)
        (tmp_path / key).mkdir()
        paths, config = _project(tmp_path / key, f"[{films.as_posix()}]")
        ingest_stage(paths, config)
        manifest = pd.read_parquet(paths.manifest)
        splits.append(dict(zip(manifest["sha256"], manifest["split"])))  # paths and image_ids differ by key
    assert splits[0] == splits[1]
    assert len(set(splits[0].values())) == 3


def test_npz_with_only_train_gets_val_and_test_carved(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "train_only.npz",
        train_images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8),
        train_labels=(np.arange(60) % 3 != 0).astype(np.uint8).reshape(-1, 1),
    )
    paths, config = _project(tmp_path, "[train_only.npz]")
    result = ingest_stage(paths, config)
    assert all(count > 0 for count in result.split_counts.values())
    manifest = pd.read_parquet(paths.manifest)
    assert manifest.groupby("split")["label"].nunique().to_dict() == {"train": 2, "val": 2, "test": 2}


def test_file_names_without_a_patient_id_do_not_merge_patients(tmp_path):
    for i in range(20):
        _write_png(tmp_path / "films" / ("normal" if i % 2 else "pneumonia") / f"img_{i:04d}.png", i)
    paths, config = _project(tmp_path, "[films]")
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    assert manifest["patient_hash"].nunique() == 20
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_a_flat_exposure_under_detector_noise_is_quarantined_blank_never_stored(tmp_path):
    """Hostile: films whose only variation is fine noise (several grey levels at full resolution) are flat grey at
    the stored size; a JPEG and a PNG of them, beside real structure. They are quarantined as blank_image, cold and
    again from the decode cache, and no manifest row is flatter than the blank check allows. (Before the check
    moved to the stored pixels, both were stored with a std_intensity under 1.)"""
    from pipeline.imaging import MIN_STD, decode_file, grey_mean_std

    rng = np.random.default_rng(11)
    for label in ("normal", "pneumonia"):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for i in range(3):
            film = np.clip(np.linspace(30, 220, 256)[None, :] + rng.normal(0, 4, (256, 256)), 0, 255).astype(np.uint8)
            Image.fromarray(film).save(tmp_path / "raw" / label / f"film{i}.png")
    # 128 px: decoded in full at 32 px (a reduced decode would average the noise away before any check sees it)
    flat = lambda: np.clip(128 + rng.normal(0, 3, (128, 128)), 0, 255).astype(np.uint8)  # noqa: E731
    Image.fromarray(flat()).save(tmp_path / "raw" / "normal" / "unexposed.png")
    Image.fromarray(flat()).save(tmp_path / "raw" / "pneumonia" / "unexposed.jpg", quality=95)
    for name in ("normal/unexposed.png", "pneumonia/unexposed.jpg"):  # not flat as decoded: only as stored
        assert grey_mean_std(decode_file(tmp_path / "raw" / name, size=32).pixels)[1] > 2 * MIN_STD
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [raw]\n")

    for run in ("cold", "from the decode cache"):
        if run != "cold":  # a new film, so the run is finished again from the cache
            Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).save(tmp_path / "raw" / "normal" / "new.png")
        ingest_stage(ProjectPaths(tmp_path), load_config(params))
        quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
        refused = dict(zip(quarantine["path"], quarantine["reason"]))
        assert refused == {"normal/unexposed.png": "blank_image", "pneumonia/unexposed.jpg": "blank_image"}, run
        manifest = pd.read_parquet(tmp_path / "data" / "interim" / "manifest.parquet")
        assert len(manifest) == (6 if run == "cold" else 7) and manifest["std_intensity"].min() >= MIN_STD, run
