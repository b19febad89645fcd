"""Train: fit the model on the rebalanced training index, keep the checkpoint best on validation.

Opens the MLflow run that evaluate and register later add to (its id goes to models/run.json),
and logs every param and per-epoch metric there, the learning rate (`lr`) included.

After every epoch the whole training state is written to models/train_state.pt (atomically): weights,
optimiser, schedule, random-number states, history and the MLflow run id. `train_stage(..., resume=True)`
continues from that file into the same MLflow run and ends with the same weights as a run that never
stopped (bit-identical on the CPU). The file is removed once training finishes.

On CUDA the forward pass runs in mixed precision (bfloat16, or float16 with loss scaling) on
channels_last tensors; the CPU path is plain float32 and deterministic.

Under `torchrun` the same code trains with DistributedDataParallel (pipeline.distributed): each step's batch
of train.batch_size is split across the processes, and rank 0 alone logs and writes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config, DataConfig, TrainConfig
from pipeline import distributed
from pipeline.errors import CxrError
from pipeline.files import atomic_path, sha256_of
from pipeline.paths import ProjectPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_auc: float
    best_val_accuracy: float
    device: str
    checkpoint_path: Path
    epochs_run: int  # below train.epochs when early stopping ended training


@dataclass(frozen=True)
class TrainingData:
    """Stored uint8 images and their targets for the rebalanced train index and the val split: class indices
    (N,) int64, or for a multilabel task (N, K) float32 multi-hot rows (pipeline.labels.targets)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    task: str = "binary"  # data.task: how the targets and outputs are read


@dataclass
class Trainer:
    """The objects the epoch loop changes: exactly what a resume has to restore."""

    model: Any  # torch.nn.Module
    step_model: Any  # what the training steps call: the model itself, or its DistributedDataParallel wrapper under torchrun
    optimizer: Any  # torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler, stepped after every batch
    loss_fn: Any  # torch.nn.Module
    generator: Any  # torch.Generator for the batch order and augmentation
    device: Any  # torch.device
    amp_dtype: Any  # torch.bfloat16 or torch.float16 on CUDA; None on the CPU (float32)
    scaler: Any  # torch.amp.GradScaler for float16; None otherwise


def load_training_data(paths: ProjectPaths, data: DataConfig = DataConfig()) -> TrainingData:
    """Images and targets (as `data.task` reads the manifest's labels) of the training index and the val split."""
    from pipeline.labels import targets

    for needed, stage in ((paths.manifest, "cxr ingest"), (paths.images, "cxr ingest"), (paths.train_index, "cxr rebalance")):
        if not needed.exists():
            raise CxrError(f"{needed} is missing: run `{stage}` first")
    manifest = pd.read_parquet(paths.manifest, columns=["store_index", "split", "label", "label_index"])
    images = np.load(paths.images, mmap_mode="r")
    train_index = np.load(paths.train_index)
    target_of = targets(manifest.set_index("store_index").loc[train_index], data.task, data.labels)
    val = manifest[manifest["split"] == "val"]
    if val.empty:
        raise CxrError("train: the validation split is empty; add data or raise data.split.val")
    return TrainingData(
        train_images=np.asarray(images[train_index]),
        train_labels=target_of,
        val_images=np.asarray(images[val["store_index"].to_numpy()]),
        val_labels=targets(val, data.task, data.labels),
        task=data.task,
    )


def pick_device(choice: str):  # -> torch.device
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CxrError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def train_state_path(paths: ProjectPaths) -> Path:
    """Where the per-epoch training state lives while a run is unfinished."""
    return paths.models / "train_state.pt"


def train_stage(paths: ProjectPaths, config: Config, resume: bool = False) -> TrainResult:
    """Train `train.model`, log to MLflow, save the best-on-validation checkpoint.

    resume=True continues an interrupted run from models/train_state.pt (into the same MLflow run);
    without that file it starts a new run, so a retry loop can always pass resume=True.
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

    state_path = train_state_path(paths)
    state = _resume_state(state_path, fingerprint, paths, world) if resume else None
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

    with _tracked_run(paths, config, state, device, world) as run_id:
        best, epochs_run = _fit(trainer, data, config, paths, run_id, fingerprint, state, world)
    if world.is_main:
        state_path.unlink(missing_ok=True)
        log.info("train: best epoch %d, val AUC %.4f, val accuracy %.4f → %s (MLflow run %s)",
                 best["epoch"], best["val_auc"], best["val_accuracy"], paths.checkpoint, run_id)
    return TrainResult(run_id, best["epoch"], best["val_auc"], best["val_accuracy"], str(device), paths.checkpoint, epochs_run)


def _resume_state(state_path: Path, fingerprint: dict, paths: ProjectPaths, world: distributed.World) -> dict | None:
    """Rank 0 reads the state file and every rank gets it, or the same one-line error (no rank left waiting)."""
    state, problem = None, None
    if world.is_main:
        try:
            state = load_train_state(state_path, fingerprint, paths)
        except CxrError as exc:
            problem = str(exc)
    state, problem = distributed.broadcast((state, problem), world)
    if problem:
        raise CxrError(problem)
    return state


@contextmanager
def _tracked_run(paths: ProjectPaths, config: Config, state: dict | None, device,
                 world: distributed.World) -> Iterator[str]:
    """The MLflow run training logs to, new (with params and tags) or reopened on resume; yields its id.

    Only rank 0 talks to MLflow; under torchrun the other ranks receive the id from it.
    """
    import mlflow

    from pipeline import tracking

    if not world.is_main:
        yield distributed.broadcast(None, world)
        return
    tracking.connect(paths.root)
    if state is None:
        experiment = tracking.experiment_id(config.tracking.experiment, paths.root)
        run_name = f"{config.train.model}-{config.data.image_size}px"
        active_run = mlflow.start_run(experiment_id=experiment, run_name=run_name)
    else:
        active_run = _reopen_run(state["run_id"], train_state_path(paths))
    with active_run as run:
        run_id = run.info.run_id
        tracking.write_run_info(paths, run_id, run.info.experiment_id)
        if state is None:
            _log_params(run_id, config)
            _log_gate_summary(run_id, paths)
            mlflow.set_tags({
                **tracking.data_version_tags(paths, [spec.path for spec in config.data.sources]),
                "git.commit": tracking.git_commit(paths.root) or "unknown",
                "device": str(device),
                "world_size": str(world.size),  # processes trained together under torchrun
            })
        yield distributed.broadcast(run_id, world)


def _reopen_run(run_id: str, state_path: Path):  # -> mlflow.ActiveRun
    """The interrupted run, so one MLflow run holds every epoch (a killed run is still RUNNING; that is fine)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.start_run(run_id=run_id)
    except MlflowException as exc:
        raise CxrError(f"{state_path}: MLflow run {run_id} cannot be reopened ({exc}); run `cxr train` without --resume") from None


# --- building the model, optimiser, schedule and loss ------------------------------------------


def build_trainer(config: Config, data: TrainingData, device, world: distributed.World = distributed.ONE_PROCESS) -> Trainer:
    """Model, optimiser, per-step schedule, loss and random generator as the params describe them."""
    import torch

    from pipeline.losses import build_loss
    from pipeline.models import build_model

    settings = config.train
    n_classes = len(config.data.labels)
    model = build_model(settings.model, config.data.image_size, n_classes, settings.dropout).to(device)
    amp_dtype = mixed_precision_dtype(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # convolutions on tensor cores want NHWC
    step_model = distributed.wrap_model(model, device, world)  # before the optimiser: it may swap batch-norm layers
    optimizer = build_optimizer(model, settings)
    total_steps = settings.epochs * steps_per_epoch(len(data.train_labels), settings.batch_size, world.size)
    return Trainer(
        model=model,
        step_model=step_model,
        optimizer=optimizer,
        scheduler=build_schedule(optimizer, settings, total_steps),
        loss_fn=build_loss(settings, data.train_labels, n_classes, data.task).to(device),
        generator=torch.Generator().manual_seed(settings.seed),
        device=device,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
    )


def mixed_precision_dtype(device):  # -> torch.dtype | None
    """bfloat16 where the GPU supports it (float32's range, no loss scaling), else float16; None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_optimizer(model, settings: TrainConfig):  # -> torch.optim.Optimizer
    """Adam (the default, as before), AdamW (decoupled weight decay) or SGD with Nesterov momentum 0.9."""
    import torch

    parameters = model.parameters()
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9, nesterov=True, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps in one epoch: full batches, plus the last one unless it would give a process a single image."""
    if batch_size < 2 * world_size:
        raise CxrError(f"train.batch_size {batch_size} is split over {world_size} processes and each needs at least 2 "
                       f"images; use train.batch_size={2 * world_size} or more")
    steps = n_images // batch_size + (1 if n_images % batch_size >= 2 * world_size else 0)
    if steps == 0:
        raise CxrError(f"train: the training index holds {n_images} image(s); training needs at least {2 * world_size}")
    return steps


def build_schedule(optimizer, settings: TrainConfig, total_steps: int):  # -> LRScheduler
    """A per-step learning-rate schedule; `constant` keeps train.lr throughout (as before schedules existed).

    cosine: linear warm-up over warmup_fraction of the steps, then half a cosine down towards 0.
    onecycle: PyTorch's one-cycle policy peaking at train.lr after warmup_fraction of the steps
    (it starts at lr/25, ends near 0, and cycles momentum the other way).
    """
    from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

    if settings.schedule == "onecycle":
        warmup_share = onecycle_warmup_steps(settings.warmup_fraction, total_steps) / total_steps
        return OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=warmup_share)
    if settings.schedule == "cosine":
        warmup_steps = round(settings.warmup_fraction * total_steps)
        return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    return LambdaLR(optimizer, lambda step: 1.0)


def onecycle_warmup_steps(warmup_fraction: float, total_steps: int) -> int:
    """The warm-up in whole steps, avoiding the lengths for which OneCycleLR divides by zero.

    PyTorch's phase boundaries fall at (warm-up − 1) and (total − 1); a warm-up of exactly one step, or of
    every step, makes a phase of length zero.
    """
    steps = min(round(warmup_fraction * total_steps), total_steps - 1)
    if steps == 1:
        steps = 2 if total_steps > 2 else 0
    return steps


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on train.lr at a step: (step+1)/warmup during the warm-up, then a cosine from 1 towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --- the epoch loop ------------------------------------------------------------------------------


def _fit(trainer: Trainer, data: TrainingData, config: Config, paths: ProjectPaths, run_id: str,
         fingerprint: dict, state: dict | None, world: distributed.World = distributed.ONE_PROCESS) -> tuple[dict, int]:
    """Train epoch by epoch, score validation, keep the best checkpoint, save the state; returns (best, epochs run).

    Under torchrun rank 0 validates and sends the scores to the other ranks, so all stop at the same epoch;
    it alone logs, writes and shows progress.
    """
    import mlflow
    import torch
    from tqdm import tqdm

    settings = config.train
    labels = torch.as_tensor(np.array(data.train_labels))  # int64 class indices, or float32 multi-hot rows (multilabel)
    epoch = state["epoch"] if state else 0  # epochs completed
    history: list[dict] = state["history"] if state else []
    best: dict = state["best"] if state else {"epoch": 0, "val_auc": -1.0, "val_accuracy": 0.0}

    progress = tqdm(total=settings.epochs, initial=epoch, desc="train", unit="epoch", disable=None if world.is_main else True)
    while epoch < settings.epochs and not patience_ran_out(best["epoch"], epoch, settings.early_stopping_patience):
        epoch += 1
        lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this epoch starts at
        started = time.perf_counter()
        train_loss = _train_one_epoch(trainer, data.train_images, labels, config, world)
        seconds = time.perf_counter() - started
        scores = _validate(trainer, data, len(config.data.labels)) if world.is_main else None
        scores = distributed.broadcast(scores, world)
        row = {"epoch": epoch, "train_loss": train_loss, **scores, "lr": lr}
        history.append(row)  # history.csv holds only what is reproducible; throughput goes to MLflow alone
        metrics = {k: v for k, v in row.items() if k != "epoch"} | {"train_images_per_second": len(labels) / seconds}
        if world.is_main:
            mlflow.log_metrics(metrics, step=epoch, run_id=run_id)
        if row["val_auc"] > best["val_auc"]:  # NaN never wins, ties keep the earlier epoch
            best = {"epoch": epoch, "val_auc": row["val_auc"], "val_accuracy": row["val_accuracy"]}
            if world.is_main:
                _save_checkpoint(paths.checkpoint, trainer.model, config, best)
        rank_rng = distributed.all_gather(global_rng_state(trainer.device), world)
        if world.is_main:
            save_train_state(train_state_path(paths), trainer, epoch, best, history, run_id, fingerprint, rank_rng)
        progress.update(1)
    progress.close()

    if best["epoch"] == 0:  # validation AUC undefined every epoch (one class): keep the last model
        best = {"epoch": epoch, "val_auc": float("nan"), "val_accuracy": history[-1]["val_accuracy"]}
        if world.is_main:
            _save_checkpoint(paths.checkpoint, trainer.model, config, best)
    if not world.is_main:
        return best, epoch
    if epoch < settings.epochs:
        log.info("train: no better val AUC for %d epochs; stopped after epoch %d of %d",
                 settings.early_stopping_patience, epoch, settings.epochs)
    mlflow.log_metrics({"best_val_auc": best["val_auc"], "best_val_accuracy": best["val_accuracy"],
                        "best_epoch": best["epoch"], "epochs_run": epoch}, run_id=run_id)
    with atomic_path(paths.history) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6g")  # 6 significant digits: lr can be 1e-5
    return best, epoch


def patience_ran_out(best_epoch: int, epochs_done: int, patience: int) -> bool:
    """Early stopping: `patience` epochs in a row without a better val AUC (patience 0 never stops)."""
    return patience > 0 and epochs_done - best_epoch >= patience


def _train_one_epoch(trainer: Trainer, images: np.ndarray, labels, config: Config,
                     world: distributed.World = distributed.ONE_PROCESS) -> float:
    """One pass over the training index in a seeded random order, augmenting each batch; the mean loss.

    Under torchrun every rank draws the same order and augments the same batch of train.batch_size from the
    same generator, then trains on its own rows (every world.size-th): one process's step, split across
    ranks, with the generator identical everywhere. Augmenting the whole batch on each rank costs little next
    to the forward and backward passes, and keeps each image's augmentation independent of the rank count.
    """
    import torch

    from pipeline.augment import augment_batch
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
        rows = batch[mine]
        share = rank_share(trainer.loss_fn, labels[batch], mine, world.size)
        total_loss += _step(trainer, inputs[mine], labels[rows].to(trainer.device), share) * len(rows)
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


def _step(trainer: Trainer, inputs, targets, share: float = 1.0) -> float:
    """One optimiser step and one schedule step; returns the batch loss.

    CPU: float32, exactly as before mixed precision existed. CUDA: the forward pass under autocast on
    channels_last input, the loss in float32, and loss scaling when the half type is float16.
    `share` scales this rank's loss so that DDP's average over the ranks is the whole batch's loss (see
    rank_share; 1 in one process, where the gradient is unchanged).
    """
    import torch

    optimizer = trainer.optimizer
    if trainer.device.type != "cuda":
        loss = trainer.loss_fn(trainer.step_model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        optimizer.step()
    else:
        with torch.autocast("cuda", dtype=trainer.amp_dtype):
            logits = trainer.step_model(inputs.contiguous(memory_format=torch.channels_last))
        loss = trainer.loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if trainer.scaler is None:  # bfloat16
            (loss * share).backward()
            optimizer.step()
        else:  # float16: scale the loss so small gradients do not underflow; skips steps with inf/NaN gradients
            trainer.scaler.scale(loss * share).backward()
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
    trainer.scheduler.step()
    return loss.item()


def _validate(trainer: Trainer, data: TrainingData, n_classes: int) -> dict:
    """val_loss (plain cross-entropy, or binary cross-entropy per label for multilabel, whatever train.loss is, so
    runs compare), val AUC and val accuracy.

    binary: AUC of the positive class, accuracy at 0.5 (the operating threshold is chosen later, by evaluate).
    multiclass: macro one-vs-rest AUC, accuracy of the most probable class. multilabel: macro AUC over labels,
    mean per-label accuracy at 0.5 (pipeline.metrics.label_scores).
    """
    from pipeline.metrics import binary_metrics, label_scores
    from pipeline.models import predict_proba

    probabilities = predict_proba(trainer.model, data.val_images, trainer.device, multilabel=data.task == "multilabel")
    if data.task == "multilabel":
        p = np.clip(probabilities, 1e-7, 1 - 1e-7)
        val_loss = float(-(data.val_labels * np.log(p) + (1 - data.val_labels) * np.log(1 - p)).mean())
    else:
        val_loss = float(-np.log(probabilities[np.arange(len(data.val_labels)), data.val_labels] + 1e-7).mean())
    if data.task == "binary":
        scores = binary_metrics(data.val_labels == n_classes - 1, probabilities[:, -1], 0.5)
    else:
        scores = label_scores(data.task, data.val_labels, probabilities, 0.5)
    return {
        "val_loss": val_loss,
        "val_auc": scores["auc"] if scores["auc"] is not None else float("nan"),
        "val_accuracy": scores["accuracy"],
    }


# --- saving and resuming ------------------------------------------------------------------------


def run_fingerprint(paths: ProjectPaths, config: Config, manifest_sha256: str, world_size: int = 1) -> dict:
    """What a resumed run must share with the interrupted one: every training setting, the exact data and the
    number of torchrun processes (each has its own dropout generator in the saved state).

    train.num_threads is left out: it changes speed only (and a resume on a busier machine may lower it).
    """
    settings = {
        key: value
        for key, value in config.as_flat_dict().items()
        if key.startswith(("train.", "augment.")) and key != "train.num_threads"
    }
    settings["data.image_size"] = config.data.image_size
    settings["data.labels"] = list(config.data.labels)
    settings["world_size"] = world_size
    return {"settings": settings, "manifest_sha256": manifest_sha256, "train_index_sha256": sha256_of(paths.train_index)}


def save_train_state(path: Path, trainer: Trainer, epoch: int, best: dict, history: list[dict], run_id: str,
                     fingerprint: dict, rank_rng: list[dict]) -> None:
    """Everything needed to continue after `epoch` as if never stopped, written atomically.

    rank_rng holds global_rng_state() of every rank (one entry in one process), in rank order.
    """
    import torch

    state = {
        "epoch": epoch,
        "best": best,
        "history": history,
        "run_id": run_id,
        "fingerprint": fingerprint,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "augment_rng": trainer.generator.get_state(),
        "rank_rng": rank_rng,
        "numpy_rng": _numpy_rng_state(),
    }
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(state, handle)


def load_train_state(path: Path, fingerprint: dict, paths: ProjectPaths) -> dict | None:
    """The saved state if there is one and it belongs to these settings and data; None if there is none."""
    import pickle

    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CxrError(f"{path} cannot be read ({exc}); run `cxr train` without --resume") from None
    if state["fingerprint"] != fingerprint:
        changed = _differences(state["fingerprint"], fingerprint)
        raise CxrError(f"{path} belongs to a run with other settings or data ({changed}); "
                       "restore them, or run `cxr train` without --resume to start over")
    if state["best"]["epoch"] > 0 and not paths.checkpoint.exists():
        raise CxrError(f"{paths.checkpoint} (best of epoch {state['best']['epoch']}) is missing; "
                       "run `cxr train` without --resume to start over")
    return state


def _differences(saved: dict, current: dict) -> str:
    """`key: saved → current` for each setting that changed, or which data file did."""
    changes = [f"{key}: {saved['settings'].get(key)} → {value}"
               for key, value in current["settings"].items() if saved["settings"].get(key) != value]
    changes += [f"{key} changed" for key in ("manifest_sha256", "train_index_sha256") if saved[key] != current[key]]
    return "; ".join(changes)


def restore_trainer(trainer: Trainer, state: dict, rank: int = 0) -> None:
    """Put weights, optimiser, schedule, scaler and every random-number state back as they were saved (for this rank)."""
    import torch

    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["augment_rng"])
    own = state["rank_rng"][rank]
    torch.set_rng_state(own["torch"])
    if trainer.device.type == "cuda" and own["cuda"]:
        torch.cuda.set_rng_state_all(own["cuda"])
    _set_numpy_rng_state(state["numpy_rng"])


def global_rng_state(device) -> dict:
    """This process's global torch (and CUDA) generator states: dropout draws from them."""
    import torch

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def _numpy_rng_state() -> dict:
    """numpy's global random state as plain numbers (torch.load with weights_only reads no numpy arrays).

    This loop does not draw from numpy; it is saved so that a numpy-based transform added later resumes exactly too.
    """
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {"keys": [int(key) for key in keys], "position": int(position), "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss)}


def _set_numpy_rng_state(saved: dict) -> None:
    keys = np.array(saved["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, saved["position"], saved["has_gauss"], saved["cached_gauss"]))


def _save_checkpoint(path: Path, model, config: Config, best: dict) -> None:
    """Weights plus everything needed to rebuild and feed the model, so prediction never re-types preprocessing."""
    import torch

    state = {
        "model": config.train.model,
        "image_size": config.data.image_size,
        "labels": list(config.data.labels),
        "task": config.data.task,  # how the outputs read: softmax over classes, or a sigmoid per label
        "dropout": config.train.dropout,
        "epoch": best["epoch"],
        "val_auc": best["val_auc"],
        # contiguous: weights trained channels_last on CUDA are stored in the usual layout
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(state, handle)  # through a handle, the archive's inner name is fixed: same weights, same bytes


def _log_gate_summary(run_id: str, paths: ProjectPaths) -> None:
    """The data gate's counts (duplicates, leakage) belong to the run trained on that data."""
    import json

    import mlflow

    if not paths.validation_summary.exists():
        return
    summary = json.loads(paths.validation_summary.read_text())
    counts = {f"gate.duplicates.{k}": v for k, v in summary.get("duplicates", {}).items() if isinstance(v, int)}
    counts["gate.patient_leakage"] = summary.get("patient_leakage", 0)
    mlflow.log_metrics(counts, run_id=run_id)
    mlflow.MlflowClient().log_artifact(run_id, str(paths.validation_summary), artifact_path="validation")


def _log_params(run_id: str, config: Config) -> None:
    import mlflow

    params = {key: str(value)[:500] for key, value in config.as_flat_dict().items()}
    mlflow.log_params(params, run_id=run_id)
