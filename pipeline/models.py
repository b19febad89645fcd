"""Network definitions and the one function that turns stored uint8 images into probabilities.

Every network takes (N, 1, S, S) floats in 0..1 for any S from 16 px up (`vit`: even S) and returns
(N, n_classes) logits.
`train.dropout` is always the dropout right before the output layer, so it means the same in every model.

| `train.model` | what it is                                                                   | from   |
|---------------|------------------------------------------------------------------------------|--------|
| `seed_cnn`    | the brief's Keras CNN, the baseline                                          | here   |
| `resnet18/34` | residual CNN, stem chosen by image size                                      | MONAI  |
| `densenet121` | densely connected CNN, upsamples inputs below 64 px                          | MONAI  |
| `cnn_gru`     | small CNN whose feature rows a bidirectional GRU reads (the RNN); the default | here   |
| `vit`         | small Vision Transformer, patch size chosen by image size                    | MONAI  |
| `vgg_gap`     | small VGG-style CNN with batch norm and global average pooling               | here   |

`Ensemble` holds K of them (train.ensemble) and answers as one network.

MONAI is imported inside `build_model`, only for the models that need it, because it takes seconds to import.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import CxrError

MODEL_NAMES = ("seed_cnn", "resnet18", "resnet34", "densenet121", "cnn_gru", "vit", "vgg_gap")


class SeedCNN(nn.Module):
    """The brief's CNN: Conv 32-64-128 (3×3, ReLU, 2×2 max-pool each), Dense 128, dropout, one output per label
    (2-way, as the brief's softmax, for the binary task).

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


class CNNGRU(nn.Module):
    """The brief's RNN-based model: a small CNN, then a bidirectional GRU that reads the feature map row by row.

    A chest film has a top-to-bottom order (apices, hila, bases, diaphragm); the GRU reads the rows of the
    CNN's feature map in that order, and back. Each row is averaged into 4 column bins so the left and right
    lungs stay apart, whatever the image size. The last hidden state of each direction goes to the output.
    """

    def __init__(self, n_classes: int = 2, dropout: float = 0.5, channels: int = 64, hidden_size: int = 64) -> None:
        super().__init__()

        def block(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )

        # Two 2×2 pools (÷4): 28 px gives a 7-step sequence, 64 px 16 steps, 224 px 56 steps.
        self.features = nn.Sequential(
            block(1, 32), nn.MaxPool2d(2), block(32, channels), nn.MaxPool2d(2), block(channels, channels)
        )
        self.column_bins = nn.AdaptiveAvgPool2d((None, 4))  # keep every row, 4 bins across
        self.gru = nn.GRU(channels * 4, hidden_size, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_size, n_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.column_bins(self.features(images))  # (N, C, rows, 4)
        rows = maps.permute(0, 2, 1, 3).flatten(2)  # (N, rows, C·4): one step per row, top to bottom
        _, last_hidden = self.gru(rows)  # (2, N, hidden): the forward pass's last step, the backward pass's last step
        return self.head(torch.cat([last_hidden[0], last_hidden[1]], dim=1))


class VGGGAP(nn.Module):
    """A small VGG: three blocks of two 3×3 conv + batch norm + ReLU (32, 64, 128 channels), a 2×2 max-pool between
    blocks, then global average pooling, dropout and one linear output layer.

    Why this shape generalises on small films: batch norm steadies training at a high learning rate, and global
    average pooling leaves the head 128 weights per class instead of SeedCNN's Flatten over every position
    (294 912 weights at 64 px), so there is little to memorise. Any size from 4 px up: the last map is a quarter
    of the side (28 px → 7×7, 64 px → 16×16), which Grad-CAM reads (`features`); the OOD score reads the 128
    pooled features (the input of the last nn.Linear).
    """

    def __init__(self, n_classes: int = 2, dropout: float = 0.5, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()

        def conv(in_channels: int, out_channels: int) -> list[nn.Module]:
            return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]

        layers: list[nn.Module] = []
        in_channels = 1
        for position, width in enumerate(widths):
            if position:
                layers.append(nn.MaxPool2d(2))
            layers += [*conv(in_channels, width), *conv(width, width)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, n_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class UpsampleTo(nn.Module):
    """Wraps a network that needs a minimum input size: smaller images are enlarged (bilinear) first."""

    def __init__(self, network: nn.Module, min_size: int) -> None:
        super().__init__()
        self.network = network
        self.min_size = min_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < self.min_size or images.shape[-2] < self.min_size:
            size = (max(images.shape[-2], self.min_size), max(images.shape[-1], self.min_size))
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self.network(images)


class LogitsOnly(nn.Module):
    """MONAI's ViT returns (logits, hidden states of every layer); training and prediction want the logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.network(images)
        return logits


class Ensemble(nn.Module):
    """A deep ensemble (train.ensemble): K networks of one recipe, trained from different seeds, answering as one
    network whose logits are those of the members' mean probabilities. Whatever reads logits (evaluate, the
    threshold, temperature scaling, TTA, the pyfunc) therefore treats it as any other network.

    Softmax tasks (binary, multiclass): the log of the mean softmax, whose softmax is that mean exactly.
    Sigmoid tasks (multilabel): the logit of the mean sigmoid, as logsumexp(logsigmoid(z)) - logsumexp(logsigmoid(-z))
    over the members, so a saturated member gives a large finite logit instead of log(0).
    """

    def __init__(self, members: list[nn.Module], softmax: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.softmax = softmax

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(images) for member in self.members])  # (K, N, outputs)
        if self.softmax:
            return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(len(self.members))
        log_sigmoid = nn.functional.logsigmoid
        return torch.logsumexp(log_sigmoid(logits), dim=0) - torch.logsumexp(log_sigmoid(-logits), dim=0)


def members_of(network: nn.Module) -> list[nn.Module]:
    """The networks inside: an Ensemble's members, or the network itself (what Grad-CAM and the OOD score read)."""
    return list(network.members) if isinstance(network, Ensemble) else [network]


def resnet_stem(image_size: int) -> dict[str, int | bool]:
    """First-layer settings that leave ResNet a last feature map of about 4-7 px at any image size.

    ResNet's layers 2-4 halve the map (÷8); the stem decides the rest. ImageNet's ÷32 would leave 28 px a 1×1 map,
    and ÷8 at 224 px would cost 16 times the compute of ÷32:

    | image size  | stem                                | total | last map            |
    |-------------|-------------------------------------|-------|---------------------|
    | below 64 px | 3×3 conv, stride 1, no max-pool     | ÷8    | 28 → 4, 32 → 4      |
    | 64-127 px   | 7×7 conv, stride 1, 3×3 max-pool    | ÷16   | 64 → 4, 96 → 6      |
    | 128 px up   | 7×7 conv, stride 2, 3×3 max-pool    | ÷32   | 128 → 4, 224 → 7    |
    """
    if image_size < 64:
        return {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True}
    if image_size < 128:
        return {"conv1_t_size": 7, "conv1_t_stride": 1, "no_max_pool": False}
    return {"conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False}


def build_resnet(depth: int, image_size: int, n_classes: int, dropout: float) -> nn.Module:
    """MONAI's ResNet-18 or -34 for 1-channel 2-D input: a standard, well-understood CNN baseline."""
    from monai.networks.nets import resnet18, resnet34

    factory = {18: resnet18, 34: resnet34}[depth]
    model = factory(spatial_dims=2, n_input_channels=1, num_classes=n_classes, **resnet_stem(image_size))
    model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model


DENSENET_MIN_SIZE = 64


def build_densenet121(image_size: int, n_classes: int, dropout: float) -> nn.Module:
    """MONAI's DenseNet-121, the network of CheXNet and most published chest X-ray classifiers.

    DenseNet downsamples by 32 in fixed steps: 28 px collapses to nothing and 32 px to a 1×1 map, on which
    batch norm fails for a training batch of one image. Inputs below 64 px are therefore enlarged to 64 px
    inside the model (last map 2×2); the cost at 28 px is then that of 64 px.
    """
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=n_classes)
    model.class_layers.out = nn.Sequential(nn.Dropout(dropout), model.class_layers.out)
    return UpsampleTo(model, DENSENET_MIN_SIZE) if image_size < DENSENET_MIN_SIZE else model


VIT_PATCH_SIZES = (16, 8, 4, 2)
VIT_MIN_PATCHES_PER_SIDE = 7


def vit_patch_size(image_size: int) -> int:
    """The largest of 16, 8, 4, 2 px that divides the image into at least 7 patches a side.

    Larger patches mean fewer tokens (attention costs tokens²); at least 7×7 patches keep some spatial
    detail. 28 px → 4 (7×7 tokens), 32 px → 4 (8×8), 64 px → 8 (8×8), 224 px → 16 (14×14, as in ViT-B/16).
    """
    for patch in VIT_PATCH_SIZES:
        if image_size % patch == 0 and image_size // patch >= VIT_MIN_PATCHES_PER_SIDE:
            return patch
    raise CxrError(
        f"train.model=vit needs data.image_size divisible by 2 (and at least 14 px), got {image_size}; "
        "pick an even size such as 28, 32, 64 or 224"
    )


def build_vit(image_size: int, n_classes: int, dropout: float) -> nn.Module:
    """A small MONAI Vision Transformer (4 layers, 4 heads, width 128): the self-attention model, CPU-sized.

    ViT-B (768 wide, 12 layers, 86M parameters) is far too large for the data and the CPU this runs on.
    MONAI's default Tanh after the head would squash logits into -1..1 (softmax never above 0.88): it is off.
    """
    from monai.networks.nets import ViT

    model = ViT(
        in_channels=1,
        img_size=image_size,
        patch_size=vit_patch_size(image_size),
        hidden_size=128,
        mlp_dim=256,
        num_layers=4,
        num_heads=4,
        classification=True,
        num_classes=n_classes,
        post_activation=None,
        spatial_dims=2,
    )
    model.classification_head = nn.Sequential(nn.Dropout(dropout), model.classification_head)
    return LogitsOnly(model)


def build_model(name: str, image_size: int, n_classes: int, dropout: float) -> nn.Module:
    """The network named by `train.model`, for 1-channel input of `image_size` px."""
    if name == "seed_cnn":
        return SeedCNN(image_size, n_classes, dropout)
    if name == "resnet18":
        return build_resnet(18, image_size, n_classes, dropout)
    if name == "resnet34":
        return build_resnet(34, image_size, n_classes, dropout)
    if name == "densenet121":
        return build_densenet121(image_size, n_classes, dropout)
    if name == "cnn_gru":
        return CNNGRU(n_classes, dropout)
    if name == "vit":
        return build_vit(image_size, n_classes, dropout)
    if name == "vgg_gap":
        return VGGGAP(n_classes, dropout)
    raise ValueError(f"unknown model '{name}'; known: {', '.join(MODEL_NAMES)}")


def network_for(state: dict) -> nn.Module:
    """The untrained network a checkpoint describes: one `state["model"]`, or an Ensemble of `state["ensemble"]`
    of them (the key is there only for ensembles, so a one-network checkpoint is as it always was)."""
    from pipeline.tasks import task_for

    def one() -> nn.Module:
        return build_model(state["model"], state["image_size"], len(state["labels"]), state["dropout"])

    count = int(state.get("ensemble", 1))
    if count == 1:
        return one()
    softmax = task_for(state["task"], state["labels"]).one_label_per_film  # the task's activation: softmax, else sigmoid
    return Ensemble([one() for _ in range(count)], softmax)


def describe_network(state: dict) -> str:
    """How documents name a checkpoint's network: `vgg_gap`, or `vgg_gap × 3 (deep ensemble)`."""
    count = int(state.get("ensemble", 1))
    return str(state["model"]) if count == 1 else f"{state['model']} × {count} (deep ensemble)"


def load_checkpoint(path: Path):  # -> tuple[torch.nn.Module, dict]
    """Rebuild the network a checkpoint describes and load its weights (CPU tensors)."""
    if not path.exists():
        raise CxrError(f"{path} is missing: run `cxr train` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = network_for(state)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Stored (N, H, W) uint8 → (N, 1, H, W) float in 0..1, the only input form the networks take."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, device: torch.device, activation, batch_size: int = 128) -> np.ndarray:
    """Probabilities (N, n_outputs) for stored uint8 images, in batches, without gradients.

    `activation` turns logits into probabilities: the task's (pipeline.tasks), a softmax over classes or a
    sigmoid per label.
    """
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        logits = model(to_tensor(images[start : start + batch_size]).to(device))
        chunks.append(activation(logits).cpu().numpy())
    if not chunks:
        return np.zeros((0, 2), dtype=np.float32)
    return np.concatenate(chunks)
