"""What an operator sees in Prefect, against a real local Prefect server: the stages' own log lines in the task
runs, the task graph in the stages' order, the flow run's artifacts, and the alerts `cxr deploy --notify-block`
makes firing (a failed run, a champion change) through a real notification block to a webhook in the test."""

import csv
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.paths import ProjectPaths
from pipeline.status import project_status
from tests.conftest import write_tiny_project
from tests.servers import free_port, stop, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

SET_UP_ALERTS = """
import json, sys
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from flows.pipeline_flow import create_alerts

CustomWebhookNotificationBlock(name="ops", url=sys.argv[1], json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ops")
from pipeline.errors import CxrError

try:
    create_alerts("custom-webhook/nobody")
except CxrError as exc:
    print(exc)
create_alerts("custom-webhook/ops")
print(json.dumps(create_alerts("custom-webhook/ops")))  # twice: a redeploy replaces the automations, never adds
"""

APPLY_DEPLOYMENT = """
import sys
from flows.pipeline_flow import cxr_pipeline

cxr_pipeline.to_deployment(name="scheduled", cron="0 2 * * *", parameters={"params_path": sys.argv[1]}).apply()
"""

READ_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowFilter, FlowRunFilter, LogFilter, TaskRunFilter
from prefect.client.schemas.sorting import LogSort

with get_client(sync_client=True) as client:
    runs = []
    for run in client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["cxr-pipeline"]})):
        ids = {"any_": [run.id]}
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=ids))
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=ids))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=ids), sort=LogSort.TIMESTAMP_ASC)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ids))
        ingest_logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [child.id for child in children]}),
                                       sort=LogSort.TIMESTAMP_ASC) if children else []
        runs.append({
            "state": run.state.type.value, "message": run.state.message,
            "subflows": {str(child.parent_task_run_id): child.name for child in children},
            "tasks": {str(t.id): {"name": t.name, "wait_for": [str(i.id) for i in t.task_inputs.get("wait_for", [])]}
                      for t in tasks},
            "logs": [{"task_run_id": str(log.task_run_id), "message": log.message} for log in logs],
            "artifacts": {a.key: {"type": a.type, "data": a.data} for a in artifacts},
            "ingest_logs": [log.message for log in ingest_logs],
        })
    automations = [a.name for a in client.read_automations()]
print(json.dumps({"runs": runs, "automations": automations}))
"""


class Webhook:
    """An HTTP endpoint on 127.0.0.1 that keeps the JSON bodies posted to it: where the notification block sends."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, seconds: float) -> list[dict]:
        deadline = time.monotonic() + seconds
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(1)
        return list(self.received)


def _status_once_scheduled(params: Path, env: dict, seconds: float) -> dict:
    """`cxr status --json`, once the server's scheduler has scheduled the deployment's next run."""
    deadline = time.monotonic() + seconds
    while True:
        out = subprocess.run([str(BIN / "cxr"), "status", "--json", "--params", str(params)], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        found = json.loads(out.stdout)
        if found["prefect"]["next_scheduled"] or time.monotonic() > deadline:
            return found
        time.sleep(2)


def test_prefect_shows_the_stages_lines_graph_artifacts_and_alerts(tmp_path):
    params = write_tiny_project(tmp_path / "project", n=48)
    broken = tmp_path / "broken" / "params.yaml"
    broken.parent.mkdir()
    broken.write_text("data:\n  sources: [nowhere]\n")
    port, webhook = free_port(), Webhook()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=dict(env, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", server)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        alerts = subprocess.run([sys.executable, "-c", SET_UP_ALERTS, webhook.url], env=env, capture_output=True,
                                text=True, timeout=300)
        assert alerts.returncode == 0, alerts.stderr[-3000:]
        assert "--notify-block 'custom-webhook/nobody': no such block on the Prefect server" in alerts.stdout
        good = subprocess.run([str(BIN / "cxr"), "pipeline", "--params", str(params)], cwd=params.parent, env=env,
                              capture_output=True, text=True, timeout=900)
        assert good.returncode == 0, good.stderr[-3000:]
        bad = subprocess.run([str(BIN / "cxr"), "pipeline", "--params", str(broken)], cwd=broken.parent, env=env,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stderr[-3000:]
        webhook.wait_for(2, seconds=120)
        time.sleep(5)  # a duplicate notification would come now
        notes = list(webhook.received)
        read = subprocess.run([sys.executable, "-c", READ_RUNS], env=env, capture_output=True, text=True, timeout=300)
        assert read.returncode == 0, read.stderr[-3000:]
        applied = subprocess.run([sys.executable, "-c", APPLY_DEPLOYMENT, str(params)], env=env, capture_output=True,
                                 text=True, timeout=300)
        assert applied.returncode == 0, applied.stderr[-3000:]
        status = _status_once_scheduled(params, env, seconds=90)
        started = time.perf_counter()
        assert project_status(ProjectPaths(params.parent), env["PREFECT_API_URL"]) == status
        status_seconds = time.perf_counter() - started
    finally:
        stop(server)
        webhook.server.shutdown()
    assert status["prefect"]["error"] is None and status_seconds < 2.0
    assert status["prefect"]["next_scheduled"]["deployment"] == "scheduled"
    assert status["prefect"]["next_scheduled"]["at"][11:16] == "02:00", status["prefect"]  # the cron's hour, in UTC
    assert [run["message"] for run in status["prefect"]["failed_runs"]] == [
        "ingest: data.sources: 'nowhere' does not exist (run `cxr demo-data` for the demo set, or fix the path)"]
    assert status["runs"]["flow"]["data_version"] == status["data"]["version"]
    seen = json.loads(read.stdout.strip().splitlines()[-1])
    assert sorted(seen["automations"]) == ["cxr: champion changed", "cxr: cxr-pipeline run failed"]
    runs = {run["state"]: run for run in seen["runs"]}
    assert sorted(runs) == ["COMPLETED", "FAILED"]
    assert runs["FAILED"]["message"].startswith("ingest: data.sources: 'nowhere' does not exist"), runs["FAILED"]["message"]

    run = runs["COMPLETED"]
    # a task run is named "<task>-<suffix>"; the ingest subflow has a task run of its own in the flow run
    by_name = {task["name"].rsplit("-", 1)[0]: task_id for task_id, task in run["tasks"].items()}
    assert run["subflows"].keys() == {by_name["ingest"]}
    stage_names = ["ingest", "validate", "rebalance", "train", "evaluate", "register", "report"]
    for before, after in zip(stage_names, stage_names[1:]):
        assert run["tasks"][by_name[after]]["wait_for"] == [by_name[before]], (after, run["tasks"][by_name[after]])

    train_lines = [log["message"] for log in run["logs"] if log["task_run_id"] == by_name["train"]]
    assert any(line.startswith("train: kept the last epoch (1; best val AUC ") for line in train_lines), train_lines
    assert any(line.startswith("train: epoch 1 of 1: train loss ") for line in train_lines), train_lines
    assert any(line.startswith("ingest: decoded 6 of 51 new files") for line in run["ingest_logs"]), run["ingest_logs"]
    assert any(line.startswith("ingest: 48 images") for line in run["ingest_logs"]), run["ingest_logs"]
    register_lines = " ".join(log["message"] for log in run["logs"] if log["task_run_id"] == by_name["register"])
    assert "champion" in register_lines, register_lines

    artifacts = run["artifacts"]
    assert "95 % CI" in artifacts["cxr-metrics"]["data"] and "auc" in artifacts["cxr-metrics"]["data"].lower(), artifacts["cxr-metrics"]
    assert "@champion" in artifacts["cxr-gate"]["data"]
    data_gate = artifacts["cxr-data-gate"]["data"]
    assert "Data gate: passed" in data_gate and "labels_in_set" in data_gate
    with (params.parent / "data" / "interim" / "quarantine.csv").open(newline="") as handle:
        quarantined = Counter(row["reason"] for row in csv.DictReader(handle))
    assert quarantined and f"## Quarantined films: {sum(quarantined.values())}" in data_gate, data_gate
    assert all(f"| {reason} | {n} |" in data_gate for reason, n in quarantined.items()), data_gate
    assert artifacts["cxr-report"]["data"].endswith(f"({(params.parent / 'reports' / 'report.html').resolve().as_uri()})")

    bodies = [note["body"] for note in notes]
    assert len(bodies) == 2, bodies
    assert any("of cxr-pipeline failed: ingest: data.sources: 'nowhere' does not exist" in body for body in bodies), bodies
    assert any(body.startswith("cxr-pneumonia version 1 is @champion (was none): no champion yet") for body in bodies), bodies
