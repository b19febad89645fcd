"""Batch augmentation on the training device: small affine moves, brightness and contrast.

Applied to whole batches as tensors (on the GPU when training runs there), so augmentation never
becomes the bottleneck of a data loader. No horizontal flip: anatomy is not left-right symmetric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config import AugmentConfig


def augment_batch(images: torch.Tensor, settings: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly transform a (B, 1, H, W) batch in 0..1; random numbers come from `generator` (on the CPU) for reproducibility."""
    if not settings.enabled:
        return images
    batch = images.shape[0]

    def uniform(spread: float) -> torch.Tensor:
        return ((torch.rand(batch, generator=generator) * 2 - 1) * spread).to(images.device)

    angle = uniform(math.radians(settings.rotation_deg))
    zoom = 1 + uniform(settings.scale)
    shift_x, shift_y = uniform(2 * settings.translate), uniform(2 * settings.translate)  # grid spans -1..1
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness = uniform(settings.brightness).view(-1, 1, 1, 1)
    contrast = (1 + uniform(settings.contrast)).view(-1, 1, 1, 1)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    return ((moved - mean) * contrast + mean + brightness).clamp(0, 1)
