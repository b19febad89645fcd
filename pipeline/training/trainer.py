"""The Trainer: model, optimiser, schedule, loss and generators as the params describe them, on one device.

On CUDA the forward pass runs in mixed precision (bfloat16, or float16 with loss scaling) on channels_last
tensors; the CPU path is plain float32 and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import distributed
from pipeline.config import Config
from pipeline.training.data import TrainingData
from pipeline.training.optim import build_optimizer, build_schedule, steps_per_epoch


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
    average: Any = None  # pipeline.training.average.WeightAverage when train.ema_decay is on; None otherwise


def build_trainer(config: Config, data: TrainingData, device, world: distributed.World = distributed.ONE_PROCESS) -> Trainer:
    """Model, optimiser, per-step schedule, loss and random generator as the params describe them."""
    import torch

    from pipeline.models import build_model
    from pipeline.training.average import build_average

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
        loss_fn=data.task.loss(settings, data.train_labels).to(device),
        generator=torch.Generator().manual_seed(settings.seed),
        device=device,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        average=build_average(model, settings.ema_decay),  # after wrap_model: the copy has its batch-norm layers
    )


def mixed_precision_dtype(device):  # -> torch.dtype | None
    """bfloat16 where the GPU supports it (float32's range, no loss scaling), else float16; None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
