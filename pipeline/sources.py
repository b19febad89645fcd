"""Source adapters: every kind of input becomes the same list of `SourceItem`s.

As in torchxrayvision, one interface covers all sources, so ingest never cares where a film came
from. Kinds: a folder with one subfolder per label (optionally under train/val/test, the Kermany
layout), a label table (CSV or Parquet, with column mapping and NIH / RSNA presets, matching films
by path, file name or DICOM SOPInstanceUID), a label table whose films live on a DICOMweb server (`dicomweb:`,
by SOPInstanceUID), a MedMNIST-style .npz, and unlabelled folders or tables (films kept for prediction and
quality checks, never for training).

A DICOMweb table's instances are retrieved once (QIDO-RS finds each by its SOP Instance UID, WADO-RS fetches it
as stored) into `data/cache/dicomweb/`, private to the user and named by a hash of server and UID; from then on
they are local files like any other, so ingest, its decode cache, the champion gate and `cxr key rotate` read
them without asking the server again; a second ingest asks only about rows whose instance was missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig, SourceSpec
from pipeline.errors import CxrError
from pipeline.files import shown_path
from pipeline.labels import UNLABELLED
from pipeline.tasks import Task, task_for

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet"}
NOT_FILMS = TABLE_SUFFIXES | {".txt", ".md", ".json", ".yaml", ".yml", ".xlsx", ".xls", ".pdf", ".html"}

PRESETS: dict[str, dict] = {
    # NIH ChestX-ray14 Data_Entry_2017.csv; films sit in images_*/images/ folders, so they are found by name.
    "nih": {
        "path_column": "Image Index", "label_column": "Finding Labels", "label_separator": "|",
        "label_map": {"No Finding": "normal", "Pneumonia": "pneumonia"}, "patient_column": "Patient ID",
        "match": "file_name",
    },
    # RSNA Pneumonia Detection stage_2_train_labels.csv: one row per box, films named <patientId>.dcm.
    "rsna": {
        "path_column": "patientId", "path_template": "{}.dcm", "label_column": "Target",
        "label_map": {"0": "normal", "1": "pneumonia"}, "patient_column": "patientId", "match": "file_name",
    },
}


@dataclass(frozen=True)
class SourceItem:
    """One film to ingest. Exactly one of `file` and `pixels` is set; `label` is None for unlabelled films.

    `patient_id` is raw (from a table or file name); ingest hashes it and never writes it. `identifiers` are other
    raw identifying values the row names it by (a SOP Instance UID): never written, redacted wherever they appear.
    """

    source: str
    path: str
    label: str | None
    split: str | None = None
    patient_id: str | None = None
    subtype: str = ""
    file: Path | None = None
    pixels: np.ndarray | None = None
    identifiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejected:
    """A file or row that a source lists but that cannot be used, for quarantine.csv.

    `patient_id` is a table row's raw patient ID and `identifiers` the other identifying values it names the film by
    (a SOP Instance UID): never written, but redacted from every path and message ingest writes.
    """

    source: str
    path: str
    reason: str
    message: str
    patient_id: str | None = None
    identifiers: tuple[str, ...] = ()


def read_source(spec: SourceSpec, root: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    """Dispatch on the source's format (or what its path is) and apply presets."""
    path = root / spec.path if not Path(spec.path).is_absolute() else Path(spec.path)
    if not path.exists():
        raise CxrError(f"data.sources: '{spec.path}' does not exist (run `cxr demo-data` for the demo set, or fix the path)")
    spec = _with_preset(spec)
    if spec.dicomweb is not None:
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise CxrError(f"data.sources: '{spec.path}' has dicomweb: it must be a .csv/.tsv/.parquet label table")
        return _read_table(spec, path, root, data)
    kind = spec.format if spec.format in ("folder", "table", "npz") else _detect(path, spec)
    if kind == "folder":
        return _one_per_name(spec, *_read_folder(spec, path, data))
    if kind == "table":
        return _read_table(spec, path, root, data)
    return _read_npz(spec, path, data), []


def _with_preset(spec: SourceSpec) -> SourceSpec:
    """A preset's column names, overridden by whatever the user wrote explicitly."""
    if spec.format not in PRESETS:
        return spec
    explicit = {name: getattr(spec, name) for name in spec.model_fields_set}
    return SourceSpec(**{**PRESETS[spec.format], **explicit, "format": "table"})


def _detect(path: Path, spec: SourceSpec) -> str:
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    if path.suffix.lower() == ".npz":
        return "npz"
    raise CxrError(f"data.sources: '{spec.path}' is neither a folder, a .csv/.parquet table nor a .npz archive")


Odd = tuple[Path, str, str]  # an entry that cannot be a film: its path, a quarantine reason, why (after the path)


def _visible_files(folder: Path, top: Path) -> tuple[list[Path], list[Odd]]:
    """Files under a folder, sorted (hidden ones, label tables and notes skipped), and the entries that cannot be
    films, each with its reason: links leading outside `top` (the source root: following them would read data
    data.sources does not name), FIFOs, devices and sockets (never opened: reading a FIFO blocks forever), links
    to nothing, and folders that cannot be listed."""
    root = top.resolve()
    files: list[Path] = []
    odd: list[Odd] = []

    def unlisted(error: OSError) -> None:
        odd.append((Path(error.filename), "unreadable_folder", f"cannot be listed ({error.strerror}); its files were not read"))

    # os.walk never descends into a linked folder, so only a link itself can lead outside (resolving every path
    # would cost a system call per folder level of each file)
    for parent, folders, names in os.walk(folder, onerror=unlisted):
        base = Path(parent)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in folders:
            try:
                linked = (base / name).is_symlink()
            except OSError:  # e.g. a path longer than the system allows: os.walk's own listing of it says so
                continue
            if linked and not _inside(base / name, root):
                odd.append((base / name, "outside_source", "is a link to a folder outside the source; not followed"))
        for name in names:
            path = base / name
            if name.startswith(".") or path.suffix.lower() in NOT_FILMS:
                continue
            problem = _odd_file(path, root)
            if problem is None:
                files.append(path)
            else:
                odd.append((path, *problem))
    # Path's own order (by parts), with each file's parts taken once rather than at every comparison
    return sorted(files, key=lambda path: path.parts), sorted(odd)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, links followed, is under the (resolved) `root`; a link loop is not."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        return False


def _odd_file(path: Path, root: Path) -> tuple[str, str] | None:
    """Why a listed entry cannot be read as a film (reason, why), or None when it is a regular file inside the
    (resolved) `root`. Links are resolved and stat is called: nothing is opened. A plain file costs one system
    call (lstat), a link two more: an archive lists hundreds of thousands, on network storage at that."""
    try:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            try:
                target = path.resolve(strict=True)
            except FileNotFoundError:
                return "broken_link", "is a link to a file that does not exist"
            except (OSError, RuntimeError):  # a loop: RuntimeError in Python 3.11, OSError later
                return "broken_link", "is a link that cannot be followed (a loop)"
            if not target.is_relative_to(root):
                return "outside_source", "is a link to a file outside the source; not followed"
            mode = path.stat().st_mode  # the link's target
    except FileNotFoundError:
        return "missing_file", "no longer exists"
    except OSError as exc:  # e.g. a path longer than the system allows
        return "unreadable_file", f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(mode):
        return "not_a_regular_file", f"is a {_kind_of(mode)}, not a file; never opened"
    return None


def _kind_of(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _odd_rejected(spec: SourceSpec, folder: Path, odd: list[Odd]) -> list[Rejected]:
    """quarantine.csv rows for entries that cannot be films, named relative to the source like every path."""
    rows = []
    for path, reason, why in odd:
        rel = shown_path(path.relative_to(folder).as_posix()) if path.is_relative_to(folder) else shown_path(path)
        rows.append(Rejected(spec.path, rel, reason, f"{spec.path}/{rel}: {why}"))
    return rows


def _from_name(pattern: str, name: str) -> str | None:
    match = re.search(pattern, name)
    return match.group(1) if match else None


def _file_item(spec: SourceSpec, folder: Path, file: Path, data: DataConfig, label: str | None, split: str | None) -> SourceItem:
    """`path` is shown (pipeline.files.shown_path): a name that is not UTF-8 is written escaped; `file` opens it."""
    rel = shown_path(_relative(file, folder))
    name = shown_path(file.name)
    subtype = _from_name(data.subtype_pattern, name) or ""
    label = _class_of(label, subtype, data)
    return SourceItem(
        source=spec.path, path=rel, label=label, split=split if label is not None else UNLABELLED,
        patient_id=_from_name(data.patient_pattern, name), subtype=subtype, file=file,
    )


def _relative(file: Path, folder: Path) -> str:
    """file.relative_to(folder).as_posix(), by cutting the folder's text off the file's where it starts with it (as
    it does for every file os.walk lists under the folder): Path.relative_to parses the folder anew for each file."""
    text, prefix = str(file), f"{folder}/"
    return text[len(prefix):] if text.startswith(prefix) else file.relative_to(folder).as_posix()


def _class_of(label: str | None, subtype: str, data: DataConfig) -> str | None:
    """With data.class_from: subtype, a labelled film's subtype (e.g. bacteria) is its class; else its label is."""
    if data.class_from == "subtype" and subtype and label is not None:
        return subtype.lower()
    return label


def _read_folder(spec: SourceSpec, folder: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    if not spec.labelled:
        files, odd = _visible_files(folder, folder)
        return [_file_item(spec, folder, file, data, None, None) for file in files], _odd_rejected(spec, folder, odd)
    outside: list[Odd] = []
    subfolders = _label_folders(folder, folder, outside)
    if subfolders and all(p.name.lower() in SPLITS for p in subfolders):
        groups = [(split_dir.name.lower(), class_dir) for split_dir in subfolders for class_dir in _label_folders(split_dir, folder, outside)]
    else:
        groups = [(None, class_dir) for class_dir in subfolders]
    if not groups:
        raise CxrError(
            f"data.sources: '{spec.path}' has no label subfolders; expected e.g. {spec.path}/{data.labels[0]}/ and "
            f"{spec.path}/{data.labels[-1]}/, or mark it unlabelled: {{path: {spec.path}, labelled: false}}"
        )
    items: list[SourceItem] = []
    rejected = _odd_rejected(spec, folder, outside)
    for split, class_dir in groups:
        files, odd = _visible_files(class_dir, folder)
        rejected += _odd_rejected(spec, folder, odd)
        for file in files:
            item = _file_item(spec, folder, file, data, shown_path(class_dir.name).lower(), split)
            if item.label not in data.labels:
                where = f"folder '{shown_path(class_dir.name)}'" if item.label == shown_path(class_dir.name).lower() else f"subtype '{item.label}'"
                rejected.append(Rejected(spec.path, item.path, "label_not_in_set", f"{spec.path}/{item.path}: {where} is not one of data.labels {data.labels}",
                                         item.patient_id))
                continue
            items.append(item)
    return items, rejected


def _one_per_name(spec: SourceSpec, items: list[SourceItem], rejected: list[Rejected]) -> tuple[list[SourceItem], list[Rejected]]:
    """Each shown path once: a name that is not UTF-8, escaped, can read like another file's literal name
    (b'caf\\xe9' and 'caf\\xe9'), and two films under one path would share an image_id. The first keeps it."""
    seen: set[str] = set()
    kept = []
    for item in items:
        if item.path in seen:
            rejected.append(Rejected(spec.path, item.path, "ambiguous_name", f"{spec.path}/{item.path}: another file in "
                                     "the source shows under the same name (a name that is not UTF-8, escaped); rename one"))
        else:
            seen.add(item.path)
            kept.append(item)
    return kept, rejected


def _label_folders(parent: Path, root: Path, outside: list[Odd]) -> list[Path]:
    """The visible folders in `parent`, sorted; a link to a folder outside the source `root` is not followed but
    added to `outside` (quarantined as outside_source)."""
    folders = []
    for path in sorted(parent.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if path.is_symlink() and not _inside(path, root.resolve()):
            outside.append((path, "outside_source", "is a link to a folder outside the source; its files were not read"))
        else:
            folders.append(path)
    return folders


def _read_table(spec: SourceSpec, table: Path, root: Path, data: DataConfig) -> tuple[list[SourceItem], list[Rejected]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(table) if table.suffix.lower() == ".parquet" else pd.read_csv(
            table, dtype=str, keep_default_na=False, sep="\t" if table.suffix.lower() == ".tsv" else ",")
    except Exception as exc:
        raise CxrError(f"{spec.path}: could not read the table ({exc})") from None
    frame = frame.astype(str).replace({"nan": "", "None": ""})
    needed = [spec.path_column] + ([spec.label_column] if spec.labelled else [])
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise CxrError(
            f"{spec.path}: missing column(s) {missing}; found {list(frame.columns)[:12]}. "
            "Name yours with path_column / label_column in the source entry, or use format: nih / rsna"
        )
    if spec.dicomweb is not None:
        image_root = retrieved_folder(root)
        locate = _Retriever(spec, image_root)
    else:
        image_root = (root / spec.image_root) if spec.image_root else table.parent
        if not image_root.is_dir():
            raise CxrError(f"{spec.path}: image_root '{image_root}' is not a folder")
        locate = _locator(spec, image_root)
    by_uid = spec.match == "sop_instance_uid"
    task = task_for(data.task, data.labels)
    items: list[SourceItem] = []
    rejected: list[Rejected] = []
    seen: dict[str, str | None] = {}
    for row_number, row in enumerate(frame.to_dict("records"), start=2):
        key = spec.path_template.format(row[spec.path_column].strip())
        where = f"{spec.path} line {row_number}"
        split = row.get(spec.split_column, "").strip().lower() or None
        # a server is asked only for rows that can be used (below): a film is not copied only to be quarantined
        file = locate(key) if row[spec.path_column].strip() and spec.dicomweb is None else None
        subtype = _from_name(data.subtype_pattern, shown_path(file.name) if file is not None else Path(key).name) or ""
        label = _table_label(row, spec, data, task, subtype) if spec.labelled else None
        patient = row.get(spec.patient_column, "").strip() or None
        named = (key,) if by_uid and key else ()  # a UID identifies a study's image: redacted like a patient ID
        if key in seen:  # RSNA lists a film once per box: one item, unless the rows disagree
            if seen[key] != label:
                rejected.append(Rejected(spec.path, key, "conflicting_labels", f"{where}: '{key}' is listed again with another label", patient, named))
            continue
        seen[key] = label
        if not row[spec.path_column].strip():
            rejected.append(Rejected(spec.path, f"line {row_number}", "missing_path", f"{where}: empty {spec.path_column}", patient))
        elif spec.labelled and label is None:
            raw = row[spec.label_column]
            reason = "no_label" if not raw.strip() else "label_not_in_set"
            rejected.append(Rejected(spec.path, key, reason, f"{where}: label '{raw}' maps to none (or several) of data.labels {data.labels}", patient, named))
        elif split is not None and split not in SPLITS:
            rejected.append(Rejected(spec.path, key, "bad_split", f"{where}: split '{split}' is not one of {list(SPLITS)}", patient, named))
        elif spec.dicomweb is not None and (file := locate(key)) is None:
            rejected.append(Rejected(spec.path, key, "missing_instance", f"{where}: SOP Instance UID '{key}' is not on "
                                     f"{spec.dicomweb}", patient, named))
        elif file is None:
            rejected.append(Rejected(spec.path, key, "missing_file", f"{where}: no film '{key}' under {spec.image_root or 'the table folder'}", patient, named))
        elif not _inside(file, image_root.resolve()):
            rejected.append(Rejected(spec.path, key, "outside_source", f"{where}: '{key}' leads outside {image_root}", patient, named))
        elif (problem := _odd_file(file, image_root.resolve())) is not None:
            rejected.append(Rejected(spec.path, key, problem[0], f"{where}: '{key}' {problem[1]}", patient, named))
        else:
            local = spec.dicomweb is None and file.is_relative_to(image_root)  # a retrieved film is named by its UID
            items.append(SourceItem(
                source=spec.path, path=shown_path(file.relative_to(image_root).as_posix()) if local else key,
                label=label, split=split if label is not None else UNLABELLED, patient_id=patient,
                subtype=subtype, file=file, identifiers=named,
            ))
    if isinstance(locate, _Retriever) and locate.fetched:
        log.info("data.sources '%s': retrieved %d instance(s) from %s into %s", spec.path, locate.fetched,
                 locate.base_url, image_root)
    return items, rejected


def retrieved_folder(root: Path) -> Path:
    """Where DICOMweb tables' instances are kept once retrieved: beside the decode cache, under data/cache/."""
    from pipeline.paths import ProjectPaths

    return ProjectPaths(root).decode_cache / "dicomweb"


class _Retriever:
    """How a DICOMweb table's SOP Instance UID finds its film: the copy an earlier run retrieved, else the instance
    fetched now into `folder` (mode 0700, files 0600: they hold the headers); None when the server does not hold
    it. The server is asked only for a missing copy, and signed in to (CXR_DICOMWEB_*) only then."""

    def __init__(self, spec: SourceSpec, folder: Path) -> None:
        from pipeline.dicomweb_client import check_service_url

        check_service_url(spec.dicomweb, f"data.sources '{spec.path}'")
        self.base_url, self.folder = spec.dicomweb.rstrip("/"), folder
        self.client = None
        self.fetched = 0

    def __call__(self, uid: str) -> Path | None:
        from pipeline.config import dicomweb_credentials
        from pipeline.dicomweb_client import fetch_instance, open_client

        name = hashlib.sha256(f"{self.base_url}\0{uid}".encode()).hexdigest()[:32]
        file = self.folder / f"{name}.dcm"
        if file.is_file():
            return file
        if self.client is None:
            self.client = open_client(self.base_url, dicomweb_credentials())
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.folder / f".{name}.tmp{os.getpid()}"
        try:
            if not fetch_instance(self.client, self.base_url, uid, tmp):
                return None
            os.chmod(tmp, 0o600)
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        self.fetched += 1
        return file


def _table_label(row: dict, spec: SourceSpec, data: DataConfig, task: Task, subtype: str = "") -> str | None:
    """The row's label as the manifest writes it (the task reads the cell: pipeline.tasks); None when it has none.

    With data.class_from: subtype, the file name's subtype names the class, whatever the table says.
    """
    raw = row[spec.label_column].strip()
    if not raw:
        return None
    subtype_class = subtype.lower() if data.class_from == "subtype" and subtype else None
    return task.label_from_cell(raw, spec, subtype_class)


def _locator(spec: SourceSpec, image_root: Path):  # -> Callable[[str], Path | None]
    """How a table key finds its film: a relative path, a file name anywhere under image_root, or a SOPInstanceUID."""
    if spec.match == "path":  # what is there, odd or not: the row says why it cannot be used
        return lambda key: (image_root / key) if os.path.lexists(image_root / key) else None
    files, odd = _visible_files(image_root, image_root)
    if spec.match == "file_name":
        by_name: dict[str, Path] = {}
        for file in files + [path for path, reason, _ in odd if reason != "unreadable_folder"]:
            by_name.setdefault(file.name, file)
            by_name.setdefault(file.stem, file)
        return lambda key: by_name.get(key) or by_name.get(Path(key).name)
    by_uid = _index_by_sop_instance_uid(files)
    return lambda key: by_uid.get(key)


def _index_by_sop_instance_uid(files: list[Path]) -> dict[str, Path]:
    """Read only the headers (no pixels) of every file under the root to map SOPInstanceUID → file."""
    import pydicom

    index: dict[str, Path] = {}
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SOPInstanceUID"], force=True)
            uid = str(header.get("SOPInstanceUID", "") or "")
        except Exception:
            continue  # not DICOM, or a header too damaged to name; ingest never reaches it by UID
        if uid:
            index.setdefault(uid, file)
    return index


def _read_npz(spec: SourceSpec, archive: Path, data: DataConfig) -> list[SourceItem]:
    """MedMNIST layout: {split}_images (N,H,W[,C]) and {split}_labels: class indices (N,) or (N,1), one-hot (N,K),
    or for a multilabel task (N,K) 0/1 columns in data.labels order (ChestMNIST); the task reads them
    (Task.labels_from_npz). Pixels of any numeric type become 8-bit grey by the archive's own range (_to_grey8)."""
    task = task_for(data.task, data.labels)
    check_npz_sizes(archive, spec.path, data.max_pixels)
    try:
        arrays = np.load(archive)
    except Exception as exc:
        raise CxrError(f"{spec.path}: could not read the .npz archive ({exc})") from None
    items: list[SourceItem] = []
    with arrays:
        present = [split for split in SPLITS if f"{split}_images" in arrays.files]
        if not present:
            raise CxrError(f"{spec.path}: expected arrays named train_images/train_labels (and val_, test_), found {arrays.files}")
        stacks = {split: arrays[f"{split}_images"] for split in present}
        to_grey8 = _to_grey8(list(stacks.values()), spec.path)
        for split, images in stacks.items():
            if spec.labelled and f"{split}_labels" not in arrays.files:
                raise CxrError(f"{spec.path}: has {split}_images but no {split}_labels")
            labels = (task.labels_from_npz(arrays[f"{split}_labels"].reshape(len(images), -1), f"{spec.path}: {split}_labels")
                      if spec.labelled else [None] * len(images))
            for index, (pixels, label) in enumerate(zip(images, labels)):
                items.append(SourceItem(source=spec.path, path=f"{split}/{index}", label=label,
                                        split=split if label is not None else UNLABELLED, pixels=to_grey8(pixels)))
    return items


def check_npz_sizes(archive: Path, where: str, max_pixels: int) -> None:
    """Refuse, in one line, an archive whose arrays cannot be loaded, from each member's .npy header alone (a few
    hundred bytes): np.load allocates whatever a header declares before it reads the data, so a header declaring
    a terabyte would kill the run. Refused: an image above `max_pixels` (data.max_pixels), an array larger than
    the bytes its member holds (a damaged or forged header), and arrays that together exceed this machine's memory."""
    import zipfile

    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0, (3, 0): npy.read_array_header_2_0}
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    total = 0
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename.removesuffix(".npy")
                with zipped.open(info) as member:
                    version = npy.read_magic(member)
                    if version not in readers:
                        raise CxrError(f"{where}: array '{name}' is in .npy format version {version}, which is not supported")
                    shape, _, dtype = readers[version](member)
                    header_bytes = member.tell()
                size = int(np.prod(shape, dtype=object)) * dtype.itemsize  # Python ints: a forged shape cannot overflow
                if name.endswith("_images") and len(shape) >= 3 and shape[1] * shape[2] > max_pixels:
                    raise CxrError(f"{where}: '{name}' holds {shape[1]}x{shape[2]} px images, above data.max_pixels ({max_pixels:,})")
                if not dtype.hasobject and size > info.file_size - header_bytes:
                    raise CxrError(f"{where}: '{name}' declares a {'x'.join(map(str, shape))} {dtype} array ({size:,} bytes) but "
                                   f"holds {info.file_size - header_bytes:,} bytes: the archive is damaged")
                total += size
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CxrError(f"{where}: could not read the .npz archive ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if total > memory:
        raise CxrError(f"{where}: its arrays hold {total / 2**30:,.1f} GiB, more than this machine's {memory / 2**30:,.1f} GiB of "
                       "memory; split the archive")


def _to_grey8(stacks: list[np.ndarray], where: str):  # -> Callable[[np.ndarray], np.ndarray]
    """How one archive's films become 8-bit grey, never wrapped: uint8 as stored; other non-negative integers by the
    bit depth the archive's largest value needs (12-bit 0..4095 → 0..255); floats, and integers with negative
    values, from the archive's minimum to its maximum (one range for the whole archive, so films keep their
    brightness relative to each other). Colour channels (a last axis of 3 or 4) are averaged first."""
    dtype = stacks[0].dtype
    if dtype == np.uint8:
        return lambda pixels: pixels.mean(axis=-1).astype(np.uint8) if pixels.ndim == 3 else pixels
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise CxrError(f"{where}: images of type {dtype} cannot be read as pixel values")
    for stack in stacks:
        if np.issubdtype(dtype, np.floating) and not np.isfinite(stack).all():
            raise CxrError(f"{where}: images hold NaN or infinite pixel values")
    low = min(float(stack.min()) for stack in stacks if stack.size)
    high = max(float(stack.max()) for stack in stacks if stack.size)
    if np.issubdtype(dtype, np.integer) and low >= 0:
        low, high = 0.0, float(2 ** max(8, int(high).bit_length()) - 1)
    scale = 255.0 / (high - low) if high > low else 0.0

    def convert(pixels: np.ndarray) -> np.ndarray:
        grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels.astype(np.float64)
        return np.clip(np.round((grey - low) * scale), 0, 255).astype(np.uint8)

    return convert
