"""No patient identifier planted in the demo DICOM headers reaches any output, unhashed."""

import os

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
