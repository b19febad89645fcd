"""A source that dvc.yaml cannot watch is refused when DVC runs the stage: `dvc repro` in a real git+DVC repo."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.demo_data import write_demo_data
from pipeline.dvc_watch import check_sources_watched
from pipeline.errors import CxrError
from pipeline.ingest import ingest_stage
from pipeline.paths import ProjectPaths
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _dvc_repo(root: Path, sources: list[str]) -> Path:
    """A git+DVC repo with the project's dvc.yaml and a params file reading `sources`."""
    (root / "data" / "raw").mkdir(parents=True)  # the ingest stage's data dependency, empty
    (root / "data" / "raw" / "README").write_text("sources go here\n")
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "data" / "labels", root / "data" / "labels")  # the label decisions: in git, an ingest dep
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    _write_params(root, sources)
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def _write_params(root: Path, sources: list[str]) -> None:
    """The project's params.yaml (DVC wants every param a stage declares) reading `sources`, tiny."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"sources": sources, "image_size": 16, "num_workers": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def _repro(root: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dvc_repro_refuses_a_source_outside_the_stage_deps_and_runs_one_inside(tmp_path):
    outside = tmp_path / "elsewhere" / "films"
    write_demo_data(outside, n=12, seed=0, size=32)
    root = _dvc_repo(tmp_path / "project", [str(outside)])

    refused = _repro(root, "ingest")
    assert refused.returncode != 0
    shown = refused.stdout + refused.stderr
    assert f"error: data.sources '{outside}' lies outside every dependency dvc.yaml declares for stage ingest " \
           "(data/raw, data/labels/overrides.csv)" in shown and "Traceback" not in shown
    assert not ProjectPaths(root).manifest.exists()

    shutil.copytree(outside, root / "data" / "raw" / "films")
    _write_params(root, ["data/raw/films"])
    ran = _repro(root, "ingest")
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert ProjectPaths(root).manifest.exists()


def test_run_directly_nothing_is_checked_and_under_dvc_evaluate_external_is_checked(tmp_path, monkeypatch):
    """`cxr ingest` on its own always runs, so a source anywhere is fine; under DVC the check reads the stage named
    by DVC_STAGE (a stage in another dvc.yaml is addressed as path:stage)."""
    outside = tmp_path / "elsewhere"
    write_demo_data(outside, n=12, seed=0, size=32)
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(f"data:\n  sources: ['{outside}']\n  image_size: 16\n  num_workers: 1\n")
    ingest_stage(ProjectPaths(root), load_config(root / "params.yaml"))  # not under DVC: runs

    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "data" / "labels", root / "data" / "labels")  # the label decisions: in git, an ingest dep
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_STAGE", "dvc.yaml:evaluate")
    check_sources_watched(root, ["data/raw/site-b"], "evaluate.external")  # under evaluate's data/raw dep
    with pytest.raises(CxrError, match=r"evaluate.external '\.\./site-b' lies outside every dependency dvc.yaml "
                                       r"declares for stage evaluate"):
        check_sources_watched(root, ["../site-b"], "evaluate.external")
