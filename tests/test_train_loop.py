"""The training loop: optimisers, schedules, losses, class weights, combined rebalance, the newer
augmentations, early stopping and resuming after a crash (bit-identical on the CPU).

One tiny project (32 px, 64 demo films, ingested and rebalanced once) is shared by the tests here;
each training test overwrites its outputs and reads them straight back.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import augment_batch, mixup_pairs
from pipeline.config import AugmentConfig, RebalanceConfig, TrainConfig, load_config
from pipeline.errors import CxrError
from pipeline.losses import FocalLoss, balanced_class_weights
from pipeline.rebalance import rebalance_indices
from pipeline.paths import ProjectPaths
from pipeline.tracking import client as tracking_client, read_run_id
from pipeline.train import train_stage
from pipeline.training.average import WeightAverage
from pipeline.training.loop import mixed_loss, patience_ran_out
from pipeline.training.optim import warmup_cosine
from pipeline.training.state import train_state_path
from tests.conftest import REPO, ingest_and_rebalance


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project ingested and rebalanced once (the data gate is not needed for training)."""
    return ingest_and_rebalance(tmp_path_factory.mktemp("loop"))


@pytest.fixture(autouse=True)
def _no_state_file_left_behind(request):
    """A training test that fails midway (or writes a stale state on purpose) must not leave models/train_state.pt
    in the shared module project: the next test would resume from it, or find a state it never wrote."""
    yield
    if "project" in request.fixturenames:
        _, paths = request.getfixturevalue("project")
        train_state_path(paths).unlink(missing_ok=True)


def _metric_steps(paths: ProjectPaths, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in tracking_client(paths).get_metric_history(run_id, key)]


# --- optimisers, schedules, losses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "schedule", "loss", "class_weights"),
    [
        ("adam", "constant", "cross_entropy", "none"),
        ("adamw", "cosine", "focal", "balanced"),
        ("sgd", "onecycle", "cross_entropy", "balanced"),
        ("sgd", "cosine", "focal", "none"),
    ],
)
def test_every_optimizer_schedule_and_loss_trains_and_logs_lr(project, optimizer, schedule, loss, class_weights):
    params, paths = project
    config = load_config(params, [
        "train.epochs=2", f"train.optimizer={optimizer}", f"train.schedule={schedule}", f"train.loss={loss}",
        f"train.class_weights={class_weights}", "train.weight_decay=0.01", "train.lr=0.001",
    ])
    result = train_stage(paths, config)

    history = pd.read_csv(paths.history)
    assert list(history["epoch"]) == [1, 2] and np.isfinite(history["train_loss"]).all()
    lrs = [value for _, value in _metric_steps(paths, result.run_id, "lr")]
    assert len(lrs) == 2 and lrs == pytest.approx(list(history["lr"]), rel=1e-5)
    if schedule == "constant":
        assert lrs == [pytest.approx(1e-3), pytest.approx(1e-3)]
    else:  # never above the peak, and the second epoch starts at another rate
        assert max(lrs) <= 1e-3 * (1 + 1e-6) and lrs[1] != pytest.approx(lrs[0])
    assert len(_metric_steps(paths, result.run_id, "train_images_per_second")) == 2
    assert not train_state_path(paths).exists()  # a finished run leaves no state to resume


def test_cosine_warms_up_linearly_then_decays_towards_zero():
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and 0 < factors[-1] < 0.02


@pytest.mark.parametrize("total_steps", [1, 2, 3, 10, 20, 33])
def test_onecycle_runs_any_number_of_steps_and_never_exceeds_the_peak(total_steps):
    from pipeline.config import TrainConfig
    from pipeline.training.optim import build_schedule

    for warmup_fraction in (0.0, 0.1, 0.5, 0.9):
        optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1e-3, momentum=0.9)
        schedule = build_schedule(optimizer, TrainConfig(schedule="onecycle", warmup_fraction=warmup_fraction, lr=1e-3), total_steps)
        rates = []
        for _ in range(total_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert max(rates) <= 1e-3 * (1 + 1e-9) and min(rates) > 0


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.tensor([0, 1] * 8)
    weight = torch.tensor([2.0, 0.5])
    assert torch.allclose(FocalLoss(0.0)(logits, targets), F.cross_entropy(logits, targets))
    assert torch.allclose(FocalLoss(0.0, weight)(logits, targets), F.cross_entropy(logits, targets, weight=weight))
    assert FocalLoss(2.0)(logits, targets) < F.cross_entropy(logits, targets)  # easy examples count less


def test_balanced_class_weights_are_inverse_frequency():
    weights = balanced_class_weights(np.array([0] * 10 + [1] * 30), 2)
    assert weights.tolist() == pytest.approx([40 / (2 * 10), 40 / (2 * 30)])
    assert balanced_class_weights(np.array([1, 1, 1]), 2).tolist() == [0.0, 0.5]  # an absent class weighs nothing


# --- combined rebalance -------------------------------------------------------------------------

INDEX = np.arange(100, 140)
LABELS = np.array(["normal"] * 10 + ["pneumonia"] * 30)


@pytest.mark.parametrize(
    ("over_ratio", "under_ratio", "expected"),
    [(0.5, 1.0, (15, 15)), (0.3, 0.5, (10, 20)), (0.4, 0.4, (12, 30)), (0.2, 1.0, (10, 10))],
)
def test_combined_rebalance_gives_the_expected_counts(over_ratio, under_ratio, expected):
    settings = RebalanceConfig(method="combined", over_ratio=over_ratio, under_ratio=under_ratio)
    chosen = rebalance_indices(INDEX, LABELS, settings)
    label_of = dict(zip(INDEX, LABELS))
    counts = Counter(label_of[i] for i in chosen)
    assert (counts["normal"], counts["pneumonia"]) == expected
    assert set(chosen) <= set(INDEX)
    assert np.array_equal(chosen, rebalance_indices(INDEX, LABELS, settings))  # seeded
    reseeded = RebalanceConfig(method="combined", over_ratio=over_ratio, under_ratio=under_ratio, seed=settings.seed + 1)
    assert not np.array_equal(chosen, rebalance_indices(INDEX, LABELS, reseeded))  # and the seed decides which films


def test_combined_rebalance_refuses_under_ratio_below_over_ratio(tmp_path):
    with pytest.raises(CxrError, match="under_ratio"):
        load_config(tmp_path / "params.yaml", ["rebalance.method=combined", "rebalance.over_ratio=0.8", "rebalance.under_ratio=0.5"])


# --- augmentation -------------------------------------------------------------------------------

NOTHING = {"rotation_deg": 0, "translate": 0, "scale": 0, "brightness": 0, "contrast": 0, "crop_scale": 1.0, "gamma": 0.0}


def test_crop_gamma_and_flip_are_seeded_bounded_and_change_images():
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    settings = AugmentConfig(crop_scale=0.85, gamma=0.2, hflip=True)
    first = augment_batch(images, settings, torch.Generator().manual_seed(0))
    assert torch.equal(first, augment_batch(images, settings, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augment_batch(images, settings, torch.Generator().manual_seed(1)))
    assert first.min() >= 0 and first.max() <= 1
    without = AugmentConfig(crop_scale=1.0, gamma=0.0, hflip=False)  # the same settings with these three off
    assert not torch.allclose(first, augment_batch(images, without, torch.Generator().manual_seed(0)))


def test_crop_zooms_into_the_image_within_the_area_bounds():
    ramp = torch.linspace(0, 1, 64).expand(16, 1, 64, 64).contiguous()  # brightness rises left to right
    cropped = augment_batch(ramp, AugmentConfig(**{**NOTHING, "crop_scale": 0.5}), torch.Generator().manual_seed(0))
    spans = cropped.amax(dim=(1, 2, 3)) - cropped.amin(dim=(1, 2, 3))
    # A crop of side s (s² of the area, 0.5..1) spans about s of the ramp: between √0.5 and all of it.
    assert (spans <= 1 + 1e-6).all() and (spans >= 0.5**0.5 - 0.05).all()
    assert (spans < 0.95).any()


def test_flip_mirrors_some_images_exactly_and_leaves_the_others():
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    out = augment_batch(images, AugmentConfig(**NOTHING, hflip=True), torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images)]
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_gamma_stays_within_its_range():
    grey = torch.full((16, 1, 8, 8), 0.25)
    out = augment_batch(grey, AugmentConfig(**{**NOTHING, "gamma": 0.5}), torch.Generator().manual_seed(0))
    assert (out >= 0.25**1.5 - 1e-6).all() and (out <= 0.25**0.5 + 1e-6).all()
    assert len(set(out[:, 0, 0, 0].tolist())) > 1  # each image its own gamma


def test_random_erasing_sets_one_rectangle_per_chosen_image_to_its_mean_and_leaves_the_rest():
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    plain = augment_batch(images, AugmentConfig(**NOTHING), torch.Generator().manual_seed(0))
    erased = augment_batch(images, AugmentConfig(**NOTHING, erasing=0.5), torch.Generator().manual_seed(0))
    changed = erased != plain  # the other moves drew the same numbers first: only the rectangles differ
    touched = changed.flatten(1).any(dim=1)
    assert 0 < int(touched.sum()) < 32  # about half the images
    for image, was, mask in zip(erased[touched], plain[touched], changed[touched]):
        rows, columns = mask[0].any(dim=1).nonzero()[:, 0], mask[0].any(dim=0).nonzero()[:, 0]
        box = image[0, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        assert torch.allclose(box, was.mean().expand_as(box))  # a solid rectangle of the image's mean
        assert 0.005 <= box.numel() / 28**2 <= 0.25
    assert torch.equal(erased[~touched], plain[~touched])


def test_mixup_pairs_are_seeded_a_permutation_and_a_weight_in_0_1():
    partner, weight = mixup_pairs(16, 0.4, torch.Generator().manual_seed(0))
    again, same = mixup_pairs(16, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(partner, again) and weight == same
    assert sorted(partner.tolist()) == list(range(16)) and 0 <= weight <= 1
    weights = [mixup_pairs(4, 0.4, torch.Generator().manual_seed(seed))[1] for seed in range(50)]
    assert min(weights) < 0.2 and max(weights) > 0.8  # Beta(0.4, 0.4) puts most weight near 0 and 1


def test_mixed_loss_is_the_loss_against_blended_targets_for_weighted_cross_entropy_and_multilabel_bce():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    own, partners = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 1, 0, 1])
    weight = torch.tensor([1.0, 2.0, 0.5])
    blended = 0.7 * F.one_hot(own, 3).float() + 0.3 * F.one_hot(partners, 3).float()
    unweighted = mixed_loss(torch.nn.CrossEntropyLoss(), logits, own, (partners, 0.7))
    assert unweighted == pytest.approx(float(F.cross_entropy(logits, blended)), rel=1e-5)
    assert unweighted != pytest.approx(float(F.cross_entropy(logits, own)), rel=1e-3)  # the targets did change
    weighted = mixed_loss(torch.nn.CrossEntropyLoss(weight=weight), logits, own, (partners, 0.7))
    assert weighted == pytest.approx(0.7 * float(F.cross_entropy(logits, own, weight=weight))
                                     + 0.3 * float(F.cross_entropy(logits, partners, weight=weight)), rel=1e-5)
    multi_own, multi_partner = torch.tensor([[1.0, 0.0, 1.0]] * 6), torch.tensor([[0.0, 1.0, 1.0]] * 6)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 3.0]))
    assert mixed_loss(bce, logits, multi_own, (multi_partner, 0.25)) == pytest.approx(
        float(bce(logits, 0.25 * multi_own + 0.75 * multi_partner)), rel=1e-5)


def test_label_smoothing_is_cross_entropys_and_raises_the_loss_of_confident_right_answers():
    from pipeline.tasks import task_for

    targets = np.array([0, 1, 1, 0])
    logits = torch.tensor([[6.0, -6.0], [-6.0, 6.0], [-5.0, 5.0], [4.0, -4.0]])
    plain = task_for("binary", ["normal", "pneumonia"]).loss(TrainConfig(), targets)
    smoothed = task_for("binary", ["normal", "pneumonia"]).loss(TrainConfig(label_smoothing=0.2), targets)
    target_tensor = torch.as_tensor(targets)
    assert float(smoothed(logits, target_tensor)) > 10 * float(plain(logits, target_tensor))
    soft = F.one_hot(target_tensor, 2).float() * 0.8 + 0.1
    assert float(smoothed(logits, target_tensor)) == pytest.approx(float(F.cross_entropy(logits, soft)), rel=1e-5)


# --- weight averaging -----------------------------------------------------------------------------


def test_weight_average_follows_the_live_weights_with_the_warmed_up_decay_and_copies_integer_buffers():
    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(live, decay=0.99)
    start = {k: v.clone() for k, v in live.state_dict().items()}
    with torch.no_grad():
        live[0].weight.add_(1.0)
    live.train()(torch.randn(4, 3))  # running statistics and num_batches_tracked move
    average.update(live)
    decay = 1 / 10  # the first update's warm-up decay, (1 + 0) / (10 + 0)
    assert torch.allclose(average.model[0].weight, decay * start["0.weight"] + (1 - decay) * live[0].weight)
    assert torch.allclose(average.model[1].running_mean, decay * start["1.running_mean"] + (1 - decay) * live[1].running_mean)
    assert int(average.model[1].num_batches_tracked) == 1
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    for _ in range(2000):
        average.update(live)
    assert average.current_decay() == 0.99  # the warm-up has passed the configured decay
    assert torch.allclose(average.model[0].weight, live[0].weight, atol=1e-6)


def test_with_ema_validation_and_the_checkpoint_are_the_average_not_the_raw_weights(project):
    """EMA draws no random numbers, so the raw weights are exactly those of the run without it: the EMA run's
    checkpoint must differ from them, and its history's val_loss must be the checkpoint's own."""
    params, paths = project
    train_stage(paths, load_config(params, ["train.epochs=1"]))
    raw = torch.load(paths.checkpoint, weights_only=True)["state_dict"]
    config = load_config(params, ["train.epochs=1", "train.ema_decay=0.9"])
    train_stage(paths, config)
    state = torch.load(paths.checkpoint, weights_only=True)
    assert state["state_dict"].keys() == raw.keys()
    moved = [key for key, value in raw.items() if value.is_floating_point() and not torch.equal(state["state_dict"][key], value)]
    assert len(moved) > len(raw) // 2  # the weights and the batch-norm statistics
    assert pd.read_csv(paths.history)["val_loss"].iloc[-1] == pytest.approx(_checkpoint_val_loss(paths, config), rel=1e-5)


def test_mixup_changes_what_the_epoch_trains_on(project):
    params, paths = project
    train_stage(paths, load_config(params, ["train.epochs=1"]))
    plain = pd.read_csv(paths.history)["train_loss"].iloc[0]
    train_stage(paths, load_config(params, ["train.epochs=1", "augment.mixup_alpha=0.4"]))
    assert pd.read_csv(paths.history)["train_loss"].iloc[0] != pytest.approx(plain, rel=1e-4)


# --- early stopping -----------------------------------------------------------------------------


def test_patience_counts_epochs_since_the_best():
    assert not patience_ran_out(best_epoch=3, epochs_done=4, patience=2)
    assert patience_ran_out(best_epoch=3, epochs_done=5, patience=2)
    assert not patience_ran_out(best_epoch=1, epochs_done=9, patience=0)


def test_early_stopping_stops_when_validation_never_improves(project):
    params, paths = project
    # A learning rate too small to change a float32 weight: validation AUC stays where epoch 1 put it
    # (seed_cnn has no batch norm, whose running statistics would move it whatever the learning rate).
    config = load_config(params, ["train.epochs=4", "train.lr=1e-12", "train.early_stopping_patience=1",
                                  "train.model=seed_cnn"])
    result = train_stage(paths, config)
    assert result.epochs_run == 2 < config.train.epochs
    assert result.best_epoch == 1
    assert result.epoch == 2  # train.keep last: the model where training stopped, not the best one
    assert list(pd.read_csv(paths.history)["epoch"]) == [1, 2]
    assert tracking_client(paths).get_run(result.run_id).data.metrics["epochs_run"] == 2


def _checkpoint_val_loss(paths: ProjectPaths, config) -> float:
    """The validation loss of the model the checkpoint holds, scored afresh."""
    from pipeline.models import load_checkpoint, predict_proba
    from pipeline.training.data import load_training_data

    model, _ = load_checkpoint(paths.checkpoint)
    data = load_training_data(paths, config.data)
    probability = predict_proba(model, data.val_images, torch.device("cpu"), data.task.activation)
    return data.task.validation_scores(data.val_labels, probability)["val_loss"]


@pytest.mark.parametrize("keep", ["last", "best"])
def test_the_checkpoint_holds_the_last_epochs_model_or_the_best_as_train_keep_says(project, keep):
    params, paths = project
    config = load_config(params, ["train.epochs=3", "train.lr=0.01", f"train.keep={keep}"])
    result = train_stage(paths, config)
    history = pd.read_csv(paths.history)
    best_row = history.loc[history["val_auc"].idxmax()]  # the first of equal maxima, as training keeps it
    row = history.iloc[-1] if keep == "last" else best_row
    assert result.epoch == int(row["epoch"]) == torch.load(paths.checkpoint, weights_only=True)["epoch"]
    assert result.val_auc == pytest.approx(row["val_auc"], abs=1e-5)
    assert result.best_epoch == int(best_row["epoch"])
    assert _checkpoint_val_loss(paths, config) == pytest.approx(row["val_loss"], rel=1e-4)
    metrics = tracking_client(paths).get_run(result.run_id).data.metrics
    assert metrics["kept_epoch"] == result.epoch and metrics["best_epoch"] == result.best_epoch


def test_keep_last_and_keep_best_part_when_validation_never_improves(project):
    """Validation AUC flat from epoch 1 (a learning rate too small to move a weight): best is epoch 1, last is 3."""
    params, paths = project
    common = ["train.epochs=3", "train.lr=1e-12", "train.model=seed_cnn"]
    assert train_stage(paths, load_config(params, [*common, "train.keep=last"])).epoch == 3
    assert torch.load(paths.checkpoint, weights_only=True)["epoch"] == 3
    assert train_stage(paths, load_config(params, [*common, "train.keep=best"])).epoch == 1
    assert torch.load(paths.checkpoint, weights_only=True)["epoch"] == 1


# --- resume ---------------------------------------------------------------------------------------

CRASH_AFTER_EPOCH_1 = textwrap.dedent("""
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
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no MLflow end_run: a real crash

    loop.save_train_state = save_then_die
    train_stage(ProjectPaths(params.parent), load_config(params, sys.argv[2:]))
""")


@pytest.mark.parametrize("overrides", [
    ["train.epochs=3", "train.schedule=cosine", "augment.hflip=true"],
    # the weight average and its update count, mixup's and erasing's draws must all survive the crash
    ["train.epochs=3", "train.ema_decay=0.9", "augment.mixup_alpha=0.4", "augment.erasing=0.5", "train.label_smoothing=0.1"],
], ids=["plain", "ema-mixup-erasing"])
def test_resume_after_a_crash_gives_the_same_weights_as_an_uninterrupted_run(project, overrides):
    params, paths = project
    config = load_config(params, overrides)
    straight = train_stage(paths, config)
    straight_checkpoint = torch.load(paths.checkpoint, weights_only=True)
    straight_history = pd.read_csv(paths.history)

    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_EPOCH_1, str(params), *overrides],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    state = torch.load(train_state_path(paths), weights_only=True)
    assert state["epoch"] == 1

    resumed = train_stage(paths, config, resume=True)

    assert resumed.run_id == state["run_id"] != straight.run_id  # continued the crashed run
    assert read_run_id(paths) == resumed.run_id
    checkpoint = torch.load(paths.checkpoint, weights_only=True)
    assert checkpoint["epoch"] == straight_checkpoint["epoch"] == straight.epoch
    assert checkpoint["state_dict"].keys() == straight_checkpoint["state_dict"].keys()
    for key, weights in straight_checkpoint["state_dict"].items():
        assert torch.equal(checkpoint["state_dict"][key], weights), key
    pd.testing.assert_frame_equal(pd.read_csv(paths.history), straight_history)  # epochs 2-3 trained after the resume
    assert [step for step, _ in _metric_steps(paths, resumed.run_id, "train_loss")] == [1, 2, 3]
    assert not train_state_path(paths).exists()


def test_resume_refuses_a_state_from_other_settings(project):
    params, paths = project
    config = load_config(params)
    stale = {"fingerprint": {"settings": {"train.lr": 0.5}, "manifest_sha256": "x", "train_index_sha256": "y"}}
    try:
        train_state_path(paths).parent.mkdir(parents=True, exist_ok=True)  # no training test need have run first
        torch.save(stale, train_state_path(paths))
        with pytest.raises(CxrError, match="other settings or data"):
            train_stage(paths, config, resume=True)
        assert train_state_path(paths).exists()  # left for the user to resume with the right settings
    finally:
        train_state_path(paths).unlink(missing_ok=True)


def test_resume_without_a_state_file_starts_a_new_run(project):
    params, paths = project
    assert not train_state_path(paths).exists(), "a state file left by another test would be resumed here"
    result = train_stage(paths, load_config(params, ["train.epochs=1"]), resume=True)
    assert result.epochs_run == 1 and read_run_id(paths) == result.run_id


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_in_mixed_precision_into_a_cpu_loadable_checkpoint(project):
    from pipeline.models import load_checkpoint
    from pipeline.training.data import load_training_data
    from pipeline.training.trainer import build_trainer, mixed_precision_dtype

    params, paths = project
    config = load_config(params, ["train.device=cuda", "train.epochs=2"])
    trainer = build_trainer(config, load_training_data(paths, config.data), torch.device("cuda"))
    assert trainer.amp_dtype == mixed_precision_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert (trainer.scaler is not None) == (trainer.amp_dtype == torch.float16)

    result = train_stage(paths, config)
    assert result.device == "cuda" and np.isfinite(pd.read_csv(paths.history)["train_loss"]).all()
    model, _ = load_checkpoint(paths.checkpoint)  # weights saved on the CPU, in the usual layout
    assert next(model.parameters()).device.type == "cpu"
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("weighted", [False, True])
def test_rank_shares_make_the_ranks_mean_loss_the_whole_batch_loss(weighted):
    """Under DDP the gradient is the ranks' average of share × loss; it must equal the whole batch's loss (3 ranks,
    a batch of 8 that splits 3/3/2, class-weighted or not)."""
    import torch

    from pipeline.training.loop import rank_share

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, generator=generator)
    labels = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1])
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([2.0, 0.6]) if weighted else None)
    ranks = 3
    averaged = sum(
        rank_share(loss_fn, labels, slice(rank, None, ranks), ranks) * loss_fn(logits[rank::ranks], labels[rank::ranks])
        for rank in range(ranks)
    ) / ranks
    assert float(averaged) == pytest.approx(float(loss_fn(logits, labels)), rel=1e-6)
    assert rank_share(loss_fn, labels, slice(0, None, 1), 1) == 1.0
