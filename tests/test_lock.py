"""The project lock: one writer at a time, with real processes on one project; a process re-enters its own lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.demo_data import write_demo_data
from pipeline.ingest import ingest_stage
from pipeline.lock import LOCK_FILE, project_lock
from pipeline.paths import ProjectPaths
from pipeline.stages import stage
from tests.conftest import REPO

# Holds the project lock of argv[1], says so by writing argv[2], and lets go when argv[3] appears.
HOLD = """
import sys, time
from pathlib import Path
from pipeline.lock import project_lock
root, ready, release = map(Path, sys.argv[1:4])
with project_lock(root):
    ready.write_text("held")
    while not release.exists():
        time.sleep(0.05)
"""
# Tries once to take the project lock of argv[1]: prints "taken" or the refusal.
TRY = """
import sys
from pathlib import Path
from pipeline.errors import CxrError
from pipeline.lock import project_lock
try:
    with project_lock(Path(sys.argv[1])):
        print("taken")
except CxrError as exc:
    print(exc)
"""


def _project(root: Path, *sources: str, n: int = 24) -> Path:
    for index, source in enumerate(sources):
        write_demo_data(root / "data" / "raw" / source, n=n, seed=index, size=64)
    params = root / "params.yaml"
    params.write_text("data:\n  image_size: 32\n  num_workers: 1\n")
    return params


def _outputs(root: Path) -> list[bytes]:
    paths = ProjectPaths(root)
    return [paths.manifest.read_bytes(), paths.images.read_bytes(), paths.quarantine.read_bytes()]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _cxr(params: Path, *args: str, stderr, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cxr", *args, "--params", str(params)], cwd=params.parent,
                            env=_env(**env), stdout=subprocess.DEVNULL, stderr=stderr, text=True)


class Holder:
    """Another process holding the project lock until released."""

    def __init__(self, root: Path, scratch: Path):
        self.ready, self.release_file = scratch / "ready", scratch / "release"
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(self.ready), str(self.release_file)],
                                        cwd=REPO, env=_env())
        _wait_for(lambda: self.ready.exists(), "the holder to take the lock")

    def release(self) -> None:
        self.release_file.write_text("")
        assert self.process.wait(timeout=60) == 0


def _wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _try_lock(root: Path) -> str:
    done = subprocess.run([sys.executable, "-c", TRY, str(root)], cwd=REPO, env=_env(CXR_LOCK_TIMEOUT="0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_second_run_waits_for_the_first_saying_whom_it_waits_for_then_runs(tmp_path):
    params = _project(tmp_path / "project", "demo")
    root = params.parent
    holder = Holder(root, tmp_path)
    log = tmp_path / "ingest.log"
    with log.open("w") as stderr:
        second = _cxr(params, "ingest", stderr=stderr, CXR_LOCK_TIMEOUT="300")
        _wait_for(lambda: "waiting for the run holding" in log.read_text(), "the second run to say it waits")
        time.sleep(0.5)
        assert second.poll() is None and not ProjectPaths(root).manifest.exists()  # it waits, writing nothing
        holder.release()
        assert second.wait(timeout=300) == 0, log.read_text()

    message = log.read_text()
    assert f"waiting for the run holding {root.resolve() / LOCK_FILE} (pid {holder.process.pid}, started at " in message
    assert "Traceback" not in message
    assert ProjectPaths(root).manifest.exists()


def test_a_run_that_waits_past_the_timeout_refuses_in_one_line(tmp_path):
    params = _project(tmp_path / "project", "demo", n=20)
    root = params.parent
    holder = Holder(root, tmp_path)
    try:
        done = subprocess.run([sys.executable, "-m", "cxr", "ingest", "--params", str(params)], cwd=root,
                              env=_env(CXR_LOCK_TIMEOUT="1"), capture_output=True, text=True, timeout=300)
    finally:
        holder.release()

    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert errors[0].startswith(f"error: another run holds {root.resolve() / LOCK_FILE} (pid {holder.process.pid}, started at ")
    assert "did not finish within 1 s" in errors[0]
    assert not ProjectPaths(root).manifest.exists()


def test_two_ingests_started_together_run_one_after_the_other(tmp_path):
    """Whichever runs second, the outputs are all that run's: never one run's manifest with the other's images.

    The split registry remembers the first run's patients, so what the second writes is what it writes after the
    first, run one after the other by hand, in either order."""
    params = _project(tmp_path / "project", "a", "b")
    root = params.parent
    expected = []
    for order in (("a", "b"), ("b", "a")):
        alone = tmp_path / ("alone-" + "-".join(order))
        for source in order:
            shutil.copytree(root / "data" / "raw" / source, alone / "data" / "raw" / source)
        alone_params = _project(alone)
        for source in order:
            ingest_stage(ProjectPaths(alone), load_config(alone_params, [f"data.sources=[data/raw/{source}]"]))
        expected.append(_outputs(alone))

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = []
    for source, log in zip(("a", "b"), logs):
        with log.open("w") as stderr:
            runs.append(_cxr(params, "ingest", "--set", f"data.sources=[data/raw/{source}]", stderr=stderr))
    for run, log in zip(runs, logs):
        assert run.wait(timeout=600) == 0, log.read_text()

    assert _outputs(root) in expected
    assert not any("Traceback" in log.read_text() for log in logs)


def test_a_process_reenters_its_own_lock_from_any_thread_and_holds_it_against_others(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_LOCK_TIMEOUT", "0")  # waiting for itself would refuse at once
    params = _project(tmp_path, "demo", n=20)
    paths, config = ProjectPaths(tmp_path), load_config(params, ["data.sources=[data/raw/demo]"])
    entered = []

    with project_lock(tmp_path):
        with project_lock(tmp_path):  # as the flow's stages re-enter the flow's lock
            stage("ingest").run(paths, config)  # Stage.run takes the lock too
        thread = threading.Thread(target=lambda: entered.append(_enter(tmp_path)))  # as Prefect's task threads do
        thread.start()
        thread.join(timeout=60)
        held = _try_lock(tmp_path)
    free = _try_lock(tmp_path)

    assert entered == [True]
    assert held.startswith(f"another run holds {tmp_path.resolve() / LOCK_FILE} (pid {os.getpid()}, started at ")
    assert free == "taken"


def _enter(root: Path) -> bool:
    with project_lock(root):
        return True


def test_under_torchrun_only_local_rank_0_takes_the_lock(tmp_path, monkeypatch):
    """Every rank runs the train stage: ranks waiting for each other's lock would never meet in the process group."""
    monkeypatch.setenv("CXR_LOCK_TIMEOUT", "0")
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with project_lock(tmp_path):
        assert _try_lock(tmp_path) == "taken"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with project_lock(tmp_path):
        assert _try_lock(tmp_path).startswith("another run holds")


def test_a_bad_lock_timeout_is_a_one_line_error(tmp_path, monkeypatch):
    from pipeline.errors import CxrError

    monkeypatch.setenv("CXR_LOCK_TIMEOUT", "soon")
    with pytest.raises(CxrError, match="CXR_LOCK_TIMEOUT must be a number of seconds"):
        with project_lock(tmp_path):
            pass
