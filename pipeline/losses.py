"""Training losses: cross-entropy or focal loss, optionally weighted by inverse class frequency.

Both answer class imbalance from the loss side, on top of (or instead of) the rebalance stage's sampler:
class weights make each class count equally however often it appears; focal loss shrinks the loss of
images the model already gets right, so the rare hard ones dominate the gradient.

Multilabel tasks have one sigmoid output per label: binary cross-entropy with logits, or its focal form,
and `balanced` weights become a positive weight per label (negatives / positives), as BCEWithLogitsLoss takes.
Which loss a run uses is the task's choice (pipeline.tasks: Task.loss).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def balanced_positive_weights(targets: np.ndarray) -> torch.Tensor:
    """negatives / positives per label of (N, K) multi-hot targets: each label's positives weigh as much as its
    negatives together. A label without positives keeps weight 1 (it has no positive terms to weigh)."""
    positives = np.asarray(targets, dtype=np.float64).sum(axis=0)
    negatives = len(targets) - positives
    weights = np.divide(negatives, positives, out=np.ones(len(positives)), where=positives > 0)
    return torch.tensor(weights, dtype=torch.float32)


class SigmoidFocalLoss(nn.Module):
    """Focal loss for independent sigmoid outputs (Lin et al. 2017): each label's binary cross-entropy scaled by
    (1 - p_true)^gamma, with an optional positive weight per label; gamma = 0 is BCEWithLogitsLoss(pos_weight)."""

    def __init__(self, gamma: float, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        # Clamped as in FocalLoss: a finite gradient for gamma < 1 where the model is certain and right.
        positive = -((1 - log_p.exp()).clamp(min=1e-6) ** self.gamma) * log_p * targets
        negative = -(log_p.exp().clamp(min=1e-6) ** self.gamma) * log_not_p * (1 - targets)
        if self.pos_weight is not None:
            positive = positive * self.pos_weight
        return (positive + negative).mean()
