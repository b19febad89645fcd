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


LOAD_WITHOUT_THE_PROJECT = """
import sys
# Forget the project's own install (an editable one is a finder on sys.meta_path, a regular one a path entry):
# the model must run on the code it carries.
sys.meta_path = [finder for finder in sys.meta_path if "editable" not in str(getattr(finder, "__module__", ""))]
sys.path = [entry for entry in sys.path if entry not in ("", sys.argv[2])]
import mlflow.pyfunc
import numpy as np

model = mlflow.pyfunc.load_model(sys.argv[1])
size = int(model.metadata.metadata["image_size"])
answer = model.predict(np.zeros((2, size, size), dtype=np.uint8))
import pipeline
print(pipeline.__file__)
print(answer.to_json())
"""


def test_the_registered_model_runs_on_the_code_it_carries_without_the_project_installed(tiny_project, tmp_path):
    import mlflow.artifacts

    from pipeline.tracking import fluent_store
    from tests.conftest import REPO

    with fluent_store(tiny_project.paths):
        local = mlflow.artifacts.download_artifacts("models:/cxr-pneumonia@champion", dst_path=str(tmp_path / "model"))
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_THE_PROJECT, local, str(REPO)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, answer = out.stdout.strip().splitlines()[-2:]
    assert str(REPO) not in where and where.startswith(local)  # the copy inside the model, not the project
    assert set(json.loads(answer)) == {"probability", "label"}
