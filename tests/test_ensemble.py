"""Deep ensembles (train.ensemble): K networks of one recipe and K seeds, trained in one run and registered as one
model whose probabilities are the members' mean; evaluate, the gate, Grad-CAM, the out-of-distribution score and
serving treat it as one network."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import CxrError
from pipeline.models import Ensemble, build_model, load_checkpoint, predict_proba
from pipeline.paths import ProjectPaths
from tests.conftest import ingest_and_rebalance, write_tiny_project

CHAMPION = "models:/cxr-pneumonia@champion"


def _members(count: int, outputs: int) -> list[torch.nn.Module]:
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        members.append(build_model("vgg_gap", 28, outputs, 0.5).eval())
    return members


def test_a_softmax_ensemble_answers_the_mean_of_its_members_softmax():
    members = _members(3, 3)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        mean = torch.stack([torch.softmax(m(images), dim=1) for m in members]).mean(dim=0)
        assert not torch.allclose(torch.softmax(members[0](images), 1), torch.softmax(members[1](images), 1))
        answered = torch.softmax(Ensemble(members, softmax=True)(images), dim=1)
    assert torch.allclose(answered, mean, atol=1e-6)


def test_a_sigmoid_ensemble_answers_the_mean_of_its_members_sigmoid_and_stays_finite_when_one_saturates():
    members = _members(2, 4)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(images)) for m in members]).mean(dim=0)
        assert torch.allclose(torch.sigmoid(Ensemble(members, softmax=False)(images)), mean, atol=1e-6)
        members[0].head[-1].bias.fill_(200.0)  # member 1 is certain of every label: sigmoid 1.0 in float32
        logits = Ensemble(members, softmax=False)(images)
        expected = (1.0 + torch.sigmoid(members[1](images))) / 2
    assert torch.isfinite(logits).all()
    assert torch.allclose(torch.sigmoid(logits), expected, atol=1e-6)


def test_the_member_count_must_be_at_least_one(tmp_path):
    params = write_tiny_project(tmp_path / "p", n=8)
    assert load_config(params).train.ensemble == 1
    with pytest.raises(CxrError, match="train.ensemble"):
        load_config(params, ["train.ensemble=0"])


@pytest.mark.slow
def test_one_member_leaves_the_checkpoint_of_one_network(tmp_path):
    """train.ensemble=1 (the default) is today's training: one network's weights, no member count, no member files."""
    from pipeline.train import train_stage

    params, paths = ingest_and_rebalance(tmp_path / "one", n=48)
    train_stage(paths, load_config(params))
    state = torch.load(paths.checkpoint, weights_only=True)
    assert set(state) == {"model", "image_size", "labels", "task", "dropout", "epoch", "val_auc", "state_dict"}
    assert state["state_dict"].keys() == build_model(state["model"], 32, 2, 0.5).state_dict().keys()
    assert "member" not in pd.read_csv(paths.history).columns
    assert not (paths.models / "ensemble").exists()


@pytest.fixture(scope="module")
def ensemble_project(tmp_path_factory):
    """A tiny project whose every stage through register ran with train.ensemble=2 at 28 px."""
    from pipeline.stages import run_stages

    params = write_tiny_project(tmp_path_factory.mktemp("ensemble"), n=48)
    config = load_config(params, ["train.ensemble=2", "data.image_size=28"])
    paths = ProjectPaths(params.parent)
    results = run_stages(paths, config, until="register")
    return paths, config, results


def _member_networks(state: dict) -> list[torch.nn.Module]:
    """The checkpoint's members rebuilt one by one from their slices of the ensemble's weights."""
    members = []
    for k in range(state["ensemble"]):
        prefix = f"members.{k}."
        network = build_model(state["model"], state["image_size"], len(state["labels"]), state["dropout"])
        network.load_state_dict({key[len(prefix):]: value for key, value in state["state_dict"].items() if key.startswith(prefix)})
        members.append(network.eval())
    return members


@pytest.mark.slow
def test_two_members_train_with_their_own_seeds_into_one_checkpoint_and_one_run(ensemble_project):
    from pipeline import tracking

    paths, config, results = ensemble_project
    network, state = load_checkpoint(paths.checkpoint)
    assert isinstance(network, Ensemble) and state["ensemble"] == 2 and state["model"] == config.train.model
    first, second = _member_networks(state)
    differing = [name for name, value in first.state_dict().items()
                 if value.is_floating_point() and not torch.equal(value, second.state_dict()[name])]
    assert len(differing) > len(first.state_dict()) // 2  # seeds 0 and 1: other starting weights, other batches

    run = tracking.client(paths).get_run(results["train"].run_id)
    metrics = run.data.metrics
    assert {"member1/val_auc", "member2/val_auc", "member1/best_val_auc", "member2/best_val_auc", "val_auc"} <= set(metrics)
    assert run.data.params["train.ensemble"] == "2"
    # the run's one-line description (evaluate's, once it has run) names the ensemble, as the documents do
    assert run.data.tags["mlflow.note.content"].startswith(f"{config.train.model} × 2 (deep ensemble), ")
    history = pd.read_csv(paths.history)
    assert history["member"].tolist() == [1, 2] and history.columns[0] == "member"
    assert not (paths.models / "ensemble").exists()  # the members' working folders are gone

    # the run's val AUC is the ensemble's, not a member's
    from pipeline.training.data import load_training_data

    data = load_training_data(paths, config.data)
    probability = predict_proba(network, data.val_images, torch.device("cpu"), data.task.activation)
    assert metrics["val_auc"] == pytest.approx(data.task.validation_scores(data.val_labels, probability)["val_auc"])


@pytest.mark.slow
def test_evaluate_and_the_registered_model_answer_the_mean_of_the_members_probabilities(ensemble_project):
    from pipeline.predict import load_model

    paths, _, results = ensemble_project
    assert results["register"] is not None
    predictions = pd.read_csv(paths.predictions)
    test = predictions[predictions["split"] == "test"]
    films = np.load(paths.images)[test["store_index"].to_numpy()]
    _, state = load_checkpoint(paths.checkpoint)
    each = [predict_proba(m, films, torch.device("cpu"), lambda z: torch.softmax(z, dim=1))[:, -1] for m in _member_networks(state)]
    assert np.abs(each[0] - each[1]).max() > 1e-3  # the members disagree, so the mean below is no coincidence
    assert np.allclose(test["probability"], (each[0] + each[1]) / 2, atol=1e-5)  # evaluate scored the ensemble

    model = load_model(CHAMPION, paths)
    assert model.metadata.signature.inputs.input_names() == ["image"]
    served = model.predict(films)
    assert (served["out_of_scope"] == "").all()
    assert np.allclose(served["probability"].to_numpy(dtype=float), (each[0] + each[1]) / 2, atol=1e-5)
    card = (paths.models / "model_card.md").read_text()
    assert f"`{state['model']} × 2 (deep ensemble)`" in card


@pytest.mark.slow
def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps(ensemble_project):
    from pipeline.explain import grad_cam, network_to_explain
    from pipeline.predict import load_model

    paths, _, _ = ensemble_project
    network = network_to_explain(load_model(CHAMPION, paths))
    assert isinstance(network, Ensemble)
    films = np.load(paths.images)[:3]
    heat = grad_cam(network, films)
    assert heat.shape == films.shape and heat.min() >= 0 and heat.max() <= 1
    member_maps = [grad_cam(member, films) for member in network.members]
    assert not np.allclose(member_maps[0], member_maps[1], atol=1e-3)
    mean = (member_maps[0] + member_maps[1]) / 2
    low, high = mean.min(axis=(1, 2), keepdims=True), mean.max(axis=(1, 2), keepdims=True)
    assert np.allclose(heat, (mean - low) / np.maximum(high - low, 1e-12), atol=1e-5)
    # None: each film's class as the ensemble predicts it
    top = predict_proba(network, films[:1], torch.device("cpu"), lambda z: z).argmax(axis=1)[0]
    assert np.array_equal(grad_cam(network, films[:1], class_index=None), grad_cam(network, films[:1], class_index=int(top)))


@pytest.mark.slow
def test_the_ood_features_of_an_ensemble_are_its_members_side_by_side(ensemble_project):
    from pipeline.ood import network_features

    paths, _, _ = ensemble_project
    network, _ = load_checkpoint(paths.checkpoint)
    films = np.load(paths.images)[:4]
    features = network_features(network, films)
    first, second = (network_features(member, films) for member in network.members)
    assert features.shape == (4, first.shape[1] + second.shape[1])
    assert np.allclose(features, np.concatenate([first, second], axis=1))


@pytest.mark.slow
def test_cxr_predict_with_an_ensemble_explains_films_and_refuses_what_is_out_of_scope(ensemble_project, pydicom_test_files, tmp_path):
    """A fresh process (the CLI) loads the registered ensemble: a chest film gets a probability and an overlay, a CT
    its modality refusal, a blank image the pixel check's."""
    from PIL import Image

    from tests.test_cli import cxr

    paths, _, _ = ensemble_project
    chest = min((paths.root / "data" / "raw" / "demo" / "normal").glob("P*.dcm"))  # not the broken demo file
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8)).save(blank)
    ct = pydicom_test_files / "CT_small.dcm"
    out = cxr("predict", str(chest), str(ct), str(blank), "--json", "--explain", str(tmp_path / "cams"), cwd=paths.root)
    assert out.returncode == 0, out.stdout + out.stderr
    answers = {r["path"]: r for r in json.loads(out.stdout)}
    assert 0 <= answers[str(chest)]["probability"] <= 1
    assert (tmp_path / "cams" / f"{chest.stem}_gradcam.png").exists()
    assert answers[str(ct)]["out_of_scope"] == "modality: CT is not one of CR, DX"
    assert answers[str(blank)]["out_of_scope"]
    assert "probability" not in answers[str(blank)]


@pytest.mark.slow
def test_crossval_scores_each_fold_by_its_ensemble_not_by_its_last_member(tmp_path):
    from pipeline.crossval import crossval_stage
    from pipeline.ingest import ingest_stage
    from pipeline.tracking import client as tracking_client

    params = write_tiny_project(tmp_path / "cv", n=48)
    config = load_config(params, ["train.ensemble=2", "data.image_size=28"])
    paths = ProjectPaths(params.parent)
    ingest_stage(paths, config)
    result = crossval_stage(paths, config, folds=2)
    client = tracking_client(paths)
    for fold in result.folds:
        metrics = client.get_run(fold.run_id).data.metrics
        assert fold.val_auc == pytest.approx(metrics["val_auc"])  # the ensemble's own score, logged by train
        assert fold.val_accuracy == pytest.approx(metrics["val_accuracy"])
    summary = json.loads((paths.reports / "crossval.json").read_text())
    assert "deep ensemble" in summary["scored"]


@pytest.mark.slow
def test_under_torchrun_an_ensemble_trains_to_the_weights_of_one_process(tmp_path):
    """Every rank trains every member in step (rank 0 alone assembles, scores and writes the Ensemble)."""
    from pipeline.train import train_stage
    from tests.test_distributed import SAME_RUN, WEIGHT_TOLERANCE, cxr_train

    params, paths = ingest_and_rebalance(tmp_path / "ddp", n=48)
    overrides = [*SAME_RUN, "train.epochs=1", "train.ensemble=2"]
    train_stage(paths, load_config(params, overrides))
    single, _ = load_checkpoint(paths.checkpoint)
    done = cxr_train(params, overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    model, state = load_checkpoint(paths.checkpoint)
    assert isinstance(model, Ensemble) and state["ensemble"] == 2
    for (key, weights), single_weights in zip(model.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(weights, single_weights, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)
    assert not (paths.models / "ensemble").exists()


CRASH_IN_MEMBER_2 = """
import os, signal, sys
from pathlib import Path
import pipeline.training.loop as loop
from pipeline.config import load_config
from pipeline.paths import ProjectPaths
from pipeline.train import train_stage

params = Path(sys.argv[1])
save = loop.save_train_state

def save_then_die(path, trainer, epoch, *rest):
    save(path, trainer, epoch, *rest)
    if "member-2" in str(path) and epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # member 1 finished, member 2 one epoch in: a real crash

loop.save_train_state = save_then_die
train_stage(ProjectPaths(params.parent), load_config(params, sys.argv[2:]))
"""


@pytest.mark.slow
def test_an_ensemble_killed_in_its_second_member_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, caplog):
    """Member 1 is kept, member 2 continues after its first epoch, member 3 trains from its seed: the same weights
    as a run that never stopped, in the crashed run's MLflow run, and nothing left behind."""
    import subprocess
    import sys

    from pipeline.tracking import client as tracking_client
    from pipeline.tracking import read_run_id
    from pipeline.train import train_stage
    from pipeline.training.state import train_state_path
    from tests.conftest import REPO

    params, paths = ingest_and_rebalance(tmp_path / "resume", n=48)
    overrides = ["train.model=seed_cnn", "train.ensemble=3", "train.epochs=2", "train.num_threads=1"]
    config = load_config(params, overrides)
    straight = train_stage(paths, config)
    straight_model, straight_state = load_checkpoint(paths.checkpoint)
    straight_history = pd.read_csv(paths.history)

    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_MEMBER_2, str(params), *overrides], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    member_2 = torch.load(paths.models / "ensemble" / "member-2" / "models" / "train_state.pt", weights_only=True)
    assert member_2["epoch"] == 1 and not (paths.models / "ensemble" / "member-3").exists()

    with caplog.at_level("INFO", logger="pipeline.train"):
        resumed = train_stage(paths, config, resume=True)

    assert "member 2 of 3 (train.seed 1), resumed after epoch 1" in caplog.text
    assert resumed.run_id == member_2["run_id"] != straight.run_id and read_run_id(paths) == resumed.run_id
    model, state = load_checkpoint(paths.checkpoint)
    assert isinstance(model, Ensemble) and state["ensemble"] == 3 and state["epoch"] == straight_state["epoch"]
    for (key, weights), straight_weights in zip(model.state_dict().items(), straight_model.state_dict().values()):
        assert torch.equal(weights, straight_weights), key  # bit-identical on the CPU, member 1 and 3 included
    pd.testing.assert_frame_equal(pd.read_csv(paths.history), straight_history)
    steps = [m.step for m in tracking_client(paths).get_metric_history(resumed.run_id, "member2/train_loss")]
    assert sorted(steps) == [1, 2]  # epoch 1 before the crash, epoch 2 after: each logged once
    assert resumed.val_auc == pytest.approx(straight.val_auc)
    assert not train_state_path(paths).exists() and not (paths.models / "ensemble").exists()


@pytest.mark.slow
def test_resume_without_a_member_state_starts_the_ensemble_over_and_never_uses_a_single_networks_state(tmp_path, caplog):
    """A killed run that finished no epoch leaves no member state: resume=True starts over (logged); the state file
    of a single-network run is never resumed into an ensemble, and nothing is left behind."""
    from pipeline.train import train_stage
    from pipeline.training.state import train_state_path

    params, paths = ingest_and_rebalance(tmp_path / "over", n=48)
    config = load_config(params, ["train.model=seed_cnn", "train.ensemble=2"])
    train_state_path(paths).parent.mkdir(parents=True, exist_ok=True)
    train_state_path(paths).write_bytes(b"left by a killed single-network run")
    with caplog.at_level("INFO", logger="pipeline.train"):
        result = train_stage(paths, config, resume=True)
    assert "no ensemble member to resume from" in caplog.text
    assert isinstance(load_checkpoint(paths.checkpoint)[0], Ensemble)
    assert not train_state_path(paths).exists() and not (paths.models / "ensemble").exists()
    assert result.epochs_run == 1


@pytest.mark.slow
def test_resume_refuses_an_ensemble_member_state_of_other_settings(tmp_path):
    """As for one network: a member's state from other settings is refused with the setting that changed, and kept."""
    import subprocess
    import sys

    from pipeline.train import train_stage
    from tests.conftest import REPO

    params, paths = ingest_and_rebalance(tmp_path / "other", n=48)
    overrides = ["train.model=seed_cnn", "train.ensemble=2", "train.epochs=2", "train.num_threads=1"]
    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_MEMBER_2, str(params), *overrides], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    with pytest.raises(CxrError, match="train.lr: .* → 0.5"):
        train_stage(paths, load_config(params, [*overrides, "train.lr=0.5"]), resume=True)
    assert (paths.models / "ensemble" / "member-2" / "models" / "train_state.pt").exists()
