"""Batch augmentation on the training device: small affine moves, random resized crop, optional flip, gamma,
brightness and contrast, random erasing; and mixup, which blends images and therefore their targets.

Applied to whole batches as tensors (on the GPU when training runs there), so augmentation never
becomes the bottleneck of a data loader. Every geometric change (rotation, zoom, shift, crop, flip) is
folded into one affine map, so each image is resampled once. Horizontal flip is off by default:
anatomy is not left-right symmetric.

Random numbers are drawn from the caller's generator in a fixed order, and an option that is off draws
nothing: the images depend only on the options in use and the generator's state.
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
    if settings.crop_scale < 1:
        theta = crop_then(theta, settings.crop_scale, generator)
    if settings.hflip:
        theta = flip_some(theta, generator)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    brightness = uniform(settings.brightness).view(-1, 1, 1, 1)
    contrast = (1 + uniform(settings.contrast)).view(-1, 1, 1, 1)
    if settings.gamma > 0:
        gamma = (1 + uniform(settings.gamma)).view(-1, 1, 1, 1)
        moved = moved.clamp(0, 1) ** gamma  # below 1 brightens the dark lungs, above 1 darkens them
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    adjusted = ((moved - mean) * contrast + mean + brightness).clamp(0, 1)
    return erase_some(adjusted, settings.erasing, generator) if settings.erasing > 0 else adjusted


ERASE_AREA = (0.02, 0.2)  # of the image; aspect ratio 0.3-3.3, as torchvision's RandomErasing


def erase_some(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): in each image, with `probability`, one rectangle of 2-20 % of the area is
    set to that image's mean grey level, so no single region (a marker, a tube, one lung) can decide alone.

    The mean rather than black: a black patch on a radiograph reads as air, a strong feature of its own.
    """
    batch, _, height, width = images.shape
    chosen = torch.rand(batch, generator=generator) < probability
    area = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * torch.rand(batch, generator=generator)
    log_ratio = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(batch, generator=generator)
    box_h = (area * height * width * log_ratio.exp()).sqrt().clamp(1, height)
    box_w = (area * height * width / log_ratio.exp()).sqrt().clamp(1, width)
    top = torch.rand(batch, generator=generator) * (height - box_h)
    left = torch.rand(batch, generator=generator) * (width - box_w)
    rows = torch.arange(height).view(1, -1, 1)
    columns = torch.arange(width).view(1, 1, -1)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + box_h).view(-1, 1, 1))
              & (columns >= left.view(-1, 1, 1)) & (columns < (left + box_w).view(-1, 1, 1)) & chosen.view(-1, 1, 1))
    inside = inside.unsqueeze(1).to(images.device)
    return torch.where(inside, images.mean(dim=(1, 2, 3), keepdim=True), images)


def mixup_pairs(batch: int, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): a partner for each image of the batch (a random permutation) and the weight
    λ ~ Beta(alpha, alpha) of the image itself; the input is λ·image + (1 − λ)·partner and the loss
    λ·loss(target) + (1 − λ)·loss(partner's target) (pipeline.training.loop), which equals the loss against
    the blended target for cross-entropy and binary cross-entropy, weighted or not, and is well defined for
    focal loss and label smoothing too, so every task and loss takes mixup unchanged.

    Both come from `generator` (numpy's Beta sampler seeded from it), so a run and its resume draw the same.
    """
    import numpy as np

    partner = torch.randperm(batch, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    weight = float(np.random.default_rng(seed).beta(alpha, alpha))
    return partner, weight


def crop_then(theta: torch.Tensor, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """Compose the (B, 2, 3) affine maps with a random square crop of min_area..1 of the image, resized back.

    Square, so the film's aspect ratio (and the heart's width relative to the chest) is kept. The crop lies
    wholly inside the image: side s (as a fraction) and a centre within ±(1 − s) in grid units.
    """
    batch = theta.shape[0]
    area = min_area + (1 - min_area) * torch.rand(batch, generator=generator)
    side = area.sqrt()
    centre = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    side, centre = side.to(theta.device), centre.to(theta.device)
    # grid_sample reads input at theta · (x, y, 1); the crop maps those coordinates p to side · p + centre.
    cropped = theta * side[:, None, None]
    cropped[:, :, 2] += centre
    return cropped


def flip_some(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (negating x before the other moves)."""
    flip = torch.rand(theta.shape[0], generator=generator) < 0.5
    sign = torch.where(flip, -1.0, 1.0).to(theta.device)
    flipped = theta.clone()
    flipped[:, :, 0] *= sign[:, None]
    return flipped
