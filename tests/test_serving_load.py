"""A real `mlflow models serve` refuses bad requests with a 4xx and a reason and keeps serving; it logs its answers
for `cxr monitor`; and benchmarks/serve.py's short run ends with 0 errors."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.serve import huge_png_header
from pipeline.config import default_tracking_uri
from tests.conftest import REPO
from tests.servers import free_port, stop, wait_for
from tests.test_serving import _films

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHAMPION = "models:/cxr-pneumonia@champion"


def _request(port: int, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _files(*contents: bytes) -> bytes:
    rows = [[base64.b64encode(content).decode("ascii")] for content in contents]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def test_mlflow_models_serve_answers_bad_requests_with_a_4xx_and_a_reason_and_keeps_serving(tiny_project, pydicom_test_files, tmp_path):
    root = tiny_project.paths.root
    _, (film,) = _films(tiny_project, formats=("dicom",))
    good = _files(film.read_bytes())
    log = tmp_path / "served.jsonl"
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=default_tracking_uri(root), CXR_MONITOR_LOG=str(log),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    bad = {
        "malformed": (b'{"dataframe_split": {"columns": ["image"], "data": [[', "JSONDecodeError"),
        "truncated": (_files((pydicom_test_files / "MR_truncated.dcm").read_bytes()), "no film in the request could be read: decode_failed: row 0"),
        "huge": (_files(huge_png_header(50_000, 50_000)), "no film in the request could be read: too_large: row 0: the header declares over twice"),
        "no image column": (json.dumps({"dataframe_split": {"columns": ["film"], "data": [["eA=="]]}}).encode(), "image"),
    }
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process)
        status, first = _request(port, good)
        assert status == 200
        for name, (data, reason) in bad.items():
            status, answer = _request(port, data)
            assert 400 <= status < 500, (name, status, answer)
            assert answer["error_code"] in ("BAD_REQUEST", "INVALID_PARAMETER_VALUE") and reason in answer["message"], (name, answer)
            status, after = _request(port, good)  # still serving, and the same answer
            assert status == 200 and after == first, name
        # a request with one readable film is answered: its bad row carries its error
        status, mixed = _request(port, _files(film.read_bytes(), (pydicom_test_files / "MR_truncated.dcm").read_bytes()))
        assert status == 200 and mixed["predictions"][0]["error"] == "" and mixed["predictions"][1]["error"].startswith("decode_failed")
    finally:
        stop(process)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    # good, (malformed: never reached the model), good, truncated, good, huge, good, (no image column: refused by
    # MLflow's schema check), good, then the mixed request's two rows
    ok, truncated, huge = ("classified", None), ("error", "decode_failed"), ("error", "too_large")
    assert [(r["answer"], r["reason"]) for r in records] == [ok, ok, truncated, ok, huge, ok, ok, ok, truncated]
    assert {r["source"] for r in records} == {"serve"} and str(film.stem) not in log.read_text()


def test_the_serving_benchmark_short_run_ends_with_0_errors_and_the_bad_requests_refused(tiny_project):
    done = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--project", str(tiny_project.paths.root), "--films", "demo",
         "--requests", "40", "--concurrency", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3:-1] == ["errors=0", "bad_requests_refused=3/3"], lines[-6:]
    assert float(lines[-1].split("=")[1]) > 0
    assert "monitoring records written by the server: " in done.stdout
