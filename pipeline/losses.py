"""Training losses: cross-entropy or focal loss, optionally weighted by inverse class frequency.

Both answer class imbalance from the loss side, on top of (or instead of) the rebalance stage's sampler:
class weights make each class count equally however often it appears; focal loss shrinks the loss of
images the model already gets right, so the rare hard ones dominate the gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (n_classes · count) per class, scikit-learn's 'balanced': a class twice as rare weighs twice as much.

    A class absent from `labels` gets weight 0 rather than infinity: it contributes no terms to the loss anyway.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.divide(len(labels), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 − p_true)^gamma.

    With class weights the batch mean is weighted as CrossEntropyLoss weights it (Σ w·loss / Σ w), so
    gamma = 0 gives exactly cross-entropy, weighted or not.
    """

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p_true = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
        # Clamped so that gamma < 1 has a finite gradient where the model is certain and right (p_true = 1).
        modulating = (1 - log_p_true.exp()).clamp(min=1e-6) ** self.gamma
        losses = -modulating * log_p_true
        if self.weight is None:
            return losses.mean()
        weights = self.weight[targets]
        return (weights * losses).sum() / weights.sum()


def build_loss(settings: TrainConfig, train_labels: np.ndarray, n_classes: int) -> nn.Module:
    """The loss `train.loss` and `train.class_weights` name; weights come from the (rebalanced) training index."""
    weight = balanced_class_weights(train_labels, n_classes) if settings.class_weights == "balanced" else None
    if settings.loss == "focal":
        return FocalLoss(settings.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight)
