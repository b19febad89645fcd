"""Decoding only the resolution kept (pipeline.imaging, issue 15): a JPEG through libjpeg's DCT scaling, a JPEG 2000
DICOM through OpenJPEG's resolution levels, an 8-bit PNG averaged down after its full decode. Each reduced decode is
checked against the full decode at 64 px, and ingest's path against the served model's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pipeline.decode_cache import DecodeCache, Decoded
from pipeline.imaging import (
    REDUCED_MARGIN,
    DecodeLimits,
    UnreadableImage,
    _reduced_j2k,
    decode_bytes,
    decode_file,
    j2k_header,
    resize,
)
from pipeline.ingest import decode_one
from tests.conftest import SHARED_DATA

SIZE = 64
KEY = b"test-key-0123456789-0123456789-abcdef"
SAMPLES = SHARED_DATA / "samples"


def film(height: int = 1203, width: int = 1031, seed: int = 0) -> np.ndarray:
    """A radiograph-like 8-bit film: smooth lungs and ribs, sensor noise, a white burned-in label and a black border
    (the odd sizes are not multiples of any reduction)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    body = 150 - 70 * np.exp(-(((x - 0.32) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2))
    body -= 70 * np.exp(-(((x - 0.68) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2))
    body += 12 * np.sin(y * 60) * (y > 0.2)
    pixels = body + rng.normal(0, 4, body.shape)
    pixels[40:90, 40:200] = 250  # a label
    pixels[:, :20] = 5  # collimator edge
    return np.clip(pixels, 0, 255).astype(np.uint8)


def j2k_dicom(path: Path, values: np.ndarray, bits: int, signed: bool, photometric: str = "MONOCHROME2", **header) -> Path:
    """A single-frame grey DICOM, JPEG 2000 lossless (pydicom's encoder, pylibjpeg-openjpeg)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, photometric
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def compare(path: Path) -> tuple[float, tuple[int, ...], tuple[int, ...]]:
    """Mean absolute difference at SIZE px between the reduced and the full decode, and both decodes' shapes."""
    full, reduced = decode_file(path), decode_file(path, size=SIZE)
    assert (reduced.width, reduced.height) == (full.width, full.height)  # the film's own size, not the decode's
    difference = np.abs(resize(full.pixels, SIZE).astype(int) - resize(reduced.pixels, SIZE).astype(int)).mean()
    return float(difference), full.pixels.shape, reduced.pixels.shape


def assert_reduced(full_shape: tuple[int, ...], reduced_shape: tuple[int, ...]) -> None:
    """Really reduced (at least halved), and never below REDUCED_MARGIN times the stored size."""
    assert reduced_shape[0] * 2 <= full_shape[0] + 1 and reduced_shape[1] * 2 <= full_shape[1] + 1
    assert min(reduced_shape) >= REDUCED_MARGIN * SIZE


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_jpeg_decodes_at_a_reduced_scale_within_one_grey_level_of_the_full_decode(tmp_path, mode):
    path = tmp_path / "film.jpg"
    Image.fromarray(film()).convert(mode).save(path, quality=92)
    difference, full_shape, reduced_shape = compare(path)
    assert_reduced(full_shape, reduced_shape)
    assert difference < 1.0


@pytest.mark.parametrize(("bits", "signed", "photometric", "header"), [
    (12, False, "MONOCHROME2", {"WindowCenter": 1800, "WindowWidth": 3000}),  # Pillow shifts 12-bit values up by 4
    (12, True, "MONOCHROME1", {"RescaleSlope": 2, "RescaleIntercept": -100, "WindowCenter": 0, "WindowWidth": 3000}),
    (16, False, "MONOCHROME2", {}),
    (8, True, "MONOCHROME2", {}),  # Pillow offsets signed values by half their range
])
def test_a_jpeg2000_dicom_decodes_a_reduced_resolution_level_with_its_luts_as_the_full_decode(tmp_path, bits, signed,
                                                                                              photometric, header):
    """The stored values of the reduced level are the film's (Pillow's shift and offset undone: a 12-bit film read
    as 16-bit would be 16 times too bright, a signed one off by half its range), and the grey film at 64 px is near
    the full decode's. Near, not under 1 grey level: to_uint8 stretches a DICOM by its own range, and the wavelet
    low-pass overshoots at the hard edges of the label and the border (here 0..4095 where the film holds 80..4014),
    so the reduced film's contrast is a few percent lower (measured 0.62 to 1.19)."""
    values = film().astype(np.int32) * ((1 << bits) - 1) // 255 - ((1 << (bits - 1)) if signed else 0)
    path = j2k_dicom(tmp_path / "film.dcm", values, bits, signed, photometric, **header)
    dataset = pydicom.dcmread(path)
    assert j2k_header(pydicom.encaps.get_frame(dataset.PixelData, 0, number_of_frames=1))[2:5] == (1, bits, signed)
    reduced_values = _reduced_j2k(dataset, SIZE)
    assert abs(reduced_values.mean() - values.mean()) < 0.01 * (1 << bits)
    assert abs(reduced_values.std() - values.std()) < 0.05 * values.std()
    difference, full_shape, reduced_shape = compare(path)
    assert_reduced(full_shape, reduced_shape)  # 1031 px: Pillow's own `reduce` refuses this size at 1/4
    assert difference < 1.25


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_an_8_bit_png_is_averaged_down_within_one_grey_level_of_the_full_decode(tmp_path, mode):
    """zlib has no reduced decode: the grey film is averaged down (box means) by the factor a JPEG's draft takes,
    then resized as before (this film: 0.22 grey levels from the direct resize)."""
    path = tmp_path / "film.png"
    Image.fromarray(film()).convert(mode).save(path)
    difference, full_shape, reduced_shape = compare(path)
    assert_reduced(full_shape, reduced_shape)
    assert difference < 1.0


def test_a_16_bit_png_and_a_small_film_are_decoded_in_full(tmp_path):
    """A 16-bit PNG is stretched by its own range, which an average would move (as for a JPEG 2000 film's extremes),
    so it is not reduced; a film under REDUCED_MARGIN times the size is not reduced either."""
    Image.fromarray(film().astype(np.uint16) * 200).save(tmp_path / "wide.png")
    Image.fromarray(film(200, 180)).save(tmp_path / "small.jpg")
    Image.fromarray(film(200, 180)).save(tmp_path / "small.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    for name in ("wide.png", "small.jpg", "small.png"):
        assert np.array_equal(decode_file(tmp_path / name, size=SIZE).pixels, decode_file(tmp_path / name).pixels)


def test_a_film_is_judged_too_small_by_its_own_size_not_its_decode(tmp_path):
    """At 4 px, a reduced decode of a 100 px film would be 16 px: still usable, since the film is 100 px."""
    Image.fromarray(film(100, 100)).save(tmp_path / "film.jpg")
    decoded = decode_file(tmp_path / "film.jpg", size=2)
    assert decoded.pixels.shape[0] < 100 and (decoded.width, decoded.height) == (100, 100)


def test_ingest_and_the_served_model_make_the_same_pixels_of_a_reduced_film(tmp_path):
    """decode_one (ingest, the champion gate) and the served model (decode_bytes with its image_size, then resize)
    give identical stored pixels, and the manifest keeps the film's own width and height."""
    Image.fromarray(film()).save(tmp_path / "film.jpg", quality=90)
    Image.fromarray(film(seed=2)).save(tmp_path / "film.png")
    values = film(seed=1).astype(np.int32) * 16
    j2k_dicom(tmp_path / "film.dcm", values, 12, False, WindowCenter=2000, WindowWidth=3500)
    for path in (tmp_path / "film.jpg", tmp_path / "film.png", tmp_path / "film.dcm"):
        ingested = decode_one(path, SIZE, KEY)
        assert isinstance(ingested, Decoded)
        served = resize(decode_bytes(path.read_bytes(), "row 0", size=SIZE).pixels, SIZE)
        assert np.array_equal(ingested.pixels, served)
        assert (ingested.fields["width"], ingested.fields["height"]) == (1031, 1203)


def test_films_cached_before_reduced_decoding_are_not_served(tmp_path):
    """The decode cache of version 3 holds full-decode pixels and full-size sha256s: the current cache is another
    folder, so an old entry is decoded again rather than stored, or de-duplicated, beside new ones."""
    old = DecodeCache(tmp_path / f"decoded-{SIZE}px-v3")
    old.add([("f" * 64, Decoded(np.zeros((SIZE, SIZE), np.uint8), {"format": "jpeg", "sha256": "0" * 64}))])
    assert old.has("f" * 64)
    assert not DecodeCache.for_size(tmp_path, SIZE).has("f" * 64)


def pillows_pixels(path: Path, size: int | None) -> np.ndarray:
    """A JPEG as Pillow's own open decodes it (its EXIF parsed), drafted as ingest drafts it for `size`."""
    with Image.open(path) as image:
        if size:
            image.draft(image.mode, (REDUCED_MARGIN * size, REDUCED_MARGIN * size))
        return np.asarray(image.convert("L"))


def exif_block(**tags: int) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[{"x_resolution": 0x011A, "resolution_unit": 0x0128, "orientation": 0x0112}[tag]] = value
    return exif.tobytes()


def test_a_jpeg_opened_without_its_exif_parsed_decodes_to_the_pixels_pillow_gives(tmp_path):
    """A JPEG opens without Pillow's EXIF parse for DPI (pipeline.film_jpeg). Whatever its EXIF holds (a
    resolution, an orientation, a damaged block, none), grey, colour or a camera's MPO, it decodes to exactly the
    pixels of Pillow's own open, in full and reduced, from a file and from bytes; its declared size is still checked
    before decoding, and what is no JPEG is still not an image."""
    rng = np.random.default_rng(5)
    grey = Image.fromarray((np.linspace(0, 220, 700)[None, :] + rng.normal(0, 20, (600, 700))).clip(0, 255).astype(np.uint8))
    colour = Image.fromarray(rng.integers(0, 255, (600, 700, 3), dtype=np.uint8))
    resolution = exif_block(x_resolution=300, resolution_unit=2, orientation=6)
    cases = {"resolution-and-orientation": (grey, {"exif": resolution}),
             "damaged-exif": (grey, {"exif": b"II*\x00\x08\x00\x00\x00\xff\xff" + bytes(40)}),
             "jfif-dpi-and-exif": (grey, {"dpi": (150, 150), "exif": exif_block(orientation=3)}),
             "no-exif": (grey, {}),
             "colour-with-exif": (colour, {"exif": resolution})}
    for name, (image, options) in cases.items():
        image.save(tmp_path / f"{name}.jpg", quality=90, **options)
    # A camera's MPO (a JPEG, then more pictures after its end): Pillow's open makes it a sequence, whose first
    # frame is the JPEG; opened as a plain JPEG, that first picture is what decodes.
    grey.save(tmp_path / "two-pictures.jpg", "MPO", save_all=True, append_images=[colour], quality=90)
    with Image.open(tmp_path / "two-pictures.jpg") as image:
        assert image.format == "MPO" and image.n_frames == 2
    for name in [*cases, "two-pictures"]:
        path = tmp_path / f"{name}.jpg"
        for size in (None, SIZE):
            expected = pillows_pixels(path, size)
            assert (min(expected.shape) < 600) == bool(size), name  # the reduced path was taken
            assert np.array_equal(decode_file(path, size=size).pixels, expected), (name, size)
            assert np.array_equal(decode_bytes(path.read_bytes(), name, size=size).pixels, expected), (name, size)
    with Image.open(tmp_path / "resolution-and-orientation.jpg") as image:
        assert image.info["dpi"] == (300, 300)  # Pillow parses this EXIF at open: the case the skip is for
    with pytest.raises(UnreadableImage) as raised:
        decode_file(tmp_path / "resolution-and-orientation.jpg", limits=DecodeLimits(max_pixels=100))
    assert raised.value.reason == "too_large" and "700x600" in str(raised.value)  # 4,200 times the limit
    for broken in (b"\xff\xd8\xff" + bytes(200), b"GIF89a" + bytes(200)):  # a JPEG's magic and nothing of one; a GIF
        (tmp_path / "not-a.jpg").write_bytes(broken)
        with pytest.raises(UnreadableImage) as raised:
            decode_file(tmp_path / "not-a.jpg")
        assert raised.value.reason == "not_an_image" and "not-a.jpg" in str(raised.value), broken[:6]


@pytest.mark.skipif(not (SAMPLES / "kermany_fullres").is_dir(), reason="real samples absent (../shared/data/samples)")
def test_real_kermany_jpegs_decode_to_the_pixels_pillows_own_open_gives():
    """Half the real Kermany films carry EXIF: opened without its parse, each decodes as Pillow's open decodes it."""
    files = sorted((SAMPLES / "kermany_fullres").rglob("*.jp*g"))
    with_exif = 0
    for path in files:
        with Image.open(path) as image:
            with_exif += "exif" in image.info
        for size in (None, SIZE):
            assert np.array_equal(decode_file(path, size=size).pixels, pillows_pixels(path, size)), (path.name, size)
    assert with_exif >= 2


@pytest.mark.skipif(not (SAMPLES / "kermany_fullres").is_dir(), reason="real samples absent (../shared/data/samples)")
def test_real_kermany_jpegs_at_a_reduced_scale_are_within_one_grey_level_of_the_full_decode():
    files = sorted((SAMPLES / "kermany_fullres").rglob("*.jp*g"))
    assert len(files) >= 10
    reduced = 0
    for path in files:
        difference, full_shape, reduced_shape = compare(path)
        reduced += reduced_shape[0] < full_shape[0]  # one of them is too small to reduce at 64 px
        assert difference < 1.0, path.name
    assert reduced >= len(files) - 2


@pytest.mark.skipif(not (SAMPLES / "kermany_fullres").is_dir(), reason="real samples absent (../shared/data/samples)")
def test_real_films_saved_as_png_average_down_within_one_grey_level_of_the_full_decode(tmp_path):
    """The real Kermany films, decoded in full and saved as 8-bit PNGs (as NIH ChestX-ray14 ships its films): 0.35
    grey levels on average, 0.99 at most (a 1082x1318 film reduced by 4 is squashed on its long side), as their
    JPEG draft decodes."""
    files = sorted((SAMPLES / "kermany_fullres").rglob("*.jp*g"))
    reduced = 0
    for path in files:
        png = tmp_path / f"{path.stem}.png"
        Image.fromarray(decode_file(path).pixels).save(png)
        difference, full_shape, reduced_shape = compare(png)
        reduced += reduced_shape[0] < full_shape[0]
        assert difference < 1.0, path.name
    assert reduced >= len(files) - 2


@pytest.mark.skipif(not (SAMPLES / "dicom" / "RG1_J2KI.dcm").is_file(), reason="real samples absent (../shared/data/samples)")
def test_the_real_jpeg2000_chest_film_at_a_reduced_level_stays_near_the_full_decode():
    """RG1_J2KI (1841x1955 CR, 15-bit, lossy JPEG 2000, MONOCHROME1, a window) decodes at 1/4. It differs by 1.06
    grey levels on average, not under 1: to_uint8 stretches a DICOM by its own range, and a reduced level's extremes
    are averaged in (with the full decode's range, 0.58). The bound is what is measured, so a regression shows."""
    difference, full_shape, reduced_shape = compare(SAMPLES / "dicom" / "RG1_J2KI.dcm")
    assert reduced_shape == (489, 461) and full_shape == (1955, 1841)
    assert difference < 1.1


def test_cxr_ingest_profile_prints_where_the_time_went(tmp_path):
    """`cxr ingest --profile`: a line per step (listing, hashing, decoding, finishing), their total and the rate."""
    import subprocess
    import sys

    from tests.conftest import write_tiny_project

    params = write_tiny_project(tmp_path / "project", n=20)
    out = subprocess.run([str(Path(sys.executable).parent / "cxr"), "ingest", "--profile", "--params", str(params)],
                         check=False, cwd=params.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    steps = ("listing", "hashing", "decoding", "finishing")
    assert all(step in lines for step in steps)
    seconds = [float(lines[step][0]) for step in steps]
    assert all(value >= 0 for value in seconds) and seconds[2] > 0
    assert abs(float(lines["total"][0]) - sum(seconds)) < 0.05
    assert re.search(r"decoded \d+ films at \d+ films/s", out.stdout)
