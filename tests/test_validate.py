"""The validation gate on small hand-built manifests, through real great-expectations runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import DataConfig, Severities, SplitFractions, ValidationConfig, load_config
from pipeline.errors import CxrError
from pipeline.paths import ProjectPaths
from pipeline.splits import assign_splits, write_registry
from pipeline.validate import CheckResult, GateResult, run_validation, validate_stage

SUMMARY_KEYS = {"passed", "n_images", "per_split", "duplicates", "patient_leakage", "checks", "label_review"}
PNEUMONIAMNIST = Path("/work/shared/data/pneumoniamnist/pneumoniamnist_trainval.npz")


def clean_manifest() -> pd.DataFrame:
    """60 images of 20 patients (3 each); patients 0-11 train, 12-15 val, 16-19 test; even patients have pneumonia."""
    rows = []
    for i in range(60):
        patient = i // 3
        split = "train" if patient < 12 else "val" if patient < 16 else "test"
        label = "pneumonia" if patient % 2 == 0 else "normal"
        rows.append({
            "store_index": i, "image_id": f"img{i:03d}", "split": split, "label": label,
            "label_index": int(label == "pneumonia"), "label_original": label, "label_source": "source",
            "patient_hash": f"patient{patient:02d}", "patient_from": "source",
            "sha256": f"{i:064x}", "format": "png", "source": "demo", "path": f"demo/img{i:03d}.png", "subtype": "",
            "width": 256, "height": 256, "bits_stored": 8, "modality": "", "photometric": "MONOCHROME2", "view": "",
            "body_part": "", "sex": "", "age_band": "",
            "mean_intensity": 100.0 + i, "std_intensity": 40.0,
        })
    return pd.DataFrame(rows)


def clean_images() -> np.ndarray:
    """60 different 64×64 films for clean_manifest: smooth random 8×8 blocks of grey between 40 and 200."""
    cells = np.random.default_rng(0).integers(40, 200, (60, 8, 8)).astype(np.uint8)
    return np.kron(cells, np.ones((8, 8), dtype=np.uint8))


def registry_of(manifest: pd.DataFrame) -> pd.DataFrame:
    """The split registry ingest records for a manifest whose splits came from its source."""
    return assign_splits(manifest.dropna(subset=["patient_hash"]), None, SplitFractions(), 0, "key")[1]


def validate(manifest: pd.DataFrame, out_dir: Path, images: np.ndarray | None = None, **severity: str) -> GateResult:
    images = clean_images() if images is None else images
    return run_validation(manifest, images, DataConfig(), ValidationConfig(severity=Severities(**severity)), out_dir,
                          registry=registry_of(manifest))


def check(gate: GateResult, name: str) -> CheckResult:
    return next(c for c in gate.checks if c.name == name)


def write_manifest(root: Path, manifest: pd.DataFrame, images: np.ndarray | None = None,
                   task: str = "binary", labels: tuple[str, ...] = ("normal", "pneumonia")) -> ProjectPaths:
    """What ingest writes: the manifest (for `task` and `labels`, the defaults' unless given), the image store and
    the split registry."""
    from pipeline.manifest import write_manifest as write_for_task

    paths = ProjectPaths(root)
    paths.manifest.parent.mkdir(parents=True)
    write_for_task(paths.manifest, manifest, task, list(labels))
    np.save(paths.images, clean_images() if images is None else images)
    write_registry(paths.split_registry, registry_of(manifest))
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
    no_split, no_pair = {"train": 0, "val": 0, "test": 0}, {"train/val": 0, "train/test": 0, "val/test": 0}
    assert summary["duplicates"] == {
        "exact_within_split": 0, "exact_cross_split": 0, "near_within_split": 0, "near_cross_split": 0,
        "exact_within_by_split": no_split, "exact_cross_by_pair": no_pair,
        "near_within_by_split": no_split, "near_cross_by_pair": no_pair, "dropped_by_dedupe": 0,
    }
    assert summary["patient_leakage"] == 0
    assert summary["checks"]["intensity"] == {"severity": "warning", "success": True}
    assert summary["checks"]["near_duplicates"] == {"severity": "warning", "success": True}


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


def copy_film(manifest: pd.DataFrame, images: np.ndarray, source: int, target: int) -> None:
    """Make row `target` an identical copy (same pixels, same sha256) of row `source`."""
    manifest.loc[target, "sha256"] = manifest.loc[source, "sha256"]
    images[target] = images[source]


def test_summary_counts_duplicates_and_leaked_patients_exactly(tmp_path: Path) -> None:
    manifest, images = clean_manifest(), clean_images()
    copy_film(manifest, images, 0, 1)  # exact, within train
    copy_film(manifest, images, 3, 4)  # exact, within train
    copy_film(manifest, images, 0, 57)  # exact, train image again in test
    images[45] = images[10] + 10  # near: a brighter train film in val
    images[50] = np.clip(images[20] + np.random.default_rng(1).normal(0, 3, (64, 64)), 0, 255)  # near: noisy, in test
    images[7] = (128 + (images[6] - 128.0) * 1.1).astype(np.uint8)  # near: more contrast, both in train
    manifest.loc[40, "patient_hash"] = "patient00"  # a train patient with one val image

    gate = validate(manifest, tmp_path, images)

    assert gate.summary["duplicates"] == {
        "exact_within_split": 2, "exact_cross_split": 1, "near_within_split": 1, "near_cross_split": 2,
        "exact_within_by_split": {"train": 2, "val": 0, "test": 0},
        "exact_cross_by_pair": {"train/val": 0, "train/test": 1, "val/test": 0},
        "near_within_by_split": {"train": 1, "val": 0, "test": 0},
        "near_cross_by_pair": {"train/val": 1, "train/test": 1, "val/test": 0},
        "dropped_by_dedupe": 0,
    }
    assert gate.summary["patient_leakage"] == 1
    assert not gate.passed
    assert check(gate, "cross_split_duplicates").details == "1 sha256 value(s) occur in more than one split"
    assert check(gate, "patient_leakage").details == "1 patient(s) have images in more than one split"
    assert gate.summary["checks"]["cross_split_duplicates"] == {"severity": "blocking", "success": False}
    near = check(gate, "near_duplicates")
    assert (near.severity, near.success) == ("warning", False)
    assert near.details == (
        "2 image(s) with a near-duplicate (perceptual hash within 4 bits) in their own split; "
        "4 image(s) with a near-duplicate (perceptual hash within 4 bits) in another split")
    outcomes = json.loads(gate.results_path.read_text())["near_duplicates"]["result"]["results"]
    named = {row["image_id"] for outcome in outcomes for row in outcome["result"]["partial_unexpected_index_list"]}
    assert named == {"img006", "img007", "img010", "img045", "img020", "img050"}
    # DVC's metrics file: the same counts, numbers only, flat (one `dvc exp show` column each)
    failed = [c.severity for c in gate.checks if not c.success]
    assert json.loads((tmp_path / "counts.json").read_text()) == {
        "passed": 0, "n_images": len(manifest), "failed_blocking": failed.count("blocking"), "failed_warning": 1,
        "patient_leakage": 1, "exact_cross_split": 1, "near_cross_split": 2, "exact_within_split": 2,
        "near_within_split": 1, "dropped_by_dedupe": 0}
    assert failed.count("blocking") >= 2


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
    assert paths.validation_results.is_file() and paths.validation_summary.is_file()
    assert json.loads(paths.validation_results.read_text())  # the GX results, one entry per check run
    summary = json.loads(paths.validation_summary.read_text())
    assert summary["passed"] is True and summary == gate.summary


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


def test_small_or_upsampled_originals_warn_in_image_size(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[8, ["width", "height"]] = [20, 300]  # a thumbnail: below 28 px and below data.image_size
    manifest.loc[9, ["width", "height"]] = [48, 48]  # above 28 px but stored upsampled to 64 px

    gate = validate(manifest, tmp_path)

    size = check(gate, "image_size")
    assert (size.severity, size.success) == ("warning", False)
    assert size.details == (
        "1 image(s) with an original side below 28 px (a thumbnail, not a film); "
        "2 image(s) smaller than data.image_size (64 px) before resizing: stored upsampled, "
        "so blurrier than the stored size suggests")
    assert gate.passed


def test_mr_modality_and_lateral_view_warn_and_unknown_ones_pass(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[0:3, ["modality", "view"]] = ["CR", "PA"]
    manifest.loc[4, ["modality", "view"]] = ["dx", "ap"]  # case does not matter
    manifest.loc[5, "modality"] = "MR"
    manifest.loc[6, ["modality", "view"]] = ["DX", "LATERAL"]
    manifest.loc[7, "modality"] = None  # unknown, like the empty strings of PNG rows

    gate = validate(manifest, tmp_path)

    modality_view = check(gate, "modality_and_view")
    assert (modality_view.severity, modality_view.success) == ("warning", False)
    assert modality_view.details == (
        "1 image(s) with a DICOM modality outside CR, DX; 1 image(s) with a DICOM view position outside PA, AP")
    assert gate.passed


def test_data_docs_are_built_from_the_same_results_inside_the_output_folder(tmp_path: Path, monkeypatch) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # where GX's own docs site would have gone
    out_dir = tmp_path / "reports" / "validation"

    gate = validate(clean_manifest(), out_dir, modality_and_view="ignore")
    validate(clean_manifest(), out_dir, modality_and_view="ignore")  # a rerun replaces the pages

    assert gate.data_docs_path == out_dir / "data_docs" / "index.html"
    index = gate.data_docs_path.read_text()
    ran = [c.name for c in gate.checks]
    assert all(name in index for name in ran)
    assert "modality_and_view" not in index
    validation_pages = sorted((out_dir / "data_docs" / "validations").rglob("*.html"))
    assert len(validation_pages) == len(ran)
    assert sorted(p.name for p in out_dir.iterdir()) == ["counts.json", "data_docs", "results.json", "summary.json"]
    assert list(system_tmp.iterdir()) == []


def test_validate_stage_needs_the_image_store(tmp_path: Path) -> None:
    paths = write_manifest(tmp_path, clean_manifest())
    paths.images.unlink()

    with pytest.raises(CxrError, match="images.npy is missing: run ingest first"):
        validate_stage(paths, load_config(tmp_path / "params.yaml"))


def test_validate_stage_needs_the_split_registry(tmp_path: Path) -> None:
    paths = write_manifest(tmp_path, clean_manifest())
    paths.split_registry.unlink()

    with pytest.raises(CxrError, match="splits.parquet is missing: run ingest first"):
        validate_stage(paths, load_config(tmp_path / "params.yaml"))


def test_a_manifest_that_disagrees_with_the_split_registry_fails_the_gate(tmp_path: Path) -> None:
    """A recorded test patient found in train (a manifest from elsewhere, a hand edit) blocks, as does an unrecorded one."""
    from pipeline.manifest import write_manifest as write_labelled_manifest

    paths = write_manifest(tmp_path, clean_manifest())
    manifest = clean_manifest()
    manifest.loc[manifest["patient_hash"] == "patient16", "split"] = "train"  # every film of a test patient
    manifest.loc[manifest["patient_hash"] == "patient19", "patient_hash"] = "patient20"  # not in the registry
    write_labelled_manifest(paths.manifest, manifest, "binary", ["normal", "pneumonia"])

    with pytest.raises(CxrError, match="split_registry") as failure:
        validate_stage(paths, load_config(tmp_path / "params.yaml"))

    assert "\n" not in str(failure.value)
    results = json.loads(paths.validation_results.read_text())
    assert results["split_registry"]["severity"] == "blocking"
    assert results["split_registry"]["details"] == (
        "1 patient(s) in a split other than data/splits.parquet records: the manifest and the registry disagree; "
        "rerun ingest (README: Splits that never move); 1 patient(s) missing from data/splits.parquet: rerun ingest")
    named = {row["patient_hash"] for outcome in results["split_registry"]["result"]["results"]
             for row in outcome["result"]["partial_unexpected_index_list"]}
    assert named == {"patient16", "patient20"}
    assert results["patient_leakage"]["result"]["success"] is True  # one split per patient: only the registry knows


def test_image_store_shorter_than_the_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="does not match the manifest.*rerun ingest"):
        validate(clean_manifest(), tmp_path, clean_images()[:50])


@pytest.mark.skipif(not PNEUMONIAMNIST.exists(), reason=f"real data absent: {PNEUMONIAMNIST}")
def test_pneumoniamnist_duplicates_within_train_and_between_train_and_val_are_counted(tmp_path, monkeypatch) -> None:
    """The published file holds identical images within train and between train and val (shared/data/README.md)."""
    from pipeline.ingest import ingest_stage

    monkeypatch.setenv("CXR_DEID_KEY", "test-key-0123456789abcdef0123456789")
    paths = ProjectPaths(tmp_path)
    found = {}
    for dedupe in ("report", "drop"):
        config = load_config(tmp_path / "params.yaml", [f"data.sources=[{PNEUMONIAMNIST}]", "data.image_size=28", f"data.dedupe={dedupe}"])
        ingest_stage(paths, config)
        if dedupe == "report":  # the copies stay, so the blocking check stops the run
            with pytest.raises(CxrError, match="cross_split_duplicates"):
                validate_stage(paths, config)
        else:  # the copies were dropped, so the gate passes and still reports what was found
            validate_stage(paths, config)
        found[dedupe] = json.loads(paths.validation_summary.read_text())["duplicates"]

    for duplicates in found.values():
        assert duplicates["exact_within_by_split"]["train"] > 0
        assert duplicates["exact_cross_by_pair"]["train/val"] > 0
        # A handful of near pairs (4 when written), not the 200 or so the classic image-relative pHash finds.
        assert duplicates["near_within_split"] + duplicates["near_cross_split"] <= 10
    assert found["drop"]["exact_within_split"] == found["report"]["exact_within_split"]
    assert found["drop"]["dropped_by_dedupe"] >= found["drop"]["exact_within_split"] > 0


def test_odd_bit_depth_fails_image_size(tmp_path: Path) -> None:
    manifest = clean_manifest()
    manifest.loc[3, "bits_stored"] = 32
    gate = validate(manifest, tmp_path)
    assert "1 image(s) with a bit depth outside 8 to 16 bits" in check(gate, "image_size").details


def multilabel_manifest() -> pd.DataFrame:
    """clean_manifest with label sets: patients cycle through none, effusion, pneumonia and both (every split has each)."""
    manifest = clean_manifest()
    sets = ["", "effusion", "pneumonia", "effusion|pneumonia"]
    return manifest.assign(label=[sets[(i // 3) % 4] for i in range(60)], label_index=-1)


def validate_multilabel(manifest: pd.DataFrame, out_dir: Path) -> GateResult:
    data = DataConfig(task="multilabel", labels=["effusion", "pneumonia"])
    return run_validation(manifest, clean_images(), data, ValidationConfig(), out_dir)


def test_multilabel_sets_pass_with_each_labels_fraction_in_the_summary(tmp_path: Path) -> None:
    gate = validate_multilabel(multilabel_manifest(), tmp_path)
    assert gate.passed, gate.checks
    assert gate.summary["per_split"]["val"] == {"n": 12, "label_fractions": {"effusion": 0.5, "pneumonia": 0.5}}


def test_multilabel_label_missing_from_a_split_or_unknown_fails(tmp_path: Path) -> None:
    manifest = multilabel_manifest()
    val = manifest["split"] == "val"
    manifest.loc[val, "label"] = manifest.loc[val, "label"].str.replace("pneumonia", "").str.strip("|")
    manifest.loc[0, "label"] = "effusion|nodule"
    gate = validate_multilabel(manifest, tmp_path)
    assert not gate.passed
    assert check(gate, "splits_complete").details.startswith("1 of train/val/test lack images of some label")
    assert check(gate, "class_ratio").details == "1 split/label pair(s) with a label fraction outside [0.05, 0.95]"
    assert check(gate, "labels_in_set").details == "1 label(s) of images outside effusion, pneumonia"
