"""The demo set is the pipeline's test input, so it must be deterministic, mixed and honestly labelled."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.demo_data import DemoSummary, phi_values, write_demo_data
from pipeline.errors import CxrError

N = 60
SIZE = 64
BROKEN = {"pneumonia/broken_truncated.dcm", "normal/broken_empty.png", "normal/broken_notes.dcm"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return write_demo_data(tmp_path_factory.mktemp("demo") / "raw", n=N, seed=0, size=SIZE)


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def usable_images(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if not p.name.startswith("broken_"))


def load_unit(path: Path) -> np.ndarray:
    """Decode any of the three formats to [0, 1] with bright = dense, as a viewer would show it."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64) / 4095
        return 1 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
    pixels = np.asarray(Image.open(path)).astype(np.float64)
    return pixels / (65535 if pixels.max() > 255 else 255)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path, demo: DemoSummary) -> None:
    again = write_demo_data(tmp_path / "again", n=N, seed=0, size=SIZE)
    other = write_demo_data(tmp_path / "other", n=N, seed=1, size=SIZE)

    assert tree_hashes(again.out_dir) == tree_hashes(demo.out_dir)
    assert tree_hashes(other.out_dir) != tree_hashes(demo.out_dir)


def test_counts_labels_and_formats(demo: DemoSummary) -> None:
    images = usable_images(demo.out_dir)
    assert len(images) == demo.n_images == N
    assert sum(demo.counts.values()) == sum(demo.formats.values()) == N
    assert 0.6 <= demo.counts["pneumonia"] / N <= 0.85
    assert all(demo.formats[fmt] > 0 for fmt in ("dicom", "png", "jpeg"))
    assert {p.suffix for p in images} == {".dcm", ".png", ".jpg"}

    labels_by_patient: dict[str, set[str]] = {}
    suffixes_by_patient: dict[str, set[str]] = {}
    for path in images:
        code = re.match(r"^([^_]+)_", path.name).group(1)
        labels_by_patient.setdefault(code, set()).add(path.parent.name)
        suffixes_by_patient.setdefault(code, set()).add(path.suffix)
    assert len(labels_by_patient) == demo.n_patients
    assert all(len(labels) == 1 for labels in labels_by_patient.values())
    assert all(len(suffixes) == 1 for suffixes in suffixes_by_patient.values())
    assert all(1 <= sum(p.name.startswith(code + "_") for p in images) <= 5 for code in labels_by_patient)


def test_dicoms_are_12_bit_cr_and_dx_in_both_photometrics(demo: DemoSummary) -> None:
    dicoms = [pydicom.dcmread(p) for p in usable_images(demo.out_dir) if p.suffix == ".dcm"]

    assert {ds.Modality for ds in dicoms} == {"CR", "DX"}
    assert {ds.PhotometricInterpretation for ds in dicoms} == {"MONOCHROME1", "MONOCHROME2"}
    for ds in dicoms:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert ds.BodyPartExamined == "CHEST"
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE)
        assert 0 <= pixels.min() and pixels.max() <= 4095


def test_pngs_include_8_and_16_bit(tmp_path: Path) -> None:
    # n=60 has too few PNG patients to be sure of a 16-bit one, so use a bigger set here.
    summary = write_demo_data(tmp_path / "raw", n=200, seed=0, size=32)
    modes = {Image.open(p).mode for p in usable_images(summary.out_dir) if p.suffix == ".png"}
    assert modes == {"L", "I;16"}


def test_broken_files_are_really_broken(demo: DemoSummary) -> None:
    root = demo.out_dir
    assert {str(p.relative_to(root)) for p in demo.broken} == BROKEN

    with pytest.raises(Exception):
        pydicom.dcmread(root / "pneumonia" / "broken_truncated.dcm").pixel_array
    assert (root / "normal" / "broken_empty.png").stat().st_size == 0
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(root / "normal" / "broken_notes.dcm")


def test_no_phi_in_file_or_folder_names(demo: DemoSummary) -> None:
    phi = phi_values(demo.out_dir)
    assert any(value.startswith("MRN") for value in phi)
    assert any("^" in value for value in phi)

    names = [p.name for p in demo.out_dir.rglob("*")] + [demo.out_dir.name]
    leaks = {(value, name) for value in phi for name in names if value.lower() in name.lower()}
    assert not leaks


def test_pneumonia_lungs_are_brighter_than_normal_lungs(demo: DemoSummary) -> None:
    # A box inside each lung field; pneumonia opacities sit there, so its mean brightness must rise.
    rows = slice(int(SIZE * 0.3), int(SIZE * 0.7))
    lungs = np.r_[int(SIZE * 0.15) : int(SIZE * 0.38), int(SIZE * 0.62) : int(SIZE * 0.85)]
    means: dict[str, list[float]] = {"normal": [], "pneumonia": []}
    for path in usable_images(demo.out_dir):
        means[path.parent.name].append(load_unit(path)[rows][:, lungs].mean())

    assert np.mean(means["pneumonia"]) - np.mean(means["normal"]) > 0.02


def test_rerun_replaces_the_folder_without_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    first = write_demo_data(out, n=N, seed=0, size=SIZE)
    expected = tree_hashes(out)
    (out / "pneumonia" / "stray.png").write_bytes(b"left over from an earlier run")

    second = write_demo_data(out, n=N, seed=0, size=SIZE)

    assert tree_hashes(out) == expected
    assert second.broken == first.broken
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp folders left next to it


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "scan.dcm").write_bytes(b"someone's real data")

    with pytest.raises(CxrError, match="not written by demo-data"):
        write_demo_data(out, n=N, seed=0, size=SIZE)
    assert (out / "scan.dcm").read_bytes() == b"someone's real data"
