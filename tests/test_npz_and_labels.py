"""MedMNIST-style archives read right or refused, and a manifest only ever read with the labels it was ingested with."""

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.errors import CxrError
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths

FILMS = 24


def _films(n: int = FILMS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 220, (n, 28, 28), dtype=np.uint8)


def _ingest(tmp_path, *extra: str) -> pd.DataFrame:
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 28\n")
    ingest_stage(ProjectPaths(tmp_path), load_config(params, ["data.sources=[archive.npz]", *extra]))
    return pd.read_parquet(ProjectPaths(tmp_path).manifest)


def _save(tmp_path, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez(tmp_path / "archive.npz", train_images=images, train_labels=labels)


CLASSES = np.arange(FILMS) % 2  # 0 normal, 1 pneumonia


@pytest.mark.parametrize("shape", ["(N,)", "(N, 1)", "one-hot (N, 2)"])
def test_class_indices_in_every_layout_read_the_same_labels(tmp_path, shape):
    labels = {"(N,)": CLASSES, "(N, 1)": CLASSES[:, None], "one-hot (N, 2)": np.eye(2, dtype=np.uint8)[CLASSES]}[shape]
    _save(tmp_path, _films(), labels)
    manifest = _ingest(tmp_path).sort_values("path", key=lambda paths: paths.str.split("/").str[1].astype(int))
    assert list(manifest["label"]) == ["normal" if k == 0 else "pneumonia" for k in CLASSES]  # never column 0 of one-hot


@pytest.mark.parametrize(("labels", "message"), [
    (np.where(np.arange(FILMS) == 5, np.nan, CLASSES), r"archive.npz: train_labels\[5\] = nan is not a class index"),
    (np.where(np.arange(FILMS) == 7, 2, CLASSES), r"train_labels\[7\] = 2 is not a class index of data.labels"),
    (np.where(np.arange(FILMS) == 3, 0.5, CLASSES), r"train_labels\[3\] = 0.5 is not a class index"),
    (np.eye(3, dtype=np.uint8)[np.arange(FILMS) % 3], "has 3 columns: expected one class index per film, or one-hot"),
    (np.tile([1, 1], (FILMS, 1)), r"train_labels\[0\] = \[1, 1\]: a one-hot row needs exactly one 1"),
])
def test_labels_that_cannot_be_read_are_one_line_errors_naming_the_row(tmp_path, labels, message):
    _save(tmp_path, _films(), labels)
    with pytest.raises(CxrError, match=message) as error:
        _ingest(tmp_path)
    assert "\n" not in str(error.value)


def test_a_multilabel_archive_refuses_a_value_other_than_0_or_1(tmp_path):
    hot = np.random.default_rng(1).integers(0, 2, (FILMS, 2)).astype(float)
    hot[4, 1] = np.nan
    _save(tmp_path, _films(), hot)
    with pytest.raises(CxrError, match=r"train_labels\[4\] = \[.*nan\]: each label's column holds 0 or 1"):
        _ingest(tmp_path, "data.task=multilabel", "data.labels=[effusion, nodule]")


CHECKERBOARD = (np.indices((28, 28)).sum(axis=0) % 2) * 2 - 1  # ±1: texture, so no film is quarantined as blank


def _by_film(tmp_path, manifest: pd.DataFrame) -> np.ndarray:
    """Each stored film's mean grey level, in the archive's order."""
    stored = np.load(ProjectPaths(tmp_path).images)[manifest["store_index"].to_numpy()].mean(axis=(1, 2))
    return stored[np.argsort(manifest["path"].str.split("/").str[1].astype(int).to_numpy())]


def test_twelve_bit_films_are_scaled_by_their_bit_depth_and_never_wrap(tmp_path):
    """A ramp up to 4095 in uint16 (12-bit values, as DICOM stores them): brightness rises with the value to white.
    Cast to uint8 as before, 4095 wrapped to 255 but 256 to 0."""
    levels = np.linspace(100, 3995, FILMS)
    _save(tmp_path, (levels[:, None, None] + 100 * CHECKERBOARD).astype(np.uint16), CLASSES)
    by_level = _by_film(tmp_path, _ingest(tmp_path))
    assert (np.diff(by_level) > 0).all() and by_level[-1] > 240
    np.testing.assert_allclose(by_level, levels / 4095 * 255, atol=1)


def test_float_films_are_scaled_from_the_archive_range_and_nan_pixels_refused(tmp_path):
    images = np.linspace(-1.0, 3.0, FILMS)[:, None, None] + 0.1 * CHECKERBOARD
    _save(tmp_path, images, CLASSES)
    by_level = _by_film(tmp_path, _ingest(tmp_path))
    assert (np.diff(by_level) > 0).all()
    np.testing.assert_allclose(by_level, (np.linspace(-1.0, 3.0, FILMS) + 1.1) / 4.2 * 255, atol=1)
    images[2, 3, 4] = np.nan
    _save(tmp_path, images, CLASSES)
    with pytest.raises(CxrError, match="archive.npz: images hold NaN or infinite pixel values"):
        _ingest(tmp_path)


def test_every_stage_refuses_a_manifest_ingested_with_other_labels(tiny_project, tmp_path):
    """Reordering data.labels after ingest would swap every label_index: the stages refuse instead."""
    from pipeline.evaluate import evaluate_stage
    from pipeline.manifest import manifest_labels, read_manifest, write_manifest
    from pipeline.rebalance import rebalance_stage
    from pipeline.train import train_stage
    from pipeline.validate import validate_stage

    assert manifest_labels(tiny_project.paths.manifest) == ("binary", ["normal", "pneumonia"])
    swapped = load_config(tiny_project.params, ["data.labels=[pneumonia, normal]"])
    for stage in (validate_stage, rebalance_stage, train_stage):
        with pytest.raises(CxrError, match=r"ingested as a binary task with labels \['normal', 'pneumonia'\], but params"):
            stage(tiny_project.paths, swapped)

    # A checkpoint trained on other labels than the manifest's is refused by evaluate (a project of its own).
    other = ProjectPaths(tmp_path)
    other.interim.mkdir(parents=True)
    manifest = read_manifest(tiny_project.paths.manifest, "binary", ["normal", "pneumonia"])
    write_manifest(other.manifest, manifest, "binary", ["healthy", "pneumonia"])
    (other.images).symlink_to(tiny_project.paths.images)
    other.models.mkdir()
    other.checkpoint.write_bytes(tiny_project.paths.checkpoint.read_bytes())
    with pytest.raises(CxrError, match=r"but the model in .*checkpoint.pt says binary with \['normal', 'pneumonia'\]"):
        evaluate_stage(other, tiny_project.config)


def test_the_manifest_is_written_in_row_groups_and_reads_back_whole_with_its_labels(tmp_path, monkeypatch):
    """write_manifest converts and writes ROW_GROUP rows at a time (a 200,000-film manifest is never copied whole into
    Arrow): the file must still read back as the very frame, types and labels included, an empty one too."""
    import pyarrow.parquet as pq

    from pipeline import manifest as module
    from pipeline.manifest import manifest_labels, write_manifest

    monkeypatch.setattr(module, "ROW_GROUP", 4)
    frame = pd.DataFrame({"store_index": np.arange(10), "label": ["normal", "pneumonia"] * 5,
                          "mean_intensity": np.linspace(0, 1, 10), "view": [""] * 9 + ["PA"]})
    write_manifest(tmp_path / "manifest.parquet", frame, "binary", ["normal", "pneumonia"])
    assert pq.ParquetFile(tmp_path / "manifest.parquet").metadata.num_row_groups == 3
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "manifest.parquet"), frame)
    assert manifest_labels(tmp_path / "manifest.parquet") == ("binary", ["normal", "pneumonia"])
    write_manifest(tmp_path / "empty.parquet", frame.iloc[:0], "binary", ["normal", "pneumonia"])
    assert pd.read_parquet(tmp_path / "empty.parquet").columns.tolist() == frame.columns.tolist()
