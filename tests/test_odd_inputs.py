"""Odd names, odd files and headers that declare more than anyone should decode (issue 11, items 4 and 6).

Each such input ends as a quarantine row with its reason, or is ingested under a name every writer takes; the run
finishes, with no traceback and no hang (a FIFO is never opened), and nothing is decoded whose header is over
data.max_pixels or data.max_frames.
"""

from __future__ import annotations

import faulthandler
import io
import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from pipeline.config import DataConfig, load_config
from pipeline.errors import CxrError
from pipeline.imaging import DecodeLimits, UnreadableImage, decode_file, read_identity
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths

CXR = str(Path(sys.executable).parent / "cxr")
LONG_NAME = "L" * 251 + ".png"  # 255 bytes: the longest name Linux file systems allow
NOT_UTF8 = b"caf\xe9_1.png"  # Latin-1 bytes, as an old Windows share or a CD export names files


def _film(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path, format="PNG")


def png_declaring(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose IHDR declares width x height (valid chunks and CRCs, a few bytes of image data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def dicom_declaring(path: Path, rows: int, columns: int, pydicom_files: Path) -> None:
    """A real small DICOM whose header is edited to declare rows x columns (its pixel data stays small). Rows and
    Columns are US (at most 65535): a forged file writes them as UL in explicit VR, and pydicom reads them so."""
    dataset = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    dataset.add_new(0x00280010, "UL", rows)
    dataset.add_new(0x00280011, "UL", columns)
    dataset.save_as(path)
    assert (pydicom.dcmread(path).Rows, pydicom.dcmread(path).Columns) == (rows, columns)


@pytest.fixture
def odd_project(tmp_path: Path, pydicom_test_files: Path) -> Path:
    """A tiny demo set plus one of each odd input; returns the project root. Expected outcomes in ODD_EXPECTED."""
    from pipeline.demo_data import write_demo_data

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text("data:\n  image_size: 32\n  num_workers: 1\n")
    demo = root / "data" / "raw" / "demo"
    write_demo_data(demo, n=12, seed=0, size=64)
    normal = demo / "normal"
    _film(tmp_path / "x.png", 1)
    os.rename(tmp_path / "x.png", os.fsencode(normal) + b"/" + NOT_UTF8)  # a usable film: ingested
    (Path(os.fsdecode(os.fsencode(normal) + b"/vide\xff.png"))).write_bytes(b"")  # unusable: quarantined
    _film(normal / "a" / "b" / "c" / LONG_NAME, 2)  # a 255-byte name in folders: a ~270-byte relative path
    (normal / "d" / ("B" * 251 + ".dcm")).parent.mkdir()
    (normal / "d" / ("B" * 251 + ".dcm")).write_text("not a film\n" * 20)
    os.mkfifo(normal / "pipe.png")  # opening it would block for ever
    png_declaring(normal / "bomb.png", 60_000, 60_000)
    dicom_declaring(normal / "huge.dcm", 100_000, 100_000, pydicom_test_files)
    pydicom.dcmread(pydicom_test_files / "SC_rgb_rle_2frame.dcm").save_as(normal / "two_frames.dcm")
    outside = tmp_path / "elsewhere"
    _film(outside / "secret.png", 3)
    (normal / "linked.png").symlink_to(outside / "secret.png")
    (normal / "dangling.png").symlink_to(tmp_path / "gone.png")
    # The pneumonia label folder is a link to films outside the source: refused, not followed.
    (demo / "pneumonia").rename(outside / "pneumonia")
    (demo / "pneumonia").symlink_to(outside / "pneumonia")
    return root


ODD_EXPECTED = {  # quarantine path → reason
    "normal/vide\\xff.png": "empty_file",
    f"normal/d/{'B' * 251}.dcm": "not_dicom",
    "normal/pipe.png": "not_a_regular_file",
    "normal/bomb.png": "too_large",
    "normal/huge.dcm": "too_large",
    "normal/two_frames.dcm": "too_many_frames",
    "normal/linked.png": "outside_source",
    "normal/dangling.png": "broken_link",
    "pneumonia": "outside_source",
}


def _check_outputs(root: Path) -> None:
    paths = ProjectPaths(root)
    for written in (paths.quarantine, paths.dropped_duplicates):
        written.read_bytes().decode("utf-8")  # valid UTF-8: no lone surrogate reached a writer
    quarantine = pd.read_csv(paths.quarantine, keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"]))
    assert {path: reasons.get(path) for path in ODD_EXPECTED} == ODD_EXPECTED
    assert all(message.strip() and "\n" not in message for message in quarantine["message"])
    assert not quarantine["path"].str.startswith("pneumonia/").any()  # the linked folder was never listed
    manifest = pd.read_parquet(paths.manifest)
    assert "normal/caf\\xe9_1.png" in set(manifest["path"])  # the film behind the Latin-1 name, escaped
    assert f"normal/a/b/c/{LONG_NAME}" in set(manifest["path"])
    assert not manifest["path"].str.startswith("pneumonia/").any()
    assert set(manifest["label"]) == {"normal"}


def test_odd_names_and_files_are_quarantined_with_a_reason_and_the_run_finishes(odd_project):
    faulthandler.dump_traceback_later(300, exit=True)  # a FIFO opened by mistake would block for ever
    try:
        result = ingest_stage(ProjectPaths(odd_project), load_config(odd_project / "params.yaml"))
    finally:
        faulthandler.cancel_dump_traceback_later()
    _check_outputs(odd_project)
    # A second run reads the hash table it wrote (non-UTF-8 names included) and keeps the outputs.
    again = ingest_stage(ProjectPaths(odd_project), load_config(odd_project / "params.yaml"))
    assert again.n_decoded == 0 and again.quarantine_reasons == result.quarantine_reasons


@pytest.mark.slow
def test_cxr_ingest_on_odd_inputs_prints_no_traceback(odd_project):
    done = subprocess.run([CXR, "ingest"], cwd=odd_project, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr[-2000:]
    assert "not_a_regular_file 1" in done.stderr and "too_large 2" in done.stderr
    _check_outputs(odd_project)


def test_a_latin1_name_that_reads_like_another_files_escaped_name_is_quarantined(tmp_path):
    from pipeline.sources import read_source

    _film(tmp_path / "src" / "normal" / "caf\\xe9.png", 0)  # a literal backslash: what the Latin-1 name shows as
    _film(tmp_path / "x.png", 1)
    os.rename(tmp_path / "x.png", os.fsencode(tmp_path / "src" / "normal") + b"/caf\xe9.png")
    config = DataConfig(sources=["src"])
    items, rejected = read_source(config.sources[0], tmp_path, config)
    assert [item.path for item in items] == ["normal/caf\\xe9.png"]
    assert [(row.path, row.reason) for row in rejected] == [("normal/caf\\xe9.png", "ambiguous_name")]
    assert items[0].file.name == "caf\\xe9.png"  # the literal name sorts first and keeps the path


def test_a_folder_deeper_than_the_system_path_limit_is_quarantined_not_a_traceback(tmp_path):
    """Linux keeps folders of any depth (made one level at a time), but no path over 4096 bytes can be opened."""
    from pipeline.sources import read_source

    _film(tmp_path / "src" / "normal" / "film.png", 0)
    handle = os.open(tmp_path / "src" / "normal", os.O_DIRECTORY)
    for level in range(18):  # 18 names of 252 bytes: a 4.5 kB path
        os.mkdir(f"{level:02d}" + "D" * 250, dir_fd=handle)
        deeper = os.open(f"{level:02d}" + "D" * 250, os.O_DIRECTORY, dir_fd=handle)
        os.close(handle)
        handle = deeper
    os.close(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=handle))
    os.close(handle)
    config = DataConfig(sources=["src"])
    items, rejected = read_source(config.sources[0], tmp_path, config)
    assert [item.path for item in items] == ["normal/film.png"]
    assert [row.reason for row in rejected] == ["unreadable_folder"] and "too long" in rejected[0].message


def test_png_header_declaring_60000_squared_is_refused_before_decoding(tmp_path):
    png_declaring(tmp_path / "bomb.png", 60_000, 60_000)  # Pillow's own bomb limit: refused at open
    png_declaring(tmp_path / "big.png", 8_000, 8_000)  # 64 million px: between data.max_pixels and twice it
    for name in ("bomb.png", "big.png"):
        with pytest.raises(UnreadableImage) as raised:
            decode_file(tmp_path / name)
        assert raised.value.reason == "too_large" and "data.max_pixels" in str(raised.value)


def test_max_pixels_refuses_a_real_film_by_its_header(tmp_path):
    _film(tmp_path / "film.png", 0, size=40)
    Image.open(tmp_path / "film.png").convert("L").save(tmp_path / "film.jpg", quality=95)
    for name in ("film.png", "film.jpg"):
        assert decode_file(tmp_path / name).width == 40
        with pytest.raises(UnreadableImage) as raised:
            decode_file(tmp_path / name, limits=DecodeLimits(max_pixels=40 * 40 - 1))
        assert raised.value.reason == "too_large" and "40x40" in str(raised.value)


@pytest.mark.parametrize("kind", ["BMP", "GIF", "TIFF"])
def test_pillow_opens_a_png_named_file_only_as_png(tmp_path, kind):
    """A film named .png whose bytes are another format is refused: only the PNG plug-in may read it."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(buffer, format=kind)
    (tmp_path / "film.png").write_bytes(buffer.getvalue())
    with pytest.raises(UnreadableImage) as raised:
        decode_file(tmp_path / "film.png")
    assert raised.value.reason == "not_an_image"


def test_postscript_named_jpeg_never_reaches_ghostscript(tmp_path):
    (tmp_path / "film.jpg").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\nshowpage\n")
    with pytest.raises(UnreadableImage) as raised:
        decode_file(tmp_path / "film.jpg")
    assert raised.value.reason == "not_an_image"


def test_dicom_declaring_100000_squared_is_refused_before_pixel_decoding(tmp_path, pydicom_test_files):
    dicom_declaring(tmp_path / "huge.dcm", 100_000, 100_000, pydicom_test_files)
    key = b"k" * 32
    with pytest.raises(UnreadableImage) as raised:
        decode_file(tmp_path / "huge.dcm", key)
    assert raised.value.reason == "too_large" and "100000x100000" in str(raised.value)
    identity = raised.value.identity  # its identifiers, as pseudonyms: ingest redacts them from what it writes
    assert identity.patient is not None and identity == read_identity(tmp_path / "huge.dcm", key)
    assert str(pydicom.dcmread(tmp_path / "huge.dcm").PatientID) not in repr(identity)
    # The same check on a real film, by its header: refused at one pixel under its size, decoded at its size.
    film = pydicom_test_files / "MR_small.dcm"
    assert decode_file(film, limits=DecodeLimits(max_pixels=64 * 64)).width == 64
    with pytest.raises(UnreadableImage, match="too_large|64x64"):
        decode_file(film, limits=DecodeLimits(max_pixels=64 * 64 - 1))


def test_multi_frame_dicom_is_refused_unless_max_frames_allows_and_then_only_the_first_frame_is_kept(pydicom_test_files):
    film = pydicom_test_files / "SC_rgb_rle_2frame.dcm"
    with pytest.raises(UnreadableImage) as raised:
        decode_file(film)
    assert raised.value.reason == "too_many_frames" and "data.max_frames (1)" in str(raised.value)
    first = decode_file(film, limits=DecodeLimits(max_frames=2)).pixels
    frames = pydicom.dcmread(film).pixel_array
    assert first.shape == frames.shape[1:3]
    assert not np.array_equal(frames[0], frames[1])  # the two frames differ: the first one is the one kept
    grey = frames[0][..., 0] * 0.299 + frames[0][..., 1] * 0.587 + frames[0][..., 2] * 0.114
    assert np.abs(first.astype(int) - (grey - grey.min()) * 255 / (grey.max() - grey.min())).max() <= 1


def _npz_declaring(path: Path, shape: tuple[int, ...]) -> None:
    """An .npz whose train_images member's header declares `shape` (uint8) but holds a few bytes."""
    from numpy.lib import format as npy

    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    member.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train_images.npy", member.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(2, dtype=np.int64))  # the images' header is refused before labels are compared
        archive.writestr("train_labels.npy", buffer.getvalue())


def test_npz_member_declaring_a_huge_array_is_refused_in_one_line_without_allocating_it(tmp_path):
    from pipeline.sources import read_source

    _npz_declaring(tmp_path / "forged.npz", (10**9, 28, 28))  # 784 GB of MedMNIST-sized films declared
    _npz_declaring(tmp_path / "wide.npz", (2, 100_000, 100_000))  # two 10-gigapixel films declared
    config = DataConfig(sources=["forged.npz"])
    tracemalloc.start()
    try:
        for name, expected in (("forged.npz", "holds 64 bytes: the archive is damaged"), ("wide.npz", "data.max_pixels")):
            with pytest.raises(CxrError) as raised:
                read_source(config.sources[0].model_copy(update={"path": name}), tmp_path, config)
            assert expected in str(raised.value) and "\n" not in str(raised.value) and name in str(raised.value)
        assert tracemalloc.get_traced_memory()[1] < 20 * 2**20  # numpy's allocations are traced: none was made
    finally:
        tracemalloc.stop()


def test_npz_images_above_max_pixels_are_refused(tmp_path):
    from pipeline.sources import read_source

    np.savez(tmp_path / "small.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([0, 1]))
    config = DataConfig(sources=["small.npz"], max_pixels=28 * 28 - 1)
    with pytest.raises(CxrError, match="28x28 px images, above data.max_pixels"):
        read_source(config.sources[0], tmp_path, config)
    assert len(read_source(config.sources[0], tmp_path, DataConfig(sources=["small.npz"]))[0]) == 2


def test_decode_limits_default_to_the_data_params_defaults():
    data = DataConfig()
    assert DecodeLimits() == DecodeLimits(max_pixels=data.max_pixels, max_frames=data.max_frames)


def test_a_small_max_pixels_does_not_stay_pillows_limit_for_the_rest_of_the_process(tmp_path):
    """data.max_pixels sets Pillow's process-wide bomb limit while a film is opened; left there, it refused later,
    unrelated Pillow work in the same process (Grad-CAM overlays, report thumbnails) depending on test order."""
    from PIL import Image

    from pipeline.imaging import DecodeLimits, decode_file

    film = tmp_path / "film.png"
    Image.fromarray(np.full((64, 64), 100, dtype=np.uint8) + np.arange(64, dtype=np.uint8)).save(film)
    before = Image.MAX_IMAGE_PIXELS
    decode_file(film, limits=DecodeLimits(max_pixels=5000))
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(film).load()  # 4,096 px, under 5,000: fine either way; a larger one must open too
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 200), dtype=np.uint8)).save(big)
    Image.open(big).load()
