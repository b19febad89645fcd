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
