"""`mlflow models serve` answers a real REST request with the registered champion."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import default_tracking_uri
from tests.servers import free_port, stop, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_mlflow_models_serve_returns_a_probability_per_image_labelled_at_the_stored_threshold(tiny_project):
    root = tiny_project.paths.root
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=default_tracking_uri(root), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/cxr-pneumonia@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process)
        images = np.load(tiny_project.paths.images)[:3]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop(process)
    rows = answer["predictions"]
    assert len(rows) == 3
    threshold = json.loads(tiny_project.paths.metrics.read_text())["threshold"]  # chosen on validation, stored with the model
    for row in rows:
        assert 0.0 <= row["probability"] <= 1.0
        assert row["label"] == ("pneumonia" if row["probability"] >= threshold else "normal")
