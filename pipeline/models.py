"""Network definitions and the one function that turns stored uint8 images into probabilities.

`seed_cnn` is the brief's Keras example in torch. Later model families are added to `build_model`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import CxrError

MODEL_NAMES = ("seed_cnn",)


class SeedCNN(nn.Module):
    """The brief's CNN: Conv 32-64-128 (3×3, ReLU, 2×2 max-pool each), Dense 128, dropout, 2-way output.

    Padding keeps any input size from 8 px up usable (the Keras original used 'valid' at 224 px).
    """

    def __init__(self, image_size: int, n_classes: int = 2, dropout: float = 0.5) -> None:
        super().__init__()

        def block(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, n_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def build_model(name: str, image_size: int, n_classes: int, dropout: float) -> nn.Module:
    """The network named by `train.model`, for 1-channel input of `image_size` px."""
    if name == "seed_cnn":
        return SeedCNN(image_size, n_classes, dropout)
    raise ValueError(f"unknown model '{name}'; known: {', '.join(MODEL_NAMES)}")


def load_checkpoint(path: Path):  # -> tuple[torch.nn.Module, dict]
    """Rebuild the network a checkpoint describes and load its weights (CPU tensors)."""
    if not path.exists():
        raise CxrError(f"{path} is missing: run `cxr train` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(state["model"], state["image_size"], len(state["labels"]), state["dropout"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Stored (N, H, W) uint8 → (N, 1, H, W) float in 0..1, the only input form the networks take."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Class probabilities (N, n_classes) for stored uint8 images, in batches, without gradients."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start : start + batch_size]).to(device)
        chunks.append(torch.softmax(model(batch), dim=1).cpu().numpy())
    if not chunks:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(chunks)
