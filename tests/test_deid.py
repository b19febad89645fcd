"""No patient identifier planted in the demo DICOM headers reaches any output, unhashed."""

import os

import pandas as pd

from pipeline.deid import load_key, patient_hash
from pipeline.demo_data import phi_values

OUTPUT_DIRS = ("data/interim", "data/processed", "reports", "models", "mlartifacts")


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

    root = tiny_project.paths.root
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    dicom_row = manifest[manifest["format"] == "dicom"].iloc[0]
    header = pydicom.dcmread(root / dicom_row["source"] / dicom_row["path"], stop_before_pixels=True)
    assert dicom_row["patient_hash"] == patient_hash(str(header.PatientID), load_key())
    assert dicom_row["patient_hash"] != patient_hash(str(header.PatientID), b"another key")


def test_key_file_is_created_once_outside_the_project_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv("CXR_DEID_KEY", raising=False)
    monkeypatch.setenv("CXR_DEID_KEY_FILE", str(tmp_path / "keys" / "deid.key"))
    first = load_key()
    assert load_key() == first and len(first) == 64
    assert oct(os.stat(tmp_path / "keys" / "deid.key").st_mode & 0o777) == "0o600"
