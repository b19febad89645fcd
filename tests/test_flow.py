"""Prefect behaviour of the flow's tasks, on the real Prefect engine (a temporary local server)."""

import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import USER_ERROR, _as_state, _is_transient, run_pipeline
from pipeline.errors import CxrError


@pytest.fixture(scope="module")
def prefect_engine():
    with prefect_test_harness(server_startup_timeout=120):  # a busy 2-core machine starts it slowly
        yield


def test_user_errors_are_not_retried_but_faults_are(prefect_engine):
    calls = {"user": 0, "fault": 0}

    def user_error():
        calls["user"] += 1
        raise CxrError("data.sources: 'x' does not exist")

    def fault():
        calls["fault"] += 1
        raise ConnectionError("tracking server went away")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_is_transient)
    def stage(kind: str):
        return _as_state(user_error if kind == "user" else fault)

    @flow
    def two_stages():
        return stage("user", return_state=True), stage("fault", return_state=True)

    user_state, fault_state = two_stages()
    assert user_state.name == USER_ERROR and "does not exist" in user_state.message
    assert fault_state.is_failed()
    assert calls == {"user": 1, "fault": 3}


def test_failing_stage_ends_the_flow_with_its_message(prefect_engine, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  sources: [nowhere]\n")
    with pytest.raises(CxrError, match="ingest: data.sources: 'nowhere' does not exist"):
        run_pipeline(params, [])


def test_ingest_on_a_local_dask_cluster_gives_the_same_outputs(prefect_engine, tmp_path):
    """prefect-dask's DaskTaskRunner with two worker processes: same manifest, store and quarantine as `cxr ingest`,
    and the films reach the decode cache every data.checkpoint_every as the shards come back, as on threads."""
    import shutil

    from flows.pipeline_flow import ingest_flow, task_runner_for
    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths

    write_demo_data(tmp_path / "data" / "raw" / "demo", n=40, seed=5, size=64)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n")
    paths = ProjectPaths(tmp_path)
    single = load_config(params, ["data.num_workers=1"])
    ingest_stage(paths, single)
    expected = [p.read_bytes() for p in (paths.manifest, paths.images, paths.quarantine)]

    for runner in ("dask", "threads"):
        shutil.rmtree(paths.decode_cache)
        config = load_config(params, [f"orchestration.task_runner={runner}", "orchestration.dask_workers=2",
                                      "orchestration.ingest_shard_size=8", "data.checkpoint_every=10"])
        state = ingest_flow.with_options(task_runner=task_runner_for(config))(paths, config, return_state=True)

        assert state.is_completed(), state.message
        assert state.result().n_decoded == 43  # 40 films and the 3 broken ones (on Dask, in 6 shards)
        assert [p.read_bytes() for p in (paths.manifest, paths.images, paths.quarantine)] == expected
        shards = list(paths.decode_cache.glob("decoded-*/shard-*.npy"))
        assert len(shards) >= 4, runner  # a shard per checkpoint of 10 outcomes (4), then finish's for the rest


@pytest.mark.parametrize("n_files, threads, image_size, expected", [
    (33, 2, 32, 9),  # 4 shards: two per worker thread
    (2000, 2, 64, 500),
    (200_000, 64, 64, 1563),  # 128 shards on 64 threads
    (5, 8, 64, 1),  # fewer films than tasks the threads could take: one film each
    (0, 2, 64, 1),
    (200_000, 2, 64, 16_384),  # not 4 shards of 200 MB: 13 of 64 MiB
    (3000, 2, 512, 256),
    (40, 2, 8192, 1),  # a film of 64 MiB: one per task
])
def test_dask_shards_are_two_per_worker_thread_up_to_a_memory_cap(n_files, threads, image_size, expected):
    """The default shard size (orchestration.ingest_shard_size unset): two tasks per worker thread, since each task
    costs a worker Prefect's set-up, but never a shard whose films pass MAX_SHARD_BYTES (they come back at once)."""
    from flows.pipeline_flow import MAX_SHARD_BYTES, dask_shard_size

    size = dask_shard_size(n_files, threads, image_size)
    assert size == expected
    assert size * image_size**2 <= MAX_SHARD_BYTES


def test_a_flow_run_waits_for_the_project_lock_and_fails_in_one_line_when_time_runs_out(prefect_engine, tmp_path, monkeypatch):
    """The flow holds the lock for its whole run (ingest's tasks do not go through the stage table's lock)."""
    from tests.test_lock import Holder

    params = tmp_path / "project" / "params.yaml"
    params.parent.mkdir()
    params.write_text("data:\n  image_size: 32\n")
    monkeypatch.setenv("CXR_LOCK_TIMEOUT", "1")
    holder = Holder(params.parent, tmp_path)
    try:
        with pytest.raises(CxrError, match=r"^another run holds .*\.cxr\.lock \(pid \d+, started at .*did not finish within 1 s"):
            run_pipeline(params, [])
    finally:
        holder.release()


PERSISTED_RUN = r"""
import sys
from pathlib import Path

from flows.pipeline_flow import ingest_flow, task_runner_for
from pipeline.config import load_config
from pipeline.paths import ProjectPaths

for root, runner in ((Path(sys.argv[1]), "dask"), (Path(sys.argv[2]), "threads")):
    config = load_config(root / "params.yaml", [f"orchestration.task_runner={runner}", "orchestration.dask_workers=2",
                                                "orchestration.ingest_shard_size=6"])
    paths = ProjectPaths(root)
    state = ingest_flow.with_options(task_runner=task_runner_for(config))(paths, config, return_state=True)
    assert state.is_completed(), state.message
    print(runner, state.result().n_decoded)
"""

KEEP_SPILLED = r"""
import shutil, threading, time
from pathlib import Path

KEEP = Path(r"KEEP_FOLDER")  # the worker imports a copy of this file from its own folder, deleted at its end


def dask_setup(worker):
    # Spilled films are deleted once the flow takes them: copy every file that appears in the spill folder.
    storage = Path(worker.local_directory) / "storage"
    KEEP.mkdir(exist_ok=True)

    def keep():
        while True:
            for file in list(storage.glob("*")) if storage.is_dir() else []:
                try:
                    shutil.copy(file, KEEP / f"{worker.name}-{file.name}")
                except OSError:
                    pass
            time.sleep(0.005)

    threading.Thread(target=keep, daemon=True).start()
"""


@pytest.mark.slow
def test_prefect_with_persisted_results_and_dask_spilling_everything_write_no_identifier(tmp_path):
    """The PACS-style export through ingest_flow on a local Dask cluster and on Prefect's threads, with every task
    result persisted (PREFECT_RESULTS_PERSIST_BY_DEFAULT) and every Dask result spilled to disk: Prefect's home and
    database, the result storage, Dask's folders and every output hold no planted identifier."""
    import os
    import subprocess
    import sys

    from pipeline.demo_data import write_demo_data
    from tests.test_deid import PACS_IDENTIFIERS, leaked_identifiers, write_pacs_export

    write_demo_data(tmp_path / "demo", n=24, seed=3, size=64)
    projects = [tmp_path / "on-dask", tmp_path / "on-threads"]
    for root in projects:
        write_pacs_export(root, tmp_path / "demo")
        (root / "params.yaml").write_text("data:\n  image_size: 32\n  num_workers: 1\n  sources: [pacs]\n")
    (tmp_path / "keep_spilled.py").write_text(KEEP_SPILLED.replace("KEEP_FOLDER", str(tmp_path / "dask-spilled")))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"), "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
           "PREFECT_API_URL": "", "DASK_TEMPORARY_DIRECTORY": str(tmp_path / "dask-tmp"),
           "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "1e-12",  # spill every result as soon as it is made
           "DASK_DISTRIBUTED__WORKER__PRELOAD": f"['{tmp_path / 'keep_spilled.py'}']"}
    env.pop("PREFECT_API_KEY", None)

    run = subprocess.run([sys.executable, "-c", PERSISTED_RUN, *map(str, projects)], env=env, capture_output=True,
                         text=True, timeout=600, check=False)

    assert run.returncode == 0, run.stderr[-3000:]
    decoded = dict(line.split() for line in run.stdout.splitlines() if line.startswith(("dask ", "threads ")))
    assert decoded["dask"] == decoded["threads"] and int(decoded["dask"]) > 20
    assert any((tmp_path / "prefect-results").iterdir())  # results really were persisted
    assert any((tmp_path / "dask-spilled").iterdir())  # and spilled
    assert (tmp_path / "prefect-home" / "prefect.db").is_file()
    output = (run.stdout + run.stderr).lower()
    assert not [needle for needle in PACS_IDENTIFIERS if needle.lower() in output]
    assert leaked_identifiers(tmp_path, skip=("demo", "pacs", "params.yaml", "keep_spilled.py")) == {}


def test_a_stage_task_that_refuses_ends_the_flow_with_its_own_one_line_message(prefect_engine, tmp_path):
    """validate (a task of the flow, not the ingest subflow) refuses the data: the flow run's state message is
    "validate: " and the gate's own one-line message, the very one `cxr validate` gives; no later stage runs."""
    from pipeline.config import load_config
    from pipeline.paths import ProjectPaths
    from pipeline.validate import validate_stage
    from tests.conftest import write_tiny_project

    params = write_tiny_project(tmp_path / "project", n=24)
    strict = ["validation.class_ratio.min=0.9"]  # no demo split is 90 % one class: the blocking check fails
    with pytest.raises(CxrError) as in_the_flow:
        run_pipeline(params, strict)
    with pytest.raises(CxrError) as on_its_own:
        validate_stage(ProjectPaths(params.parent), load_config(params, strict))

    assert "class_ratio" in str(on_its_own.value) and "\n" not in str(on_its_own.value)
    assert str(in_the_flow.value) == f"validate: {on_its_own.value}"
    assert not (params.parent / "data" / "processed" / "train_index.npy").exists()  # rebalance never ran


@pytest.mark.slow
def test_ingest_on_a_separately_started_dask_scheduler_and_two_workers_gives_the_same_outputs(prefect_engine, tmp_path):
    """The multi-machine setup of the README, on one machine: `dask scheduler` and two `dask worker` processes started
    on their own (each in its own folder, the key in its environment, as on another host), and the flow pointed at
    them by orchestration.dask_address. The outputs are the bytes of the thread runner's, and the films were decoded
    by those workers, not by a cluster the flow started itself."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from flows.pipeline_flow import ingest_flow, task_runner_for
    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.paths import ProjectPaths
    from tests.conftest import REPO

    write_demo_data(tmp_path / "data" / "raw" / "demo", n=30, seed=7, size=64)
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  image_size: 32\n")
    paths = ProjectPaths(tmp_path)
    on_threads = load_config(params, ["data.num_workers=1"])
    state = ingest_flow.with_options(task_runner=task_runner_for(on_threads))(paths, on_threads, return_state=True)
    assert state.is_completed(), state.message
    expected = [p.read_bytes() for p in (paths.manifest, paths.images, paths.quarantine, paths.dropped_duplicates)]
    shutil.rmtree(paths.decode_cache)

    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DASK_TEMPORARY_DIRECTORY": str(tmp_path / "dask-tmp"),
           "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}  # as the README starts them
    started = [subprocess.Popen([*dask, "--scheduler-file", str(scheduler_file), "--port", "0", "--dashboard-address", ":0"],
                                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        address = _scheduler_address(scheduler_file, deadline=time.monotonic() + 120)
        for name in ("host-a", "host-b"):
            (tmp_path / name).mkdir()
            started.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                 "--name", name, "--no-dashboard"], env=env, cwd=tmp_path / name, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            # no ingest_shard_size: the shards are sized from the cluster's 2 worker threads (dask_shard_size)
            on_dask = load_config(params, ["orchestration.task_runner=dask", f"orchestration.dask_address={address}"])
            state = ingest_flow.with_options(task_runner=task_runner_for(on_dask))(paths, on_dask, return_state=True)
            assert state.is_completed(), state.message
            assert state.result().n_decoded == 33  # 30 films and the 3 broken ones, in 4 shards of at most 9
            assert len(client.scheduler_info()["workers"]) == 2  # the flow used these, it started no cluster of its own
            done = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
            assert all(count > 0 for count in done.values()), done  # both "machines" decoded shards
            sampling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
            assert not any(sampling.values()), sampling  # the README's DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
    finally:
        for process in reversed(started):
            process.terminate()
        for process in started:
            process.wait(timeout=60)

    assert [p.read_bytes() for p in (paths.manifest, paths.images, paths.quarantine, paths.dropped_duplicates)] == expected



def _scheduler_address(scheduler_file, deadline: float) -> str:
    """The address in the scheduler file once it is whole: the scheduler creates the file before it writes it, so
    on a busy machine the test could read it empty (it did in a full run)."""
    import json
    import time

    while time.monotonic() < deadline:
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.2)
    raise AssertionError(f"no scheduler address in {scheduler_file} after 120 s")

def test_a_decode_task_whose_key_is_not_the_flows_refuses_in_one_line(tmp_path, monkeypatch):
    """A Dask worker on another host without the flow's key would make its own and return pseudonyms nothing else
    matches: the decode task compares key fingerprints (deid.key_check) and refuses, naming the fix."""
    from flows.pipeline_flow import decode_task
    from pipeline.deid import key_check, load_key
    from pipeline.demo_data import write_demo_data
    from pipeline.imaging import DecodeLimits

    write_demo_data(tmp_path / "demo", n=4, seed=1, size=32)
    films = sorted(p for p in (tmp_path / "demo").rglob("*") if p.is_file())[:2]
    flows_key = key_check(load_key(tmp_path, "project"))
    assert len(decode_task.fn(films, 16, 1, DecodeLimits(), tmp_path, "project", "none", flows_key)) == 2
    monkeypatch.setenv("CXR_DEID_KEY", "another-key-on-another-host-0123456789abcdef")
    with pytest.raises(CxrError, match=r"^ingest: the de-identification key on .* is not the flow's .*same CXR_DEID_KEY"):
        decode_task.fn(films, 16, 1, DecodeLimits(), tmp_path, "project", "none", flows_key)
