"""Train: fit the model on the rebalanced training index, keep the checkpoint best on validation.

Opens the MLflow run that evaluate and register later add to (its id goes to models/run.json),
and logs every param and per-epoch metric there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
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


@dataclass(frozen=True)
class TrainingData:
    """Stored uint8 images and class indices for the rebalanced train index and the val split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray


def load_training_data(paths: ProjectPaths) -> TrainingData:
    for needed, stage in ((paths.manifest, "cxr ingest"), (paths.images, "cxr ingest"), (paths.train_index, "cxr rebalance")):
        if not needed.exists():
            raise CxrError(f"{needed} is missing: run `{stage}` first")
    manifest = pd.read_parquet(paths.manifest, columns=["store_index", "split", "label_index"])
    images = np.load(paths.images, mmap_mode="r")
    train_index = np.load(paths.train_index)
    label_of = manifest.set_index("store_index")["label_index"]
    val = manifest[manifest["split"] == "val"]
    if val.empty:
        raise CxrError("train: the validation split is empty; add data or raise data.split.val")
    return TrainingData(
        train_images=np.asarray(images[train_index]),
        train_labels=label_of.loc[train_index].to_numpy(),
        val_images=np.asarray(images[val["store_index"].to_numpy()]),
        val_labels=val["label_index"].to_numpy(),
    )


def pick_device(choice: str):  # -> torch.device
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CxrError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def train_stage(paths: ProjectPaths, config: Config) -> TrainResult:
    """Train `train.model`, log to a new MLflow run, save the best-on-validation checkpoint."""
    import mlflow
    import torch

    from pipeline import tracking

    data = load_training_data(paths)
    torch.manual_seed(config.train.seed)
    torch.set_num_threads(config.train.num_threads or os.cpu_count() or 1)
    device = pick_device(config.train.device)

    tracking.connect(paths.root)
    experiment = tracking.experiment_id(config.tracking.experiment, paths.root)
    run_name = f"{config.train.model}-{config.data.image_size}px"
    with mlflow.start_run(experiment_id=experiment, run_name=run_name) as run:
        run_id = run.info.run_id
        tracking.write_run_info(paths, run_id, experiment)
        _log_params(run_id, config)
        _log_gate_summary(run_id, paths)
        mlflow.set_tags({
            "data.manifest_sha256": sha256_of(paths.manifest),
            "git.commit": tracking.git_commit(paths.root) or "unknown",
            "device": str(device),
        })
        best = _fit(data, config, device, paths, run_id)
    log.info("train: best epoch %d, val AUC %.4f, val accuracy %.4f → %s (MLflow run %s)",
             best["epoch"], best["val_auc"], best["val_accuracy"], paths.checkpoint, run_id)
    return TrainResult(run_id, best["epoch"], best["val_auc"], best["val_accuracy"], str(device), paths.checkpoint)


def _fit(data: TrainingData, config: Config, device, paths: ProjectPaths, run_id: str) -> dict:
    """The epoch loop: augment each batch, step, score validation, keep the best checkpoint."""
    import mlflow
    import torch
    from tqdm import tqdm

    from pipeline.augment import augment_batch
    from pipeline.metrics import binary_metrics
    from pipeline.models import build_model, predict_proba, to_tensor

    settings = config.train
    n_classes = len(config.data.labels)
    model = build_model(settings.model, config.data.image_size, n_classes, settings.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(settings.seed)
    labels = torch.as_tensor(np.array(data.train_labels), dtype=torch.long)
    history: list[dict] = []
    best: dict = {"epoch": 0, "val_auc": -1.0, "val_accuracy": 0.0}

    for epoch in tqdm(range(1, settings.epochs + 1), desc="train", unit="epoch", disable=None):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            if len(batch) < 2:
                continue  # a lone last image breaks batch norm (DenseNet, ResNet) and teaches nothing
            images = augment_batch(to_tensor(data.train_images[batch.numpy()]).to(device), config.augment, generator)
            loss = loss_fn(model(images), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        seconds = time.perf_counter() - started

        probabilities = predict_proba(model, data.val_images, device)
        val_loss = float(-np.log(probabilities[np.arange(len(data.val_labels)), data.val_labels] + 1e-7).mean())
        # Accuracy here is at 0.5; the operating threshold is an evaluation choice (evaluate.threshold).
        scores = binary_metrics(data.val_labels == n_classes - 1, probabilities[:, -1], 0.5)
        row = {
            "epoch": epoch,
            "train_loss": total_loss / len(order),
            "val_loss": val_loss,
            "val_auc": scores["auc"] if scores["auc"] is not None else float("nan"),
            "val_accuracy": scores["accuracy"],
        }
        history.append(row)  # history.csv holds only what is reproducible; throughput goes to MLflow alone
        metrics = {k: v for k, v in row.items() if k != "epoch"} | {"train_images_per_second": len(order) / seconds}
        mlflow.log_metrics(metrics, step=epoch, run_id=run_id)
        if row["val_auc"] > best["val_auc"]:  # NaN never wins, ties keep the earlier epoch
            best = {"epoch": epoch, "val_auc": row["val_auc"], "val_accuracy": row["val_accuracy"]}
            _save_checkpoint(paths.checkpoint, model, config, best)

    if best["epoch"] == 0:  # validation AUC undefined every epoch (one class): keep the last model
        best = {"epoch": settings.epochs, "val_auc": float("nan"), "val_accuracy": history[-1]["val_accuracy"]}
        _save_checkpoint(paths.checkpoint, model, config, best)
    mlflow.log_metrics({"best_val_auc": best["val_auc"], "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"]}, run_id=run_id)
    with atomic_path(paths.history) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False, float_format="%.6f")
    return best


def _save_checkpoint(path: Path, model, config: Config, best: dict) -> None:
    """Weights plus everything needed to rebuild and feed the model, so prediction never re-types preprocessing."""
    import torch

    state = {
        "model": config.train.model,
        "image_size": config.data.image_size,
        "labels": list(config.data.labels),
        "dropout": config.train.dropout,
        "epoch": best["epoch"],
        "val_auc": best["val_auc"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
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
