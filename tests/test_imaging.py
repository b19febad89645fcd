"""Decoding real DICOM files (pydicom's own test set) and PNG/JPEG into 8-bit grey images."""


import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.imaging import (REDUCED_MARGIN, DecodeLimits, UnreadableImage, decode_bytes, decode_file, pixel_sha256,
                              resize)


def test_every_pydicom_test_file_decodes_or_gives_a_reason(pydicom_test_files):
    """No file in pydicom's test set makes the decoder crash: each is an image or a reasoned rejection."""
    decoded, rejected = 0, 0
    for path in sorted(pydicom_test_files.glob("*.dcm")):
        try:
            image = decode_file(path)
        except UnreadableImage as exc:
            assert exc.reason and str(path) in str(exc)
            rejected += 1
            continue
        assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 2
        decoded += 1
    assert decoded > 20 and rejected > 5


def test_file_bytes_decode_exactly_as_the_file_does(pydicom_test_files, tmp_path):
    """The served model decodes request bytes with decode_bytes: every pydicom test file (no_meta.dcm has no
    preamble) and a 16-bit PNG give the same pixels and header fields, or the same reason, as decode_file gives the file."""
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (40, 30), dtype=np.uint16)).save(tmp_path / "film.png")
    paths = [*sorted(pydicom_test_files.glob("*.dcm")), tmp_path / "film.png"]
    compared, refused = 0, 0
    for path in paths:
        try:
            from_file = decode_file(path)
        except UnreadableImage as exc:
            with pytest.raises(UnreadableImage) as raised:
                decode_bytes(path.read_bytes(), "row 7")
            assert raised.value.reason == exc.reason and str(raised.value).startswith("row 7: "), path.name
            refused += 1
            continue
        from_bytes = decode_bytes(path.read_bytes(), "row 7")
        assert np.array_equal(from_file.pixels, from_bytes.pixels), path.name
        assert (from_file.modality, from_file.view, from_file.photometric, from_file.colour, from_file.format) == \
            (from_bytes.modality, from_bytes.view, from_bytes.photometric, from_bytes.colour, from_bytes.format), path.name
        compared += 1
    assert compared > 20 and refused > 5


def test_bytes_too_large_garbage_or_empty_are_reasons_not_crashes(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(tmp_path / "big.png")
    cases = [(b"", "empty_file"), (b"not an image at all" * 20, "not_dicom"),
             ((tmp_path / "big.png").read_bytes()[:200], "decode_failed")]
    for data, reason in cases:
        with pytest.raises(UnreadableImage) as raised:
            decode_bytes(data, "row 0")
        assert raised.value.reason == reason
    with pytest.raises(UnreadableImage) as raised:
        decode_bytes((tmp_path / "big.png").read_bytes(), "row 0", limits=DecodeLimits(max_pixels=300 * 299))
    assert raised.value.reason == "too_large"


def test_truncated_dicom_is_rejected_with_decode_failed(pydicom_test_files):
    with pytest.raises(UnreadableImage) as raised:
        decode_file(pydicom_test_files / "MR_truncated.dcm")
    assert raised.value.reason == "decode_failed"


def _noisy_film(path, size: int = 640) -> None:
    """A film whose file spans several of Pillow's 64 KB reads (noise compresses badly)."""
    rng = np.random.default_rng(3)
    film = (np.linspace(0, 200, size)[None, :] + rng.normal(0, 25, (size, size))).clip(0, 255).astype(np.uint8)
    Image.fromarray(film).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_content_handed_to_the_decoder_whole_decodes_as_pillow_reading_the_file(tmp_path, suffix):
    """Decoding from memory hands Pillow the whole content at once (not its 64 KB reads): the same pixels as
    Pillow's own decode of the file, in full and at the reduced scale ingest keeps."""
    path = tmp_path / f"film{suffix}"
    _noisy_film(path)
    assert path.stat().st_size > 3 * 65536
    for size in (None, 64):
        with Image.open(path) as image:
            if size and suffix == ".jpg":
                image.draft(image.mode, (REDUCED_MARGIN * size, REDUCED_MARGIN * size))
            expected = np.asarray(image.convert("L"))
        decoded = decode_file(path, size=size).pixels
        if size and suffix == ".png":  # an 8-bit PNG is averaged down after its full decode: 640 px by 2 to 320
            expected = np.asarray(Image.fromarray(expected).reduce(2))
        assert min(decoded.shape) < 640 if size else decoded.shape == (640, 640)  # the reduced path was taken
        assert np.array_equal(decoded, expected), (suffix, size)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_film_cut_short_is_decode_failed_naming_it_wherever_it_is_cut(tmp_path, suffix):
    """A JPEG or PNG whose data ends early (a copy interrupted) is refused as decode_failed, named, at any cut and
    at any decoded scale, from a file or from a request's bytes: now that the decoder gets the whole content at
    once, running out of it must still be an error, never a partial film."""
    whole = tmp_path / f"whole{suffix}"
    _noisy_film(whole)
    data = whole.read_bytes()
    for share in (0.3, 0.6, 0.95):
        cut = tmp_path / f"cut-{share}{suffix}"
        cut.write_bytes(data[: int(len(data) * share)])
        for size in (None, 64):
            with pytest.raises(UnreadableImage) as raised:
                decode_file(cut, size=size)
            assert raised.value.reason == "decode_failed" and str(cut) in str(raised.value), (share, size)
            with pytest.raises(UnreadableImage) as raised:
                decode_bytes(cut.read_bytes(), "row 3", size=size)
            assert raised.value.reason == "decode_failed" and str(raised.value).startswith("row 3: ")


def test_dicom_without_image_is_rejected(pydicom_test_files):
    with pytest.raises(UnreadableImage) as raised:
        decode_file(pydicom_test_files / "rtplan.dcm")
    assert raised.value.reason == "no_pixel_data"


def test_compressed_dicom_decodes_like_the_uncompressed_original(pydicom_test_files):
    plain = decode_file(pydicom_test_files / "MR_small.dcm").pixels
    rle = decode_file(pydicom_test_files / "MR_small_RLE.dcm").pixels
    jpeg2000 = decode_file(pydicom_test_files / "MR_small_jp2klossless.dcm").pixels
    assert np.array_equal(plain, rle) and np.array_equal(plain, jpeg2000)


def test_monochrome1_is_inverted_after_windowing(tmp_path, pydicom_test_files):
    """The same stored values shown as MONOCHROME1 come out as the inverse of MONOCHROME2."""
    dataset = pydicom.dcmread(pydicom_test_files / "MR_small.dcm")
    dataset.save_as(tmp_path / "mono2.dcm")
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "mono1.dcm")
    mono2 = decode_file(tmp_path / "mono2.dcm").pixels.astype(int)
    mono1 = decode_file(tmp_path / "mono1.dcm").pixels.astype(int)
    assert np.array_equal(mono1, 255 - mono2)


def test_window_clips_values_outside_it(tmp_path, pydicom_test_files):
    dataset = pydicom.dcmread(pydicom_test_files / "MR_small.dcm")
    values = dataset.pixel_array
    low, high = np.percentile(values, 25), np.percentile(values, 75)
    dataset.WindowCenter, dataset.WindowWidth = float((low + high) / 2), float(high - low)
    dataset.save_as(tmp_path / "windowed.dcm")
    pixels = decode_file(tmp_path / "windowed.dcm").pixels
    assert (pixels == 0).mean() > 0.2 and (pixels == 255).mean() > 0.2  # the tails are clipped to black and white


def test_text_file_named_dcm_is_not_dicom(tmp_path):
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is not an image\n" * 20)
    with pytest.raises(UnreadableImage) as raised:
        decode_file(fake)
    assert raised.value.reason == "not_dicom"


def test_empty_png_is_empty_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(UnreadableImage) as raised:
        decode_file(empty)
    assert raised.value.reason == "empty_file"


def test_16_bit_png_is_stretched_to_8_bit(tmp_path):
    ramp = np.tile(np.linspace(1000, 5000, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = decode_file(tmp_path / "ramp.png").pixels
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255


def test_blank_image_is_rejected(tmp_path):
    from pipeline.imaging import stored_film

    Image.fromarray(np.full((64, 64), 77, dtype=np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(UnreadableImage) as raised:
        stored_film(decode_file(tmp_path / "flat.png").film, 32, "none", "flat.png")
    assert raised.value.reason == "blank_image" and "flat.png: image is blank" in str(raised.value)


def test_blank_is_judged_on_the_pixels_the_model_sees_not_on_the_decoded_film():
    """A flat exposure under detector noise varies at full resolution (its deviation is several grey levels) but
    is a flat grey at the stored size: refused. A film with anatomy is kept at any noise; with data.crop center,
    a film whose structure lies only outside the central square is blank to the model, and refused."""
    from pipeline.imaging import MIN_STD, grey_mean_std, resize, stored_film

    rng = np.random.default_rng(5)
    noisy_flat = np.clip(128 + rng.normal(0, 3, (512, 512)), 0, 255).astype(np.uint8)
    assert grey_mean_std(noisy_flat)[1] > 2 * MIN_STD  # the decoded film is not flat
    with pytest.raises(UnreadableImage, match="blank"):
        stored_film(noisy_flat, 64, "none", "noisy.png")
    assert grey_mean_std(resize(noisy_flat, 64))[1] < MIN_STD  # because the stored one is

    film = noisy_flat.copy()
    film[:, 200:312] = 40  # a dark band through the middle: structure the resize keeps
    assert stored_film(film, 64, "none", "band.png").pixels.shape == (64, 64)
    assert stored_film(film, 64, "center", "band.png").std >= MIN_STD

    wide = np.clip(128 + rng.normal(0, 3, (512, 1024)), 0, 255).astype(np.uint8)
    wide[:, :100] = 30  # anatomy only outside the central 512 x 512 square
    kept = stored_film(wide, 64, "none", "wide.png")
    assert (kept.mean, kept.std) == grey_mean_std(kept.pixels) and kept.std >= MIN_STD
    with pytest.raises(UnreadableImage, match="blank"):
        stored_film(wide, 64, "center", "wide.png")


def test_resize_and_hash(tmp_path):
    image = (np.arange(100 * 80) % 251).astype(np.uint8).reshape(100, 80)
    assert resize(image, 32).shape == (32, 32) and resize(image, 32).dtype == np.uint8
    for shape in ((100, 80), (20, 12)):  # shrinking and enlarging: a flat image stays flat, at its grey level
        assert np.array_equal(resize(np.full(shape, 77, dtype=np.uint8), 32), np.full((32, 32), 77, dtype=np.uint8))
    # pixel_sha256 hashes the pixels and their shape (its docstring): not the memory layout, not the file's bytes.
    assert pixel_sha256(image) == pixel_sha256(np.asfortranarray(image))
    Image.fromarray(image).save(tmp_path / "film.png")
    assert pixel_sha256(image) == pixel_sha256(decode_file(tmp_path / "film.png").pixels)  # re-encoded, still matches
    assert pixel_sha256(image) != pixel_sha256(image.T)
    same_bytes = image.reshape(80, 100)
    assert same_bytes.tobytes() == image.tobytes() and pixel_sha256(same_bytes) != pixel_sha256(image)


def test_grey_std_from_the_histogram_equals_numpy():
    from pipeline.imaging import grey_mean_std

    rng = np.random.default_rng(0)
    for shape in ((17, 23), (512, 384)):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        assert grey_mean_std(pixels)[1] == pytest.approx(float(pixels.std()), abs=1e-9)
    assert grey_mean_std(np.full((32, 32), 200, dtype=np.uint8))[1] == 0.0
    wide = rng.normal(size=(8, 8))  # not 8-bit: numpy's own
    assert grey_mean_std(wide)[1] == pytest.approx(float(wide.std()))


def test_a_stored_films_mean_and_deviation_from_its_histogram_equal_numpys_and_the_exact_values():
    """grey_mean_std gives the manifest's mean_intensity and std_intensity of every stored film: they must be the
    values numpy gives, and where numpy's float sums round, the exact ones (computed here in fractions)."""
    import math
    from fractions import Fraction

    from pipeline.imaging import grey_mean_std

    rng = np.random.default_rng(3)
    films = [rng.integers(0, 256, (64, 64), dtype=np.uint8), rng.integers(0, 256, (7, 300), dtype=np.uint8),
             np.full((64, 64), 255, dtype=np.uint8), np.zeros((1, 1), dtype=np.uint8),
             np.where(rng.random((512, 512)) < 1e-5, 255, 254).astype(np.uint8)]  # a deviation far below the mean
    for film in films:
        mean, std = grey_mean_std(film)
        assert mean == pytest.approx(float(film.mean()), abs=1e-12)
        assert std == pytest.approx(float(film.std()), abs=1e-9)
        values = [int(v) for v in film.ravel()]
        exact_mean = Fraction(sum(values), len(values))
        exact_variance = sum((v - exact_mean) ** 2 for v in values) / len(values)
        assert mean == float(exact_mean) and std == pytest.approx(math.sqrt(exact_variance), rel=1e-15, abs=0)
    assert grey_mean_std(np.array([[0.5, 1.5]])) == (1.0, 0.5)  # not 8-bit: numpy's own


@pytest.mark.parametrize("age, band", [
    ("017Y", "0-17"), ("018Y", "18-39"), ("039Y", "18-39"), ("040Y", "40-64"), ("064Y", "40-64"), ("065Y", "65-89"),
    ("089Y", "65-89"), ("090Y", "90+"), ("112Y", "90+"), ("000D", "0-17"), ("006M", "0-17"), ("010D", "0-17"),
    ("002W", "0-17"), ("215M", "0-17"), ("216M", "18-39"),  # 216 months are 18 years
    ("45Y", ""), ("045", ""), ("04 Y", ""), ("045X", ""), ("-45Y", ""), ("", ""), (None, ""),
])
def test_patient_age_becomes_only_its_band_and_odd_ages_are_unknown(age, band):
    from pipeline.imaging import age_band

    assert age_band(age) == band


def test_sex_and_age_band_come_from_the_header_and_odd_values_are_unknown(tmp_path, pydicom_test_files):
    dataset = pydicom.dcmread(pydicom_test_files / "MR_small.dcm")
    dataset.PatientSex, dataset.PatientAge = "F", "047Y"
    dataset.save_as(tmp_path / "known.dcm")
    with pytest.warns(UserWarning, match="Invalid value"):  # pydicom warns, and writes them as a scanner might
        dataset.PatientSex, dataset.PatientAge = "female", "47 years"
    dataset.save_as(tmp_path / "odd.dcm")
    del dataset.PatientSex, dataset.PatientAge
    dataset.save_as(tmp_path / "absent.dcm")
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(tmp_path / "film.png")

    known = decode_file(tmp_path / "known.dcm")
    assert (known.sex, known.age_band) == ("F", "40-64")
    for name in ("odd.dcm", "absent.dcm", "film.png"):
        image = decode_file(tmp_path / name)
        assert (image.sex, image.age_band) == ("", ""), name


@pytest.mark.parametrize("crop", ["none", "center"])
def test_a_film_kept_as_pillow_decoded_it_resizes_exactly_as_its_array(tmp_path, crop):
    """A JPEG or 8-bit PNG's film stays the Pillow image its decoder made (no full-size copy); every stored or
    served film goes through resize, which must give the same pixels as from the array `pixels` copies out."""
    from pipeline.imaging import decode_file, resize

    rng = np.random.default_rng(3)
    for shape, name in (((301, 517), "wide.jpg"), ((517, 301), "tall.png"), ((40, 40), "small.jpg")):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert("RGB").save(tmp_path / name)
        decoded = decode_file(tmp_path / name, size=16)
        assert isinstance(decoded.film, Image.Image) and decoded.film.mode == "L"
        assert np.array_equal(decoded.pixels, np.asarray(decoded.film))
        assert (decoded.height, decoded.width) == shape  # the film's own size, however far it was decoded down
        for size in (16, 40):
            assert np.array_equal(resize(decoded.film, size, crop), resize(decoded.pixels, size, crop))


def test_read_film_reads_every_byte_whatever_the_stat_said_and_refuses_what_is_not_a_file(tmp_path):
    """Ingest reads each film once, whole, before hashing and decoding it. The read must end at the file's end, not
    at the size its stat gave (a film still being written is longer: /proc's files say 0 bytes and hold text), and
    must never wait on a FIFO swapped in for a film after listing, nor read a folder or a device."""
    import faulthandler
    import os
    from pathlib import Path

    from pipeline.imaging import READ_CHUNK_BYTES, read_film

    film = tmp_path / "film.png"
    content = np.random.default_rng(0).integers(0, 256, 2 * READ_CHUNK_BYTES + 5, dtype=np.uint8).tobytes()
    film.write_bytes(content)
    assert read_film(film) == content
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_film(tmp_path / "empty.png") == b""
    status = Path("/proc/self/status")
    if status.is_file():
        assert status.stat().st_size == 0
        assert read_film(status).startswith(b"Name:") and b"\nPid:" in read_film(status)

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    faulthandler.dump_traceback_later(60, exit=True)  # a FIFO opened for a blocking read would wait for ever
    try:
        for odd in ("pipe.png", "folder.png", "gone.png", "film.png/inside.png"):
            with pytest.raises(UnreadableImage, match="no such file") as refused:
                read_film(tmp_path / odd)
            assert refused.value.reason == "missing_file" and str(tmp_path / odd) in str(refused.value)
        if Path("/dev/zero").exists():  # a device never ends: it must not be read at all
            with pytest.raises(UnreadableImage, match="no such file"):
                read_film(Path("/dev/zero"))
    finally:
        faulthandler.cancel_dump_traceback_later()
