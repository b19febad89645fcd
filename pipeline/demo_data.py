"""A small synthetic chest X-ray set, so the whole pipeline can run without downloading real data.

The set mimics what a hospital export looks like: class folders, several images per patient, a mix
of DICOM (CR and DX, MONOCHROME1 and 2, fake PHI in the header), 8/16-bit PNG and JPEG, plus a few
files that are broken on purpose so the ingest stage's quarantine has something to catch.
Everything is derived from the seed, so the same call writes byte-identical files.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.errors import CxrError

LABELS = ("normal", "pneumonia")
FORMATS = ("dicom", "png", "jpeg")
EXTENSIONS = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName")

PNEUMONIA_SHARE = 0.75  # by patient: normal:pneumonia about 1:3
FORMAT_SHARES = {"dicom": 0.40, "png": 0.35, "jpeg": 0.25}  # by image
MAX_IMAGES_PER_PATIENT = 5

SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
FIRST_NAMES = ("Jane", "John", "Maria", "Ahmed", "Li", "Olga", "Kofi", "Sara")
LAST_NAMES = ("Doe", "Roe", "Smith", "Example", "Sample", "Testperson", "Placeholder", "Demo")
INSTITUTIONS = (
    "St. Example General Hospital",
    "Northfield Demo Medical Center",
    "Riverside Sample Clinic",
)
README_FIRST_LINE = "Synthetic chest X-ray demo data written by pipeline.demo_data."


@dataclass(frozen=True)
class DemoSummary:
    out_dir: Path
    n_images: int  # usable images written
    n_patients: int
    counts: dict[str, int]  # usable images per label
    formats: dict[str, int]  # usable images per format
    broken: list[Path]  # the deliberately broken files written


@dataclass(frozen=True)
class Patient:
    """Everything fixed per patient: one label, one file format, one set of (fake) PHI."""

    code: str  # pseudonym used in file names, e.g. P0007; never PHI
    label: str
    fmt: str
    n_images: int
    name: str  # the fake PHI below only ever goes into DICOM headers
    mrn: str
    birth_date: str
    institution: str
    modality: str = "CR"  # DICOM only
    photometric: str = "MONOCHROME2"  # DICOM only
    png_bits: int = 8  # PNG only


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body shape; each image of the patient jitters it a little (pose, breathing)."""

    body_rx: float
    lung_dx: float  # distance of each lung centre from the midline
    lung_cy: float
    lung_rx: float
    lung_ry: float
    lung_tilt: float
    heart_rx: float
    rib_spacing: float
    rib_phase: float


def write_demo_data(out_dir: Path, n: int = 600, seed: int = 0, size: int = 256) -> DemoSummary:
    """Write exactly `n` usable images plus a few broken files into out_dir/<label>/, and a README.

    The set is built in a temporary folder next to out_dir and then swapped in, so a crash never
    leaves a half-written set and a rerun replaces the old one without leftovers.
    """
    out_dir = Path(out_dir)
    if n < 1:
        raise CxrError(f"demo data: n must be at least 1, got {n}")
    if size < 32:
        raise CxrError(f"demo data: size must be at least 32 pixels, got {size}")
    _check_replaceable(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; it becomes the real folder
        summary = _write_set(tmp, n=n, seed=seed, size=size)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace(summary, out_dir=out_dir, broken=[out_dir / p.relative_to(tmp) for p in summary.broken])


def phi_values(out_dir: Path) -> set[str]:
    """Every fake PHI value in the DICOM headers under out_dir, so tests can scan outputs for leaks."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    values: set[str] = set()
    for path in sorted(Path(out_dir).rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, "") or "")
            if value:
                values.add(value)
    return values


# --- folder handling ---------------------------------------------------------------------------


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier demo set: it might hold someone's real data."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CxrError(f"demo data: {out_dir} exists and is not a folder; remove it or pick another path")
    if not any(out_dir.iterdir()):
        return
    readme = out_dir / "README.txt"
    if not (readme.is_file() and readme.read_text(errors="replace").startswith(README_FIRST_LINE)):
        raise CxrError(
            f"demo data: {out_dir} is not empty and was not written by demo-data; "
            "remove it or pick another path"
        )


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir with tmp; the old folder is moved aside first so the swap is two renames."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()  # only the unique name is wanted; rename needs the target not to exist
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def _write_set(root: Path, n: int, seed: int, size: int) -> DemoSummary:
    """Write all images, broken files and the README into root (a fresh, empty folder)."""
    rng = np.random.default_rng(seed)
    patients = _plan_patients(n, rng)
    grid = _grid(size)
    for label in LABELS:
        (root / label).mkdir()

    counts = dict.fromkeys(LABELS, 0)
    formats = dict.fromkeys(FORMATS, 0)
    for patient in patients:
        anatomy = _random_anatomy(rng)
        for k in range(1, patient.n_images + 1):
            image = _render_chest(grid, anatomy, rng, pneumonia=patient.label == "pneumonia")
            path = root / patient.label / f"{patient.code}_{k}{EXTENSIONS[patient.fmt]}"
            _write_image(path, image, patient, k, seed, rng)
            counts[patient.label] += 1
            formats[patient.fmt] += 1

    broken = _write_broken_files(root, grid, seed, rng)
    summary = DemoSummary(root, sum(counts.values()), len(patients), counts, formats, broken)
    (root / "README.txt").write_text(_readme_text(summary, seed, size))
    return summary


# --- who the patients are ----------------------------------------------------------------------


def _plan_patients(n: int, rng: np.random.Generator) -> list[Patient]:
    """Draw patients until there are exactly n images, then give each a label, a format and fake PHI."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, MAX_IMAGES_PER_PATIENT + 1)))
    sizes[-1] -= sum(sizes) - n

    n_patients = len(sizes)
    n_normal = round(n_patients * (1 - PNEUMONIA_SHARE))
    labels = rng.permutation(["normal"] * n_normal + ["pneumonia"] * (n_patients - n_normal))
    fmts = _assign_formats(sizes, rng)

    patients = []
    seen = dict.fromkeys(FORMATS, 0)  # how many patients of each format so far, to vary the flavour
    for i, (n_images, label, fmt) in enumerate(zip(sizes, labels, fmts)):
        j = seen[fmt]
        seen[fmt] += 1
        patients.append(
            Patient(
                code=f"P{i + 1:04d}",
                label=str(label),
                fmt=fmt,
                n_images=n_images,
                **_fake_phi(rng),
                modality="DX" if fmt == "dicom" and j % 2 == 1 else "CR",
                photometric="MONOCHROME1" if fmt == "dicom" and j % 3 == 1 else "MONOCHROME2",
                png_bits=16 if fmt == "png" and j % 4 == 3 else 8,
            )
        )
    return patients


def _assign_formats(sizes: list[int], rng: np.random.Generator) -> list[str]:
    """Give each patient one format so the image shares come out close to FORMAT_SHARES.

    Patients are visited in random order and the running image total decides the format, which
    hits the shares far more closely than drawing each patient's format independently.
    """
    total = sum(sizes)
    fmts = [""] * len(sizes)
    done = 0
    for i in rng.permutation(len(sizes)):
        middle = (done + sizes[i] / 2) / total
        done += sizes[i]
        cumulative = 0.0
        for fmt in FORMATS:
            cumulative += FORMAT_SHARES[fmt]
            if middle < cumulative or fmt == FORMATS[-1]:
                fmts[i] = fmt
                break
    return fmts


def _fake_phi(rng: np.random.Generator) -> dict[str, str]:
    """Obviously fake but realistic-looking PHI: a name, an MRN, a birth date, a hospital."""
    first = FIRST_NAMES[rng.integers(len(FIRST_NAMES))]
    last = LAST_NAMES[rng.integers(len(LAST_NAMES))]
    birth = np.datetime64("1940-01-01") + int(rng.integers(0, 65 * 365))
    return {
        "name": f"{last}{int(rng.integers(1, 100))}^{first}",
        "mrn": f"MRN{int(rng.integers(0, 10**7)):07d}",
        "birth_date": str(birth).replace("-", ""),
        "institution": INSTITUTIONS[rng.integers(len(INSTITUTIONS))],
    }


# --- drawing a chest ---------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [-1, 1], x to the right and y downwards, shared by every image."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    return x, y


def _random_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_rx=float(rng.uniform(0.88, 0.98)),
        lung_dx=float(rng.uniform(0.36, 0.42)),
        lung_cy=float(rng.uniform(-0.1, 0.0)),
        lung_rx=float(rng.uniform(0.25, 0.3)),
        lung_ry=float(rng.uniform(0.55, 0.62)),
        lung_tilt=float(rng.uniform(0.05, 0.15)),
        heart_rx=float(rng.uniform(0.24, 0.32)),
        rib_spacing=float(rng.uniform(0.13, 0.16)),
        rib_phase=float(rng.uniform(0, 1)),
    )


def _render_chest(
    grid: tuple[np.ndarray, np.ndarray], anatomy: Anatomy, rng: np.random.Generator, pneumonia: bool
) -> np.ndarray:
    """One chest-like image in [0, 1] (bright = dense), built from soft shapes in normalised coordinates."""
    x, y = _jitter_pose(grid, rng)
    size = x.shape[0]
    a = anatomy
    breath = float(rng.uniform(0.95, 1.05))  # deeper breath: taller lungs

    body = _torso(x, y, a.body_rx)
    heart = _ellipse(x, y, 0.12, 0.36, a.heart_rx, 0.21, -0.4, edge=0.4)
    mediastinum = np.maximum(_band(x, 0.0, 0.1, 0.06) * _band(y, -0.05, 0.65, 0.15), heart)
    spine = _band(x, 0.0, 0.05, 0.03) * (0.8 + 0.2 * np.cos(y * 40.0))
    lungs = [
        _lung(x, y, -a.lung_dx, a.lung_cy, a.lung_rx, a.lung_ry * breath, a.lung_tilt),
        _lung(x, y, a.lung_dx, a.lung_cy, a.lung_rx * 0.95, a.lung_ry * breath * 0.97, -a.lung_tilt),
    ]
    air = np.maximum(lungs[0], lungs[1]) * (1.0 - mediastinum)
    thorax = _ellipse(x, y, 0.0, a.lung_cy, a.lung_dx + a.lung_rx + 0.1, a.lung_ry + 0.12, 0.0, edge=0.2)

    image = 0.04 + 0.40 * body
    image -= 0.30 * air
    image += 0.12 * mediastinum + 0.07 * spine * body
    image += thorax * _ribs(x, y, a.rib_spacing, a.rib_phase)
    image += 0.14 * _clavicles(x, y)
    image += 0.04 * air * _smooth_noise(rng, size, cells=36)  # lung markings
    if pneumonia:
        image += _opacities(x, y, lungs, rng, size, faint=False)
    elif rng.random() < 0.15:
        image += _opacities(x, y, lungs, rng, size, faint=True)

    image += 0.03 * _smooth_noise(rng, size, cells=5)
    image += 0.012 * rng.standard_normal(x.shape, dtype=np.float32)
    image = image * float(rng.uniform(0.92, 1.08)) + float(rng.normal(0.0, 0.02))  # exposure
    return np.clip(image, 0.0, 1.0)


def _jitter_pose(
    grid: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shift, rotate and scale the coordinate grid: the patient never stands exactly the same way."""
    x, y = grid
    angle = float(rng.normal(0.0, 0.04))
    scale = float(rng.uniform(0.94, 1.06))
    dx, dy = (float(v) for v in rng.normal(0.0, 0.04, size=2))
    c, s = math.cos(angle), math.sin(angle)
    return ((x - dx) * c + (y - dy) * s) / scale, (-(x - dx) * s + (y - dy) * c) / scale


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float, edge: float
) -> np.ndarray:
    """1 inside, 0 outside, with a linear soft edge `edge` (relative to the radius) so shapes blend."""
    c, s = math.cos(angle), math.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / rx
    v = (-(x - cx) * s + (y - cy) * c) / ry
    return np.clip((1.0 - np.sqrt(u * u + v * v)) / edge + 0.5, 0.0, 1.0)


def _torso(x: np.ndarray, y: np.ndarray, rx: float) -> np.ndarray:
    """Body outline: a boxy shape (superellipse) for the trunk with rounded shoulders, plus the neck."""
    trunk = np.clip((1.0 - (np.abs(x) / rx) ** 4 - (np.abs(y - 0.35) / 1.2) ** 4) / 0.15, 0.0, 1.0)
    neck = _band(x, 0.0, 0.2, 0.05) * _band(y, -1.0, 0.3, 0.05)
    return np.maximum(trunk, neck)


def _lung(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, tilt: float) -> np.ndarray:
    """A lung field: an ellipse that widens towards the bottom, so it looks like a rounded triangle."""
    c, s = math.cos(tilt), math.sin(tilt)
    v = (-(x - cx) * s + (y - cy) * c) / ry
    u = ((x - cx) * c + (y - cy) * s) / (rx * (1.0 + 0.3 * np.clip(v, -1.0, 1.0)))
    return np.clip((1.0 - np.sqrt(u * u + v * v)) / 0.15 + 0.5, 0.0, 1.0)


def _band(t: np.ndarray, centre: float, half_width: float, edge: float) -> np.ndarray:
    """1 where |t - centre| < half_width, fading to 0 over `edge`."""
    return np.clip((half_width - np.abs(t - centre)) / edge + 0.5, 0.0, 1.0)


def _ribs(x: np.ndarray, y: np.ndarray, spacing: float, phase: float) -> np.ndarray:
    """Thin bright curved bands: posterior ribs bend down towards the sides, fainter anterior ones up."""
    side = np.abs(x)
    posterior = np.cos(2 * np.pi * ((y - 0.9 * (side - 0.1) ** 2) / spacing + phase)).clip(0.0) ** 4
    anterior = np.cos(2 * np.pi * ((y + 0.6 * (side - 0.6) ** 2) / (spacing * 1.3) + phase)).clip(0.0) ** 6
    near_spine = _band(x, 0.0, 0.08, 0.04)  # the ribs start beside the spine, not across it
    return (0.10 * posterior + 0.04 * anterior) * (1.0 - near_spine)


def _clavicles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two bright bars from the top of the sternum out to the shoulders."""
    left = _segment(x, y, (-0.08, -0.62), (-0.62, -0.76), width=0.035)
    right = _segment(x, y, (0.08, -0.62), (0.62, -0.76), width=0.035)
    return np.maximum(left, right)


def _segment(
    x: np.ndarray, y: np.ndarray, start: tuple[float, float], end: tuple[float, float], width: float
) -> np.ndarray:
    """Gaussian ridge along a line segment."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    distance2 = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
    return np.exp(-distance2 / (2 * width * width))


def _opacities(
    x: np.ndarray,
    y: np.ndarray,
    lungs: list[np.ndarray],
    rng: np.random.Generator,
    size: int,
    faint: bool,
) -> np.ndarray:
    """Patchy, textured bright blobs inside the lungs: the pattern that marks pneumonia.

    Pneumonia gets 2-5 blobs of varying size and strength in one or both lungs; `faint` gives a
    normal image one small weak blob, so the two classes are not perfectly separable.
    """
    in_lungs = np.maximum(lungs[0], lungs[1])
    texture = np.clip(0.6 + 0.5 * _smooth_noise(rng, size, cells=20), 0.0, None)
    total = np.zeros_like(x)
    for _ in range(1 if faint else int(rng.integers(2, 6))):
        # Pick a point inside the lung mask; lower zones are more likely, as in real pneumonia.
        inside = np.flatnonzero(in_lungs.ravel() > 0.9)
        weights = 1.0 + np.clip(y.ravel()[inside] + 0.2, 0.0, None)
        centre = rng.choice(inside, p=weights / weights.sum())
        cx, cy = x.ravel()[centre], y.ravel()[centre]
        if faint:
            sigma, amplitude = float(rng.uniform(0.03, 0.06)), float(rng.uniform(0.04, 0.08))
        else:
            sigma, amplitude = float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.25, 0.45))
        total += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma * sigma))
    return np.minimum(total, 0.5) * texture * in_lungs


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean noise with blobs about size/cells pixels wide: a coarse random grid upsampled bicubically."""
    from PIL import Image

    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    upsampled = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(upsampled)


# --- writing files -----------------------------------------------------------------------------


def _write_image(
    path: Path, image: np.ndarray, patient: Patient, k: int, seed: int, rng: np.random.Generator
) -> None:
    """Write one image in its patient's format; image is float in [0, 1]."""
    from PIL import Image

    if patient.fmt == "dicom":
        path.write_bytes(_dicom_bytes(image, patient, k, seed, rng))
    elif patient.fmt == "png" and patient.png_bits == 16:
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)
    elif patient.fmt == "png":
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    else:
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path, quality=90)


def _dicom_bytes(image: np.ndarray, patient: Patient, k: int, seed: int, rng: np.random.Generator) -> bytes:
    """A complete DICOM Part 10 file: preamble, File Meta, 12-bit pixels, fake PHI in the header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        # Derived from the seed rather than random, so reruns write identical files.
        return generate_uid(entropy_srcs=["cxr-demo", str(seed), patient.code, str(k), kind])

    stored = np.round(image * 4095).astype(np.uint16)
    centre = int(round(2048 + rng.normal(0, 120)))
    if patient.photometric == "MONOCHROME1":
        stored = 4095 - stored  # viewers invert MONOCHROME1, so the picture still looks right
        centre = 4095 - centre

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[patient.modality]
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds.SOPClassUID = SOP_CLASSES[patient.modality]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = patient.modality
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if patient.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k

    ds.PatientName = patient.name
    ds.PatientID = patient.mrn
    ds.PatientBirthDate = patient.birth_date
    ds.InstitutionName = patient.institution
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA" if rng.random() < 0.7 else "AP"

    rows, columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = patient.photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = centre
    ds.WindowWidth = int(round(rng.uniform(3200, 3800)))
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = stored.astype("<u2").tobytes()

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_broken_files(
    root: Path, grid: tuple[np.ndarray, np.ndarray], seed: int, rng: np.random.Generator
) -> list[Path]:
    """Files that look like images but are not, named so a reader sees they are broken on purpose."""
    truncated = root / "pneumonia" / "broken_truncated.dcm"
    patient = Patient("P9999", "pneumonia", "dicom", 1, **_fake_phi(rng))
    image = _render_chest(grid, _random_anatomy(rng), rng, pneumonia=True)
    complete = _dicom_bytes(image, patient, 1, seed, rng)
    truncated.write_bytes(complete[: len(complete) // 2])  # header intact, pixel data cut short

    empty = root / "normal" / "broken_empty.png"
    empty.write_bytes(b"")

    notes = root / "normal" / "broken_notes.dcm"
    notes.write_text("Notes from the radiology desk, saved with the wrong extension. Not a DICOM file.\n")
    return [truncated, empty, notes]


def _readme_text(summary: DemoSummary, seed: int, size: int) -> str:
    broken = "\n".join(f"  {p.relative_to(summary.out_dir)}" for p in summary.broken)
    return f"""{README_FIRST_LINE}
Nothing here comes from a real patient; every image is drawn by a program.

Settings: seed={seed}, size={size}x{size} pixels.
Usable images: {summary.n_images} from {summary.n_patients} patients
  by label:  normal={summary.counts["normal"]}, pneumonia={summary.counts["pneumonia"]}
  by format: DICOM={summary.formats["dicom"]}, PNG={summary.formats["png"]}, JPEG={summary.formats["jpeg"]}

Layout: <label>/<patient code>_<k>.<ext>, label is the folder (normal or pneumonia).
The patient code (e.g. P0007) is a pseudonym; all images of a patient share its label and format.
DICOM headers carry fake PHI (names, MRNs, birth dates, hospital) so de-identification can be tested.

Broken on purpose (the ingest stage should quarantine them):
{broken}
"""
