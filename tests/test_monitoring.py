"""The monitoring hook: one identifier-free line per answered film, from `cxr predict` and from the served model, whole
lines under concurrent writers, and `cxr monitor`'s figures and drift flag."""

from __future__ import annotations

import base64
import json
import logging
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxr.cli import app
from pipeline.monitoring import (
    MIN_FILMS,
    ModelIdentity,
    Reference,
    append_records,
    film_record,
    summarise,
)

CHAMPION = "models:/cxr-pneumonia@champion"
RECORD_KEYS = {"time", "source", "model", "run_id", "answer", "reason", "label", "probability", "ood_score"}
PATIENT = {"PatientName": "QUINCEY^MARGOT", "PatientID": "MRN7730100", "AccessionNumber": "ACC5550100",
           "PatientBirthDate": "19610224", "InstitutionName": "Vesperine Clinic"}


def _writer(path: str, worker: int, batches: int) -> None:
    for batch in range(batches):
        # over 4 KiB a line: past PIPE_BUF, where a write without O_APPEND and the lock could interleave
        records = [film_record(ModelIdentity("m", "r"), "serve", label=f"w{worker}b{batch}r{row}" + "x" * 5000, probability=0.5)
                   for row in range(3)]
        append_records(Path(path), records)


def test_concurrent_appends_from_several_processes_give_whole_lines(tmp_path):
    log, workers, batches = tmp_path / "log.jsonl", 4, 60
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(log), worker, batches)) for worker in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == workers * batches * 3
    labels = [json.loads(line)["label"].rstrip("x") for line in lines]  # every line parses: none torn or interleaved
    assert sorted(labels) == sorted(f"w{w}b{b}r{r}" for w in range(workers) for b in range(batches) for r in range(3))
    for worker in range(workers):  # one writer's lines stay in its order
        mine = [label for label in labels if label.startswith(f"w{worker}b")]
        assert mine == [f"w{worker}b{b}r{r}" for b in range(batches) for r in range(3)]


def _records(day: datetime) -> list[dict]:
    """Ten records on `day`: 6 classified (4 normal, 2 pneumonia), 3 out of scope (2 modality, 1 ood), 1 error."""
    who = ModelIdentity(None, None)  # no registry to ask
    answers = [{"label": "normal", "probability": 0.2}] * 4 + [{"label": "pneumonia", "probability": 0.9}] * 2
    answers += [{"out_of_scope": "modality: CT is not one of CR, DX"}] * 2 + [{"out_of_scope": "ood: score 9.1 above 4.0", "ood_score": 9.1}]
    answers += [{"error": "decode_failed: row 0: truncated"}]
    return [film_record(who, "predict", now=day + timedelta(hours=i), **answer) for i, answer in enumerate(answers)]


def test_cxr_monitor_json_figures_are_computed_from_the_records_of_the_period(tmp_path):
    log = tmp_path / "log.jsonl"
    append_records(log, _records(datetime(2026, 11, 2, tzinfo=UTC)) + _records(datetime(2026, 11, 3, tzinfo=UTC))[:6])
    append_records(log, _records(datetime(2026, 11, 20, tzinfo=UTC)))
    with log.open("a") as handle:
        handle.write("not json\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    out = CliRunner().invoke(app, ["monitor", "--json", "--log", str(log), "--since", "2026-11-02", "--until", "2026-11-03",
                                   "--params", str(tmp_path / "params.yaml")])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    # 2 Nov whole and 3 Nov whole (a bare --until date includes its day); not 20 Nov
    assert summary["films"] == 16 and summary["unreadable_lines"] == 1
    assert summary["answers"] == {"classified": 12, "out_of_scope": 3, "error": 1}
    assert summary["share_out_of_scope"] == round(3 / 16, 4) and summary["share_error"] == round(1 / 16, 4)
    assert summary["out_of_scope_reasons"] == {"modality": 0.125, "ood": 0.0625}
    assert summary["error_reasons"] == {"decode_failed": 0.0625}
    assert summary["label_shares"] == {"normal": round(8 / 12, 4), "pneumonia": round(4 / 12, 4)}
    (model,) = summary["models"]
    assert model["films"] == 16 and model["ood_score_drift"]["note"].startswith("no reference")
    assert summary["drift"] is False
    text = CliRunner().invoke(app, ["monitor", "--log", str(log), "--params", str(tmp_path / "params.yaml")])
    assert text.exit_code == 0 and "26 films" in text.stdout and "no drift flagged" in text.stdout


def test_cxr_monitor_without_a_log_or_with_a_bad_date_is_a_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    missing = CliRunner().invoke(app, ["monitor", "--params", str(tmp_path / "params.yaml")])
    assert missing.exit_code == 2 and missing.output.startswith("error: no monitoring log at ")
    append_records(tmp_path / "log.jsonl", _records(datetime(2026, 11, 2, tzinfo=UTC)))
    bad = CliRunner().invoke(app, ["monitor", "--log", str(tmp_path / "log.jsonl"), "--since", "yesterday",
                                   "--params", str(tmp_path / "params.yaml")])
    assert bad.exit_code == 2 and bad.output.strip() == "error: --since: 'yesterday' is not a date (YYYY-MM-DD) or an ISO timestamp"


def _scored(scores: np.ndarray) -> list[dict]:
    who = ModelIdentity("cxr-pneumonia", "run1")
    return [film_record(who, "serve", label="normal", probability=0.3, ood_score=float(s)) for s in scores]


def test_drift_is_flagged_when_the_logged_scores_are_shifted_and_not_otherwise():
    rng = np.random.default_rng(0)
    validation = rng.normal(0, 1, 500)
    reference = {("cxr-pneumonia", "run1"): Reference("3", list(validation))}
    same = summarise(_scored(rng.normal(0, 1, 200)), reference)
    shifted = summarise(_scored(rng.normal(1, 1, 200)), reference)
    assert same["drift"] is False and same["models"][0]["ood_score_drift"]["p_value"] > 0.01
    assert shifted["drift"] is True and shifted["models"][0]["ood_score_drift"]["p_value"] < 0.01
    assert shifted["models"][0]["version"] == "3" and shifted["models"][0]["ood_score_drift"]["n_reference"] == 500
    few = summarise(_scored(rng.normal(3, 1, MIN_FILMS - 1)), reference)  # far off, but too few films to say
    assert few["drift"] is False and few["models"][0]["ood_score_drift"]["note"].startswith("too few films")


def _patient_dicom(tiny_project, folder: Path) -> Path:
    """A demo chest DICOM with a patient's name, ID, birth date, accession and institution in its header, saved under
    a file name that holds the patient's name and MRN."""
    import pydicom

    from tests.test_serving import _films

    _, (dicom,) = _films(tiny_project, formats=("dicom",))
    dataset = pydicom.dcmread(dicom)
    for keyword, value in PATIENT.items():
        setattr(dataset, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "quincey_margot_MRN7730100.dcm"
    dataset.save_as(path)
    return path


def _assert_no_identifiers(log: Path, dicoms: list[Path]) -> list[dict]:
    import pydicom

    text = log.read_text()
    forbidden = [*PATIENT.values(), "QUINCEY", "MARGOT", "quincey", "7730100", "/", "\\"]
    for dicom in dicoms:
        header = pydicom.dcmread(dicom, stop_before_pixels=True)
        forbidden += [str(header.SOPInstanceUID), str(header.StudyInstanceUID), str(header.SeriesInstanceUID), dicom.stem]
    assert not [word for word in forbidden if word in text]
    records = [json.loads(line) for line in text.splitlines()]
    assert all(set(record) == RECORD_KEYS for record in records)
    return records


@pytest.mark.slow
def test_cxr_predict_appends_one_record_per_film_without_identifiers(tiny_project, pydicom_test_files, tmp_path, monkeypatch):
    from pipeline import tracking

    films = _patient_dicom(tiny_project, tmp_path / "incoming")
    log = tmp_path / "monitor" / "predictions.jsonl"
    monkeypatch.setenv("CXR_MONITOR_LOG", str(log))
    out = CliRunner().invoke(app, ["predict", "--json", "--params", str(tiny_project.params), str(films),
                                   str(pydicom_test_files / "CT_small.dcm"), str(pydicom_test_files / "MR_truncated.dcm")])
    assert out.exit_code == 0, out.output
    answers = json.loads(out.stdout)
    records = _assert_no_identifiers(log, [films, pydicom_test_files / "CT_small.dcm"])
    assert [r["answer"] for r in records] == ["classified", "out_of_scope", "error"]
    assert [r["reason"] for r in records] == [None, "modality", "decode_failed"]
    assert records[0]["label"] == answers[0]["label"] and records[0]["probability"] == answers[0]["probability"]
    assert {(r["source"], r["model"], r["run_id"]) for r in records} == {("predict", "cxr-pneumonia", tracking.read_run_id(tiny_project.paths))}
    again = CliRunner().invoke(app, ["predict", "--params", str(tiny_project.params), str(films)])
    assert again.exit_code == 0 and len(log.read_text().splitlines()) == 4  # appended, not rewritten


@pytest.mark.slow
def test_the_served_model_logs_its_answers_in_process_and_a_log_it_cannot_write_is_only_a_warning(
        tiny_project, pydicom_test_files, tmp_path, monkeypatch, caplog):
    from pipeline import tracking
    from pipeline.predict import load_model

    dicom = _patient_dicom(tiny_project, tmp_path)
    rows = [base64.b64encode(f.read_bytes()).decode() for f in (dicom, pydicom_test_files / "CT_small.dcm", pydicom_test_files / "MR_truncated.dcm")]
    log = tmp_path / "served.jsonl"
    monkeypatch.setenv("CXR_MONITOR_LOG", str(log))
    table = load_model(CHAMPION, tiny_project.paths).predict(pd.DataFrame({"image": rows}))
    records = _assert_no_identifiers(log, [dicom, pydicom_test_files / "CT_small.dcm"])
    assert [(r["source"], r["answer"], r["reason"]) for r in records] == [
        ("serve", "classified", None), ("serve", "out_of_scope", "modality"), ("serve", "error", "decode_failed")]
    assert records[0]["probability"] == pytest.approx(table["probability"][0]) and records[0]["label"] == table["label"][0]
    assert records[0]["model"] == "cxr-pneumonia" and records[0]["run_id"] == tracking.read_run_id(tiny_project.paths)

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CXR_MONITOR_LOG", str(tmp_path / "a-file" / "log.jsonl"))  # under a file: cannot be created
    logging.getLogger("pipeline.monitoring").addHandler(caplog.handler)
    try:
        answer = load_model(CHAMPION, tiny_project.paths).predict(pd.DataFrame({"image": rows[:1]}))
    finally:
        logging.getLogger("pipeline.monitoring").removeHandler(caplog.handler)
    assert answer["probability"][0] == pytest.approx(table["probability"][0])
    assert any("could not append 1 monitoring record" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_request_in_which_no_film_could_be_read_is_an_invalid_parameter_error(tiny_project, pydicom_test_files):
    from mlflow.exceptions import MlflowException

    from pipeline.predict import load_model

    model = load_model(CHAMPION, tiny_project.paths)
    truncated = base64.b64encode((pydicom_test_files / "MR_truncated.dcm").read_bytes()).decode()
    with pytest.raises(MlflowException) as refused:
        model.predict(pd.DataFrame({"image": [truncated, "not base64!"]}))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE" and refused.value.get_http_status_code() == 400
    assert "no film in the request could be read: decode_failed: row 0:" in refused.value.message
    assert "not_base64: row 1" in refused.value.message
    ct = base64.b64encode((pydicom_test_files / "CT_small.dcm").read_bytes()).decode()
    mixed = model.predict(pd.DataFrame({"image": [ct, truncated]}))  # out of scope is an answer: no exception
    assert mixed["out_of_scope"][0].startswith("modality") and mixed["error"][1].startswith("decode_failed")


@pytest.mark.slow
def test_cxr_monitor_finds_the_models_version_and_validation_probabilities_and_flags_a_shift(tiny_project, tmp_path):
    from pipeline import tracking
    from pipeline.predict import load_model

    validation = pd.read_csv(tiny_project.paths.predictions).query("split == 'val'")["probability"].to_numpy()
    assert len(validation) >= 8 and validation.max() < 0.999
    reference = np.asarray(load_model(CHAMPION, tiny_project.paths).metadata.metadata["ood"]["validation_scores"])
    assert len(reference) >= 8  # recorded with the registered model (pipeline.ood)
    who = ModelIdentity("cxr-pneumonia", tracking.read_run_id(tiny_project.paths))
    rng = np.random.default_rng(0)

    def monitor(probabilities, scores) -> tuple[int, dict]:
        log = tmp_path / f"log-{rng.integers(1 << 30)}.jsonl"
        append_records(log, [film_record(who, "serve", label="normal", probability=float(p), ood_score=float(s))
                             for p, s in zip(probabilities, scores)])
        out = CliRunner().invoke(app, ["monitor", "--json", "--log", str(log), "--params", str(tiny_project.params)])
        return out.exit_code, json.loads(out.stdout)

    code, same = monitor(rng.choice(validation, 60), rng.choice(reference, 60))
    assert code == 0 and same["drift"] is False
    (model,) = same["models"]
    assert model["version"].isdigit() and model["probability_drift"]["n_reference"] == len(validation)
    assert model["probability_drift"]["p_value"] > 0.01 and model["ood_score_drift"]["p_value"] > 0.01
    code, shifted = monitor(np.full(60, 0.999), rng.choice(reference, 60))
    assert code == 3 and shifted["drift"] is True and shifted["models"][0]["probability_drift"]["p_value"] < 0.01
    assert shifted["models"][0]["ood_score_drift"]["p_value"] > 0.01  # only the probabilities moved
    code, stranger = monitor(rng.choice(validation, 60), rng.choice(reference, 60) + 3 * reference.std() + 1)
    assert code == 3 and stranger["models"][0]["ood_score_drift"]["p_value"] < 0.01  # films unlike validation's
