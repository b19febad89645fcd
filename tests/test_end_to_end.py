"""End to end, as a user runs it: `cxr pipeline` (a real Prefect flow run), `dvc repro` in a real git+DVC repo.

Both run the tiny demo set (32 px, 1 epoch) into their own SQLite MLflow store, and must produce
the same artefacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.demo_data import phi_values
from pipeline.files import sha256_of
from pipeline.paths import ProjectPaths
from pipeline.tracking import client as tracking_client
from tests.conftest import REPO, tiny_params_text, write_tiny_project

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ARTEFACTS = ("data/interim", "data/processed", "reports", "models")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PREFECT_HOME"] = str(tmp / "prefect-home")  # Prefect's local mode, isolated from the user's
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _artefact_files(root: Path) -> set[str]:
    """Every output file, but great-expectations' Data Docs pages (they embed run times and random ids)."""
    return {
        p.relative_to(root).as_posix()
        for folder in ARTEFACTS
        for p in (root / folder).rglob("*")
        if p.is_file() and p.name != ".gitignore" and "data_docs" not in p.parts
    }


@pytest.fixture(scope="module")
def prefect_project(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("prefect")
    params = write_tiny_project(root)
    out = _run([str(BIN / "cxr"), "pipeline", "--params", str(params)], root, _env(root))
    return root, out


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh git repo holding the project's dvc.yaml, params (made tiny) and code, as a clone would."""
    root = tmp_path_factory.mktemp("dvc")
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "labels", root / "data" / "labels")  # the label decisions: in git, an ingest dep
    (root / "params.yaml").write_text(tiny_params_text())
    dvc_yaml = root / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("--n 600", "--n 80 --size 64"))
    env = _env(root)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    _run(["git", "init", "-q"], root, env)
    _run([*git, "add", "-A"], root, env)
    _run([*git, "commit", "-qm", "project"], root, env)
    out = _run([str(BIN / "dvc"), "repro"], root, env)
    return root, out


def test_cxr_pipeline_runs_every_stage_through_prefect_and_registers_a_champion(prefect_project):
    root, out = prefect_project
    log = out.stdout + out.stderr
    assert "Flow run" in log and "Finished in state Completed()" in log
    for stage in ("ingest", "validate", "rebalance", "train", "evaluate", "register"):
        assert f"Task run '{stage}-" in log, stage
    assert "Test AUC" in out.stdout and "Traceback" not in log
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert {"auc", "accuracy", "sensitivity", "specificity"} <= set(metrics["test"])
    champion = tracking_client(ProjectPaths(root)).get_model_version_by_alias("cxr-pneumonia", "champion")
    assert int(champion.version) == 1


def test_pipeline_logs_carry_no_phi(prefect_project):
    root, out = prefect_project
    planted = phi_values(root / "data" / "raw" / "demo")
    log = out.stdout + out.stderr
    assert not [value for value in planted if value in log]


def test_dvc_repro_runs_everything_then_nothing(dvc_project):
    root, first = dvc_project
    for stage in ("demo_data", "ingest", "validate", "rebalance", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    second = _run([str(BIN / "dvc"), "repro"], root, _env(root))
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout


def test_the_mlflow_run_names_the_data_version_dvc_recorded(dvc_project):
    import yaml

    root, _ = dvc_project
    outs = {out["path"]: out["md5"] for out in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["outs"]}
    run = tracking_client(ProjectPaths(root)).get_run(json.loads((root / "models" / "run.json").read_text())["run_id"])
    assert run.data.tags["data.dvc_md5.images"] == outs["data/interim/images.npy"]
    assert run.data.tags["data.dvc_md5.manifest"] == outs["data/interim/manifest.parquet"]
    # the runs table's Dataset column: each split's digest is the manifest's version in dvc.lock
    assert {given.dataset.digest for given in run.inputs.dataset_inputs} == {outs["data/interim/manifest.parquet"]}
    assert len(run.inputs.dataset_inputs) == 3
    assert len(run.data.tags["git.commit"]) == 40


def test_status_after_dvc_repro_and_the_flow(prefect_project, dvc_project):
    """`cxr status --json` names the last complete `dvc repro` and flow run, on the data they ran on."""
    for root, entry in ((dvc_project[0], "dvc"), (prefect_project[0], "flow")):
        found = json.loads(_run([str(BIN / "cxr"), "status", "--json"], root, _env(root)).stdout)
        assert found["data"]["version"] == sha256_of(root / "data" / "interim" / "manifest.parquet")
        assert found["model"]["champion"] == 1, entry
        if entry == "dvc":
            assert found["runs"]["dvc"]["complete"] and found["runs"]["flow"] is None
        else:
            assert found["runs"]["flow"]["data_version"] == found["data"]["version"] and found["runs"]["dvc"] is None


def test_cxr_pipeline_and_dvc_repro_produce_the_same_artefacts(prefect_project, dvc_project):
    """Same files, byte for byte, except those naming this run's MLflow run id, model version and git commit
    (and the flow's own record of its last complete run, which scheduled runs read)."""
    prefect_root, _ = prefect_project
    dvc_root, _ = dvc_project
    files = _artefact_files(prefect_root) - {"models/last_success.json"}
    assert files == _artefact_files(dvc_root)
    run_specific = {"models/run.json", "models/registered.json", "models/model_card.md"}  # ids, version, git commit
    different = [f for f in sorted(files - run_specific) if sha256_of(prefect_root / f) != sha256_of(dvc_root / f)]
    if "reports/report.html" in different and _same_page_up_to_overlay_rounding(prefect_root / "reports/report.html",
                                                                                dvc_root / "reports/report.html"):
        different.remove("reports/report.html")
    assert not different
    assert len(files - run_specific) >= 12


def _same_page_up_to_overlay_rounding(first: Path, second: Path) -> bool:
    """The two report pages are the same text, and their embedded images the same pixels but for a few values one or
    two grey levels apart: a Grad-CAM map is summed in float32 and the two processes' summation orders may differ
    in the last bit, which moves a handful of the overlay's 8-bit values across a rounding edge."""
    import base64
    import io
    import re

    from PIL import Image

    image = re.compile(r'src="data:image/png;base64,([^"]+)"')
    one, two = first.read_text(), second.read_text()
    if image.sub("", one) != image.sub("", two):
        return False
    for a, b in zip(image.findall(one), image.findall(two), strict=True):
        pixels_a, pixels_b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x)))).astype(int) for x in (a, b))
        if pixels_a.shape != pixels_b.shape:
            return False
        apart = np.abs(pixels_a - pixels_b)
        if apart.max() > 2 or (apart > 0).mean() > 0.001:
            return False
    return True


def test_dvc_repro_after_adding_patients_keeps_every_recorded_split(dvc_project, tmp_path):
    """data/splits.parquet is a persisted output (DVC would otherwise delete it before rerunning ingest, and every
    patient would be split afresh). On a copy of the DVC project, with 15 new patients as a second source."""
    import yaml

    from tests.test_splits import add_new_patients

    root = tmp_path / "copy"
    shutil.copytree(dvc_project[0], root, symlinks=True, ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts"))
    before = pd.read_parquet(root / "data" / "splits.parquet")
    add_new_patients(root / "data" / "raw" / "extra", tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["sources"] = ["data/raw/demo", "data/raw/extra"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    run = _run([str(BIN / "dvc"), "repro", "ingest"], root, _env(root))

    assert "Running stage 'ingest'" in run.stdout
    after = pd.read_parquet(root / "data" / "splits.parquet")
    assert len(after) == len(before) + 15
    assert after.head(len(before)).equals(before)  # every recorded patient, split and time as they were
    assert set(after.tail(15)["method"]) == {"hash_bucket"}


def _experiments(tree) -> list[dict]:
    """Every entry of `dvc exp show --json` (baseline and experiments) that carries data."""
    found = []
    if isinstance(tree, dict):
        if isinstance(tree.get("data"), dict) and "params" in tree["data"]:
            found.append(tree["data"])
        for value in tree.values():
            found += _experiments(value)
    elif isinstance(tree, list):
        for value in tree:
            found += _experiments(value)
    return found


def _metric_columns(shown: list) -> dict[str, object]:
    """Every metric column `dvc exp show` draws (file:dotted.key) and the workspace's value in it."""
    def leaves(tree, prefix: str) -> dict[str, object]:
        if isinstance(tree, dict):
            return {key: value for name, sub in tree.items() for key, value in leaves(sub, f"{prefix}.{name}").items()}
        return {prefix: tree}

    workspace = next(e for e in _experiments(shown) if e.get("rev") == "workspace")
    return {key: value for path, found in workspace["metrics"].items()
            for key, value in leaves(found["data"], path).items()}


def test_readme_experiment_commands_work_on_a_fresh_clone(dvc_project, tmp_path):
    """README: after `make demo`, `make baseline` and then `dvc exp run -S train.epochs=2 && dvc metrics diff`, as
    written. On a copy of the DVC project (a clone after `dvc repro`; the shared one stays as it was), without its
    MLflow store; `dvc exp show` has a few numeric metric columns, not one per subgroup and string."""
    root = tmp_path / "copy"
    shutil.copytree(dvc_project[0], root, symlinks=True, ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts"))
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    env = _env(root)
    baseline = _run(["make", "baseline"], root, env)
    assert "baseline:" in baseline.stdout
    committed = _run(["git", "show", "--name-only", "--format=", "HEAD"], root, env).stdout.split()
    assert {"dvc.lock", "reports/scores.json", "reports/validation/counts.json", "reports/metrics.json"} <= set(committed)
    assert "Makefile" not in committed  # only the results: what else the user has stays uncommitted
    _run(["make", "baseline"], root, env)  # nothing new to record: not an error
    before = json.loads((root / "reports" / "scores.json").read_text())

    run = _run(["bash", "-c", "dvc exp run -S train.epochs=2 && dvc metrics diff"], root, env)  # the README's line
    assert "Running stage 'train'" in run.stdout and "Running stage 'ingest'" not in run.stdout
    assert "reports/scores.json" in run.stdout and "HEAD" in run.stdout
    history = pd.read_csv(root / "reports" / "plots" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    diff = json.loads(_run([str(BIN / "dvc"), "metrics", "diff", "--all", "--json"], root, env).stdout)
    assert diff["reports/scores.json"]["test.auc"]["old"] == before["test"]["auc"]  # HEAD's: the baseline loads

    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env).stdout)
    two_epochs = [e for e in _experiments(shown) if e["params"]["params.yaml"]["data"]["train"]["epochs"] == 2]
    assert two_epochs, "the experiment is missing from dvc exp show"
    scores = two_epochs[0]["metrics"]["reports/scores.json"]["data"]
    assert scores["test"]["auc"] == json.loads((root / "reports" / "metrics.json").read_text())["test"]["auc"]
    columns = _metric_columns(shown)
    assert 10 <= len(columns) < 30, sorted(columns)
    assert all(isinstance(value, (int, float)) for value in columns.values()), columns
    header = _run([str(BIN / "dvc"), "exp", "show", "--csv"], root, env).stdout.splitlines()[0].split(",")
    assert "test.auc" in header and not [c for c in header if c.startswith(("checks.", "test.subgroups", "per_split"))]


def test_accepting_a_suggestion_then_dvc_repro_retrains_on_the_corrected_label(dvc_project, tmp_path):
    """Issue 13's done-when: a reviewer accepts the audit's suggestions (a training film and a test film; a
    label_issues.csv as `cxr audit-labels` writes it), `dvc repro` reruns ingest onwards, and the new training run
    learnt the corrected label and names the overrides file by its sha256; the model card says so, and the report
    flags the changed test label. On a copy of the DVC project, with its own MLflow store."""
    import yaml

    from pipeline.files import md5_of

    root = tmp_path / "copy"
    shutil.copytree(dvc_project[0], root, symlinks=True, ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts"))
    env = _env(root)
    before = pd.read_parquet(root / "data" / "interim" / "manifest.parquet")
    flip = {"normal": "pneumonia", "pneumonia": "normal"}
    in_split = {split: before[before["split"] == split] for split in ("train", "test")}
    # a film of its split's commoner label: the gate still finds every label in every split (it stops dvc repro else)
    films = pd.concat([rows[rows["label"] == rows["label"].mode()[0]].head(1) for rows in in_split.values()])
    films.assign(suggested_label=films["label"].map(flip), score=0.01, duplicate_of="")[
        ["path", "source", "split", "label", "suggested_label", "score", "duplicate_of"]].to_csv(
        root / "reports" / "label_issues.csv", index=False)
    old_run = json.loads((root / "models" / "run.json").read_text())["run_id"]

    _run([str(BIN / "cxr"), "review", "accept", *films["path"], "--reason", "consolidation", "--reviewer", "test"], root, env)
    repro = _run([str(BIN / "dvc"), "repro"], root, env)

    assert "Running stage 'ingest'" in repro.stdout and "Running stage 'train'" in repro.stdout
    overrides = root / "data" / "labels" / "overrides.csv"
    deps = {dep["path"]: dep["md5"] for dep in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["deps"]}
    assert deps["data/labels/overrides.csv"] == md5_of(overrides)
    after = pd.read_parquet(root / "data" / "interim" / "manifest.parquet").set_index("path")
    for path, label in zip(films["path"], films["label"]):
        assert after.loc[path, ["label", "label_original", "label_source"]].tolist() == [flip[label], label, "override"]
    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    assert run_id != old_run
    tags = tracking_client(ProjectPaths(root)).get_run(run_id).data.tags
    sha = sha256_of(overrides)
    assert tags["data.overrides_sha256"] == sha and tags["data.labels_changed_by_review"] == "2"
    assert tags["data.manifest_sha256"] == sha256_of(root / "data" / "interim" / "manifest.parquet")  # trained on it
    assert sha in (root / "models" / "model_card.md").read_text()
    summary = json.loads((root / "reports" / "validation" / "summary.json").read_text())
    assert summary["label_review"]["changed"] == 2 and summary["label_review"]["test_changed"] == 1
    assert "Flagged: 1 test label(s) were changed by review" in (root / "reports" / "report.html").read_text()
