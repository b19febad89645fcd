"""A reviewer's label decisions (data/labels/overrides.csv): read by ingest, written by `cxr review`, counted by the
data gate, recorded in the training lineage. Real files, real ingest, the real CLI."""

from __future__ import annotations

import getpass
import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr.cli import app
from pipeline.config import load_config
from pipeline.errors import CxrError
from pipeline.ingest import ingest_stage
from pipeline.manifest import label_review, review_tags
from pipeline.overrides import NO_FINDINGS, read_overrides, review_shares
from pipeline.paths import ProjectPaths
from pipeline.review import review
from pipeline.tasks import task_for

HEADER = "source,path,new_label,exclude,reason,reviewer,date\n"
SOURCE = "data/raw/films"
BINARY = task_for("binary", ["normal", "pneumonia"])


def _write_png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(30, 220, (40, 40), dtype=np.uint8)).save(path)


def _project(tmp_path, overrides: str | None = None) -> tuple[ProjectPaths, object]:
    """12 PNG films of 12 patients in class folders (6 normal, 6 pneumonia), and the decisions file when given."""
    for i in range(12):
        _write_png(tmp_path / SOURCE / ("normal" if i < 6 else "pneumonia") / f"p{i}_film.png", i)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  image_size: 32\n  sources: [{SOURCE}]\n")
    if overrides is not None:
        _overrides(tmp_path, overrides)
    return ProjectPaths(tmp_path), load_config(params)


def _overrides(root, rows: str) -> None:
    (root / "data" / "labels").mkdir(parents=True, exist_ok=True)
    (root / "data" / "labels" / "overrides.csv").write_text(HEADER + rows)


def _read(tmp_path, rows: str, task=BINARY):
    _overrides(tmp_path, rows)
    return read_overrides(tmp_path / "data" / "labels" / "overrides.csv", task, "data/labels/overrides.csv")


# --- the file ---------------------------------------------------------------------------------------------------


def test_a_missing_file_means_no_decisions_and_no_hash(tmp_path):
    read = read_overrides(tmp_path / "overrides.csv", BINARY, "data/labels/overrides.csv")
    assert read.decisions == {} and read.sha256 is None


@pytest.mark.parametrize(("row", "problem"), [
    (f"{SOURCE},normal/p0_film.png,pnemonia,,typo,ann,2026-12-01\n", "new_label 'pnemonia' is not one of data.labels"),
    (f"{SOURCE},normal/p0_film.png,normal|pneumonia,,two,ann,2026-12-01\n", "a film of this task has one label"),
    (f"{SOURCE},normal/p0_film.png,pneumonia,true,both,ann,2026-12-01\n", "both new_label and exclude"),
    (f"{SOURCE},normal/p0_film.png,,,neither,ann,2026-12-01\n", "neither new_label nor exclude"),
    (f"{SOURCE},normal/p0_film.png,,maybe,odd,ann,2026-12-01\n", "exclude 'maybe' is neither true nor false"),
    (f"{SOURCE},normal/p0_film.png,pneumonia,,,ann,2026-12-01\n", "reason is empty"),
    (f"{SOURCE},normal/p0_film.png,pneumonia,,why,ann,01/12/2026\n", "is not a date written YYYY-MM-DD"),
])
def test_a_bad_row_is_a_one_line_error_naming_the_file_and_line(tmp_path, row, problem):
    with pytest.raises(CxrError) as caught:
        _read(tmp_path, f"{SOURCE},normal/p1_film.png,pneumonia,,fine,ann,2026-12-01\n{row}")
    message = str(caught.value)
    assert message.startswith("data/labels/overrides.csv line 3: ") and problem in message and "\n" not in message


def test_a_film_decided_twice_is_refused_naming_both_lines(tmp_path):
    rows = (f"{SOURCE},normal/p0_film.png,pneumonia,,a,ann,2026-12-01\n"
            f"{SOURCE},normal/p1_film.png,pneumonia,,b,ann,2026-12-01\n"
            f"{SOURCE},normal/p0_film.png,,true,c,bob,2026-12-02\n")
    with pytest.raises(CxrError, match=r"line 4: data/raw/films/normal/p0_film.png is decided again \(first on line 2\)"):
        _read(tmp_path, rows)


def test_films_named_by_sop_instance_uid_are_refused_as_identifiers(tmp_path):
    (tmp_path / "overrides.csv").write_text("sop_instance_uid,source,new_label,reason,reviewer,date\n"
                                            "1.2.840.1.2.3,src,pneumonia,x,ann,2026-12-01\n")
    with pytest.raises(CxrError, match="an identifier the project never stores unhashed"):
        read_overrides(tmp_path / "overrides.csv", BINARY, "overrides.csv")


def test_multilabel_new_labels_are_findings_joined_by_bar_or_none(tmp_path):
    task = task_for("multilabel", ["effusion", "pneumonia"])
    read = _read(tmp_path, f"s,a.png,Pneumonia | effusion,,both,ann,2026-12-01\ns,b.png,{NO_FINDINGS},,clear,ann,2026-12-01\n", task)
    assert read.find("s", "a.png").new_label == "effusion|pneumonia"  # the manifest's form: data.labels order
    assert read.find("s", "b.png").new_label == ""
    with pytest.raises(CxrError, match=r"line 2: new_label 'effusion\|nodule' names \['nodule'\]"):
        _read(tmp_path, "s,a.png,effusion|nodule,,x,ann,2026-12-01\n", task)


# --- ingest -----------------------------------------------------------------------------------------------------


def test_ingest_relabels_and_excludes_as_decided_and_records_the_file_hash(tmp_path):
    rows = (f"{SOURCE},normal/p0_film.png,pneumonia,,consolidation missed,ann,2026-12-01\n"
            f"{SOURCE},pneumonia/p6_film.png,pneumonia,,kept after review,ann,2026-12-01\n"
            f"{SOURCE},pneumonia/p7_film.png,,true,lateral view,ann,2026-12-01\n")
    paths, config = _project(tmp_path, rows)

    ingest_stage(paths, config)

    manifest = pd.read_parquet(paths.manifest).set_index("path")
    assert manifest.loc["normal/p0_film.png", ["label", "label_index", "label_original", "label_source"]].tolist() == [
        "pneumonia", 1, "normal", "override"]
    assert manifest.loc["pneumonia/p6_film.png", ["label", "label_original", "label_source"]].tolist() == [
        "pneumonia", "pneumonia", "override"]
    assert manifest.loc["normal/p1_film.png", ["label", "label_original", "label_source"]].tolist() == [
        "normal", "normal", "source"]
    assert "pneumonia/p7_film.png" not in manifest.index
    quarantine = pd.read_csv(paths.quarantine).set_index("path")
    assert quarantine.loc["pneumonia/p7_film.png", "reason"] == "excluded_by_review"
    assert "lateral view" in quarantine.loc["pneumonia/p7_film.png", "message"]
    sha = hashlib.sha256(paths.label_overrides.read_bytes()).hexdigest()
    assert label_review(paths.manifest) == {"file": "data/labels/overrides.csv", "sha256": sha, "labels_changed": 1,
                                            "labels_kept": 1, "films_excluded": 1}
    assert review_tags(paths.manifest) == {"data.overrides_sha256": sha, "data.labels_changed_by_review": "1",
                                           "data.labels_kept_by_review": "1", "data.films_excluded_by_review": "1"}


def test_a_changed_decisions_file_makes_ingest_run_again(tmp_path):
    """Ingest skips work when nothing it reads changed: the decisions file is among what it reads."""
    paths, config = _project(tmp_path, "")
    ingest_stage(paths, config)
    _overrides(tmp_path, f"{SOURCE},normal/p2_film.png,pneumonia,,missed,ann,2026-12-01\n")

    ingest_stage(paths, config)

    manifest = pd.read_parquet(paths.manifest).set_index("path")
    assert manifest.loc["normal/p2_film.png", "label"] == "pneumonia"


def test_a_decision_naming_no_film_of_its_source_stops_ingest_before_writing(tmp_path):
    paths, config = _project(tmp_path, f"{SOURCE},normal/p0_film.png,pneumonia,,ok,ann,2026-12-01\n"
                                       f"{SOURCE},normal/p99_film.png,pneumonia,,typo,ann,2026-12-01\n")
    with pytest.raises(CxrError) as caught:
        ingest_stage(paths, config)
    assert str(caught.value).startswith("data/labels/overrides.csv line 3: source 'data/raw/films' lists no film "
                                        "'normal/p99_film.png'")
    assert not paths.manifest.exists()


def test_a_decision_for_a_source_not_in_use_is_only_a_warning(tmp_path, caplog):
    paths, config = _project(tmp_path, "data/raw/other,normal/x.png,pneumonia,,elsewhere,ann,2026-12-01\n")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        ingest_stage(paths, config)
    assert "name sources that data.sources does not list (data/raw/other)" in caplog.text
    assert (pd.read_parquet(paths.manifest)["label_source"] == "source").all()


def _table_project(tmp_path) -> tuple[ProjectPaths, object]:
    """8 films listed by a table whose patient IDs (MRN7730100, ...) are in the file names: redacted in the manifest."""
    films = tmp_path / "data" / "raw" / "table"
    rows = []
    for i in range(8):
        _write_png(films / f"MRN77301{i:02d}_film.png", 100 + i)
        rows.append({"path": f"MRN77301{i:02d}_film.png", "label": "pneumonia" if i % 2 else "normal",
                     "patient_id": f"MRN77301{i:02d}"})
    pd.DataFrame(rows).to_csv(films / "labels.csv", index=False)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  sources: [data/raw/table/labels.csv]\n")
    return ProjectPaths(tmp_path), load_config(params)


def test_decisions_name_films_by_their_redacted_path_and_errors_never_repeat_an_identifier(tmp_path):
    """A table's patient ID in a file name is redacted in the manifest; a decision names the film that way, and a
    decision that names it by the raw ID is refused without the ID in the message."""
    paths, config = _table_project(tmp_path)
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    shown = manifest.loc[manifest["label"] == "normal", "path"].iloc[0]
    assert "MRN" not in shown and "redacted-" in shown

    _overrides(tmp_path, f"data/raw/table/labels.csv,{shown},pneumonia,,missed,ann,2026-12-01\n")
    ingest_stage(paths, config)
    assert pd.read_parquet(paths.manifest).set_index("path").loc[shown, "label_source"] == "override"

    _overrides(tmp_path, "data/raw/table/labels.csv,MRN7730100_film.png,pneumonia,,raw,ann,2026-12-01\n")
    with pytest.raises(CxrError) as caught:
        ingest_stage(paths, config)
    assert "lists no film" in str(caught.value) and "7730100" not in str(caught.value)


def test_key_rotation_moves_decisions_to_the_paths_the_new_key_redacts(tmp_path, monkeypatch):
    """Redacted paths carry a hash made with the de-identification key: `cxr key rotate` rewrites the decisions'
    paths with the manifest's, or the next ingest would refuse every decision on a redacted path."""
    from pipeline.key_rotation import rotate_key

    paths, config = _table_project(tmp_path)
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest)
    shown = manifest.loc[manifest["label"] == "normal", "path"].iloc[0]
    _overrides(tmp_path, f"data/raw/table/labels.csv,{shown},pneumonia,,missed,ann,2026-12-01\n")
    ingest_stage(paths, config)
    new_key = tmp_path / "keys" / "new.key"
    new_key.parent.mkdir()
    new_key.write_text("rotated-key-" + "7f3a" * 10 + "\n")
    new_key.chmod(0o600)

    rotate_key(paths, config, new_key)
    monkeypatch.setenv("CXR_DEID_KEY", new_key.read_text().strip())  # rotate asks for it: the key is in the environment
    ingest_stage(paths, config)

    decided = pd.read_csv(paths.label_overrides, dtype=str)["path"].tolist()
    manifest = pd.read_parquet(paths.manifest)
    assert manifest.loc[manifest["label_source"] == "override", "path"].tolist() == decided
    assert decided != [shown] and "redacted-" in decided[0]


# --- cxr review -------------------------------------------------------------------------------------------------


def _issues(paths: ProjectPaths, rows: list[tuple[str, str, str]]) -> None:
    """reports/label_issues.csv as `cxr audit-labels` writes it: (path, label, suggested_label) rows."""
    paths.reports.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"path": path, "source": SOURCE, "split": "train", "label": label, "suggested_label": suggested,
                   "score": 0.1, "duplicate_of": ""} for path, label, suggested in rows]).to_csv(
        paths.reports / "label_issues.csv", index=False)


@pytest.fixture
def ingested(tmp_path) -> tuple[ProjectPaths, object]:
    paths, config = _project(tmp_path)
    ingest_stage(paths, config)
    _issues(paths, [("normal/p0_film.png", "normal", "pneumonia"), ("pneumonia/p6_film.png", "pneumonia", "normal")])
    return paths, config


def test_accept_takes_the_suggestion_and_accepting_twice_changes_nothing(ingested):
    paths, config = ingested
    first = review(paths, config, "accept", ["normal/p0_film.png"], "air bronchograms", "ann")
    written = paths.label_overrides.read_bytes()
    again = review(paths, config, "accept", ["normal/p0_film.png"], "air bronchograms", "ann")

    assert (first.n_written, again.n_written, again.n_unchanged) == (1, 0, 1)
    assert paths.label_overrides.read_bytes() == written
    table = pd.read_csv(paths.label_overrides, dtype=str, keep_default_na=False)
    assert table[["source", "path", "new_label", "exclude", "reason", "reviewer"]].values.tolist() == [
        [SOURCE, "normal/p0_film.png", "pneumonia", "", "air bronchograms", "ann"]]


def test_a_later_decision_replaces_the_films_row_and_reject_keeps_the_given_label(ingested):
    paths, config = ingested
    review(paths, config, "accept", ["pneumonia/p6_film.png", "normal/p0_film.png"], "first look", "ann")
    review(paths, config, "reject", ["pneumonia/p6_film.png"], "on second look the label holds", "bob")
    review(paths, config, "exclude", ["normal/p3_film.png"], "not a chest film", "bob")

    table = pd.read_csv(paths.label_overrides, dtype=str, keep_default_na=False)
    assert table[["path", "new_label", "exclude", "reviewer"]].values.tolist() == [
        ["pneumonia/p6_film.png", "pneumonia", "", "bob"],
        ["normal/p0_film.png", "pneumonia", "", "ann"],
        ["normal/p3_film.png", "", "true", "bob"]]
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest).set_index("path")
    assert manifest.loc["pneumonia/p6_film.png", ["label", "label_source"]].tolist() == ["pneumonia", "override"]
    assert "normal/p3_film.png" not in manifest.index
    # the excluded film is still known to review: it can be decided about again
    assert review(paths, config, "exclude", ["normal/p3_film.png"], "not a chest film", "bob").n_unchanged == 1


def test_multilabel_accept_writes_no_findings_as_none_and_ingest_reads_it_back(tmp_path):
    films = tmp_path / "data" / "raw" / "nih"
    sets = ["effusion|pneumonia", "", "pneumonia", "effusion"] * 2
    for i, found in enumerate(sets):
        _write_png(films / f"f{i}.png", 200 + i)
    pd.DataFrame({"path": [f"f{i}.png" for i in range(8)], "label": [s or "No Finding" for s in sets]}).to_csv(
        films / "labels.csv", index=False)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  task: multilabel\n  labels: [effusion, pneumonia]\n"
                      "  sources: [data/raw/nih/labels.csv]\n")
    paths, config = ProjectPaths(tmp_path), load_config(params)
    ingest_stage(paths, config)
    paths.reports.mkdir()
    pd.DataFrame([{"path": "f0.png", "source": "data/raw/nih/labels.csv", "split": "train", "label": "effusion|pneumonia",
                   "suggested_label": "", "score": 0.2, "duplicate_of": ""},
                  {"path": "f1.png", "source": "data/raw/nih/labels.csv", "split": "train", "label": "",
                   "suggested_label": "pneumonia|effusion", "score": 0.3, "duplicate_of": ""}]).to_csv(
        paths.reports / "label_issues.csv", index=False)

    review(paths, config, "accept", ["f0.png", "f1.png"], "read again", "ann")
    review(paths, config, "reject", ["f2.png"], "holds", "ann")

    assert pd.read_csv(paths.label_overrides, dtype=str, keep_default_na=False)["new_label"].tolist() == [
        NO_FINDINGS, "effusion|pneumonia", "pneumonia"]
    ingest_stage(paths, config)
    manifest = pd.read_parquet(paths.manifest).set_index("path")
    assert manifest.loc[["f0.png", "f1.png", "f2.png"], "label"].tolist() == ["", "effusion|pneumonia", "pneumonia"]
    assert manifest.loc[["f0.png", "f1.png"], "label_original"].tolist() == ["effusion|pneumonia", ""]


def test_review_refuses_an_unknown_film_and_writes_nothing(ingested):
    paths, config = ingested
    review(paths, config, "accept", ["normal/p0_film.png"], "x", "ann")
    before = paths.label_overrides.read_bytes()
    with pytest.raises(CxrError, match="no film 'normal/nope.png' in the manifest"):
        review(paths, config, "exclude", ["normal/p1_film.png", "normal/nope.png"], "y", "ann")
    with pytest.raises(CxrError, match="reports/label_issues.csv does not list it"):
        review(paths, config, "accept", ["normal/p1_film.png"], "y", "ann")
    assert paths.label_overrides.read_bytes() == before


def test_cxr_review_defaults_the_reviewer_to_the_user_and_errors_in_one_line(ingested, monkeypatch):
    paths, _ = ingested
    monkeypatch.chdir(paths.root)
    runner = CliRunner()
    done = runner.invoke(app, ["review", "accept", "normal/p0_film.png", "--reason", "missed"])
    assert done.exit_code == 0, done.output
    assert pd.read_csv(paths.label_overrides, dtype=str)["reviewer"].tolist() == [getpass.getuser()]
    refused = runner.invoke(app, ["review", "reject", "normal/none.png", "--reason", "x"])
    assert refused.exit_code == 2
    assert refused.output.strip().startswith("error: review: no film 'normal/none.png'") and len(refused.output.strip().splitlines()) == 1


def test_review_waits_for_the_project_lock_and_gives_up_without_writing(ingested, monkeypatch):
    """A review while another run holds the project (an ingest reading the file) never writes under it."""
    import subprocess
    import sys
    import time

    paths, config = ingested
    script = ("import time; from pathlib import Path; from pipeline.lock import project_lock\n"
              f"with project_lock(Path({str(paths.root)!r})):\n print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("CXR_LOCK_TIMEOUT", "1")
        started = time.monotonic()
        with pytest.raises(CxrError, match="another run holds"):
            review(paths, config, "accept", ["normal/p0_film.png"], "x", "ann")
        assert time.monotonic() - started >= 0.9
        assert not paths.label_overrides.exists()
    finally:
        holder.kill()
        holder.wait()


# --- the data gate ----------------------------------------------------------------------------------------------


def test_the_gate_counts_changed_labels_per_split_and_label():
    manifest = pd.DataFrame({
        "split": ["train", "train", "train", "test", "test"],
        "label": ["pneumonia", "pneumonia", "normal", "normal", "normal"],
        "label_original": ["normal", "pneumonia", "normal", "pneumonia", "normal"],
        "label_source": ["override", "override", "source", "override", "source"],
    })
    shares = review_shares(manifest, BINARY)
    assert (shares["reviewed"], shares["changed"], shares["test_changed"]) == (3, 2, 1)
    assert shares["per_split"]["train"]["pneumonia"] == {"n": 2, "changed": 1, "share": 0.5}
    assert shares["per_split"]["train"]["normal"] == {"n": 1, "changed": 0, "share": 0.0}
    assert shares["per_split"]["test"]["normal"] == {"n": 2, "changed": 1, "share": 0.5}
    json.dumps(shares)  # plain JSON for summary.json
