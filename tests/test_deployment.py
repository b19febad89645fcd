"""A scheduled deployment against a real local Prefect server: deploy, trigger, check the registry, skip a rerun."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.paths import ProjectPaths
from pipeline.tracking import client as tracking_client
from tests.conftest import write_tiny_project
from tests.servers import free_port, stop, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("cxr-pipeline/scheduled", timeout=600)
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def test_scheduled_deployment_trains_registers_then_skips_unchanged_data(tmp_path):
    params = write_tiny_project(tmp_path / "project")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = None
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", server)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        served = subprocess.Popen([str(BIN / "cxr"), "deploy", "--params", str(params)], cwd=params.parent, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_s = 120
        deadline = time.monotonic() + wait_s
        while True:  # the deployment exists once `cxr deploy` has registered it
            listed = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True,
                                    timeout=wait_s)
            if "scheduled" in listed.stdout:
                break
            assert served.poll() is None, served.stdout.read()[-3000:]
            if time.monotonic() >= deadline:
                pytest.fail(f"`cxr deploy` did not register the deployment 'scheduled' within {wait_s} s; "
                            f"`prefect deployment ls` printed:\n{listed.stdout[-2000:]}{listed.stderr[-2000:]}")
            time.sleep(2)

        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", TRIGGER], env=env, capture_output=True, text=True, timeout=900)
            assert out.returncode == 0, out.stderr[-3000:]
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if served is not None:
            stop(served)
        stop(server)

    assert [run["state"] for run in runs] == ["COMPLETED", "COMPLETED"], runs
    client = tracking_client(ProjectPaths(params.parent))
    assert int(client.get_model_version_by_alias("cxr-pneumonia", "champion").version) == 1
    assert len(client.search_model_versions("name='cxr-pneumonia'")) == 1  # the second, unchanged run trained nothing
    assert (params.parent / "models" / "last_success.json").exists()
