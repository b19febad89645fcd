"""The validation gate on small hand-built manifests, through real great-expectations runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import DataConfig, Severities, ValidationConfig, load_config
from pipeline.errors import CxrError
from pipeline.paths import ProjectPaths
from pipeline.validate import CheckResult, GateResult, run_validation, validate_stage

SUMMARY_KEYS = {"passed", "n_images", "per_split", "duplicates", "patient_leakage", "checks"}


def clean_manifest() -> pd.DataFrame:
    """60 images of 20 patients (3 each); patients 0-11 train, 12-15 val, 16-19 test; even patients have pneumonia."""
    rows = []
    for i in range(60):
        patient = i // 3
        split = "train" if patient < 12 else "val" if patient < 16 else "test"
        label = "pneumonia" if patient % 2 == 0 else "normal"
        rows.append({
            "store_index": i, "image_id": f"img{i:03d}", "split": split, "label": label,
            "label_index": int(label == "pneumonia"), "patient_hash": f"patient{patient:02d}",
            "sha256": f"{i:064x}", "format": "png", "source": "demo", "path": f"demo/img{i:03d}.png",
            "width": 256, "height": 256, "modality": "", "photometric": "MONOCHROME2", "view": "",
            "mean_intensity": 100.0 + i, "std_intensity": 40.0,
        })
    return pd.DataFrame(rows)


def validate(manifest: pd.DataFrame, out_dir: Path, **severity: str) -> GateResult:
    return run_validation(manifest, DataConfig(), ValidationConfig(severity=Severities(**severity)), out_dir)


def check(gate: GateResult, name: str) -> CheckResult:
    return next(c for c in gate.checks if c.name == name)


def write_manifest(root: Path, manifest: pd.DataFrame) -> ProjectPaths:
    paths = ProjectPaths(root)
    paths.manifest.parent.mkdir(parents=True)
    manifest.to_parquet(paths.manifest, index=False)
    return paths


def test_clean_manifest_passes_and_writes_both_reports(tmp_path: Path) -> None:
    gate = validate(clean_manifest(), tmp_path)

    assert gate.passed
    assert {c.name for c in gate.checks} == set(Severities.model_fields)
    assert all(c.success for c in gate.checks), gate.checks
    results = json.loads(gate.results_path.read_text())
    assert set(results) == set(Severities.model_fields)
    assert results["labels_in_set"]["severity"] == "blocking"
    assert results["labels_in_set"]["result"]["success"] is True
    summary = json.loads(gate.summary_path.read_text())
    assert summary == gate.summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["n_images"] == 60
    assert summary["per_split"] == {
        "train": {"n": 36, "positive_fraction": 0.5},
        "val": {"n": 12, "positive_fraction": 0.5},
        "test": {"n": 12, "positive_fraction": 0.5},
    }
    assert summary["duplicates"] == {"exact_within_split": 0, "exact_cross_split": 0}
    assert summary["patient_leakage"] == 0
    assert summary["checks"]["intensity"] == {"severity": "warning", "success": True}


def test_rerun_writes_the_same_summary_and_results_bytes(tmp_path: Path) -> None:
    first = validate(clean_manifest(), tmp_path)
    summary, results = first.summary_path.read_bytes(), first.results_path.read_bytes()
    again = validate(clean_manifest(), tmp_path)
    assert again.summary_path.read_bytes() == summary
    assert again.results_path.read_bytes() == results  # no GX run ids or timestamps


def test_missing_split_or_label_fails_splits_complete(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest = manifest[manifest["split"] != "test"]  # e.g. every file became one patient
    gate = validate(manifest, tmp_path, class_ratio="ignore")
    assert not gate.passed
    assert check(gate, "splits_complete").details.startswith("1 of train/val/test lack images of some label")


def test_summary_counts_duplicates_and_leaked_patients_exactly(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[1, "sha256"] = manifest.loc[0, "sha256"]  # within train
    manifest.loc[4, "sha256"] = manifest.loc[3, "sha256"]  # within train
    manifest.loc[57, "sha256"] = manifest.loc[0, "sha256"]  # train image again in test
    manifest.loc[40, "patient_hash"] = "patient00"  # a train patient with one val image

    gate = validate(manifest, tmp_path)

    assert gate.summary["duplicates"] == {"exact_within_split": 2, "exact_cross_split": 1}
    assert gate.summary["patient_leakage"] == 1
    assert not gate.passed
    assert check(gate, "cross_split_duplicates").details == "1 sha256 value(s) occur in more than one split"
    assert check(gate, "patient_leakage").details == "1 patient(s) have images in more than one split"
    assert gate.summary["checks"]["cross_split_duplicates"] == {"severity": "blocking", "success": False}


def test_validate_stage_raises_naming_the_failed_check(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[57, "sha256"] = manifest.loc[0, "sha256"]
    paths = write_manifest(tmp_path, manifest)

    with pytest.raises(CxrError, match="cross_split_duplicates") as failure:
        validate_stage(paths, load_config(tmp_path / "params.yaml"))

    assert str(paths.validation_results) in str(failure.value)
    assert "\n" not in str(failure.value)
    assert json.loads(paths.validation_summary.read_text())["passed"] is False


def test_validate_stage_returns_the_gate_for_a_clean_manifest(tmp_path: Path) -> None:
    paths = write_manifest(tmp_path, clean_manifest())

    gate = validate_stage(paths, load_config(tmp_path / "params.yaml"))

    assert gate.passed
    assert gate.results_path == paths.validation_results
    assert gate.summary_path == paths.validation_summary


def test_unknown_label_fails_labels_in_set(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[5, "label"] = "covid"

    gate = validate(manifest, tmp_path)

    assert not gate.passed
    assert not check(gate, "labels_in_set").success
    assert check(gate, "labels_in_set").details.startswith("1 image(s) with a label outside")


def test_null_key_value_fails_required_columns_present(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[2, "patient_hash"] = None

    gate = validate(manifest, tmp_path)

    assert not gate.passed
    assert check(gate, "required_columns_present").details == "1 image(s) with no patient_hash"


def test_missing_column_is_an_error_before_any_check(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="sha256.*rerun ingest"):
        validate(clean_manifest().drop(columns=["sha256"]), tmp_path)


def test_blank_image_fails_intensity_but_only_warns_by_default(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[7, ["mean_intensity", "std_intensity"]] = [0.0, 0.0]

    gate = validate(manifest, tmp_path)

    intensity = check(gate, "intensity")
    assert (intensity.severity, intensity.success) == ("warning", False)
    assert "1 image(s) with intensity std below 2 (blank)" in intensity.details
    assert gate.passed


def test_intensity_set_to_blocking_blocks_the_blank_image(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[7, "std_intensity"] = 0.0
    paths = write_manifest(tmp_path, manifest)
    config = load_config(tmp_path / "params.yaml", ["validation.severity.intensity=blocking"])

    with pytest.raises(CxrError, match="intensity"):
        validate_stage(paths, config)


def test_ignored_check_is_not_run(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[5, "label"] = "covid"

    gate = validate(manifest, tmp_path, labels_in_set="ignore")

    assert gate.passed
    assert "labels_in_set" not in [c.name for c in gate.checks]
    assert "labels_in_set" not in gate.summary["checks"]
    assert "labels_in_set" not in json.loads(gate.results_path.read_text())


def test_class_ratio_out_of_bounds_fails(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[manifest["split"] == "val", "label"] = "normal"

    gate = validate(manifest, tmp_path)

    assert not gate.passed
    assert gate.summary["per_split"]["val"]["positive_fraction"] == 0.0
    assert check(gate, "class_ratio").details == "1 split(s) with a 'pneumonia' fraction outside [0.05, 0.95]"
