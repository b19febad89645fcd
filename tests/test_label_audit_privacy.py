"""No patient identifier reaches what the label audit and a review decision write: a hostile DICOM archive whose
headers and folder and file names carry names, IDs, birth dates, accession numbers and institutions, audited with
the real CLI (fold models, cleanlab, Grad-CAM, MLflow) and one suggestion accepted with `cxr review accept`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import tiny_params_text
from tests.test_cli import cxr
from tests.test_label_audit import AUDIT_SETTINGS

# (surname, given name, MRN, accession, birth date, institution): one per patient, each unusual enough that no
# chance byte sequence in a PNG or a database page matches it
PATIENTS = [
    ("QUINCEY", "MARGOT", "MRN7730101", "ACC5550101", "19610224", "Vesperine Clinic"),
    ("VANTERPOOL", "ELSPETH", "MRN7730102", "ACC5550102", "19530817", "Halloran Infirmary"),
    ("OKONKWOBE", "THADDEUS", "MRN7730103", "ACC5550103", "19771109", "Vesperine Clinic"),
    ("BRISBOIS", "PERPETUA", "MRN7730104", "ACC5550104", "19880302", "Marchbanks Hospital"),
    ("STRZELECKI", "CORNELIUS", "MRN7730105", "ACC5550105", "19490630", "Halloran Infirmary"),
    ("ABERNATHY", "LUCRETIA", "MRN7730106", "ACC5550106", "19920115", "Marchbanks Hospital"),
]
SPLIT_OF = ["train", "train", "train", "val", "train", "test"]  # the source's own split, one per patient
FILMS_PER_PATIENT = 12
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def needles() -> list[str]:
    """Every identifier and its obvious transforms: the parts of the name in both orders and with the usual
    separators, the MRN and its digits, the accession and its digits, the birth date as written and as ISO,
    the institution and its distinctive word. Matched case-insensitively."""
    found = []
    for surname, given, mrn, accession, born, institution in PATIENTS:
        found += [surname, given, f"{surname}^{given}", f"{given} {surname}", f"{surname}_{given}", f"{given}.{surname}",
                  mrn, mrn[3:], accession, accession[3:], born, f"{born[:4]}-{born[4:6]}-{born[6:]}", institution,
                  institution.split()[0]]
    return found


def _dicom(path, pixels: np.ndarray, patient: tuple, number: int) -> None:
    """A DX film of `patient` with the identifiers in its header, 12-bit MONOCHROME2."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    surname, given, mrn, accession, born, institution = patient
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[mrn, str(number)])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[mrn, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[mrn, "series"])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{surname}^{given}", mrn, born
    ds.AccessionNumber, ds.InstitutionName, ds.InstanceNumber = accession, institution, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (pixels.astype(np.uint16) * 16).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_identified_archive(root) -> str:
    """films/<MRN>/<SURNAME_GIVEN>/<MRN>_<surname>_<n>.dcm for each patient, 28 px films a small CNN tells apart (a
    `pneumonia` film carries a bright round opacity), and films/labels.csv naming each film by that path with its
    label, the patient's MRN and the patient's split. Two films of the first patient are near-identical with
    different labels, so the audit lists at least one film whatever the fold models learn. Returns the path of
    the table relative to root."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:28, :28]
    rows = ["path,label,patient_id,split"]
    first = np.zeros((28, 28), np.uint8)
    for k, patient in enumerate(PATIENTS):
        surname, given, mrn = patient[:3]
        for n in range(FILMS_PER_PATIENT):
            sick = n % 2 == 1
            film = 70 + 2.0 * y + rng.normal(0, 12, (28, 28))
            if sick:
                cy, cx = rng.integers(9, 20, 2)
                film += 70 * (((y - cy) ** 2 + (x - cx) ** 2) < 30)
            label = "pneumonia" if sick else "normal"
            if k == 0 and n == 1:  # a near-identical copy of film 0 (normal), labelled pneumonia
                film = first.astype(float)
                film[0, 0] += 9
            pixels = np.clip(film, 0, 255).astype(np.uint8)
            first = pixels if n == 0 else first
            relative = f"{mrn}/{surname}_{given}/{mrn}_{surname.lower()}_{n:02d}.dcm"
            _dicom(root / "films" / relative, pixels, patient, n + 1)
            rows.append(f"{relative},{label},{mrn},{SPLIT_OF[k]}")
    (root / "films" / "labels.csv").write_text("\n".join(rows) + "\n")
    return "films/labels.csv"


def write_params(root, settings: list[str]):
    """params.yaml with tiny sizes and `settings` (KEY=VALUE, as --set takes them) written in: `cxr review` reads
    the file only."""
    import yaml

    params = yaml.safe_load(tiny_params_text())
    for setting in settings:
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        params[section][name] = yaml.safe_load(value)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [needle for needle in needles() if needle.lower() in lowered]


@pytest.mark.slow
def test_the_audit_its_review_page_mlflow_and_a_review_decision_leak_no_identifier(tmp_path):
    from pipeline.paths import ProjectPaths
    from pipeline.tracking import client as tracking_client

    root = tmp_path / "project"
    root.mkdir()
    table = write_identified_archive(root)
    params = write_params(root, [*AUDIT_SETTINGS, f"data.sources=[{table}]"])
    paths, options = ProjectPaths(root), ["--params", str(params)]

    outputs = [cxr("ingest", *options, cwd=root)]
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    manifest = pd.read_parquet(paths.manifest)
    assert len(manifest) == len(PATIENTS) * FILMS_PER_PATIENT and (manifest["patient_from"] != "film").all()
    outputs.append(cxr("audit-labels", "--folds", "3", "--top", "6", *options, cwd=root))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    issues = pd.read_csv(paths.reports / "label_issues.csv", keep_default_na=False)
    assert len(issues) >= 1 and issues["path"].str.contains("redacted-").all()  # the planted names were in every path
    outputs.append(cxr("review", "accept", issues["path"].iloc[0], "--reason", "consolidation on the film",
                       "--reviewer", "tester", *options, cwd=root))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    decisions = paths.label_overrides.read_text()
    assert issues["path"].iloc[0] in decisions

    page = (paths.reports / "label_review.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 * min(6, len(issues))  # the films and Grad-CAM were drawn
    written = {"label_issues.csv": (paths.reports / "label_issues.csv").read_text(), "label_review.html": page,
               "overrides.csv": decisions}
    for number, out in enumerate(outputs):
        written[f"command {number} stdout"], written[f"command {number} stderr"] = out.stdout, out.stderr
    store = root / "mlartifacts"
    artifacts = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "label_issues.csv" for p in artifacts)
    for artifact in artifacts:
        written[str(artifact.relative_to(root))] = artifact.read_bytes().decode("latin-1")
    written["mlruns.db"] = (root / "mlruns.db").read_bytes().decode("latin-1")
    client = tracking_client(paths)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(run.data.tags.get("cxr.audit") == "labels" for run in runs)
    for run in runs:  # what the store gives back, as a reader of the MLflow UI sees it
        data = run.data
        written[f"run {run.info.run_id}"] = repr((run.info.run_name, data.params, data.tags, data.metrics))
    assert {name: found for name, text in written.items() if (found := leaks(text))} == {}
    # the scan reads what it says it reads: the inputs hold every needle
    raw = {value for patient in PATIENTS for value in patient}
    assert not raw - set(leaks((root / "films" / "labels.csv").read_text() + "".join(
        p.read_bytes().decode("latin-1") for p in sorted((root / "films").rglob("*.dcm"))[::FILMS_PER_PATIENT])))


def test_a_grad_cam_overlay_renders_in_memory_to_the_bytes_write_overlay_writes(tmp_path):
    """The review page draws its overlays without a file: the same PNG `write_overlay` writes, named nowhere."""
    from pipeline.explain import overlay_png, write_overlay

    rng = np.random.default_rng(0)
    film = rng.integers(0, 255, (28, 28), dtype=np.uint8)
    heat = rng.random((28, 28)).astype(np.float32)
    write_overlay(film, heat, tmp_path / "overlay.png", "evidence for pneumonia")
    png = overlay_png(film, heat, "evidence for pneumonia")
    assert png.startswith(b"\x89PNG") and png == (tmp_path / "overlay.png").read_bytes()
