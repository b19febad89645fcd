"""Decoding DICOM, PNG and JPEG films into 8-bit grey arrays, and the resize every image goes through.

Ingest and predict both call `decode_file` and `resize`, and the served model `decode_bytes` (both run `_decode`),
each with the size it stores or classifies at, so a model sees exactly the same preprocessing at prediction time as
in training.

Given that size, a film is decoded only at the resolution kept (never below `REDUCED_MARGIN`, 4, times the size):
a JPEG through libjpeg's DCT-domain scaling (Pillow's `draft`, 1/2 to 1/8), a JPEG 2000 DICOM through OpenJPEG's
resolution levels, then the same antialiased resize. A 2000 px film stored at 64 px need not be decoded at 2000 px.
zlib has no reduced decode, so an 8-bit PNG is decoded in full and then averaged down by the same factors (box
means), which spares the resize most of its work. A JPEG opens without Pillow's parse of its EXIF for DPI
(pipeline.film_jpeg), which nothing here reads.

`data.crop` says how a film that is not square becomes a square: `none` squeezes the whole film, `center` first
crops its central square (side = the short edge), as MedMNIST made its 28 px images. The reduced decode keeps the
short edge at REDUCED_MARGIN times the size, so the cropped square keeps that margin on both sides.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import Crop
from pipeline.deid import NO_IDENTITY, Identity, identity_of
from pipeline.errors import CxrError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | PNG_SUFFIXES | JPEG_SUFFIXES

MIN_SIDE = 16  # smaller films cannot carry a diagnosis and are quarantined
MIN_STD = 1.0  # stored pixels flatter than this (standard deviation, in 0..255) are blank
# A reduced decode keeps both sides at least this many times the stored size, so the resize still averages several
# decoded pixels into each stored one. At 2, real Kermany films at 64 px differ from the full decode by up to 2 grey
# levels on average (non-square films are squashed, so one side is reduced further than its margin); at 4, under 1.
# The margin holds for the short edge, so with data.crop center the cropped square keeps it on both sides.
REDUCED_MARGIN = 4
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
READ_CHUNK_BYTES = 1 << 20  # read_film's reads after the first, of a file that grew since its stat
J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}  # JPEG 2000 lossless only / lossy


class UnreadableImage(CxrError):
    """A file that cannot be used as an image; `reason` is a short code for quarantine.csv.

    `identity` carries the pseudonyms of identifiers read from a header before decoding failed, so the
    caller can redact them from anything it writes about the file.
    """

    def __init__(self, reason: str, message: str, identity: Identity = NO_IDENTITY) -> None:
        super().__init__(message)
        self.reason = reason
        self.identity = identity


@dataclass(frozen=True)
class DecodeLimits:
    """What a film's header may declare (data.max_pixels, data.max_frames; these defaults are theirs). A header
    costs nothing to forge and can ask for gigabytes, so it is checked before a single pixel is decoded."""

    max_pixels: int = 50_000_000  # one frame's width x height
    max_frames: int = 1  # a DICOM's NumberOfFrames

    def check(self, width: int, height: int, frames: int, name: str, identity: Identity = NO_IDENTITY) -> None:
        """Raise UnreadableImage (too_large, too_many_frames) when the declared size is over a limit."""
        if width * height > self.max_pixels:
            raise UnreadableImage("too_large", f"{name}: the header declares {width}x{height} px, above data.max_pixels "
                                  f"({self.max_pixels:,}); not decoded", identity)
        if frames > self.max_frames:
            raise UnreadableImage("too_many_frames", f"{name}: the header declares {frames} frames, above data.max_frames "
                                  f"({self.max_frames}); not decoded (a chest film is one frame; a higher limit keeps the first)", identity)


def limits_of(data) -> DecodeLimits:  # data: pipeline.config.DataConfig
    """The decode limits a project's params set."""
    return DecodeLimits(max_pixels=data.max_pixels, max_frames=data.max_frames)


@dataclass(frozen=True)
class DecodedImage:
    """A film as 8-bit grey pixels, plus the few header fields we keep. The pixels are at the film's own size, or,
    when a stored size was asked for, at a reduced scale (`width` and `height` stay the film's own).

    `film` is a numpy array (DICOM, 16-bit PNG) or the Pillow "L" image a JPEG or 8-bit PNG decodes to, kept as
    Pillow made it: `resize(image.film, ...)` shrinks it with no full-size copy (copying a reduced film to numpy
    and back cost ingest about 0.4 ms of a real film's 6.6). `pixels` is the film as an array, copied when asked.

    `identity` holds keyed pseudonyms of the header's identifying values (pipeline.deid.Identity); the raw
    values never leave the function that read them.
    """

    film: Any  # np.ndarray (uint8, 2-D) or PIL.Image.Image (mode L)
    format: str
    modality: str = ""
    photometric: str = ""
    view: str = ""
    body_part: str = ""
    sex: str = ""  # M, F, O or "" (unknown)
    age_band: str = ""  # one of AGE_BANDS or "" (unknown); the age itself is never kept
    bits_stored: int = 8
    identity: Identity = NO_IDENTITY
    colour: bool = False  # the original held colour (channels that differ), not grey stored as RGB
    frames: int = 1  # a DICOM's NumberOfFrames (only the first is decoded)
    full_size: tuple[int, int] | None = None  # (width, height) in the file when `film` is a reduced decode

    @cached_property
    def pixels(self) -> np.ndarray:
        """The film as a uint8 array (2-D)."""
        return self.film if isinstance(self.film, np.ndarray) else np.asarray(self.film, dtype=np.uint8)

    @property
    def height(self) -> int:
        return int(self.full_size[1] if self.full_size else film_shape(self.film)[0])

    @property
    def width(self) -> int:
        return int(self.full_size[0] if self.full_size else film_shape(self.film)[1])


def film_shape(film) -> tuple[int, int]:  # film: np.ndarray or PIL.Image.Image
    """(height, width) of a grey film, an array or a Pillow image."""
    return (film.shape[0], film.shape[1]) if isinstance(film, np.ndarray) else (film.height, film.width)


def _grey_image(film):  # film: np.ndarray or PIL.Image.Image -> PIL.Image.Image
    """A grey film as a Pillow "L" image: a Pillow film as it is, an array mapped without a copy (when it is
    contiguous uint8, as decoded films are)."""
    from PIL import Image

    if isinstance(film, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(film, dtype=np.uint8), mode="L")
    return film


def decode_file(path: Path, key: bytes | None = None, limits: DecodeLimits = DecodeLimits(),
                size: int | None = None) -> DecodedImage:
    """Decode one film, or raise UnreadableImage with a reason code and a message naming the file. A film whose
    header declares more than `limits` is refused before decoding.

    With the de-identification `key`, a DICOM's identity comes back as pseudonyms; without it (prediction), none.
    With `size` (the side it will be resized to), it may be decoded at a reduced scale (see the module's docstring).
    The file is read once, whole: every decoder then works on its bytes in memory.
    """
    return decode_content(read_film(path), path, key, limits, size)


def read_film(path: Path) -> bytes:
    """A film file's bytes, read once and whole (ingest hashes them and decodes them from memory), or
    UnreadableImage (missing_file, unreadable_file) naming the file; an empty file is decode_content's to refuse.

    Read with the os module's calls on the file's descriptor, not Path.read_bytes: its buffered reader costs about
    25 µs more a film here (half a percent of a film's ingest). Opened without waiting (O_NONBLOCK), then judged by
    its own stat: a FIFO swapped in after listing would otherwise block the read for ever, and a folder or a device
    is no film either. Read to the end of the file, not to the size its stat gave: a film still being written is
    longer, and a network file system may return less in one read."""
    try:
        handle = os.open(path, READ_FLAGS)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UnreadableImage("missing_file", f"{path}: no such file") from None
    except OSError as exc:  # e.g. no read permission
        raise UnreadableImage("unreadable_file", f"{path}: could not be read ({exc.strerror or type(exc).__name__})") from None
    try:
        found = os.fstat(handle)
        if not stat.S_ISREG(found.st_mode):
            raise UnreadableImage("missing_file", f"{path}: no such file")
        parts = [os.read(handle, found.st_size + 1)]  # the whole file in one read, one byte over to see it grew
        while parts[-1]:
            parts.append(os.read(handle, READ_CHUNK_BYTES))
    except OSError as exc:  # e.g. an I/O error on a failing disk
        raise UnreadableImage("unreadable_file", f"{path}: could not be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(handle)
    return parts[0] if len(parts) == 2 else b"".join(parts)


def decode_content(data: bytes, path: Path, key: bytes | None = None, limits: DecodeLimits = DecodeLimits(),
                   size: int | None = None) -> DecodedImage:
    """Decode the bytes `read_film` read from `path` exactly as decode_file decodes the file (the format from the
    magic bytes, else the file's suffix); `path` names the film in messages."""
    if not data:
        raise UnreadableImage("empty_file", f"{path}: the file is empty (0 bytes)")
    return _decode(data, format_of_head(data[:132]) or _format_of_suffix(path), str(path), key, limits, size)


def decode_bytes(data: bytes, name: str, key: bytes | None = None, limits: DecodeLimits = DecodeLimits(),
                 size: int | None = None) -> DecodedImage:
    """Decode a film's file content (a served request's bytes) exactly as `decode_file` decodes the file; `name`
    stands for the file in messages. The format comes from the magic bytes; without any, DICOM is tried."""
    if not data:
        raise UnreadableImage("empty_file", f"{name}: the content is empty (0 bytes)")
    return _decode(data, format_of_head(data[:132]) or "dicom", name, key, limits, size)


def _decode(source: Path | bytes, kind: str, name: str, key: bytes | None, limits: DecodeLimits,
            size: int | None = None) -> DecodedImage:
    """The one decoder behind decode_file and decode_bytes: `source` is a file or its content; `size`, when given,
    the stored side the pixels may be decoded down towards (never below REDUCED_MARGIN times it)."""
    if kind == "dicom":
        image = _decode_dicom(source, name, key, limits, size)
    elif kind in ("png", "jpeg"):
        image = _decode_pillow(source, name, kind, limits, size)
    else:
        raise UnreadableImage("unsupported_format", f"{name}: not a DICOM, PNG or JPEG file")
    check_size((image.height, image.width), name, image.identity)
    return image


def _readable(source: Path | bytes):  # -> Path | BinaryIO
    """What pydicom and Pillow open: the file itself, or a fresh in-memory file over the content."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def looks_like_image(path: Path) -> bool:
    """For scanning folders: a known image suffix, or DICOM's magic bytes (PACS exports often have no suffix)."""
    if path.suffix.lower() in (IMAGE_SUFFIXES - {""}):
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def detect_format(path: Path) -> str:
    """Pick the decoder from the file's magic bytes, falling back to its suffix."""
    with path.open("rb") as handle:
        kind = format_of_head(handle.read(132))
    return kind or _format_of_suffix(path)


def _format_of_suffix(path: Path) -> str:
    """The decoder a file's suffix names, for files whose first bytes do not say."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"  # DICOM without the 128-byte preamble: the decoder checks it really is one
    if suffix in PNG_SUFFIXES:
        return "png"
    if suffix in JPEG_SUFFIXES:
        return "jpeg"
    return "unknown"


def format_of_head(head: bytes) -> str:
    """dicom, png or jpeg from a file's first 132 bytes; "" when they do not say."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    return ""


def check_size(shape: tuple[int, int], name: str, identity: Identity = NO_IDENTITY) -> None:
    """Reject a film too small to be a radiograph, by its own (height, width): a film is judged by its size, not by
    the scale it was decoded at. `identity`, the header's, goes with the refusal (see stored_film)."""
    height, width = shape
    if min(height, width) < MIN_SIDE:
        raise UnreadableImage("too_small", f"{name}: image is {width}x{height} px, below {MIN_SIDE} px", identity)


class StoredFilm(NamedTuple):
    """The pixels a model sees (size x size, uint8) and their mean and standard deviation in grey levels: the
    manifest's mean_intensity and std_intensity, and the deviation the blank check judged."""

    pixels: np.ndarray
    mean: float
    std: float


def stored_film(film, size: int, crop: Crop, name: str,  # film: np.ndarray or PIL.Image.Image (L)
                identity: Identity = NO_IDENTITY) -> StoredFilm:
    """What a model sees of a decoded film: `resize`d (and cropped), refused as blank when those pixels are flat
    (standard deviation under MIN_STD grey levels). Ingest, `cxr predict` and the served model all make their
    pixels here.

    Blank is judged on the stored pixels, not the decoded film: a flat exposure under detector noise varies at
    full resolution but is a flat grey to the model, and ingest's manifest records this very deviation
    (std_intensity), so no stored film is flatter than the check allows. It costs a histogram of size² pixels,
    where judging the decoded film sampled a sixteenth of a few hundred thousand.

    `identity` (the header's pseudonyms) goes with the refusal: a patient whose only film is refused is named by
    nothing else in the run, and the caller redacts the film's path and message by it.
    """
    pixels = resize(film, size, crop)
    mean, std = grey_mean_std(pixels)
    if std < MIN_STD:
        raise UnreadableImage("blank_image", f"{name}: image is blank (all pixels nearly the same value)", identity)
    return StoredFilm(pixels, mean, std)


GREY_POWERS = np.arange(256, dtype=np.int64)[:, None] ** np.arange(3)  # each grey level to the powers 0, 1, 2


def grey_mean_std(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a uint8 image (a stored film), from its histogram by np.bincount ((0, 0) for
    an empty one). Other dtypes are left to numpy.

    pixels.mean() and pixels.std() to within 1e-13, at under half their cost: numpy's std makes float64 copies of
    every pixel and runs several reductions, and ingest computes both for every film it stores (on a small film,
    several percent of its decode). Exact until the last step: the count, the sum of the levels and the sum of
    their squares are whole numbers (in int64 up to 10^14 pixels), made by one product with GREY_POWERS, and the
    variance (n * sum of squares - sum^2) / n^2 is computed in Python's integers and rounded once, with no
    cancellation to lose digits to.
    """
    if pixels.dtype != np.uint8:
        return float(pixels.mean()), float(pixels.std())
    total, first, second = (np.bincount(pixels.ravel(), minlength=256) @ GREY_POWERS).tolist()
    if not total:
        return 0.0, 0.0
    return first / total, math.sqrt((total * second - first * first) / (total * total))


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch any numeric array to 0..255 by its own range (a constant array becomes zeros)."""
    values = values.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def resize(film, size: int, crop: Crop = "none") -> np.ndarray:  # film: np.ndarray or PIL.Image.Image (L)
    """Square `size`×`size` uint8 image, antialiased (Pillow's bilinear filter widens when shrinking). With `crop`
    `center`, only the film's central square (side = its short edge) is kept first; `none` squeezes the whole film.
    Ingest, `cxr predict` and the served model all end here, with a DecodedImage's `film`, so training and serving
    stay identical; an array and the same pixels as a Pillow image give the same result."""
    from PIL import Image

    image = _grey_image(film)
    if crop == "center":
        image = image.crop(center_box(image.height, image.width))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def center_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a film's central square, its side the short edge (an odd surplus leaves the
    extra row or column at the end)."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def center_square(pixels: np.ndarray) -> np.ndarray:
    """The central square of a 2-D image (center_box); a square image is returned as it is."""
    left, top, right, bottom = center_box(*pixels.shape[:2])
    return pixels[top:bottom, left:right]


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hash of the pixels and their shape (ingest's duplicate key, of the stored film): the same film re-encoded
    still matches."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(_layout_prefix(pixels.shape, pixels.dtype))
    digest.update(pixels)  # hashlib reads a C-contiguous array's buffer in place: no copy
    return digest.hexdigest()


@lru_cache(maxsize=16)
def _layout_prefix(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """What pixel_sha256 hashes before the pixels, made once per shape: formatting a shape and a dtype costs as much
    as hashing a 64 px film's 4 KB, and ingest hashes every film it stores."""
    return f"{shape}|{dtype}".encode()


def _decode_pillow(source: Path | bytes, name: str, kind: str, limits: DecodeLimits, size: int | None = None) -> DecodedImage:
    """Only Pillow's plug-in for `kind` may open the file (never EPS through Ghostscript, or any other); its size is
    read from the header (opening decodes nothing) and checked before load(). With `size`, a JPEG is decoded
    by libjpeg's DCT-domain scaling (`draft`: 1/2, 1/4 or 1/8) to no less than REDUCED_MARGIN times it, and an
    8-bit PNG's grey film is averaged down by the factor `draft` would take (`_box_reduced`)."""
    from PIL import Image, UnidentifiedImageError

    # Pillow's own decompression-bomb check (at a PNG's open; a JPEG opens without it) agrees with ours: it refuses
    # what declares over twice the limit, and only warns between once and twice, where limits.check below refuses
    # it, naming its size.
    # Pillow's limit is process-wide: it is restored after the open, so a small data.max_pixels never refuses the
    # overlays, thumbnails and captures that other code in this process draws with Pillow.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_pillow(_readable(source), kind)
    except Image.DecompressionBombError:
        raise UnreadableImage("too_large", f"{name}: the header declares over twice data.max_pixels ({limits.max_pixels:,}) "
                              "px; not decoded") from None
    except UnidentifiedImageError:
        raise UnreadableImage("not_an_image", f"{name}: not a readable {kind.upper()} image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage("decode_failed", f"{name}: {kind.upper()} data could not be decoded ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    try:  # not `with image`: a JPEG or 8-bit grey PNG's film is this very image, which closing would empty
        limits.check(*image.size, 1, name)  # Pillow decodes only the first frame of an animated PNG
        full_size = image.size
        if isinstance(source, bytes):
            # The content is in memory already: hand it to the decoder in one piece, not in Pillow's 64 KB reads
            # (each a decode call, where libjpeg suspends and resumes mid-scan): about 1% of a JPEG's decode.
            image.decodermaxblock = max(len(source), image.decodermaxblock)
        if size and kind == "jpeg":
            image.draft(image.mode, (REDUCED_MARGIN * size, REDUCED_MARGIN * size))
        image.load()  # closes a file Pillow opened; the bytes' in-memory file needs no closing
        wide = image.mode in ("I;16", "I;16B", "I;16L", "I", "F")
        colour = image.mode not in ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F") and _has_colour_image(image)
        if wide:  # stretched by its own range, so decoded in full (an average would move its extremes)
            film = to_uint8(np.asarray(image, dtype=np.float32))
        else:
            film = image if image.mode == "L" else image.convert("L")
            if size and kind == "png":
                film = _box_reduced(film, REDUCED_MARGIN * size)
    except (OSError, ValueError, SyntaxError) as exc:
        image.close()
        raise UnreadableImage("decode_failed", f"{name}: {kind.upper()} data could not be decoded ({exc})") from None
    except BaseException:  # too large for data.max_pixels, or an interrupt
        image.close()
        raise
    if film is not image:
        image.close()
    decoded_size = film_shape(film)[::-1]
    return DecodedImage(film=film, format=kind, bits_stored=16 if wide else 8, colour=colour,
                        full_size=full_size if full_size != decoded_size else None)


def _open_pillow(readable, kind: str):  # readable: Path | BinaryIO -> PIL.Image.Image
    """`readable` opened by Pillow's plug-in for `kind` alone (the header read, nothing decoded). A JPEG opens
    through FilmJpeg, which skips the EXIF parse for DPI: as Pillow's own open, it names what is not a JPEG
    UnidentifiedImageError, but leaves the declared size to limits.check rather than Pillow's bomb check."""
    from PIL import Image, UnidentifiedImageError

    if kind != "jpeg":
        return Image.open(readable, formats=[kind.upper()])
    from pipeline.film_jpeg import FilmJpeg

    try:
        return FilmJpeg(readable)
    except SyntaxError as exc:
        raise UnidentifiedImageError(f"not a JPEG file ({exc})") from None


def _box_reduced(grey, side: int):  # grey: PIL.Image.Image (L) -> PIL.Image.Image
    """`grey` averaged down by 8, 4 or 2 (Pillow's `reduce`: the mean of each block), the largest that keeps both
    sides at least `side` (the factor libjpeg's `draft` takes for a JPEG), or as it is. Why: zlib has no reduced
    decode, but the antialiased resize from a 1024 px PNG to 64 px costs about four times the box means and the
    resize from a quarter of the pixels together. At 64 px the result is as near the direct resize as a JPEG's DCT
    scaling by the same factor: the real Kermany films saved as PNG differ by 0.35 grey levels on average, 0.99 at
    most (their JPEG draft decodes: 0.99 at most)."""
    scale = min(grey.width // side, grey.height // side)
    factor = next((factor for factor in (8, 4, 2) if factor <= scale), 1)
    return grey.reduce(factor) if factor > 1 else grey


def _check_dicom_size(source: Path | bytes, name: str, key: bytes | None, limits: DecodeLimits) -> None:
    """Rows x Columns and NumberOfFrames from the header alone (stop_before_pixels: the pixel data is not even
    read), checked against `limits` before the file is read whole and decoded."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(_readable(source), stop_before_pixels=True, force=True)
        declared = [int(header.get(keyword, default) or default) for keyword, default in
                    (("Columns", 0), ("Rows", 0), ("NumberOfFrames", 1))]
    except Exception:  # not DICOM, or a damaged header: the full read says which
        return
    try:
        identity = _header_fields(header, key)["identity"]  # pseudonyms, for the caller to redact what it writes
    except Exception:  # a damaged identifying element: the message names no header value anyway
        identity = NO_IDENTITY
    limits.check(*declared, name, identity)


def _decode_dicom(source: Path | bytes, name: str, key: bytes | None, limits: DecodeLimits,
                  size: int | None = None) -> DecodedImage:
    """Stored values → Modality LUT → VOI LUT (window) → MONOCHROME1 inversion → 0..255, as the standard orders them;
    with `size`, a JPEG 2000 film's stored values come from a reduced resolution level (`_reduced_j2k`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_dicom_size(source, name, key, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(_readable(source))
    except InvalidDicomError:
        dataset = _read_dicom_without_preamble(source, name)
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise UnreadableImage("unreadable_dicom", f"{name}: DICOM header could not be read ({_first_line(exc)})") from None
    try:
        header = _header_fields(dataset, key)
    except Exception as exc:  # pydicom converts values lazily: a damaged element fails only when read
        raise UnreadableImage("unreadable_dicom", f"{name}: DICOM header could not be read ({_first_line(exc)})") from None
    identity = header["identity"]
    if "PixelData" not in dataset:
        raise UnreadableImage("no_pixel_data", f"{name}: DICOM file holds no image (no PixelData)", identity)
    try:
        pixels, colour = _dicom_to_grey(dataset, header["photometric"], size)
        colour = colour or header["photometric"] == "PALETTE COLOR"  # grey indices into a colour table
    except Exception as exc:  # truncated data, unsupported compression, odd LUTs, ...
        message = f"{name}: DICOM pixel data could not be decoded ({_first_line(exc)})"
        raise UnreadableImage("decode_failed", message, identity) from None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    declared = (int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0))
    full_size = declared if pixels.shape != declared[::-1] and min(declared) > 0 else None
    return DecodedImage(film=pixels, format="dicom", colour=colour, frames=frames, full_size=full_size, **header)


def read_identity(path: Path, key: bytes) -> Identity:
    """A DICOM's identity, as pseudonyms, from its header alone (films served from the decode cache)."""
    if detect_format(path) != "dicom":
        return NO_IDENTITY
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _header_fields(pydicom.dcmread(path, stop_before_pixels=True, force=True), key)["identity"]
    except Exception:
        return NO_IDENTITY


# Header values that identify a patient or a study: pseudonymised where they are read, kept nowhere.
PHI_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber", "InstitutionName",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _header_fields(dataset, key: bytes | None) -> dict:  # dataset: pydicom.Dataset
    """The technical fields the manifest keeps, plus the header's identity as pseudonyms (none without a key)."""
    identity = NO_IDENTITY
    if key is not None:
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        identity = identity_of(patient_id or None, [value for keyword in PHI_KEYWORDS
                                                    for value in _values(dataset.get(keyword, ""))], key)
    return {
        "modality": str(dataset.get("Modality", "") or ""),
        "photometric": str(dataset.get("PhotometricInterpretation", "") or "").upper(),
        "view": str(dataset.get("ViewPosition", "") or "").upper(),
        "body_part": str(dataset.get("BodyPartExamined", "") or "").upper(),
        "sex": patient_sex(dataset.get("PatientSex", "")),
        "age_band": age_band(dataset.get("PatientAge", "")),
        "bits_stored": int(dataset.get("BitsStored", 8) or 8),
        "identity": identity,
    }


def _values(value) -> list[str]:
    """A header element's values as text: one, or each of a multi-valued one (OtherPatientIDs "A\\B")."""
    values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [text for each in values if (text := str(each or "").strip())]


AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-64"), (65, "65-89"), (90, "90+"))  # (lowest age in years, band)
AGE_UNITS = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}  # DICOM AS units per year


def patient_sex(value) -> str:
    """DICOM PatientSex as M, F or O; anything else (absent, empty, odd) is unknown ("")."""
    text = str(value or "").strip().upper()
    return text if text in ("M", "F", "O") else ""


def age_band(value) -> str:
    """DICOM PatientAge ("045Y", "006M", "010D", "002W": three digits and a unit) as its band, "" when absent or
    malformed. Only the band leaves this function: an exact age is identifying, a band of decades is not, and
    ages of 90 and over are one band (as HIPAA's Safe Harbor asks). Never derived from PatientBirthDate."""
    text = str(value or "").strip().upper()
    if len(text) != 4 or not (text[:3].isascii() and text[:3].isdigit()) or text[3] not in AGE_UNITS:
        return ""
    years = int(text[:3]) / AGE_UNITS[text[3]]
    return [band for lowest, band in AGE_BANDS if years >= lowest][-1]


def _dicom_to_grey(dataset, photometric: str, size: int | None = None) -> tuple[np.ndarray, bool]:  # dataset: pydicom.Dataset
    """Stored values to display grey levels, and whether they were colour; pydicom already returns colour data
    as RGB. The stored values are a reduced JPEG 2000 decode when `size` allows one, else pydicom's full decode."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = _reduced_frame(dataset, size) if size else None
    if values is None:
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            dataset.pixel_array_options(index=0)  # multi-frame (data.max_frames above 1): only the first frame is decoded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about harmless padding and VR quirks
            values = dataset.pixel_array
    if values.ndim == 3:
        grey = values[..., 0] * 0.299 + values[..., 1] * 0.587 + values[..., 2] * 0.114
        return to_uint8(grey), _has_colour(values)
    values = apply_modality_lut(values, dataset)
    values = apply_voi_lut(values, dataset, index=0)
    pixels = to_uint8(values)
    if photometric == "MONOCHROME1":  # inverted only after the VOI step, as the standard orders it
        pixels = 255 - pixels
    return pixels, False


def _reduced_frame(dataset, size: int) -> np.ndarray | None:  # dataset: pydicom.Dataset
    """A grey DICOM's stored values (first frame) decoded at a reduced scale; None where the full decode must be used.

    Only JPEG 2000 is reduced. A baseline JPEG DICOM could be (libjpeg's `draft`), but to_uint8 stretches a DICOM by
    its own range, and a reduced decode's extremes are averaged in: on the real RSNA film (0..255 in full, 6..242 at
    1/4) that moves every grey level by about 7; JPEG 2000's wavelet low-pass keeps them closer (see the tests).
    """
    syntax = str(getattr(dataset, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax not in J2K_SYNTAXES or int(dataset.get("SamplesPerPixel", 1) or 1) != 1 or "PixelData" not in dataset:
        return None
    return _reduced_j2k(dataset, size)


def _reduced_j2k(dataset, size: int) -> np.ndarray | None:  # dataset: pydicom.Dataset
    """A grey JPEG 2000 film's stored values (first frame) at the deepest resolution level that keeps both sides at
    least REDUCED_MARGIN × `size`; None where the full decode must be used (another transfer syntax, colour, over
    16 bits, a codestream whose sign or precision disagrees with the header, which pydicom corrects, or too small
    to reduce). At 64 px the real 1841x1955 CR film decodes at 1/4, 7 to 10 times as fast as in full.

    Pillow returns the values shifted up to fill its 8- or 16-bit mode, and signed ones offset by half the range
    (OpenJPEG's output, as pylibjpeg-openjpeg gives it to pydicom, is the stored values themselves): both undone here.
    """
    from pydicom.encaps import get_frame

    try:
        codestream = get_frame(dataset.PixelData, 0, number_of_frames=int(dataset.get("NumberOfFrames", 1) or 1))
    except Exception:  # damaged encapsulation: the full decode says what is wrong
        return None
    header = j2k_header(codestream)
    if header is None:
        return None
    width, height, components, precision, signed, levels = header
    if (components != 1 or precision > 16 or precision != int(dataset.get("BitsStored", precision) or precision)
            or signed != (int(dataset.get("PixelRepresentation", 0) or 0) == 1)):
        return None
    reduce = 0
    while reduce < levels and -(-min(width, height) // 2 ** (reduce + 1)) >= REDUCED_MARGIN * size:
        reduce += 1
    if reduce == 0:
        return None
    try:
        image = _load_j2k_level(codestream, reduce)
    except (OSError, ValueError, SyntaxError):  # e.g. a tile-part header with fewer levels: the full decode says
        return None
    container = 8 if image.mode == "L" else 16
    values = np.asarray(image).astype(np.int32) >> (container - precision)
    return values - (1 << (precision - 1)) if signed else values


def _load_j2k_level(codestream: bytes, reduce: int):  # -> PIL.Image.Image
    """A JPEG 2000 codestream decoded at resolution level `reduce` (each level halves both sides).

    Pillow's own `reduce` attribute rounds the reduced size to nearest (13.0: (1841 + 2) // 4 = 460) where OpenJPEG
    rounds up (461), and then refuses the tile as out of bounds; so the size and tile are set here, rounded up.
    """
    from PIL import Image, ImageFile

    image = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
    power = 2 ** reduce
    reduced = (-(-image.size[0] // power), -(-image.size[1] // power))
    codec, _, layers, fd, length = image.tile[0].args
    image._size = reduced
    image.tile = [ImageFile._Tile("jpeg2k", (0, 0, *reduced), 0, (codec, reduce, layers, fd, length))]
    ImageFile.ImageFile.load(image)
    return image


def j2k_header(codestream: bytes) -> tuple[int, int, int, int, bool, int] | None:
    """(width, height, components, precision, signed, decomposition levels) from a JPEG 2000 codestream's main
    header (SIZ, COD and any COC marker: the fewest levels count); None when it is not a codestream that says."""
    import struct

    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 42:
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", codestream[8:24])
    components = struct.unpack(">H", codestream[40:42])[0]
    ssiz = codestream[42]
    levels, position = None, 2
    while position + 4 <= len(codestream):
        marker, length = codestream[position + 1], struct.unpack(">H", codestream[position + 2:position + 4])[0]
        if marker == 0x90 or length < 2:  # the first tile: the main header is over
            break
        if marker == 0x52 and position + 13 <= len(codestream):  # COD: Scod, SGcod (4 bytes), then the levels
            levels = min(levels if levels is not None else 255, codestream[position + 9])
        elif marker == 0x53:  # COC: Ccoc (1 or 2 bytes by Csiz), Scoc, then the levels
            at = position + 4 + (1 if components < 257 else 2) + 1
            levels = min(levels if levels is not None else 255, codestream[at]) if at < len(codestream) else levels
        position += 2 + length
    if levels is None:
        return None
    return xsiz - x0, ysiz - y0, components, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels


COLOUR_SPREAD = 8.0  # mean (max - min channel) over the pixels, 0..255: above it the image holds colour


def _has_colour(rgb: np.ndarray) -> bool:
    """Colour, as opposed to a grey film stored as RGB (equal channels, or nearly so after JPEG compression)."""
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)  # no float copy of a full-size film (never negative)
    scale = 1.0 if rgb.dtype == np.uint8 else 255.0 / max(float(rgb.max()), 255.0)  # 16-bit colour: on the 8-bit scale
    return float(spread.mean()) * scale > COLOUR_SPREAD


COLOUR_BLOCK = 4  # _has_colour_image averages each 4 x 4 block of pixels first: 1/16 of the pixels to compare


def _has_colour_image(image) -> bool:  # image: PIL.Image.Image
    """_has_colour of a Pillow image, in Pillow's C loops (numpy's max and min over the last axis of 3 run several
    times slower than the JPEG decode of the same reduced film), on the image's 4 x 4 block means: a third of the
    cost (a tenth of the real Kermany JPEGs are stored RGB). Means, not one pixel per block: colour confined to the
    pixels between sampled ones would pass a sample, while a block's mean keeps it (diluted; a colour photograph's
    mean spread is several times COLOUR_SPREAD, a grey film's near 0)."""
    from PIL import ImageChops, ImageStat

    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image
    red, green, blue = rgb.reduce(COLOUR_BLOCK).split()
    high = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    low = ImageChops.darker(ImageChops.darker(red, green), blue)
    return ImageStat.Stat(ImageChops.subtract(high, low)).mean[0] > COLOUR_SPREAD


def _read_dicom_without_preamble(source: Path | bytes, name: str):  # -> pydicom.Dataset
    """Old ACR-NEMA style files have no preamble or meta header; accept them only if they hold an image."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    try:
        dataset = pydicom.dcmread(_readable(source), force=True)
        looks_like_image = "PixelData" in dataset and "Rows" in dataset and "Columns" in dataset
    except Exception:
        looks_like_image = False
    if not looks_like_image:
        raise UnreadableImage("not_dicom", f"{name}: not a DICOM file (no DICOM header or image found)")
    if "TransferSyntaxUID" not in dataset.file_meta:
        meta = FileMetaDataset(dataset.file_meta)
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        dataset.file_meta = meta
    return dataset


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
