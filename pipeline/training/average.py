"""Weight averaging of one run (train.ema_decay): an exponential moving average of the weights and of the
batch-norm statistics, updated after every optimiser step.

Why: the last steps of a run wander around a minimum, and a checkpoint picked on one noisy validation split
partly picks that noise. The average of the recent weights sits nearer the middle of the minimum, which tends to
score better on films the run never saw (Polyak averaging; Izmailov et al. 2018 for SWA, its cousin). With
averaging on, validation scores the averaged model every epoch, and the checkpoint, the registered model and
cross-validation all hold it; the raw weights only keep training.

The decay warms up as min(ema_decay, (1 + n) / (10 + n)) after n updates (TensorFlow's ExponentialMovingAverage
with num_updates), so a short run is not dominated by its random starting weights: with 0.999 and 1 500 steps
the plain average would still hold a fifth of the first epoch's weights.
"""

from __future__ import annotations

import copy


class WeightAverage:
    """An eval-mode copy of the model whose floating-point weights and buffers follow the live ones as an EMA;
    integer buffers (batch norm's num_batches_tracked) are copied."""

    def __init__(self, model, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update: the warm-up's (1 + n) / (10 + n) until it passes train.ema_decay."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, live) -> None:
        """Move the average towards the live model's weights and buffers (after an optimiser step)."""
        import torch

        decay = self.current_decay()
        with torch.no_grad():
            averaged = self.model.state_dict()
            for name, value in live.state_dict().items():
                if averaged[name].is_floating_point():
                    averaged[name].lerp_(value.detach(), 1.0 - decay)
                else:
                    averaged[name].copy_(value)
        self.updates += 1

    def state_dict(self) -> dict:
        """What a resume restores: the averaged weights and the update count (the warm-up depends on it)."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def build_average(model, decay: float) -> WeightAverage | None:
    """The average train.ema_decay asks for, or None when it is 0 (off)."""
    return WeightAverage(model, decay) if decay > 0 else None
