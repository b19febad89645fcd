"""What training reads: the rebalanced training index and the val split as images and targets, and the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import CxrError
from pipeline.manifest import read_manifest
from pipeline.paths import ProjectPaths
from pipeline.tasks import Task, task_for


@dataclass(frozen=True)
class TrainingData:
    """Stored uint8 images and their targets for the rebalanced train index and the val split, as the task reads
    the manifest's labels (pipeline.tasks: Task.targets): class indices (N,) int64, or multi-hot (N, K) float32."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    task: Task  # how the targets and the network's outputs are read


def load_training_data(paths: ProjectPaths, data: DataConfig) -> TrainingData:
    """Images and targets (as `data.task` reads the manifest's labels) of the training index and the val split."""
    task = task_for(data.task, data.labels)
    for needed, stage in ((paths.manifest, "cxr ingest"), (paths.images, "cxr ingest"), (paths.train_index, "cxr rebalance")):
        if not needed.exists():
            raise CxrError(f"{needed} is missing: run `{stage}` first")
    manifest = read_manifest(paths.manifest, data.task, data.labels, ["store_index", "split", "label", "label_index"])
    images = np.load(paths.images, mmap_mode="r")
    train_index = np.load(paths.train_index)
    target_of = task.targets(manifest.set_index("store_index").loc[train_index])
    val = manifest[manifest["split"] == "val"]
    if val.empty:
        raise CxrError("train: the validation split is empty; add data or raise data.split.val")
    return TrainingData(
        train_images=np.asarray(images[train_index]),
        train_labels=target_of,
        val_images=np.asarray(images[val["store_index"].to_numpy()]),
        val_labels=task.targets(val),
        task=task,
    )


def pick_device(choice: str):  # -> torch.device
    """The device train.device names; `auto` takes CUDA when a GPU is visible, and `cuda` without one is an error."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise CxrError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
