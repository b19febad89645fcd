"""Shared fixtures: a tiny real project (demo data → every stage) built once per test session.

Everything is real: demo DICOM/PNG/JPEG files on disk, a SQLite MLflow store, great-expectations
runs, torch training. Sizes are tiny (32 px, 1 epoch, ~80 images) so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.paths import ProjectPaths

# A fixed test key: tests never create ~/.config/cxr/deid.key, and hashes are stable across a session.
os.environ.setdefault("CXR_DEID_KEY", "test-deid-key-0123456789abcdef0123456789")
os.environ.pop("MLFLOW_TRACKING_URI", None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]



def tiny_params_text() -> str:
    """The project's own params.yaml with tiny sizes: DVC needs every param a stage names to be in the file."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image_size"] = 32
    params["train"]["epochs"] = 1
    params["train"]["batch_size"] = 16
    params["train"]["ensemble"] = 1  # one network: tests that want an ensemble ask for one (tests/test_ensemble.py)
    return yaml.safe_dump(params, sort_keys=False)


def write_tiny_project(root: Path, n: int = 80, seed: int = 0) -> Path:
    """A project folder with tiny params and a small demo set; returns the params path."""
    from pipeline.demo_data import write_demo_data

    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    params.write_text(tiny_params_text())
    write_demo_data(root / "data" / "raw" / "demo", n=n, seed=seed, size=64)
    labels = root / "data" / "labels"  # as a clone has it: the header of the (empty) label decisions
    labels.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "data" / "labels" / "overrides.csv", labels / "overrides.csv")
    return params


def ingest_and_rebalance(root: Path, n: int = 64) -> tuple[Path, ProjectPaths]:
    """A tiny project ingested and rebalanced, ready for `train` (the data gate is not needed for training)."""
    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.rebalance import rebalance_stage

    params = write_tiny_project(root, n=n)
    config = load_config(params)
    paths = ProjectPaths(params.parent)
    ingest_stage(paths, config)
    rebalance_stage(paths, config)
    return params, paths


@dataclass
class TinyProject:
    params: Path
    paths: ProjectPaths
    config: Config
    results: dict


def source_files(paths: ProjectPaths, config: Config, manifest, key: bytes | None = None) -> list[Path]:
    """Each manifest row's source file. Paths are redacted (a patient ID in a file name is), so a row leads back to
    its file only as the champion gate's does: through its keyed image_id (pipeline.ingest.image_id_of)."""
    from pipeline.deid import load_key
    from pipeline.ingest import image_id_of
    from pipeline.sources import read_source

    key = key or load_key(paths.root, config.deid.key_scope)
    files = {image_id_of(item, key): item.file for spec in config.data.sources
             for item in read_source(spec, paths.root, config.data)[0]}
    return [files[image_id] for image_id in manifest["image_id"]]


def run_all_stages(params: Path, overrides: list[str] = ()) -> TinyProject:
    """Every stage of the stage table in order, in this process (the functions the CLI and the flow call)."""
    from pipeline.config import load_config
    from pipeline.stages import run_stages

    config = load_config(params, overrides)
    paths = ProjectPaths(params.parent)
    return TinyProject(params, paths, config, run_stages(paths, config))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> TinyProject:
    """Demo data run through every stage once; tests read its outputs and must not change them."""
    return run_all_stages(write_tiny_project(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def pydicom_test_files() -> Path:
    """The real DICOM files that pydicom ships (compressed, truncated, without meta header, ...)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).parent
