"""No patient identifier planted in the demo DICOM headers reaches any output, unhashed."""

import os

import numpy as np
import pandas as pd
import pytest

from pipeline.deid import load_key, patient_hash
from pipeline.demo_data import phi_values

OUTPUT_DIRS = ("data/interim", "data/processed", "data/cache", "reports", "models", "mlartifacts")


def _output_files(root):
    for folder in OUTPUT_DIRS:
        yield from (p for p in (root / folder).rglob("*") if p.is_file())
    yield root / "mlruns.db"


def test_no_phi_value_in_any_output_file_or_the_mlflow_store(tiny_project):
    root = tiny_project.paths.root
    planted = phi_values(root / "data" / "raw" / "demo")
    assert len(planted) > 20  # names, MRNs, birth dates and institutions were really planted
    needles = [value.encode() for value in planted if len(value) >= 4]
    scanned = 0
    for path in _output_files(root):
        data = path.read_bytes()
        leaked = [n.decode() for n in needles if n in data]
        assert not leaked, f"{path} contains {leaked[:3]}"
        scanned += 1
    assert scanned > 10


def test_manifest_cells_hold_no_phi_even_inside_compressed_parquet(tiny_project):
    root = tiny_project.paths.root
    planted = phi_values(root / "data" / "raw" / "demo")
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    text = " ".join(manifest.astype(str).to_numpy().ravel())
    assert not [value for value in planted if value in text]


def test_patient_id_from_the_header_is_stored_as_its_keyed_hash(tiny_project):
    import pydicom

    from tests.conftest import source_files

    manifest = pd.read_parquet(tiny_project.paths.manifest)
    dicom_rows = manifest[manifest["format"] == "dicom"]
    dicom_row = dicom_rows.iloc[0]
    file = source_files(tiny_project.paths, tiny_project.config, dicom_rows.iloc[:1])[0]
    header = pydicom.dcmread(file, stop_before_pixels=True)
    assert dicom_row["patient_hash"] == patient_hash(str(header.PatientID), load_key())
    assert dicom_row["patient_hash"] != patient_hash(str(header.PatientID), b"another key")


def test_key_file_is_created_once_outside_the_project_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_DEID_KEY", raising=False)
    monkeypatch.setenv("CXR_DEID_KEY_FILE", str(tmp_path / "keys" / "deid.key"))
    first = load_key()
    assert load_key() == first and len(first) == 64
    assert oct(os.stat(tmp_path / "keys" / "deid.key").st_mode & 0o777) == "0o600"


def test_identifiers_in_pacs_style_paths_are_redacted(tiny_project, tmp_path):
    """A folder named after the PatientID must not carry it into the manifest or the quarantine list."""
    import shutil

    import pydicom

    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    demo = tiny_project.paths.root / "data" / "raw" / "demo"
    good = next(p for p in sorted((demo / "pneumonia").glob("*.dcm")) if "broken" not in p.name)
    header = pydicom.dcmread(good, stop_before_pixels=True)
    mrn, name = str(header.PatientID), str(header.PatientName)
    own_films = [p for p in sorted(demo.rglob("*.dcm")) if "broken" not in p.name
                 and str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) == mrn]
    folder = tmp_path / "pacs" / "pneumonia" / mrn / name.replace("^", "_")
    folder.mkdir(parents=True)
    for film in own_films:
        shutil.copy2(film, folder / f"{mrn}_{film.name}")
    other = next(p for p in sorted((demo / "normal").glob("*.png")))
    (tmp_path / "pacs" / "normal").mkdir()
    shutil.copy2(other, tmp_path / "pacs" / "normal" / other.name)
    truncated = tmp_path / "pacs" / "pneumonia" / mrn / f"{mrn}_cut.dcm"
    truncated.write_bytes(good.read_bytes()[:-500])
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [pacs]\n")

    ingest_stage(ProjectPaths(tmp_path), load_config(params))

    written = (tmp_path / "data" / "interim" / "quarantine.csv").read_text()
    written += " ".join(pd.read_parquet(tmp_path / "data" / "interim" / "manifest.parquet")["path"])
    assert "redacted-" in written and "_cut.dcm" in written
    for part in (mrn, *name.replace("^", " ").split()):
        if len(part) >= 3:
            assert part not in written


@pytest.mark.slow
def test_sex_and_age_band_are_kept_but_never_the_age_or_birth_date(tmp_path):
    """Hostile headers: PatientAge "047Y" (or "070Y"), PatientSex and a birth date on every demo DICOM. The
    manifest keeps sex and the band; no output of any stage holds the age or the birth date."""
    import pydicom

    from tests.conftest import run_all_stages, write_tiny_project

    params = write_tiny_project(tmp_path, n=60)
    patients: dict[str, int] = {}
    for path in sorted((tmp_path / "data" / "raw" / "demo").rglob("*.dcm")):
        try:
            dataset = pydicom.dcmread(path)
        except Exception:  # the demo's deliberately broken files
            continue
        woman = patients.setdefault(str(dataset.PatientID), len(patients)) % 2 == 0
        dataset.PatientSex, dataset.PatientAge = ("F", "047Y") if woman else ("M", "070Y")
        dataset.PatientBirthDate = "19770312"
        dataset.save_as(path)
    assert len(patients) >= 2

    project = run_all_stages(params, ["evaluate.min_subgroup_patients=1"])

    manifest = pd.read_parquet(project.paths.manifest)
    dicom = manifest[manifest["format"] == "dicom"]
    assert set(zip(dicom["sex"], dicom["age_band"])) == {("F", "40-64"), ("M", "65-89")}
    assert set(manifest.loc[manifest["format"] != "dicom", "sex"]) == {""}  # PNG and JPEG: unknown
    assert not set(manifest.columns) & {"age", "patient_age", "age_years", "birth_date", "patient_birth_date"}
    text = manifest.select_dtypes(exclude="number")  # numbers such as store_index 47 are no age
    cells = {str(value).strip() for value in text.to_numpy().ravel()}
    assert not cells & {"047Y", "070Y", "47", "70", "047", "070", "19770312", "1977-03-12"}
    written = [project.paths.metrics, *(p for p in project.paths.decode_cache.rglob("*") if p.is_file())]
    for path in [project.paths.manifest, *written]:
        data = path.read_bytes()
        assert b"047Y" not in data and b"070Y" not in data and b"19770312" not in data, path


PACS_IDENTIFIERS = ("MRN7730100", "7730100", "ACC5550100", "5550100", "QUINCEY", "MARGOT", "19610224", "VESPERINE")


def write_pacs_export(root, demo) -> None:
    """A PACS-style export at root/pacs: DICOMs of patient MRN7730100 (accession ACC5550100, QUINCEY^MARGOT, born
    19610224, at Vesperine Clinic) in pneumonia/MRN7730100/ACC5550100/, beside a PNG, an identical copy of it, an
    empty file and a truncated DICOM; a folder named after her in another case and order, and a file named after
    her MRN in lower case. The other demo films fill both labels."""
    import shutil

    import pydicom

    films = {label: sorted((demo / label).glob("*.*")) for label in ("normal", "pneumonia")}
    dicoms = [f for f in films["pneumonia"] if f.suffix == ".dcm" and "broken" not in f.name][:2]
    pngs = [f for f in films["pneumonia"] if f.suffix == ".png"][:3]
    study = root / "pacs" / "pneumonia" / "MRN7730100" / "ACC5550100"
    study.mkdir(parents=True)
    for number, film in enumerate(dicoms, start=1):
        dataset = pydicom.dcmread(film)
        dataset.PatientID, dataset.AccessionNumber, dataset.PatientName = "MRN7730100", "ACC5550100", "QUINCEY^MARGOT"
        dataset.PatientBirthDate, dataset.InstitutionName = "19610224", "Vesperine Clinic"
        dataset.save_as(study / f"IM-000{number}.dcm")
        if number == 1:
            (study / "IM-0004.dcm").write_bytes((study / "IM-0001.dcm").read_bytes()[:-600])  # truncated pixel data
    shutil.copy2(pngs[0], study / "scan.png")
    shutil.copy2(pngs[0], study / "copy.png")  # identical: a dropped duplicate
    (study / "IM-0003").write_bytes(b"")  # empty: quarantined
    (root / "pacs" / "pneumonia" / "margot.quincey-19610224").mkdir()
    shutil.copy2(pngs[1], root / "pacs" / "pneumonia" / "margot.quincey-19610224" / "film.png")
    shutil.copy2(pngs[2], root / "pacs" / "pneumonia" / "mrn7730100-lateral.png")
    for label, listed in films.items():
        (root / "pacs" / label).mkdir(exist_ok=True)
        for film in listed:
            if film not in (*dicoms, *pngs):
                shutil.copy2(film, root / "pacs" / label / film.name)


def leaked_identifiers(root, needles=PACS_IDENTIFIERS, skip=("pacs", "demo", "params.yaml")) -> dict[str, list[str]]:
    """Every file under root (but the inputs) that holds a needle, case-insensitively: in its bytes, or in a parquet
    table's cells (compression could hide a value from the byte scan)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not set(p.relative_to(root).parts) & set(skip)):
        texts = [path.read_bytes().decode("latin-1")]
        if path.suffix == ".parquet":
            texts.append(" ".join(map(str, pd.read_parquet(path).to_numpy().ravel())))
        hits = [needle for needle in needles if any(needle.lower() in text.lower() for text in texts)]
        if hits:
            found[str(path.relative_to(root))] = hits
    return found


def test_a_pacs_export_leaves_no_mrn_accession_or_name_in_any_output_sibling_files_included(tmp_path, caplog):
    """The MRN and accession folders hold a DICOM that reveals them, and a PNG, its copy, an empty file and a truncated
    DICOM that do not: every path written (manifest, quarantine, dropped duplicates, the caches) is redacted."""
    import hashlib
    import logging

    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    write_demo_data(tmp_path / "demo", n=40, seed=3, size=64)
    write_pacs_export(tmp_path, tmp_path / "demo")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  num_workers: 1\n  sources: [pacs]\n")
    paths = ProjectPaths(tmp_path)

    with caplog.at_level(logging.DEBUG):
        ingest_stage(paths, load_config(params))
        ingest_stage(paths, load_config(params, ["data.image_size=48"]))  # the identities now come from the cache

    assert leaked_identifiers(tmp_path) == {}
    assert not [needle for needle in PACS_IDENTIFIERS if needle.lower() in caplog.text.lower()]
    manifest = pd.read_parquet(paths.manifest)
    quarantine = pd.read_csv(paths.quarantine)
    dropped = pd.read_csv(paths.dropped_duplicates)
    study = r"^pneumonia/redacted-\w{8}/redacted-\w{8}/"
    assert manifest["path"].str.fullmatch(study + r"IM-000[12]\.dcm").sum() == 2
    assert manifest["path"].str.fullmatch(study + r"(scan|copy)\.png").sum() + dropped["path"].str.fullmatch(
        study + r"(scan|copy)\.png").sum() == 2
    assert manifest["path"].str.fullmatch(r"pneumonia/redacted-\w{8}\.redacted-\w{8}-redacted-\w{8}/film\.png").sum() == 1
    assert manifest["path"].str.fullmatch(r"pneumonia/redacted-\w{8}-lateral\.png").sum() == 1
    reasons = dict(zip(quarantine["path"].str.replace(study, "", regex=True), quarantine["reason"]))
    assert {"IM-0003": "empty_file", "IM-0004.dcm": "decode_failed"}.items() <= reasons.items()
    assert quarantine["message"].str.contains(r"^pacs/pneumonia/redacted-\w{8}/redacted-\w{8}/IM-000[34]").sum() == 2
    # image_id is keyed: the plain hash of a guessed path confirms nothing
    guessed = hashlib.sha256(b"pacs/pneumonia/MRN7730100/ACC5550100/IM-0001.dcm").hexdigest()[:16]
    assert guessed not in set(manifest["image_id"]) and manifest["image_id"].is_unique


def test_a_table_patient_column_is_redacted_from_its_films_and_its_rejected_rows(tmp_path):
    """A label table's patient_id, written in another case in a film's name, and on a row whose film is missing."""
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    films = tmp_path / "table"
    films.mkdir()
    rows = ["path,label,patient_id"]
    for i in range(24):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)
        Image.fromarray(pixels).save(films / f"hn{8840200 + i // 2}_{i}.png")
        rows.append(f"hn{8840200 + i // 2}_{i}.png,{'pneumonia' if i % 3 else 'normal'},HN{8840200 + i // 2}")
    rows.append("HN9990001_gone.png,normal,HN9990001")
    (films / "labels.csv").write_text("\n".join(rows) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  num_workers: 1\n  patient_pattern: '^(zz\\d+)_'\n"
                      "  sources: [table/labels.csv]\n")

    ingest_stage(ProjectPaths(tmp_path), load_config(params))

    needles = tuple(f"{8840200 + i}" for i in range(12)) + ("9990001",)
    assert leaked_identifiers(tmp_path, needles, skip=("table", "params.yaml")) == {}
    quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
    assert list(quarantine["reason"]) == ["missing_file"] and quarantine["path"].str.fullmatch(r"redacted-\w{8}_gone\.png").all()


def test_what_decode_workers_return_holds_no_identifier_and_no_path(tmp_path):
    """Outcomes cross process, task and network boundaries (a process pool, Prefect results, Dask): pickled as any
    of those would, they hold pseudonyms only, and a failed film is named {file}, never by its path."""
    import pickle

    from pipeline.decode_cache import FILE, Decoded, Failure
    from pipeline.deid import identifier_hashes, load_key, patient_hash
    from pipeline.demo_data import write_demo_data
    from pipeline.ingest import decode_items

    write_demo_data(tmp_path / "demo", n=40, seed=3, size=64)
    write_pacs_export(tmp_path, tmp_path / "demo")
    study = tmp_path / "pacs" / "pneumonia" / "MRN7730100" / "ACC5550100"
    files = sorted(study.iterdir()) + sorted((tmp_path / "pacs" / "normal").iterdir())[:8]
    key = load_key()

    outcomes = decode_items(files, 32, key, workers=2)  # a real process pool: 13 files, two workers

    sent = pickle.dumps(outcomes).decode("latin-1").lower()
    assert not [needle for needle in PACS_IDENTIFIERS if needle.lower() in sent]
    by_name = dict(zip((file.name for file in files), outcomes))
    assert isinstance(by_name["IM-0001.dcm"], Decoded) and isinstance(by_name["IM-0004.dcm"], Failure)
    assert by_name["IM-0001.dcm"].identity.patient == patient_hash("MRN7730100", key)
    assert identifier_hashes(["ACC5550100", "QUINCEY", "19610224"], key) <= by_name["IM-0004.dcm"].identity.hashes
    assert by_name["IM-0003"].message.startswith(f"{FILE}: ") and by_name["IM-0004.dcm"].message.startswith(f"{FILE}: ")


def test_the_redactor_finds_identifiers_as_words_runs_of_words_and_runs_inside_words():
    """Redactor's one pass over letter and digit runs must still find every form the docstring promises: a whole
    word, a run of words across separators (a name's parts joined by _ or -, a UID's 32 numbers), letter or digit
    runs inside a word, any case; and never a shorter match inside a longer word that is not the identifier."""
    from pipeline.deid import Redactor, identifier_hashes

    key = b"redactor-test-key-0123456789abcdef"
    uid = ".".join(str(n) for n in range(1, 33))  # 32 numbers: the most a 64-character DICOM UID can hold
    redactor = Redactor(identifier_hashes(["MRN7730100", "QUINCEY^MARGOT", uid], key), key)
    texts = {
        "MRN7730100/IM-1.dcm": ["MRN7730100", "7730100"],  # the whole word
        "mrn_7730100_film.png": ["mrn", "7730100"],  # a run of words, in other case
        "IMG7730100.jpg": ["7730100"],  # a digit run inside a word
        "XMRN7730100.jpg": ["7730100"],  # glued: its run of 6 or more digits
        "Quincey-Margot_chest.png": ["Quincey", "Margot"],  # a name's parts, joined by another separator
        "MARGOT/QUINCEY": ["MARGOT", "QUINCEY"],  # each part alone
        f"study {uid} view.dcm": [uid, "32"],  # a UID of 32 numbers, whole
    }
    for text, gone in texts.items():
        redacted = redactor.text(text)
        assert "redacted-" in redacted, text
        for part in gone:
            assert part not in redacted, (text, redacted)
    assert redactor.text("NRM7730101_IMG.png") == "NRM7730101_IMG.png"  # near misses stay
    assert redactor.path("pneumonia/MRN7730100/x.dcm").split("/")[0] == "pneumonia"


def test_a_redactor_told_the_identifiers_lengths_finds_exactly_what_one_hashing_every_run_finds():
    """The length filter may skip only runs no identifier could be: random paths built from identifiers (in any
    case, split by any separator, glued into words, with letters whose casefold is longer, such as ß) and noise
    must come out of both Redactors the same."""
    import random

    from pipeline.deid import Redactor, identifier_hashes

    key = b"redactor-length-test-key-0123456789"
    values = ["MRN7730100", "QUINCEY^MARGOT", "Straße^Jörg", "ACC5550100", "1.2.840.10008.77", "Ab9"]
    every_run = Redactor(identifier_hashes(values, key), key)
    by_length = Redactor.from_values(values, key)
    pieces = ["MRN7730100", "mrn", "7730100", "Quincey", "MARGOT", "STRASSE", "straße", "jörg", "ACC", "5550100",
              "1.2.840.10008.77", "ab9", "AB9X", "IM", "0001", "copy", "chest", "pa", "77", "xray", "ß", "é"]
    separators = ["", "-", "_", ".", " ", "/", "^"]
    generator = random.Random(15)
    for _ in range(3000):
        text = "".join(generator.choice(pieces) + generator.choice(separators) for _ in range(generator.randint(1, 9)))
        assert by_length.text(text) == every_run.text(text), text
        assert by_length.path(text) == every_run.path(text), text
    assert "7730100" not in by_length.text("scans/MRN-7730100_IM-1.dcm")
    assert "Jörg" not in by_length.text("STRASSE_Jörg.png") and "redacted-" in by_length.text("strasse.png")


def test_ingest_redacts_header_names_of_any_length_beside_file_name_patients():
    """A run whose identifiers all come from file names knows their lengths, but a header's pseudonyms come without
    theirs: a name from a DICOM header, longer than every file-name patient ID, must still be redacted from a path."""
    from pipeline.deid import Identity, identifier_hashes
    from pipeline.ingest import run_redactor
    from pipeline.sources import SourceItem

    key = b"redactor-length-test-key-0123456789"
    items = [SourceItem(source="films", path="P12/x.png", label="normal", split=None, patient_id="P12")]
    header = Identity(patient=None, hashes=identifier_hashes(["QUINCEY^MARGOT"], key))
    redacted = run_redactor(items, [header], [], key).path("QUINCEY_MARGOT_P12/x.png")
    assert "QUINCEY" not in redacted and "MARGOT" not in redacted and "P12" not in redacted, redacted
    only_names = run_redactor(items, [Identity()], [], key).path("P12_QUINCEY/x.png")
    assert "P12" not in only_names and "QUINCEY" in only_names  # nobody's header named QUINCEY in this run


@pytest.mark.parametrize("kind", ["blank", "too_small"])
def test_a_patient_whose_only_film_is_refused_after_decoding_is_still_redacted_from_its_path(tmp_path, kind):
    """Hostile: the patient's one DICOM decodes, then is refused for its pixels (flat, or too small), in folders
    named after the patient's ID and name. No other film names them, so only that film's own header can: the
    quarantine list must still not carry the ID or the name."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128, 16-bit
    dataset.PatientID, dataset.PatientName = "MRN4471902", "QUILLFEATHER^ROSALIND"
    if kind == "blank":
        pixels = np.full((128, 128), 900, dtype=np.int16)  # as flat a film as a detector with no exposure
    else:
        pixels = np.arange(12 * 12, dtype=np.int16).reshape(12, 12) * 10
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    folder = tmp_path / "raw" / "pneumonia" / "MRN4471902" / "QUILLFEATHER_ROSALIND"
    folder.mkdir(parents=True)
    dataset.save_as(folder / "MRN4471902_chest.dcm")
    other = tmp_path / "raw" / "normal"
    other.mkdir()
    Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)).save(other / "film.png")
    (tmp_path / "params.yaml").write_text("data:\n  image_size: 32\n  sources: [raw]\n")

    for run in ("cold", "from the decode cache"):  # the second run finds the refusal cached, with a new film beside it
        if run != "cold":
            Image.fromarray((np.arange(64 * 64) % 241).astype(np.uint8).reshape(64, 64)).save(other / "film2.png")
        ingest_stage(ProjectPaths(tmp_path), load_config(tmp_path / "params.yaml"))

        quarantine = pd.read_csv(tmp_path / "data" / "interim" / "quarantine.csv")
        assert list(quarantine["reason"]) == ["blank_image" if kind == "blank" else "too_small"], run
        written = (tmp_path / "data" / "interim" / "quarantine.csv").read_text()
        assert "redacted-" in written
        for part in ("MRN4471902", "4471902", "QUILLFEATHER", "ROSALIND"):
            assert part not in written, (run, written)
