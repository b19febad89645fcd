"""Train → evaluate → register on the tiny demo project, against a real SQLite MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.augment import augment_batch
from pipeline.config import AugmentConfig, load_config
from pipeline.files import sha256_of
from pipeline.metrics import calibration_table
from pipeline.champion import champion_history, rollback
from pipeline.register import register_stage
from pipeline.predict import load_model
from pipeline.tracking import client as tracking_client, read_run_id
from pipeline.train import train_stage
from pipeline.evaluate import evaluate_stage
from pipeline.errors import CxrError
from tests.conftest import run_all_stages, write_tiny_project


def test_augmentation_is_seeded_bounded_and_changes_images():
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    settings = AugmentConfig()
    first = augment_batch(images, settings, torch.Generator().manual_seed(0))
    again = augment_batch(images, settings, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    assert not torch.equal(first, augment_batch(images, settings, torch.Generator().manual_seed(1)))
    assert first.min() >= 0 and first.max() <= 1
    assert not torch.allclose(first, images)
    assert torch.equal(augment_batch(images, AugmentConfig(enabled=False), torch.Generator()), images)


def test_training_logs_params_and_per_epoch_metrics_to_mlflow(tiny_project):
    paths, config = tiny_project.paths, tiny_project.config
    client = tracking_client(paths)
    run_id = read_run_id(paths)
    run = client.get_run(run_id)
    assert run.data.params["train.model"] == config.train.model
    assert run.data.params["data.image_size"] == str(config.data.image_size)
    for key in ("train_loss", "val_loss", "val_auc", "val_accuracy", "best_val_auc", "test_auc", "test_accuracy"):
        assert key in run.data.metrics, key
    history = pd.read_csv(paths.history)
    assert list(history["epoch"]) == list(range(1, config.train.epochs + 1))
    for key in ("train_loss", "val_auc"):
        # Training logs one value per epoch at step = epoch, and nothing else shares the key (evaluate's are eval_val_*).
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [step for step, _ in logged] == list(history["epoch"]), key
        assert [value for _, value in logged] == pytest.approx(list(history[key]), rel=1e-5), key  # history.csv: 6 digits
    assert run.data.tags["data.manifest_sha256"] == sha256_of(paths.manifest)
    assert run.data.metrics["gate.duplicates.exact_cross_split"] == 0  # the data gate's counts travel with the run


def test_mlflow_ui_shows_the_runs_data_its_description_and_the_versions_model_card(tiny_project):
    """What MLflow's own UI reads: dataset inputs (the runs table's Dataset column), the experiment kind (the
    training-runs view, not GenAI), the run's note, and the version's description and tags."""
    from pipeline.files import md5_of

    paths, config = tiny_project.paths, tiny_project.config
    client = tracking_client(paths)
    run = client.get_run(read_run_id(paths))
    metrics = json.loads(paths.metrics.read_text())
    manifest = pd.read_parquet(paths.manifest)

    inputs = {tag.value: given for given in run.inputs.dataset_inputs for tag in given.tags if tag.key == "mlflow.data.context"}
    assert sorted(inputs) == ["test", "train", "val"]
    for split, given in inputs.items():
        assert given.dataset.digest == md5_of(paths.manifest) == run.data.tags["data.dvc_md5.manifest"]
        assert {tag.key: tag.value for tag in given.tags}["data.manifest_sha256"] == sha256_of(paths.manifest)
        assert given.dataset.name == f"manifest-{split}" and json.loads(given.dataset.source) == {"uri": "data/interim/manifest.parquet"}
        assert json.loads(given.dataset.profile)["num_rows"] == int((manifest["split"] == split).sum())
        columns = [column["name"] for column in json.loads(given.dataset.schema)["mlflow_colspec"]]
        assert columns == ["label", "format", "modality", "view", "source"]  # no patient, path or image id

    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"{config.train.model}, {config.data.image_size} px: test AUC ") and "\n" not in note
    assert f"{metrics['test']['auc']:.4f}" in note
    # evaluate's validation scores at the operating point, apart from training's per-epoch val_auc
    assert run.data.metrics["eval_val_auc"] == pytest.approx(metrics["val"]["auc"])
    assert run.data.metrics["eval_val_accuracy"] == pytest.approx(metrics["val"]["accuracy"])

    result = tiny_project.results["register"]
    version = client.get_model_version("cxr-pneumonia", str(result.version))
    assert version.description == (paths.models / "model_card.md").read_text() and "test" in version.description.lower()
    assert version.tags["data.manifest_sha256"] == sha256_of(paths.manifest)
    assert version.tags["data.dvc_md5.manifest"] == md5_of(paths.manifest)
    assert version.tags["decision"] == result.reason
    assert json.loads(version.tags["threshold"]) == metrics["threshold"]


def test_metrics_json_has_the_keys_dvc_and_users_read(tiny_project):
    from sklearn.metrics import roc_auc_score

    metrics = json.loads(tiny_project.paths.metrics.read_text())
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert 0.0 <= metrics["test"][key] <= 1.0
    assert metrics["test"]["tp"] + metrics["test"]["fn"] + metrics["test"]["tn"] + metrics["test"]["fp"] == metrics["test"]["n"]
    # The headline numbers recomputed independently from the per-film test predictions evaluate wrote.
    predictions = pd.read_csv(tiny_project.paths.predictions)
    test = predictions[predictions["split"] == "test"]
    assert len(test) == metrics["test"]["n"]
    assert metrics["test"]["auc"] == pytest.approx(roc_auc_score(test["truth"], test["probability"]), abs=1e-9)
    _, ece = calibration_table(test["truth"].to_numpy(), test["probability"].to_numpy(), tiny_project.config.evaluate.calibration_bins)
    assert metrics["test"]["ece"] == pytest.approx(ece, abs=1e-6)  # predictions.csv keeps 9 significant digits
    # DVC's metrics file: metrics.json's headline numbers, few and numeric (`dvc exp show` makes a column of each)
    scores = json.loads(tiny_project.paths.scores.read_text())
    assert scores["val"] == {"auc": metrics["val"]["auc"], "accuracy": metrics["val"]["accuracy"]}
    assert scores["test"] == {**{k: metrics["test"][k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece", "n")},
                              "auc_ci95_low": metrics["test"]["ci95"]["auc"][0], "auc_ci95_high": metrics["test"]["ci95"]["auc"][1]}
    roc = pd.read_csv(tiny_project.paths.roc)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and roc["tpr"].iloc[-1] == 1.0
    assert (tiny_project.paths.plots / "roc.png").stat().st_size > 1000


def test_first_registered_version_is_champion_with_signature(tiny_project):
    result = tiny_project.results["register"]
    client = tracking_client(tiny_project.paths)
    champion = client.get_model_version_by_alias("cxr-pneumonia", "champion")
    assert result.is_champion and int(champion.version) == result.version
    model = load_model("models:/cxr-pneumonia@champion", tiny_project.paths)
    size = tiny_project.config.data.image_size
    signature = model.metadata.signature
    assert not signature.inputs.is_tensor_spec()  # the bytes form: base64 file bytes in column `image`
    assert signature.inputs.input_names() == ["image"]
    assert signature.outputs.input_names() == ["probability", "label", "out_of_scope", "error", "ood_score"]
    assert model.metadata.metadata["image_size"] == size
    table = model.predict(np.load(tiny_project.paths.images)[:2])  # in this process, arrays at its size as before
    assert list(table.columns) == ["probability", "label", "out_of_scope", "ood_score"]  # arrays are judged by pixels
    assert table["probability"].between(0, 1).all() and (table["out_of_scope"] == "").all()


@pytest.mark.slow
def test_weaker_challenger_does_not_take_champion(tmp_path):
    """A model trained with a useless learning rate registers a version but leaves the alias where it was."""
    small_test_split = "register.min_gate_films=10"  # the gate's floor, for a tiny project
    project = run_all_stages(write_tiny_project(tmp_path, n=120), ["train.epochs=8", small_test_split])
    client = tracking_client(project.paths)
    before = client.get_model_version_by_alias("cxr-pneumonia", "champion").version

    weak = load_config(project.params, ["train.lr=1e-9", "augment.enabled=false", small_test_split])
    train_stage(project.paths, weak)
    with pytest.raises(CxrError, match="run `cxr evaluate` first"):
        register_stage(project.paths, weak)  # its metrics still describe the champion's checkpoint
    evaluate_stage(project.paths, weak)
    result = register_stage(project.paths, weak)

    assert not result.is_champion and "worse at the point estimate" in result.reason
    assert result.value < result.previous_value
    assert client.get_model_version_by_alias("cxr-pneumonia", "champion").version == before
    assert int(client.get_model_version_by_alias("cxr-pneumonia", "challenger").version) == result.version
    assert result.difference_ci95[1] < 0  # worse on the same films, beyond chance
    assert len(client.search_model_versions("name='cxr-pneumonia'")) == 2

    again = register_stage(project.paths, weak)  # a rerun (or a retry) of the same run adds no version
    assert again.version == result.version
    assert len(client.search_model_versions("name='cxr-pneumonia'")) == 2

    # A person can still overrule the gate, and undo that; both are recorded.
    cli = [str(Path(sys.executable).parent / "cxr")]
    promoted = subprocess.run([*cli, "promote", str(result.version), "--reason", "reader study"], cwd=project.paths.root,
                              capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert promoted.returncode == 0, promoted.stderr
    assert int(client.get_model_version_by_alias("cxr-pneumonia", "champion").version) == result.version
    assert "challenger" not in client.get_registered_model("cxr-pneumonia").aliases
    assert rollback(project.paths, client, "cxr-pneumonia", "reader study withdrawn") == int(before)
    history = champion_history(client, "cxr-pneumonia")
    assert [entry["version"] for entry in history] == [int(before), result.version, int(before)]
    assert [entry["action"] for entry in history] == ["automatic", "promote", "rollback"]
    assert "reader study" in history[1]["reason"]


def test_registered_version_carries_audit_tags_and_a_model_card(tiny_project):
    version = tracking_client(tiny_project.paths).get_model_version("cxr-pneumonia", str(tiny_project.results["register"].version))
    for tag in ("data.manifest_sha256", "git.commit", "params_sha256", "threshold", "test_metrics", "test_ci95", "decision"):
        assert tag in version.tags, tag
    metrics = json.loads(tiny_project.paths.metrics.read_text())
    assert json.loads(version.tags["test_ci95"]) == metrics["test"]["ci95"]
    assert json.loads(version.tags["test_ci95"])["auc"] == metrics["test"]["ci95"]["auc"]
    assert version.tags["data.manifest_sha256"] == sha256_of(tiny_project.paths.manifest)
    assert json.loads(version.tags["threshold"]) == metrics["threshold"]
    test_metrics = json.loads(version.tags["test_metrics"])
    assert {"auc", "accuracy", "sensitivity", "specificity", "n"} <= test_metrics.keys()
    assert test_metrics == {key: metrics["test"][key] for key in test_metrics}
    assert version.description.startswith("# Model card: cxr-pneumonia version")
    assert "## Limits" in version.description and "95 % CI" in version.description


@pytest.mark.slow
def test_the_default_model_learns_the_demo_set(tmp_path):
    """The shipped params (only smaller images and fewer epochs) rank the held-out test films of the demo set well,
    and the served champion says so on the films themselves: a label, output column or threshold swapped anywhere
    between ingest and serving cannot pass this."""
    from pipeline.demo_data import write_demo_data
    from pipeline.tasks import task_for
    from tests.conftest import REPO

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_demo_data(tmp_path / "data" / "raw" / "demo", n=400, seed=0, size=64)
    project = run_all_stages(tmp_path / "params.yaml", ["data.image_size=32"])  # the default model and epochs
    test = project.results["evaluate"].metrics["test"]
    assert test["auc"] >= 0.9 and test["accuracy"] >= 0.85, test  # about 0.99 and 0.97

    manifest = pd.read_parquet(project.paths.manifest)
    held_out = manifest[manifest["split"] == "test"]
    films = np.load(project.paths.images)[held_out["store_index"].to_numpy()]
    answer = load_model("models:/cxr-pneumonia@champion", project.paths).predict(films)
    positive = task_for("binary", project.config.data.labels).positive
    is_positive = (held_out["label"] == positive).to_numpy()
    assert answer["probability"][is_positive].mean() > answer["probability"][~is_positive].mean() + 0.3
    assert (answer["label"].to_numpy() == held_out["label"].to_numpy()).mean() == pytest.approx(test["accuracy"])
