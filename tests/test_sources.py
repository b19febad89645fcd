"""Source adapters on real files: NIH and RSNA tables, DICOM folders keyed by SOPInstanceUID,
unlabelled folders, header filters, and the real samples in ../shared (skipped when absent)."""

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths
from tests.conftest import SHARED_DATA


def _png(path, seed, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path)


def _ingest(tmp_path, sources: str, *extra: str):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n")
    paths = ProjectPaths(tmp_path)
    result = ingest_stage(paths, load_config(params, [f"data.sources={sources}", *extra]))
    return result, pd.read_parquet(paths.manifest), pd.read_csv(paths.quarantine)


@pytest.fixture
def demo_dicoms(tiny_project):
    demo = tiny_project.paths.root / "data" / "raw" / "demo"
    return [p for p in sorted(demo.rglob("*.dcm")) if "broken" not in p.name]


def test_nih_table_preset_finds_films_by_name_and_reads_multi_labels(tmp_path):
    rows = []
    findings = ["No Finding", "Pneumonia", "Pneumonia|Effusion", "Effusion", "No Finding", "Infiltration|Pneumonia"]
    for i, finding in enumerate(findings * 3):
        name = f"{i:08d}_000.png"
        _png(tmp_path / "nih" / f"images_{i % 2 + 1:03d}" / "images" / name, i)
        rows.append({"Image Index": name, "Finding Labels": finding, "Follow-up #": 0, "Patient ID": i // 2})
    pd.DataFrame(rows).to_csv(tmp_path / "nih" / "Data_Entry_2017.csv", index=False)

    result, manifest, quarantine = _ingest(tmp_path, "[{path: nih/Data_Entry_2017.csv, format: nih}]")

    assert result.n_images == 15
    assert (manifest["label"] == "pneumonia").sum() == 9 and (manifest["label"] == "normal").sum() == 6
    assert set(quarantine["reason"]) == {"label_not_in_set"}  # 'Effusion' alone is neither label
    assert manifest.groupby("patient_hash")["split"].nunique().max() == 1


def test_rsna_table_preset_with_one_row_per_box(tmp_path, demo_dicoms):
    rows = []
    for i, film in enumerate(demo_dicoms[:6]):
        shutil.copy2(film, tmp_path / f"pid{i}.dcm")
        target = i % 2
        rows += [{"patientId": f"pid{i}", "x": 1, "y": 2, "width": 3, "height": 4, "Target": target}] * (1 + target)
    rows.append({"patientId": "pid0", "x": "", "y": "", "width": "", "height": "", "Target": 1})  # disagrees with pid0
    pd.DataFrame(rows).to_csv(tmp_path / "stage_2_train_labels.csv", index=False)

    result, manifest, quarantine = _ingest(tmp_path, "[{path: stage_2_train_labels.csv, format: rsna}]")

    assert result.n_images == 6
    assert sorted(manifest["label"]) == ["normal"] * 3 + ["pneumonia"] * 3
    assert quarantine["reason"].tolist() == ["conflicting_labels"]


def test_dicom_folder_labelled_by_table_keyed_on_sop_instance_uid(tmp_path, demo_dicoms):
    rows = []
    (tmp_path / "films").mkdir()
    for i, film in enumerate(demo_dicoms[:8]):
        shutil.copy2(film, tmp_path / "films" / f"anon{i}.dcm")
        uid = str(pydicom.dcmread(film, stop_before_pixels=True).SOPInstanceUID)
        rows.append({"uid": uid, "finding": "pos" if i % 2 else "neg"})
    rows.append({"uid": "1.2.3.4.5", "finding": "pos"})
    pd.DataFrame(rows).to_parquet(tmp_path / "labels.parquet")
    source = "{path: labels.parquet, image_root: films, match: sop_instance_uid, path_column: uid, label_column: finding, label_map: {neg: normal, pos: pneumonia}}"

    result, manifest, quarantine = _ingest(tmp_path, f"[{source}]")

    assert result.n_images == 8 and (manifest["label"] == "pneumonia").sum() == 4
    assert quarantine["reason"].tolist() == ["missing_file"]
    assert set(manifest["modality"]) <= {"CR", "DX"} and set(manifest["body_part"]) == {"CHEST"}


def test_unlabelled_folder_is_kept_apart_from_training_splits(tmp_path):
    for i in range(6):
        _png(tmp_path / "lab" / ("normal" if i % 2 else "pneumonia") / f"p{i}_1.png", i)
        _png(tmp_path / "unlab" / f"scan{i}.png", 100 + i)
    (tmp_path / "unlab" / "notes.csv").write_text("a,b\n")

    result, manifest, quarantine = _ingest(tmp_path, "[lab, {path: unlab, labelled: false}]")

    unlabelled = manifest[manifest["split"] == "unlabelled"]
    assert len(unlabelled) == 6 and (unlabelled["label"] == "").all() and (unlabelled["label_index"] == -1).all()
    assert result.split_counts["unlabelled"] == 6
    assert quarantine.empty  # the CSV beside the films is a table, not a broken film


def test_filters_quarantine_films_outside_modality_and_view(tmp_path, demo_dicoms):
    for i, film in enumerate(demo_dicoms[:6]):
        target = tmp_path / "films" / "pneumonia" / f"p{i}_1.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset = pydicom.dcmread(film)
        dataset.Modality = "MR" if i == 0 else "CR"
        dataset.ViewPosition = "LL" if i == 1 else "PA"
        dataset.save_as(target)
    _png(tmp_path / "films" / "normal" / "n1_1.png", 7)

    result, manifest, quarantine = _ingest(tmp_path, "[films]", "data.filters.modalities=[CR, DX]", "data.filters.views=[PA, AP]")

    assert sorted(quarantine["reason"]) == ["filtered_modality", "filtered_view"]
    assert result.n_images == 5  # the PNG has no header and passes


@pytest.mark.skipif(not (SHARED_DATA / "samples").is_dir(), reason="../shared/data/samples is not here (real sample films)")
def test_every_real_sample_is_used_or_quarantined_with_a_reason(tmp_path):
    samples = SHARED_DATA / "samples"
    sources = f"[{samples / 'kermany_fullres'}, {{path: {samples / 'dicom'}, labelled: false}}]"

    result, manifest, quarantine = _ingest(tmp_path, sources)

    films = [p for p in (samples / "kermany_fullres").rglob("*.jpeg")] + list((samples / "dicom").glob("*.dcm"))
    assert result.n_images + len(quarantine) == len(films)
    # the truncated MR and the bad-SOS JPEG; the 2-frame RGB test image is no chest film (data.max_frames: 1)
    assert sorted(quarantine["reason"]) == ["decode_failed", "decode_failed", "too_many_frames"]
    # Every Kermany pneumonia film that was used names bacteria or virus, and only those carry a subtype.
    pattern = re.compile(load_config(tmp_path / "params.yaml").data.subtype_pattern)
    def unredacted_part(name: str) -> str:  # person1139_virus_2312.jpeg: the patient (person1139) is redacted
        return name.partition("_")[2]

    quarantined = {unredacted_part(Path(path).name) for path in quarantine["path"]}
    expected = {unredacted_part(film.name): pattern.search(film.name).group(1)
                for film in (samples / "kermany_fullres" / "PNEUMONIA").glob("*.jpeg")
                if unredacted_part(film.name) not in quarantined}
    assert expected
    with_subtype = manifest[manifest["subtype"] != ""]
    assert dict(zip(with_subtype["path"].map(lambda path: unredacted_part(Path(path).name)), with_subtype["subtype"])) == expected
    mono1 = manifest[manifest["photometric"] == "MONOCHROME1"]
    assert len(mono1) == 2 and set(manifest.loc[manifest["format"] == "dicom", "split"]) == {"unlabelled"}
