"""The `cxr` command as a user runs it: help texts, one-line errors, prediction JSON."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

CXR = str(Path(sys.executable).parent / "cxr")
COMMANDS = ["demo-data", "ingest", "validate", "rebalance", "train", "evaluate", "register", "pipeline", "predict", "promote", "rollback", "history", "summary", "status"]


def cxr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CXR, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_top_level_help_lists_every_command():
    out = cxr("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_explaining_help(command):
    out = cxr(command, "--help")
    assert out.returncode == 0
    assert len(out.stdout.split()) > 25, out.stdout
    if command not in ("demo-data", "predict", "promote", "rollback", "history", "summary", "status"):
        assert "--set" in out.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [("train.epoch=2", "unknown key 'train.epoch'"), ("train.epochs=lots", "'train.epochs'"), ("data.sources=[a", "not valid YAML"),
     ("data.labels=[normal, bacteria, virus]", "data.task binary needs exactly two labels"),
     ("data.task=multiclass", "data.task multiclass needs three or more labels")],
)
def test_bad_set_is_one_line_error_without_traceback(tmp_path, override, expected):
    out = cxr("train", "--set", override, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and expected in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_stage_without_its_inputs_says_what_to_run(tmp_path):
    out = cxr("train", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "run `cxr ingest` first" in out.stderr


def test_predict_json_on_pydicom_test_files(tiny_project, pydicom_test_files):
    """Real DICOMs: none is a chest film, so none gets a probability: CT, MR and NM are out of scope with the reason,
    the broken ones an error; nothing was classified, so the exit code is 1."""
    files = [pydicom_test_files / name for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "rtplan.dcm", "JPEG2000.dcm")]
    out = cxr("predict", *map(str, files), "--json", cwd=tiny_project.paths.root)
    assert out.returncode == 1, out.stderr
    results = json.loads(out.stdout)
    assert [r["path"] for r in results] == list(map(str, files))
    by_name = {Path(r["path"]).name: r for r in results}
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("JPEG2000.dcm", "NM")):
        assert by_name[name] == {"path": str(pydicom_test_files / name), "out_of_scope": f"modality: {modality} is not one of CR, DX"}
    assert by_name["MR_truncated.dcm"]["error"].startswith("decode_failed")
    assert by_name["rtplan.dcm"]["error"].startswith("no_pixel_data")


def test_predict_says_out_of_scope_in_plain_output_and_classifies_the_chest_film(tiny_project, pydicom_test_files):
    chest = next((tiny_project.paths.root / "data" / "raw" / "demo" / "normal").glob("*.dcm"))
    out = cxr("predict", str(pydicom_test_files / "CT_small.dcm"), str(chest), cwd=tiny_project.paths.root)
    assert out.returncode == 0, out.stderr
    ct, film = out.stdout.strip().splitlines()
    assert ct == f"{pydicom_test_files / 'CT_small.dcm'}\tout_of_scope: modality: CT is not one of CR, DX"
    assert re.fullmatch(rf"{re.escape(str(chest))}\t(normal|pneumonia)\t(0\.\d{{4}}|1\.0000)", film), film


def test_predict_a_folder_and_plain_output(tiny_project):
    folder = tiny_project.paths.root / "data" / "raw" / "demo" / "pneumonia"
    out = cxr("predict", str(folder), cwd=tiny_project.paths.root)
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    files = sorted(str(p) for p in folder.iterdir() if p.is_file())
    assert len(lines) == len(files)
    assert sorted(line.split("\t", 1)[0] for line in lines) == files  # one line per file, named as given
    assert any("error: decode_failed" in line for line in lines)  # the truncated demo DICOM
    # The out-of-distribution threshold lets about 99 % of in-distribution films through: a few demo films may be
    # refused, each with its reason on its line.
    refused = [line for line in lines if "\tout_of_scope: " in line]
    assert len(refused) <= len(lines) // 10, refused
    for line in refused:
        assert re.fullmatch(r"[^\t]+\tout_of_scope: ood: score [\d.]+ above the threshold [\d.]+ set on validation", line), line
    classified = [line for line in lines if "\terror: " not in line and line not in refused]
    assert classified
    for line in classified:  # path, label, the positive label's probability to 4 digits, tab-separated
        assert re.fullmatch(r"[^\t]+\t(normal|pneumonia)\t(0\.\d{4}|1\.0000)", line), line


def test_predict_with_nothing_readable_exits_1(tiny_project, tmp_path):
    (tmp_path / "empty.png").touch()
    out = cxr("predict", str(tmp_path / "empty.png"), "--json", cwd=tiny_project.paths.root)
    assert out.returncode == 1
    assert json.loads(out.stdout)[0]["error"].startswith("empty_file")


def test_predict_without_a_registered_model_is_a_clear_error(tmp_path, pydicom_test_files):
    out = cxr("predict", str(pydicom_test_files / "CT_small.dcm"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "could not load model 'models:/cxr-pneumonia@champion'" in out.stderr


def test_summary_points_at_the_results(tiny_project):
    out = cxr("summary", cwd=tiny_project.paths.root)
    assert out.returncode == 0
    assert "Test AUC" in out.stdout and "mlflow ui --backend-store-uri" in out.stdout
    test = json.loads(tiny_project.paths.metrics.read_text())["test"]
    low, high = test["ci95"]["auc"]
    shown = re.search(r"Test AUC (\S+) \((\S+)-(\S+)\)", out.stdout)
    assert shown, out.stdout
    assert shown.groups() == (f"{test['auc']:.3f}", f"{low:.3f}", f"{high:.3f}")


def test_status_json_says_what_is_live_and_why(tiny_project):
    """`cxr status --json` on a project every stage ran in (in-process, so no dvc.lock and no flow record yet)."""
    import time

    import pandas as pd

    from pipeline.files import md5_of, sha256_of
    from pipeline.status import project_status

    paths = tiny_project.paths
    out = cxr("status", "--json", "--params", str(tiny_project.params))
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["data"]["version"] == sha256_of(paths.manifest) and found["data"]["dvc_md5"] == md5_of(paths.manifest)
    assert found["runs"] == {"dvc": None, "flow": None}
    registered = tiny_project.results["register"]
    assert found["model"]["champion"] == registered.version and found["model"]["challenger"] is None
    assert found["model"]["gate"]["metric"] == registered.gate_metric and found["model"]["gate"]["value"] == registered.value
    assert found["model"]["gate"]["decision"] == registered.reason
    reasons = pd.read_csv(paths.quarantine)["reason"].value_counts().to_dict()
    assert found["quarantine"] == {"total": sum(reasons.values()), "out_of_scope": 0, "by_reason": dict(sorted(reasons.items()))}
    assert found["quarantine"]["total"] >= 1  # the demo set's broken files

    started = time.perf_counter()
    assert project_status(paths) == found
    assert time.perf_counter() - started < 2.0
    text = cxr("status", "--params", str(tiny_project.params)).stdout
    assert f"@champion v{registered.version}" in text and found["data"]["version"][:12] in text


def test_status_of_an_empty_project_says_what_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    out = cxr("status", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 0 and "run `cxr ingest`" in out.stdout and "nothing registered yet" in out.stdout
    assert json.loads(cxr("status", "--json", "--params", str(tmp_path / "params.yaml")).stdout) == {
        "data": None, "runs": {"dvc": None, "flow": None}, "model": None, "quarantine": None, "prefect": None}
    assert "no Prefect server configured (PREFECT_API_URL)" in out.stdout


def test_status_answers_quickly_when_the_prefect_server_does_not(tmp_path):
    """A server that accepts the connection and never answers (a hung Prefect server) costs `cxr status` its short
    timeout, once, not the whole screen: the JSON says why there are no runs, the text says so in a line."""
    import os
    import socket
    import time

    from pipeline.paths import ProjectPaths
    from pipeline.status import project_status

    (tmp_path / "params.yaml").write_text("{}\n")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        api = f"http://127.0.0.1:{hung.getsockname()[1]}/api"
        started = time.perf_counter()
        found = project_status(ProjectPaths(tmp_path), api)
        assert time.perf_counter() - started < 2.0
        assert found["prefect"]["error"].startswith(f"no Prefect server answered at {api} within 0.7 s")
        assert found["prefect"]["failed_runs"] == [] and found["prefect"]["next_scheduled"] is None
        out = subprocess.run([CXR, "status", "--params", str(tmp_path / "params.yaml")], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, PREFECT_API_URL=api))
    assert out.returncode == 0, out.stderr
    assert f"Prefect:     no Prefect server answered at {api}" in out.stdout


def test_deploy_documents_its_alerts_and_refuses_a_block_without_its_type_in_one_line(tmp_path):
    import os

    from tests.servers import free_port

    helped = cxr("deploy", "--help").stdout
    assert "--notify-block" in helped and "BLOCK_TYPE/NAME" in helped and "cxr.champion.changed" in helped
    (tmp_path / "params.yaml").write_text("{}\n")
    out = subprocess.run([CXR, "deploy", "--notify-block", "ops", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api"))
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: --notify-block 'ops': give BLOCK_TYPE/NAME, e.g. slack-webhook/ops "
                                  "(`prefect block ls` lists them)")
