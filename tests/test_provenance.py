"""Provenance from the artifact: the registry's tags, the model card and the report describe the trained checkpoint and
its MLflow run, never params.yaml as edited since; register refuses such an edit and code trained with uncommitted
changes unless told; every training run records its environment; the lock file pins the project's dependencies."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.config import load_config
from pipeline.files import sha256_of
from pipeline.paths import ProjectPaths
from pipeline.stages import run_stages
from pipeline.tracking import client as tracking_client
from pipeline.tracking import git_dirty, read_run_id
from tests.conftest import REPO, write_tiny_project

CXR = str(Path(sys.executable).parent / "cxr")
NAME = "cxr-pneumonia"


def _cxr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CXR, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=root, check=True,
                   capture_output=True)


def _trained(params: Path) -> ProjectPaths:
    """A tiny project trained and evaluated, ready for `cxr register`."""
    paths = ProjectPaths(params.parent)
    run_stages(paths, load_config(params), until="evaluate")
    return paths


def _run_tags(paths: ProjectPaths) -> dict[str, str]:
    return tracking_client(paths).get_run(read_run_id(paths)).data.tags


@pytest.mark.slow
def test_register_refuses_params_edited_since_training_and_from_run_documents_the_trained_model(tmp_path):
    params = write_tiny_project(tmp_path, n=60)
    paths = _trained(params)
    tree = yaml.safe_load(params.read_text())
    assert tree["train"]["model"] == "vgg_gap"
    tree["train"]["model"] = "seed_cnn"  # edited after training
    params.write_text(yaml.safe_dump(tree, sort_keys=False))

    refused = _cxr("register", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "train.model: params.yaml seed_cnn, run vgg_gap" in refused.stderr and "--from-run" in refused.stderr
    assert not paths.registered.exists()

    registered = _cxr("register", "--from-run", cwd=tmp_path)
    assert registered.returncode == 0, registered.stderr
    card = (paths.models / "model_card.md").read_text()
    assert "`vgg_gap` at 32x32 px" in card and "`seed_cnn` at" not in card
    assert "Registered with `from-run`" in card
    tags = tracking_client(paths).get_model_version(NAME, "1").tags
    assert tags["params_sha256"] == _run_tags(paths)["params_sha256"] != load_config(params).params_hash()
    assert tags["registered_with"] == "from-run" and "train.model" in tags["params_differ_from_run"]

    from pipeline.report import report_stage

    page = report_stage(paths, load_config(params)).read_text()
    assert "vgg_gap at 32 px" in page and "seed_cnn" not in page


@pytest.mark.slow
def test_register_refuses_a_model_trained_from_a_dirty_work_tree_unless_allow_dirty(tmp_path):
    params = write_tiny_project(tmp_path, n=60)
    (tmp_path / "notes.md").write_text("how we train\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "params.yaml", "notes.md")
    _git(tmp_path, "commit", "-qm", "project")
    (tmp_path / "notes.md").write_text("how we train, changed\n")  # a tracked file, not committed
    paths = _trained(params)
    assert _run_tags(paths)["git.dirty"] == "true"

    refused = _cxr("register", cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "uncommitted changes" in refused.stderr and "--allow-dirty" in refused.stderr
    assert not paths.registered.exists()

    registered = _cxr("register", "--allow-dirty", cwd=tmp_path)
    assert registered.returncode == 0, registered.stderr
    tags = tracking_client(paths).get_model_version(NAME, "1").tags
    assert tags["registered_with"] == "allow-dirty" and tags["git.dirty"] == "true"
    card = (paths.models / "model_card.md").read_text()
    assert "uncommitted changes: true" in card and "Registered with `allow-dirty`" in card


def test_git_dirty_counts_changed_tracked_files_but_not_params_or_outputs(tmp_path):
    """Untracked outputs (a clean clone after `dvc repro`) and params.yaml (logged with the run) leave it clean."""
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    for name in ("params.yaml", "code.py", "models/run.json", "dvc.lock"):
        (root / name).write_text("committed\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "project")
    assert git_dirty(root) is False
    for name in ("params.yaml", "models/run.json", "dvc.lock", "untracked.txt"):
        (root / name).write_text("written by a run\n")
    assert git_dirty(root) is False
    (root / "code.py").write_text("changed\n")
    assert git_dirty(root) is True
    (tmp_path / "elsewhere").mkdir()
    assert git_dirty(tmp_path / "elsewhere") is None  # outside git: tagged "unknown", and register does not refuse


def test_each_training_run_records_its_environment(tiny_project, tmp_path):
    paths = tiny_project.paths
    client = tracking_client(paths)
    run_id = read_run_id(paths)
    tags = client.get_run(run_id).data.tags
    assert tags["requirements_lock_sha256"] == sha256_of(REPO / "requirements.lock")
    assert tags["git.dirty"] == "unknown"  # a tmp folder outside git
    assert tags["params_sha256"] == tiny_project.config.params_hash()
    frozen = Path(client.download_artifacts(run_id, "environment/pip-freeze.txt", str(tmp_path))).read_text().splitlines()
    assert f"mlflow=={installed_version('mlflow')}" in frozen and f"torch=={installed_version('torch')}" in frozen


def test_the_lock_file_pins_every_dependency_of_the_project_at_the_installed_version():
    """torch stays outside the lock (make installs the CPU or CUDA build TORCH names); every other dependency in
    pyproject.toml is pinned exactly, at the version this environment has (else: `make lock`)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(text).name)
              for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    lines = [line for line in (REPO / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        requirement = Requirement(line)
        assert str(requirement.specifier).startswith("==") and len(requirement.specifier) == 1, line
        pins[canonicalize_name(requirement.name)] = str(requirement.specifier)[2:]
    assert "torch" not in pins
    for name in sorted(wanted - {"torch"}):
        assert name in pins, f"requirements.lock does not pin {name}: run `make lock`"
        assert pins[name] == installed_version(name), f"{name}: installed {installed_version(name)}, locked {pins[name]}"
