"""The HTML report: self-contained, and every image in it loads in a real headless Chromium."""

import json
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.servers import free_port, stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def report(tiny_project):
    return tiny_project.results["report"]  # the report stage's output, written when the shared project was built


def test_report_is_self_contained_and_complete(report):
    page = report.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:|//|file:)""", page)  # nothing fetched from anywhere
    assert "<script" not in page
    for heading in ("Data", "Data-quality gate", "Test metrics", "Plots", "Grad-CAM", "Registry"):
        assert f"<h2>{heading}" in page, heading
    assert page.count("data:image/png;base64,") >= 4 + 2  # four plots and some Grad-CAM overlays
    assert "95 % bootstrap CI" in page and "@champion" in page


def _evaluate_in_page(url: str, expression: str, tmp_path) -> object:
    """Open `url` in headless Chromium and evaluate `expression` there over the DevTools protocol."""
    from websockets.sync.client import connect

    port = free_port()
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        startup = 120  # seconds: a busy 2-core CI machine can take a while to start Chromium
        deadline = time.monotonic() + startup
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            assert browser.poll() is None, f"Chromium exited with status {browser.returncode} before it served DevTools"
            assert time.monotonic() < deadline, f"Chromium did not start within {startup} s"
            time.sleep(0.5)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as socket_:
            def call(method: str, params: dict, call_id: int) -> dict:
                socket_.send(json.dumps({"id": call_id, "method": method, "params": params}))
                while True:
                    message = json.loads(socket_.recv(timeout=60))
                    if message.get("id") == call_id:
                        return message

            call("Page.navigate", {"url": url}, 1)
            wait = "new Promise(r => { const done = () => r(true); document.readyState === 'complete' ? done() : addEventListener('load', done); })"
            call("Runtime.evaluate", {"expression": wait, "awaitPromise": True}, 2)
            answer = call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, 3)
            return answer["result"]["result"]["value"]
    finally:
        stop(browser)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_every_image_loads_in_headless_chromium(report, tmp_path):
    images = _evaluate_in_page(
        report.resolve().as_uri(),
        "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth]))",
        tmp_path,
    )
    loaded = json.loads(images)
    assert len(loaded) >= 6
    assert all(complete and width > 0 for complete, width in loaded), loaded


def test_a_project_whose_patients_are_known_carries_no_caveat(tiny_project, report):
    """The demo names every patient (DICOM PatientID, P0003_1.png): no caveat anywhere."""
    metrics = json.loads(tiny_project.paths.metrics.read_text())
    assert metrics["patients_known"] is True and metrics["patient_caveat"] is None
    assert metrics["films_without_patient"] == 0
    assert "may share patients" not in report.read_text()


@pytest.mark.slow
def test_a_source_without_patient_ids_is_flagged_in_every_report(tmp_path):
    """A MedMNIST-style archive names no patient: metrics.json, the report, the MLflow run and the model card say
    that validation and test may share patients with train."""
    import numpy as np

    from pipeline.tracking import client as tracking_client, read_run_id
    from tests.conftest import run_all_stages, tiny_params_text

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 96), ("val", 32), ("test", 32)):
        labels = (np.arange(n) % 3 != 0).astype(np.uint8)
        base = rng.normal(120, 30, (n, 28, 28)) + labels[:, None, None] * 30  # learnable, and films differ
        arrays |= {f"{split}_images": np.clip(base, 0, 255).astype(np.uint8), f"{split}_labels": labels.reshape(-1, 1)}
    np.savez(tmp_path / "mnist_like.npz", **arrays)
    params = tmp_path / "params.yaml"
    params.write_text(tiny_params_text())
    project = run_all_stages(params, ["data.sources=[mnist_like.npz]", "data.image_size=28", "train.epochs=1"])

    metrics = json.loads(project.paths.metrics.read_text())
    assert metrics["patients_known"] is False and metrics["films_without_patient"] == 160
    assert metrics["sources_without_patients"] == ["mnist_like.npz"]
    caveat = metrics["patient_caveat"]
    assert caveat.startswith("validation and test may share patients with train: 160 of 160 films (mnist_like.npz)")
    assert caveat in (project.paths.reports / "report.html").read_text()
    client = tracking_client(project.paths)
    run = client.get_run(read_run_id(project.paths))
    assert run.data.tags["patients_known"] == "false" and run.data.tags["patient_caveat"] == caveat
    assert caveat in run.data.tags["mlflow.note.content"]
    version = client.get_model_version("cxr-pneumonia", str(project.results["register"].version))
    assert version.tags["patients_known"] == "false" and f"**Caveat: {caveat}.**" in version.description
