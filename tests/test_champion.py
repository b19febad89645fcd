"""The champion gate and its history, against real MLflow stores (SQLite, and a real `mlflow server`) and the real
register stage: it fails closed, cannot be walked down, compares fairly, and rollback pops a stack."""

import getpass
import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.champion import champion_history, current_champion, promote, rollback
from pipeline.config import default_tracking_uri, load_config
from pipeline.errors import CxrError, StoreUnavailable
from pipeline.evaluate import evaluate_stage
from pipeline.paths import ProjectPaths
from pipeline.predictions import load_predictions
from pipeline.register import register_stage
from pipeline.stages import run_stages
from pipeline.tracking import client as tracking_client
from tests.conftest import source_files, write_tiny_project
from tests.servers import FailingProxy, free_port, stop, wait_for

NAME = "cxr-pneumonia"
BIN = Path(sys.executable).parent


def _store_with_a_version(root: Path):  # -> tuple[MlflowClient, ProjectPaths]
    """A real SQLite registry holding model `m` with one version (no training: the registry is what is tested)."""
    paths = ProjectPaths(root)
    client = tracking_client(paths)
    client.create_registered_model("m")
    (root / "model").mkdir()
    client.create_model_version("m", source=str(root / "model"))
    return client, paths


@contextmanager
def _unreadable(database: Path):
    """The SQLite file's header overwritten while inside (the store then answers "file is not a database")."""
    with database.open("r+b") as handle:
        header = handle.read(100)
        handle.seek(0)
        handle.write(b"not a database any more".ljust(100, b"\0"))
    try:
        yield lambda: _restore(database, header)
    finally:
        _restore(database, header)


def _restore(database: Path, header: bytes) -> None:
    with database.open("r+b") as handle:
        handle.write(header)


def test_only_a_missing_model_or_a_missing_alias_means_no_champion(tmp_path):
    client, _ = _store_with_a_version(tmp_path)
    assert current_champion(client, "no-such-model") is None
    assert current_champion(client, "m") is None  # registered, but nothing holds the alias
    client.set_registered_model_alias("m", "champion", "1")
    assert int(current_champion(client, "m").version) == 1


def test_an_unreadable_store_fails_reading_the_champion_instead_of_answering_none(tmp_path):
    client, paths = _store_with_a_version(tmp_path)
    client.set_registered_model_alias("m", "champion", "1")
    with _unreadable(paths.root / "mlruns.db"):
        with pytest.raises(StoreUnavailable, match="reading the champion of m.*4 tries.*file is not a database"):
            current_champion(client, "m")
    assert int(current_champion(client, "m").version) == 1  # and the alias is where it was


def test_a_store_that_answers_again_within_the_retries_gives_the_champion(tmp_path):
    client, paths = _store_with_a_version(tmp_path)
    client.set_registered_model_alias("m", "champion", "1")
    with _unreadable(paths.root / "mlruns.db") as restore:
        threading.Timer(0.8, restore).start()  # between the second and the third try
        assert int(current_champion(client, "m").version) == 1


def _write_params(params: Path, **register) -> Path:
    """The tiny params with these register settings (and fewer bootstrap rounds) written into the file itself."""
    tree = yaml.safe_load(params.read_text())
    tree["register"].update(register)
    tree["evaluate"]["bootstrap_rounds"] = 200
    params.write_text(yaml.safe_dump(tree, sort_keys=False))
    return params


def _evaluated_at(params: Path, paths: ProjectPaths, threshold: float, *more: str):
    """The trained checkpoint evaluated again at a fixed threshold: the next registration is a new version."""
    config = load_config(params, ["evaluate.threshold_method=fixed", f"evaluate.threshold={float(threshold)!r}", *more])
    evaluate_stage(paths, config)
    return config


@pytest.mark.slow
def test_ten_slightly_worse_challengers_leave_the_first_champion_in_place(tmp_path):
    """One network, called positive at ten successively higher thresholds: each challenger misses one more positive
    test film than the one before, well within the margin of it (the old rule `ours >= theirs - margin` took every
    one, and the champion ended ten films worse). The rule compares each with the champion and refuses them all;
    an equal one still takes it."""
    params = _write_params(write_tiny_project(tmp_path, n=200), gate_metric="test_sensitivity", margin=0.15, min_gate_films=10)
    paths = ProjectPaths(tmp_path)
    run_stages(paths, load_config(params), until="evaluate")
    test = load_predictions(paths.predictions, "test")
    positives = np.unique(test.loc[test["truth"] == 1, "probability"])  # ascending
    assert len(positives) >= 11
    n_positive = int((test["truth"] == 1).sum())
    below = [float(positives[0]) / 2, *((positives[:10] + positives[1:11]) / 2)]  # all positives called, then 1, 2, ... missed
    sensitivity = [((test["truth"] == 1) & (test["probability"] >= cut)).sum() / n_positive for cut in below]
    assert sensitivity[0] == 1.0 and all(0 < a - b <= 0.15 for a, b in zip(sensitivity, sensitivity[1:]))

    _evaluated_at(params, paths, below[0])
    first = register_stage(paths, load_config(params))
    assert first.version == 1 and first.is_champion and first.value == 1.0
    for step, cut in enumerate(below[1:10], start=1):
        config = _evaluated_at(params, paths, cut)
        result = register_stage(paths, config)
        assert (result.version, result.is_champion, result.previous_champion) == (step + 1, False, 1), result.reason
        assert result.value == pytest.approx(sensitivity[step]) and result.previous_value == 1.0
        assert "worse at the point estimate" in result.reason

    # The tenth through `cxr register`, with a margin of 1 on the command line: still worse, still refused, and said so.
    _evaluated_at(params, paths, below[10])
    out = subprocess.run([str(BIN / "cxr"), "register", "--set", "register.margin=1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "version 11 is @challenger" in out.stdout and "margin 1 (set on the command line; params.yaml says 0.15)" in out.stdout
    client = tracking_client(paths)
    assert int(current_champion(client, NAME).version) == 1
    registered = json.loads(paths.registered.read_text())
    assert registered["margin"] == 1 and registered["difference"] == pytest.approx(sensitivity[10] - 1.0)
    assert registered["n_films"] == len(test) and registered["n_patients"] == test.merge(
        pd.read_parquet(paths.manifest), on="image_id")["patient_hash"].nunique()
    low, high = registered["difference_ci95"]
    assert low <= registered["difference"] <= high <= 0
    tags = client.get_model_version(NAME, "11").tags
    assert tags["decision"] == registered["reason"] and json.loads(tags["gate"])["difference_ci95"] == [low, high]

    equal = register_stage(paths, _evaluated_at(params, paths, float(positives[0]) / 3))  # every positive called again
    assert equal.is_champion and equal.difference == 0 and "promoted" in equal.reason
    history = champion_history(client, NAME)
    assert [(entry["version"], entry["action"]) for entry in history] == [(1, "automatic"), (12, "automatic")]
    assert history[1]["previous"] == 1 and history[1]["user"] == getpass.getuser()
    assert datetime.fromisoformat(history[1]["at"]).utcoffset().total_seconds() == 0
    assert history[1]["decision"]["metric"] == "test_sensitivity" and history[1]["decision"]["n_films"] == len(test)
    assert history[1]["reason"] == equal.reason


@pytest.mark.slow
def test_each_model_is_scored_on_the_raw_films_at_its_own_size_and_only_on_patients_neither_saw(tmp_path, monkeypatch):
    """A champion trained at 32 px on one split, a challenger at 28 px on another (another project, the same films
    and registry): the gate leaves out the test films of patients the champion trained or was validated on and feeds
    each model the raw files at its own size, as `cxr predict` would."""
    from pipeline.imaging import decode_file, resize
    from pipeline.metrics import rank_auc
    from pipeline.predict import load_model, predict_files

    a = ProjectPaths(tmp_path / "a")
    a_params = _write_params(write_tiny_project(a.root, n=200), min_gate_films=5)
    run_stages(a, load_config(a_params, ["data.split={train: 0.5, val: 0.1, test: 0.4}"]), until="register")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(a.root))  # b registers into a's registry
    b = ProjectPaths(tmp_path / "b")
    b_params = _write_params(write_tiny_project(b.root, n=200), min_gate_films=5)
    b_settings = ["data.split={train: 0.4, val: 0.1, test: 0.5}", "data.seed=1", "data.image_size=28"]
    result = run_stages(b, load_config(b_params, b_settings), until="register")["register"]

    seen_by_a = pd.read_parquet(a.manifest).query("split in ['train', 'val']")["patient_hash"]
    b_test = pd.read_parquet(b.manifest).query("split == 'test'")
    unseen = b_test[~b_test["patient_hash"].isin(seen_by_a)]
    assert (result.version, result.previous_champion) == (2, 1), result.reason
    assert result.n_films == len(unseen) and 0 < len(unseen) < len(b_test)
    assert result.n_patients == unseen["patient_hash"].nunique()
    files = source_files(b, load_config(b_params, b_settings), unseen)
    truth = (unseen["label"] == "pneumonia").to_numpy().astype(int)
    for version, size, value in ((1, 32, result.previous_value), (2, 28, result.value)):
        model = load_model(f"models:/{NAME}/{version}", b)
        assert model.metadata.metadata["image_size"] == size
        # The gate scores every film, also one the model refuses as out of distribution (both models on the same
        # films); cxr predict gives the same probability for each film it answers.
        images = np.stack([resize(decode_file(file).pixels, size) for file in files])
        probability = model.classify_all(images)["probability"].to_numpy(dtype=float)
        assert value == pytest.approx(rank_auc(truth, probability), abs=1e-9)
        answered = [(k, p.probability) for k, p in enumerate(predict_files(model, files)) if p.probability is not None]
        assert answered and np.allclose([p for _, p in answered], probability[[k for k, _ in answered]], atol=1e-6)

    client = tracking_client(b)
    champion = int(current_champion(client, NAME).version)
    too_few = register_stage(b, _evaluated_at(b_params, b, 0.5, *b_settings, "register.min_gate_films=1000"))
    assert not too_few.is_champion and "fewer than register.min_gate_films (1000)" in too_few.reason
    gone = files[0].rename(tmp_path / files[0].name)  # a raw film of the comparison has been deleted
    missing = register_stage(b, _evaluated_at(b_params, b, 0.4, *b_settings))
    gone.rename(files[0])
    assert not missing.is_champion and "no longer in data.sources" in missing.reason and "cannot be scored" in missing.reason
    assert int(current_champion(client, NAME).version) == champion

    # Rollback refuses a version that takes another image size than the champion.
    promote(b, client, NAME, 2, "the 28 px model")
    with pytest.raises(CxrError, match="cannot roll back to cxr-pneumonia version 1.*image_size 32 instead of 28"):
        rollback(b, client, NAME, "try the old one")
    assert int(current_champion(client, NAME).version) == 2


@pytest.mark.slow
def test_rollback_pops_the_champion_stack_and_refuses_a_target_that_no_longer_loads(tmp_path):
    params = write_tiny_project(tmp_path, n=80)
    paths = ProjectPaths(tmp_path)
    run_stages(paths, load_config(params), until="register")
    for threshold in (0.3, 0.6):  # two more versions of the same network; the gate keeps v1 (too few test films)
        register_stage(paths, _evaluated_at(params, paths, threshold))
    client = tracking_client(paths)
    assert int(current_champion(client, NAME).version) == 1

    assert promote(paths, client, NAME, 2, "reader study") and promote(paths, client, NAME, 3, "site B")
    assert not promote(paths, client, NAME, 3, "twice")  # already champion: nothing moves, nothing is recorded
    assert rollback(paths, client, NAME, "site B calibration") == 2
    out = subprocess.run([str(BIN / "cxr"), "rollback", "--reason", "reader study withdrawn"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "cxr-pneumonia version 1 is @champion again" in out.stdout, out.stderr
    with pytest.raises(CxrError, match="nothing to roll back to"):
        rollback(paths, client, NAME, "once more")

    history = champion_history(client, NAME)
    assert [(entry["version"], entry["action"]) for entry in history] == [
        (1, "automatic"), (2, "promote"), (3, "promote"), (2, "rollback"), (1, "rollback")]
    assert [entry["previous"] for entry in history] == [None, 1, 2, 3, 2]
    assert history[4]["reason"] == "rollback from v2: reader study withdrawn" and history[4]["user"] == getpass.getuser()
    assert history[1]["decision"]["promote"] is False  # the gate's word on v2, kept beside the person's
    shown = subprocess.run([str(BIN / "cxr"), "history"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0 and len(shown.stdout.strip().splitlines()) == 5 and "rollback" in shown.stdout

    assert promote(paths, client, NAME, 3, "site B fixed")  # the stack is now v1, v3
    shutil.rmtree(urlparse(client.get_model_version_download_uri(NAME, "1")).path)  # v1's files are gone from the store
    with pytest.raises(CxrError, match="cannot roll back to cxr-pneumonia version 1: it no longer loads"):
        rollback(paths, client, NAME, "back to the first")
    assert int(current_champion(client, NAME).version) == 3
    assert len(champion_history(client, NAME)) == 6  # the refused rollback is no move


def _alias_reads(method: str, path: str) -> bool:
    """The requests that read a registered model or its alias (what reading the champion asks a server)."""
    return method == "GET" and ("/registered-models/get" in path or "/registered-models/alias" in path)


def _version_described(method: str, path: str) -> bool:
    """The model card written as the version's description: register's last write before it reads the champion."""
    return method == "PATCH" and path.endswith("/model-versions/update")


@pytest.mark.slow
def test_an_http_503_while_reading_the_champion_fails_cxr_register_and_leaves_the_alias(tmp_path, monkeypatch):
    """A real `mlflow server` behind a proxy that, once the new version is registered and described, answers 503 to
    reads of the registered model and its alias, as an overloaded server does: `cxr register` fails with one line and leaves the
    alias on v1 (it used to read the error as "no champion yet" and promote v2)."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         (tmp_path / "artifacts").as_uri(), "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    proxy = None
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        proxy = FailingProxy(f"http://127.0.0.1:{port}", _alias_reads, after=_version_described)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would only slow the test
        params = write_tiny_project(tmp_path / "project", n=80)
        paths = ProjectPaths(params.parent)
        run_stages(paths, load_config(params), until="register")
        _evaluated_at(params, paths, 0.5)

        proxy.failing = True
        out = subprocess.run([str(BIN / "cxr"), "register"], cwd=paths.root, capture_output=True, text=True, timeout=600)
        proxy.failing = False
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        error = out.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: reading the champion of {NAME}: the tracking store did not answer after 4 tries"), error
        assert len(proxy.failed) == 4 and all("/registered-models/" in request for request in proxy.failed)
        client = tracking_client(paths)
        assert {alias: int(version) for alias, version in client.get_registered_model(NAME).aliases.items()} == {"champion": 1}
        assert "decision" not in client.get_model_version(NAME, "2").tags  # registered, but never judged

        again = register_stage(paths, load_config(params))  # the store answers again: the same version, now judged
        assert again.version == 2 and again.previous_champion == 1 and "decision" in client.get_model_version(NAME, "2").tags
    finally:
        if proxy is not None:
            proxy.close()
        stop(server)
