"""Prefect behaviour of the flow's tasks, on the real Prefect engine (a temporary local server)."""

import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline_flow import USER_ERROR, _as_state, _is_transient, run_pipeline
from pipeline.errors import CxrError


@pytest.fixture(scope="module")
def prefect_engine():
    with prefect_test_harness():
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
