"""The epoch loop: train, score validation, keep the checkpoint (train.keep: the last epoch's model, or the best on
validation), save the resume state, stop early.

With train.ema_decay the weight average (pipeline.training.average) is what validation scores and what the
checkpoint holds; with augment.mixup_alpha each batch is blended with a shuffled copy of itself (mixed_loss).

Under `torchrun` the same code trains with DistributedDataParallel (pipeline.distributed): each step's batch
of train.batch_size is split across the processes, and rank 0 alone validates, logs and writes.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.config import Config
from pipeline.files import atomic_path
from pipeline.paths import ProjectPaths
from pipeline.training.data import TrainingData
from pipeline.training.state import global_rng_state, save_checkpoint, save_train_state, train_state_path
from pipeline.training.trainer import Trainer

log = logging.getLogger(__name__)


def fit(trainer: Trainer, data: TrainingData, config: Config, paths: ProjectPaths, run_id: str,
        fingerprint: dict, state: dict | None, world: distributed.World = distributed.ONE_PROCESS,
        metric_prefix: str = "") -> tuple[dict, dict, int]:
    """Train epoch by epoch, score validation, keep the checkpoint, save the state; returns (kept, best, epochs run):
    the epoch and validation scores of the model the checkpoint holds, the same of the best epoch on validation
    AUC (early stopping's measure; the checkpoint's too with train.keep best), and the epochs trained.

    train.keep last keeps the model where the schedule ends, chosen by nothing: on a validation split that shares
    patients with train (MedMNIST's), picking the epoch by its score would reward memorising.

    Under torchrun rank 0 validates and sends the scores to the other ranks, so all stop at the same epoch;
    it alone logs, writes and shows progress. `metric_prefix` goes before every MLflow metric name: an ensemble's
    members (`member1/`, ...) share one run.
    """
    import torch
    from tqdm import tqdm

    from pipeline import tracking

    settings = config.train
    client = tracking.client(paths) if world.is_main else None
    labels = torch.as_tensor(np.array(data.train_labels))  # int64 class indices, or float32 multi-hot rows (multilabel)
    epoch = state["epoch"] if state else 0  # epochs completed
    history: list[dict] = state["history"] if state else []
    best: dict = state["best"] if state else {"epoch": 0, "val_auc": -1.0, "val_accuracy": 0.0}
    keep_last = settings.keep == "last"

    progress = tqdm(total=settings.epochs, initial=epoch, desc="train", unit="epoch", disable=None if world.is_main else True)
    while epoch < settings.epochs and not patience_ran_out(best["epoch"], epoch, settings.early_stopping_patience):
        epoch += 1
        lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this epoch starts at
        started = time.perf_counter()
        train_loss = train_one_epoch(trainer, data.train_images, labels, config, world)
        seconds = time.perf_counter() - started
        scores = validate(trainer, data) if world.is_main else None
        scores = distributed.broadcast(scores, world)
        row = {"epoch": epoch, "train_loss": train_loss, **scores, "lr": lr}
        history.append(row)  # history.csv holds only what is reproducible; throughput goes to MLflow alone
        metrics = {k: v for k, v in row.items() if k != "epoch"} | {"train_images_per_second": len(labels) / seconds}
        if world.is_main:
            tracking.log_metrics(client, run_id, {metric_prefix + k: v for k, v in metrics.items()}, step=epoch)
            # a line per epoch, for logs that are no terminal (a Prefect task run's, a cron job's): tqdm draws none there
            log.info("train: epoch %d of %d: train loss %.4f, val AUC %.4f (%.0f s)", epoch, settings.epochs, train_loss,
                     row["val_auc"], seconds)
        scored = {"epoch": epoch, "val_auc": row["val_auc"], "val_accuracy": row["val_accuracy"]}
        improved = row["val_auc"] > best["val_auc"]  # NaN never wins, ties keep the earlier epoch
        if improved:
            best = scored
        if (improved or keep_last) and world.is_main:
            save_checkpoint(paths.checkpoint, kept_model(trainer), config, scored)
        rank_rng = distributed.all_gather(global_rng_state(trainer.device), world)
        if world.is_main:
            save_train_state(train_state_path(paths), trainer, epoch, best, history, run_id, fingerprint, rank_rng)
        progress.update(1)
    progress.close()

    last = {"epoch": epoch, "val_auc": history[-1]["val_auc"], "val_accuracy": history[-1]["val_accuracy"]}
    if best["epoch"] == 0:  # validation AUC undefined every epoch (one class): keep the last model
        best = last | {"val_auc": float("nan")}
        if world.is_main and not keep_last:
            save_checkpoint(paths.checkpoint, kept_model(trainer), config, best)
    kept = last if keep_last else best
    if not world.is_main:
        return kept, best, epoch
    if epoch < settings.epochs:
        log.info("train: no better val AUC for %d epochs; stopped after epoch %d of %d",
                 settings.early_stopping_patience, epoch, settings.epochs)
    tracking.log_metrics(client, run_id, {metric_prefix + k: v for k, v in {
        "best_val_auc": best["val_auc"], "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
        "kept_epoch": kept["epoch"], "epochs_run": epoch}.items()})
    with atomic_path(paths.history) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6g")  # 6 significant digits: lr can be 1e-5
    return kept, best, epoch


def patience_ran_out(best_epoch: int, epochs_done: int, patience: int) -> bool:
    """Early stopping: `patience` epochs in a row without a better val AUC (patience 0 never stops)."""
    return patience > 0 and epochs_done - best_epoch >= patience


def train_one_epoch(trainer: Trainer, images: np.ndarray, labels, config: Config,
                    world: distributed.World = distributed.ONE_PROCESS) -> float:
    """One pass over the training index in a seeded random order, augmenting each batch; the mean loss.

    Under torchrun every rank draws the same order and augments the same batch of train.batch_size from the
    same generator, then trains on its own rows (every world.size-th): one process's step, split across
    ranks, with the generator identical everywhere. Augmenting the whole batch on each rank costs little next
    to the forward and backward passes, and keeps each image's augmentation independent of the rank count.
    """
    import torch

    from pipeline.augment import augment_batch, mixup_pairs
    from pipeline.models import to_tensor

    trainer.step_model.train()
    batch_size = config.train.batch_size
    order = torch.randperm(len(labels), generator=trainer.generator)
    mine = slice(world.rank, None, world.size)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if len(batch) < 2 * world.size:
            continue  # a lone image on a rank breaks batch norm (DenseNet, ResNet) and teaches nothing
        inputs = augment_batch(to_tensor(images[batch.numpy()]).to(trainer.device), config.augment, trainer.generator)
        targets = labels[batch]
        mix = None
        if config.augment.enabled and config.augment.mixup_alpha > 0:
            partner, weight = mixup_pairs(len(batch), config.augment.mixup_alpha, trainer.generator)
            inputs = weight * inputs + (1 - weight) * inputs[partner.to(inputs.device)]
            mix = (targets[partner][mine].to(trainer.device), weight)
        share = rank_share(trainer.loss_fn, targets, mine, world.size)
        loss = step(trainer, inputs[mine], targets[mine].to(trainer.device), share, mix)
        # summed over the ranks, loss x share / ranks is the whole batch's mean loss (exact with class weights too)
        total_loss += loss * share * len(batch) / world.size
    return distributed.sum_over_ranks(total_loss, world) / len(order)


def rank_share(loss_fn, batch_labels, mine: slice, world_size: int) -> float:
    """This rank's part of the whole batch's loss, × ranks: DDP averages gradients over the ranks, so scaling each
    rank's mean loss by it makes the step exactly the whole batch's (1 in one process).

    A class-weighted loss averages as Σ w·loss / Σ w, so its part is the rank's share of the weights, not of the rows.
    """
    if world_size == 1:
        return 1.0
    weight = getattr(loss_fn, "weight", None)
    if weight is None or batch_labels.ndim > 1:  # a plain mean (multilabel: over every row and label)
        return len(batch_labels[mine]) * world_size / len(batch_labels)
    weights = weight.detach().cpu()[batch_labels]
    return float(weights[mine].sum() * world_size / weights.sum())


def step(trainer: Trainer, inputs, targets, share: float = 1.0, mix: tuple | None = None) -> float:
    """One optimiser step, one schedule step and, with train.ema_decay, one update of the weight average;
    returns the batch loss.

    CPU: plain float32, deterministic. CUDA: the forward pass under autocast on channels_last input, the loss
    in float32, and loss scaling when the half type is float16.
    `share` scales this rank's loss so that DDP's average over the ranks is the whole batch's loss (see
    rank_share; 1 in one process, where the gradient is unchanged).
    `mix` is mixup's (partner targets, weight of the image itself) when augment.mixup_alpha is on (mixed_loss).
    """
    import torch

    optimizer = trainer.optimizer
    if trainer.device.type != "cuda":
        loss = mixed_loss(trainer.loss_fn, trainer.step_model(inputs), targets, mix)
        optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        optimizer.step()
    else:
        with torch.autocast("cuda", dtype=trainer.amp_dtype):
            logits = trainer.step_model(inputs.contiguous(memory_format=torch.channels_last))
        loss = mixed_loss(trainer.loss_fn, logits.float(), targets, mix)
        optimizer.zero_grad(set_to_none=True)
        if trainer.scaler is None:  # bfloat16
            (loss * share).backward()
            optimizer.step()
        else:  # float16: scale the loss so small gradients do not underflow; skips steps with inf/NaN gradients
            trainer.scaler.scale(loss * share).backward()
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
    trainer.scheduler.step()
    if trainer.average is not None:
        trainer.average.update(trainer.model)
    return loss.item()


def mixed_loss(loss_fn, logits, targets, mix: tuple | None):
    """The loss of a batch; under mixup λ·loss(own targets) + (1 − λ)·loss(partners' targets), which is the loss
    against the blended targets for (weighted) cross-entropy and binary cross-entropy, as both are linear in them.

    Under torchrun the rank's share is computed from the own targets' class weights only (rank_share): exact
    without class weights, an approximation of the whole batch's weighting with them.
    """
    if mix is None:
        return loss_fn(logits, targets)
    partner_targets, weight = mix
    return weight * loss_fn(logits, targets) + (1 - weight) * loss_fn(logits, partner_targets)


def validate(trainer: Trainer, data: TrainingData) -> dict:
    """val_loss, val AUC and val accuracy, as the task scores them during training (pipeline.tasks:
    Task.validation_scores; decisions at 0.5, the operating point is chosen later, by evaluate)."""
    from pipeline.models import predict_proba

    probabilities = predict_proba(kept_model(trainer), data.val_images, trainer.device, data.task.activation)
    return data.task.validation_scores(data.val_labels, probabilities)


def kept_model(trainer: Trainer):  # -> torch.nn.Module
    """The model validation scores and the checkpoint holds: the weight average when train.ema_decay is on."""
    return trainer.average.model if trainer.average is not None else trainer.model
