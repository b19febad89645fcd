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
    """prefect-dask's DaskTaskRunner with two worker processes: same manifest, store and quarantine as `cxr ingest`."""
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
    shutil.rmtree(paths.decode_cache)

    on_dask = load_config(params, ["orchestration.task_runner=dask", "orchestration.dask_workers=2",
                                   "orchestration.ingest_shard_size=8"])
    state = ingest_flow.with_options(task_runner=task_runner_for(on_dask))(paths, on_dask, return_state=True)

    assert state.is_completed(), state.message
    assert state.result().n_decoded == 43  # 40 films and the 3 broken ones, in 6 shards
    assert [p.read_bytes() for p in (paths.manifest, paths.images, paths.quarantine)] == expected


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
