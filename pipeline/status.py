"""`cxr status`: what is live and why, from the files the stages leave behind, fast enough to type often.

Only small files are read (no MLflow, Prefect or DVC import: importing MLflow alone takes longer than the whole
answer should), so what is shown is what the project folder records: the data version of the manifest, the last
`dvc repro` (dvc.lock), the last complete flow run (models/last_success.json), the last registration and its gate
(models/registered.json), and the quarantine list. A scheduled run through a deployment records the same files
as the flow it runs. A run that failed leaves no record here: when a Prefect server is configured (PREFECT_API_URL),
its last failed flow runs with their one-line reasons and the deployment's next scheduled run come from the server's
REST API, over plain HTTP with a short timeout (no Prefect import: it alone would take most of the time allowed).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from pipeline.files import md5_of, sha256_of
from pipeline.paths import ProjectPaths


def project_status(paths: ProjectPaths, prefect_api: str | None = None) -> dict:
    """The project's state as plain JSON data; None where nothing has written the file it comes from yet, and for
    "prefect" when no Prefect server is configured (`prefect_api`, PREFECT_API_URL)."""
    return {
        "data": _data(paths),
        "runs": {"dvc": _dvc_run(paths), "flow": _flow_run(paths)},
        "model": _model(paths),
        "quarantine": _quarantine(paths.quarantine),
        "prefect": _prefect(prefect_api, _deployment_name(paths.root / "params.yaml")) if prefect_api else None,
    }


def _written(path: Path) -> str:
    """When a file was last written, as UTC ISO 8601 to the second."""
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def _data(paths: ProjectPaths) -> dict | None:
    """The data version (the manifest's sha256, as MLflow runs and model versions name it, and its md5, as dvc.lock
    does) and when ingest last wrote it."""
    if not paths.manifest.exists():
        return None
    return {"version": sha256_of(paths.manifest), "dvc_md5": md5_of(paths.manifest), "written": _written(paths.manifest)}


def _dvc_run(paths: ProjectPaths) -> dict | None:
    """The last `dvc repro`: when dvc.lock was written and whether it records every stage of dvc.yaml (DVC records
    a stage only once it succeeded, so the first one missing is where a first run stopped)."""
    import yaml

    lock, pipeline = paths.root / "dvc.lock", paths.root / "dvc.yaml"
    if not lock.exists() or not pipeline.exists():
        return None
    recorded = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {}))
    missing = [name for name in (yaml.safe_load(pipeline.read_text()) or {}).get("stages", {}) if name not in recorded]
    return {"written": _written(lock), "complete": not missing, "first_missing_stage": missing[0] if missing else None}


def _flow_run(paths: ProjectPaths) -> dict | None:
    """The last complete run of the flow (`cxr pipeline` or a deployment's scheduled run): when, and the data
    version and params hash it ran on."""
    if not paths.last_success.exists():
        return None
    return {"completed": _written(paths.last_success), **json.loads(paths.last_success.read_text())}


def _model(paths: ProjectPaths) -> dict | None:
    """The last registered version, and the champion and challenger as its gate left them, with the gate's numbers
    (models/registered.json; `cxr history` has every decision since)."""
    if not paths.registered.exists():
        return None
    reg = json.loads(paths.registered.read_text())
    version, previous = reg["version"], reg.get("previous_champion")
    return {
        "name": reg["model_name"],
        "registered": _written(paths.registered),
        "champion": version if reg["is_champion"] else previous,
        "challenger": None if reg["is_champion"] else version,
        "gate": {"metric": reg["gate_metric"], "value": reg.get("value"), "champion_value": reg.get("previous_value"),
                 "difference_ci95": reg.get("difference_ci95"), "previous_champion": previous, "decision": reg["reason"]},
    }


FLOW_NAME = "cxr-pipeline"  # flows.pipeline_flow.cxr_pipeline's name (no Prefect import here)
PREFECT_TIMEOUT_S = 0.7  # per request; `cxr status` answers within 2 s even when the server hangs
FAILED_RUNS_SHOWN = 3


def _deployment_name(params: Path) -> str:
    """orchestration.deployment_name from params.yaml, read as YAML: pipeline.config's typed models take longer to
    build than this whole answer should (its default is the same "scheduled")."""
    import yaml

    loaded = yaml.safe_load(params.read_text()) if params.exists() else None
    return ((loaded or {}).get("orchestration") or {}).get("deployment_name") or "scheduled"


def _prefect(api: str, deployment: str) -> dict:
    """The flow's last failed runs (newest first, with the state's one-line message: the failing stage's reason)
    and the deployment's next scheduled run, from the Prefect server at `api`; "error" says why there are none
    when the server did not answer in time."""
    found: dict = {"api_url": api, "error": None, "failed_runs": [], "next_scheduled": None}
    flow = {"name": {"any_": [FLOW_NAME]}}
    try:
        failed = _prefect_post(api, "/flow_runs/filter", {
            "flows": flow, "flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}},
            "sort": "START_TIME_DESC", "limit": FAILED_RUNS_SHOWN})
        scheduled = _prefect_post(api, "/flow_runs/filter", {
            "flows": flow, "deployments": {"name": {"any_": [deployment]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 1})
    except (OSError, ValueError) as exc:  # refused, timed out, not HTTP, not JSON
        found["error"] = f"no Prefect server answered at {api} within {PREFECT_TIMEOUT_S} s ({_reason(exc)})"
        return found
    found["failed_runs"] = [{"name": run["name"], "started": run.get("start_time") or run.get("expected_start_time"),
                             "state": (run.get("state") or {}).get("name"), "message": (run.get("state") or {}).get("message")}
                            for run in failed]
    if scheduled:
        found["next_scheduled"] = {"name": scheduled[0]["name"], "deployment": deployment,
                                   "at": scheduled[0].get("next_scheduled_start_time") or scheduled[0].get("expected_start_time")}
    return found


def _prefect_post(api: str, route: str, body: dict) -> list[dict]:
    """POST a JSON body to the Prefect REST API; the decoded JSON answer. PREFECT_API_KEY, when set, authenticates
    (Prefect Cloud)."""
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['PREFECT_API_KEY']}"
    request = urllib.request.Request(api.rstrip("/") + route, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=PREFECT_TIMEOUT_S) as response:
        return json.loads(response.read())


def _reason(exc: Exception) -> str:
    """An HTTP or connection error in a few words."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = getattr(exc, "reason", None) or exc
    return str(reason).strip() or type(exc).__name__


OUT_OF_SCOPE = "filtered_"  # the reasons of films data.filters left out (modality, view, body part): pipeline.ingest


def _quarantine(path: Path) -> dict | None:
    """Films ingest set aside, counted per reason, and how many of them were out of scope (data.filters) rather
    than unreadable or refused."""
    if not path.exists():
        return None
    with path.open(newline="") as handle:
        reasons = Counter(row["reason"] for row in csv.DictReader(handle))
    return {"total": sum(reasons.values()), "out_of_scope": sum(n for r, n in reasons.items() if r.startswith(OUT_OF_SCOPE)),
            "by_reason": dict(sorted(reasons.items()))}


def status_lines(status: dict) -> list[str]:
    """The status as a short screen of text."""
    data, runs, model, quarantine = status["data"], status["runs"], status["model"], status["quarantine"]
    lines = [f"Data:        {data['version'][:12]} (manifest sha256; dvc md5 {data['dvc_md5']}), written {data['written']}"
             if data else "Data:        no manifest yet: run `cxr ingest`, `dvc repro` or `cxr pipeline`"]
    dvc = runs["dvc"]
    lines.append("DVC:         no dvc.lock yet" if dvc is None else
                 f"DVC:         dvc.lock written {dvc['written']}, " +
                 ("every stage recorded" if dvc["complete"] else f"stopped before '{dvc['first_missing_stage']}'"))
    flow = runs["flow"]
    lines.append("Flow:        no complete flow run yet" if flow is None else
                 f"Flow:        last complete run {flow['completed']} (data {str(flow.get('data_version'))[:12]})")
    if model is None:
        lines.append("Model:       nothing registered yet")
    else:
        gate = model["gate"]
        lines.append(f"Model:       {model['name']} @champion v{model['champion']}"
                     + (f", @challenger v{model['challenger']}" if model["challenger"] is not None else "")
                     + f" (registered {model['registered']})")
        lines.append(f"Gate:        {gate['decision']}")
    if quarantine is not None:
        reasons = ", ".join(f"{reason} {n}" for reason, n in quarantine["by_reason"].items()) or "none"
        lines.append(f"Quarantine:  {quarantine['total']} film(s), {quarantine['out_of_scope']} of them out of scope: {reasons}")
    return lines + _prefect_lines(status["prefect"])


def _prefect_lines(prefect: dict | None) -> list[str]:
    """The Prefect server's part: the next scheduled run and the last failed ones, or why there are none."""
    if prefect is None:
        return ["Prefect:     no Prefect server configured (PREFECT_API_URL): no failed or scheduled runs to show"]
    if prefect["error"]:
        return [f"Prefect:     {prefect['error']}"]
    scheduled = prefect["next_scheduled"]
    lines = [f"Next run:    {scheduled['at']} ({FLOW_NAME}/{scheduled['deployment']})" if scheduled else
             "Next run:    none scheduled (`cxr deploy` serves the scheduled deployment)"]
    if not prefect["failed_runs"]:
        lines.append("Failed runs: none")
    for run in prefect["failed_runs"]:
        lines.append(f"Failed run:  {run['started']} {run['name']}: {run['message']}")
    return lines
