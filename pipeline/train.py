"""Train: fit the model on the rebalanced training index, keep the checkpoint of the last epoch (train.keep last) or
of the best on validation (train.keep best).

Opens the MLflow run that evaluate and register later add to (its id goes to models/run.json), and logs
every param and per-epoch metric there, the learning rate (`lr`) included. The parts live in
pipeline.training: data, trainer (model, optimiser, mixed precision), optim, state (the resume file and the
checkpoint), loop (the epochs, DistributedDataParallel under torchrun) and run (the MLflow run). With
train.ensemble = K > 1 the loop runs K times, once per seed, and the checkpoint holds one pipeline.models.Ensemble.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import distributed
from pipeline.config import Config
from pipeline.files import sha256_of
from pipeline.paths import ProjectPaths
from pipeline.training.data import TrainingData, load_training_data, pick_device
from pipeline.training.loop import fit
from pipeline.training.run import tracked_run
from pipeline.training.state import restore_trainer, resume_state, run_fingerprint, train_state_path
from pipeline.training.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: its MLflow run, the kept model's epoch and scores, the best epoch's, and where
    the checkpoint is. With train.keep best the kept model is the best one; an ensemble has no best epoch of its own,
    so its best_* fields repeat its kept scores."""

    run_id: str
    epoch: int  # the epoch whose model the checkpoint holds (train.keep)
    val_auc: float  # that model's validation scores
    val_accuracy: float
    best_epoch: int  # the epoch of the best validation AUC: chosen on the same films, so its score is optimistic
    best_val_auc: float
    device: str
    checkpoint_path: Path
    epochs_run: int  # below train.epochs when early stopping ended training


def train_stage(paths: ProjectPaths, config: Config, resume: bool = False) -> TrainResult:
    """Train `train.model`, log to MLflow, save the checkpoint (train.keep: the last epoch's model or the best).

    resume=True continues an interrupted run from models/train_state.pt (into the same MLflow run);
    without that file it starts a new run, so a retry loop can always pass resume=True. A deep ensemble
    (train.ensemble > 1) resumes member by member: finished members are kept, the interrupted one continues
    from its last epoch, the others train as they would have.
    Under torchrun every process runs this, joined in one DistributedDataParallel process group.
    """
    world = distributed.torchrun_world()
    device = distributed.rank_device(pick_device(config.train.device), world)
    with distributed.process_group(world, device):
        return _train(paths, config, resume, world, device)


def _train(paths: ProjectPaths, config: Config, resume: bool, world: distributed.World, device) -> TrainResult:
    """train_stage in one process; under torchrun rank 0 alone reads the state file, talks to MLflow and writes."""
    import torch

    data = load_training_data(paths, config.data)
    torch.manual_seed(config.train.seed)
    # torchrun's processes on one machine share its cores
    torch.set_num_threads(config.train.num_threads or max(1, (os.cpu_count() or 1) // world.local_size))
    manifest_sha256 = sha256_of(paths.manifest)
    fingerprint = run_fingerprint(paths, config, manifest_sha256, world.size)
    if config.train.ensemble > 1:
        return _train_ensemble(paths, config, resume, world, device, data, fingerprint)

    state_path = train_state_path(paths)
    state = resume_state(state_path, fingerprint, paths, world) if resume else None
    if world.is_main and resume and state is None:
        log.info("train: no %s to resume from; starting a new run", state_path)
    if world.is_main and state is None:
        state_path.unlink(missing_ok=True)  # an earlier run's state must never be resumed into this one
    trainer = build_trainer(config, data, device, world)  # after the seed: the weights start the same every run
    if world.size > 1:
        torch.manual_seed(config.train.seed + world.rank)  # each rank draws its own dropout masks
    if state is not None:
        restore_trainer(trainer, state, world.rank)
        if world.is_main:
            log.info("train: resuming after epoch %d of %d (MLflow run %s)", state["epoch"], config.train.epochs, state["run_id"])

    with tracked_run(paths, config, state, device, world) as run_id:
        kept, best, epochs_run = fit(trainer, data, config, paths, run_id, fingerprint, state, world)
        if world.is_main:  # evaluate replaces it with the test score
            from pipeline import tracking

            tracking.describe_run(tracking.client(paths), run_id, f"{config.train.model}, {config.data.image_size} px: "
                                  f"val AUC {kept['val_auc']:.4f} ({config.train.keep} epoch, {kept['epoch']})")
    if world.is_main:
        state_path.unlink(missing_ok=True)
        log.info("train: kept the %s epoch (%d; best val AUC %.4f at epoch %d), val AUC %.4f, val accuracy %.4f → %s "
                 "(MLflow run %s)", config.train.keep, kept["epoch"], best["val_auc"], best["epoch"], kept["val_auc"],
                 kept["val_accuracy"], paths.checkpoint, run_id)
    return TrainResult(run_id, kept["epoch"], kept["val_auc"], kept["val_accuracy"], best["epoch"], best["val_auc"],
                       str(device), paths.checkpoint, epochs_run)


def _train_ensemble(paths: ProjectPaths, config: Config, resume: bool, world: distributed.World, device,
                    data: TrainingData, fingerprint: dict) -> TrainResult:
    """train.ensemble = K > 1: K members of one recipe, seeded seed, seed + 1, ..., trained one after another into
    one MLflow run (their metrics prefixed `member<k>/`), then saved as one pipeline.models.Ensemble checkpoint,
    scored on validation as a whole (the run's `val_*` and `best_val_*` metrics).

    Each member works in models/ensemble/member-<k>/ (its checkpoint, per-epoch resume state and history), removed
    at the end; history.csv holds every member's epochs, with a `member` column. A member's resume state stays
    after its last epoch, so resume=True after a crash finds how far each member got: a finished member's state
    trains no more epochs, the interrupted member continues from its last one, later members start from their own
    seeds; the weights end as an uninterrupted run's, in the same MLflow run. Without member 1's state (nothing
    finished an epoch) the ensemble starts over.
    """
    import shutil

    import pandas as pd
    import torch

    from pipeline import tracking
    from pipeline.files import atomic_path
    from pipeline.models import Ensemble, describe_network, load_checkpoint, predict_proba
    from pipeline.training.state import save_checkpoint

    count, members_dir = config.train.ensemble, paths.models / "ensemble"
    member_paths = [ProjectPaths(members_dir / f"member-{k}", store_root=paths.tracking_root) for k in range(1, count + 1)]
    states = [resume_state(train_state_path(each), fingerprint, each, world) if resume else None for each in member_paths]
    if states[0] is None:
        states = [None] * count  # nothing to continue: every member starts from its seed
    if world.is_main:
        train_state_path(paths).unlink(missing_ok=True)  # a single network's: never resumed into an ensemble
        if states[0] is None:
            if resume:
                log.info("train: no ensemble member to resume from in %s; starting a new run", members_dir)
            shutil.rmtree(members_dir, ignore_errors=True)
    with tracked_run(paths, config, states[0], device, world) as run_id:
        members_kept, epochs = [], []
        for k, (member, state) in enumerate(zip(member_paths, states), 1):
            seed = config.train.seed + k - 1
            member_config = config.model_copy(update={"train": config.train.model_copy(update={"seed": seed, "ensemble": 1})})
            if world.is_main:
                log.info("train: ensemble member %d of %d (train.seed %d)%s", k, count, seed,
                         f", resumed after epoch {state['epoch']}" if state else "")
            torch.manual_seed(seed)
            trainer = build_trainer(member_config, data, device, world)
            if world.size > 1:
                torch.manual_seed(seed + world.rank)
            if state is not None:
                restore_trainer(trainer, state, world.rank)
            kept, _, epochs_run = fit(trainer, data, member_config, member, run_id, fingerprint, state, world,
                                      metric_prefix=f"member{k}/")
            members_kept.append(kept)
            epochs.append(epochs_run)
        scored = None
        if world.is_main:
            ensemble = Ensemble([load_checkpoint(each.checkpoint)[0] for each in member_paths], data.task.one_label_per_film)
            scores = data.task.validation_scores(data.val_labels, predict_proba(ensemble.to(device), data.val_images, device,
                                                                                data.task.activation))
            # the members' latest kept epoch stands for the ensemble's (evaluate reports it as its epoch)
            scored = {"epoch": max(m["epoch"] for m in members_kept), "val_auc": scores["val_auc"], "val_accuracy": scores["val_accuracy"]}
            save_checkpoint(paths.checkpoint, ensemble, config, scored)
            client = tracking.client(paths)
            tracking.log_metrics(client, run_id, scores | {"best_val_auc": scored["val_auc"], "best_val_accuracy": scored["val_accuracy"],
                                                           "best_epoch": scored["epoch"], "epochs_run": max(epochs)})
            history = pd.concat([pd.read_csv(each.history).assign(member=k) for k, each in enumerate(member_paths, 1)])
            with atomic_path(paths.history) as tmp:
                history[["member", *history.columns.drop("member")]].to_csv(tmp, index=False, float_format="%.6g")
            tracking.describe_run(client, run_id, f"{describe_network({'model': config.train.model, 'ensemble': count})}, {config.data.image_size} px: "
                                  f"val AUC {scored['val_auc']:.4f} (members at their {config.train.keep} epochs: "
                                  f"{', '.join(format(m['val_auc'], '.4f') for m in members_kept)})")
        scored = distributed.broadcast(scored, world)
    if world.is_main:
        shutil.rmtree(members_dir, ignore_errors=True)
        log.info("train: ensemble of %d, val AUC %.4f, val accuracy %.4f → %s (MLflow run %s)",
                 count, scored["val_auc"], scored["val_accuracy"], paths.checkpoint, run_id)
    return TrainResult(run_id, scored["epoch"], scored["val_auc"], scored["val_accuracy"], scored["epoch"], scored["val_auc"],
                       str(device), paths.checkpoint, max(epochs))
