"""Every stage names its MLflow store: nothing is left in MLflow's process-wide settings or the environment."""

import os

import mlflow
import pytest

from pipeline.config import load_config
from pipeline.tracking import client, fluent_store, store_uri
from pipeline.train import train_stage
from tests.conftest import ingest_and_rebalance


def _run_ids(paths) -> set[str]:
    store = client(paths)
    return {run.info.run_id for run in store.search_runs([e.experiment_id for e in store.search_experiments()])}


def test_two_projects_in_one_process_each_log_to_their_own_store(tiny_project, tmp_path):
    """The shared project has already trained in this process; a second one must not log into its store (nor the
    other way round), and neither may leave a tracking URI behind for the next."""
    uri_before, environment_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    shared_runs = _run_ids(tiny_project.paths)
    params, paths = ingest_and_rebalance(tmp_path / "second")

    result = train_stage(paths, load_config(params))

    assert _run_ids(paths) == {result.run_id}  # its own store, under its own root
    assert _run_ids(tiny_project.paths) == shared_runs
    assert (paths.root / "mlruns.db").exists()
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (uri_before, environment_before)


@pytest.mark.parametrize("user_setting", [None, "sqlite:////srv/team/mlflow.db"])
def test_the_fluent_store_is_set_for_the_call_only(tiny_project, monkeypatch, user_setting):
    """Unset, or a user's own server: either way the environment and MLflow's setting are as before afterwards."""
    if user_setting is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", user_setting)
    uri_before, environment_before = mlflow.get_tracking_uri(), dict(os.environ)
    with fluent_store(tiny_project.paths):
        assert mlflow.get_tracking_uri() == store_uri(tiny_project.paths) == (user_setting or store_uri(tiny_project.paths))
    assert (mlflow.get_tracking_uri(), dict(os.environ)) == (uri_before, environment_before)


def test_a_tracking_uri_the_user_sets_is_the_store(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI (a server, Postgres, another SQLite file) wins over the project's default store."""
    elsewhere = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    params, paths = ingest_and_rebalance(tmp_path / "project")

    result = train_stage(paths, load_config(params))

    assert store_uri(paths) == elsewhere
    assert result.run_id in _run_ids(paths) and not (paths.root / "mlruns.db").exists()
