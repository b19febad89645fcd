"""The optimiser and the per-step learning-rate schedule that train.optimizer and train.schedule name."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig
from pipeline.errors import CxrError


def build_optimizer(model, settings: TrainConfig):  # -> torch.optim.Optimizer
    """Adam, AdamW (decoupled weight decay) or SGD with Nesterov momentum 0.9."""
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
    """A per-step learning-rate schedule; `constant` keeps train.lr throughout.

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
