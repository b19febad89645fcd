"""Test-time augmentation: a film's probability as the mean over the film and a few slightly moved copies of it.

A small network at 28 px is sensitive to where exactly the lungs sit in the square; averaging over small shifts
and scales (never flips: a chest is not left-right symmetric, and the heart's side is a finding) smooths that out.
evaluate.tta lists the views (`shift_x`, `shift_y`: fractions of the side, + moves the film right or down;
`scale`: above 1 zooms in); the film itself is always one of them. evaluate scores validation and test with them
(so the threshold and the temperature are chosen on the averaged probabilities), and they are recorded with the
registered model, whose pyfunc (pipeline.serving) applies them to every film it answers: one function, so
evaluate and serving give the same probabilities for the same film.
"""

from __future__ import annotations

import numpy as np


def tta_probabilities(model, images: np.ndarray, activation, views: list[dict], batch_size: int = 128) -> np.ndarray:
    """(N, K) probabilities of (N, S, S) uint8 films: predict_proba's without views, else the mean over the film
    and each view of it (bilinear, edges repeated outward), on the CPU, without gradients."""
    import torch

    from pipeline.models import predict_proba, to_tensor

    if not views:
        return predict_proba(model, images, torch.device("cpu"), activation, batch_size)
    thetas = [view_matrix(view) for view in views]
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = to_tensor(np.asarray(images[start:start + batch_size]))
            total = activation(model(batch))
            for theta in thetas:
                total = total + activation(model(moved(batch, theta)))
            chunks.append((total / (len(thetas) + 1)).cpu().numpy())
    if not chunks:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(chunks)


def view_matrix(view: dict) -> np.ndarray:
    """The (2, 3) affine matrix torch's affine_grid takes for one view: it maps each output position (coordinates
    -1..1 across the square) to where it samples the film, so a shift right by f of the side samples 2f to the left
    and a zoom by s samples 1/s as far from the centre."""
    scale = float(view.get("scale", 1.0))
    return np.array([[1 / scale, 0.0, -2 * float(view.get("shift_x", 0.0))],
                     [0.0, 1 / scale, -2 * float(view.get("shift_y", 0.0))]], dtype=np.float32)


def moved(batch, theta: np.ndarray):  # (N, 1, S, S) tensor -> the same, moved
    """The batch resampled through `theta` (bilinear; positions outside the film repeat its edge)."""
    import torch
    import torch.nn.functional as F

    matrix = torch.from_numpy(theta).unsqueeze(0).expand(len(batch), 2, 3)
    grid = F.affine_grid(matrix, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
