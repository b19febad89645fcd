"""Explain: Grad-CAM heat maps that show where in a film the model found evidence, and overlay PNGs of them.

Grad-CAM (Selvaraju et al. 2017) weighs the channels of a late feature map by the gradient of one class's
score and keeps the positive part: bright where the evidence for that class lies. It comes from MONAI
(`monai.visualize.GradCAM`), not written here. A heat map is relative to its own film (0..1 within each
image) and shows where the model looked, not whether it was right.

The layer Grad-CAM reads depends on the model family (`target_layer`). `vit` is not supported yet: MONAI's
Grad-CAM needs a (N, C, H, W) feature map, and a ViT's blocks give (N, tokens, width) sequences that it cannot
reshape to the patch grid. The only spatial map inside, the patch-embedding convolution, comes before any
attention, so Grad-CAM there is one linear filter applied to each patch's pixels, not the evidence the
classifier used.

MONAI, torch and matplotlib are imported inside the functions: importing MONAI takes seconds.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import CxrError
from pipeline.files import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

OVERLAY_MIN_SIZE = 256  # px: a 28 or 32 px film is unreadable at its stored size
OVERLAY_OPACITY = 0.6  # of the colour where the heat is 1; where it is 0 the film shows through unchanged
COLOUR_MAP = "jet"  # blue (little evidence) to red (most): the usual Grad-CAM colours


def target_layer(network: nn.Module) -> str:
    """The name of the layer Grad-CAM reads for this network: its last feature map that still has a 2-D layout.

    | family        | layer               | why                                                                   |
    |---------------|---------------------|-----------------------------------------------------------------------|
    | `seed_cnn`    | `features`          | the last conv block's output (conv, ReLU, pool), what Flatten reads   |
    | `cnn_gru`     | `features`          | the CNN part's last map; after it the GRU turns rows into a sequence  |
    | `vgg_gap`     | `features`          | the last conv block's map (¼ of the side), what the head averages    |
    | `resnet18/34` | `layer4`            | the last residual layer, before global average pooling                |
    | `densenet121` | `class_layers.relu` | the last dense block after norm5 and ReLU: the map the head pools     |
    |               |                     | (MONAI's own Grad-CAM example uses it)                                |
    | `vit`         | none                | a CxrError: see the module docstring                                  |

    A deep ensemble has no layer of its own: grad_cam reads each member's (this function, per member).

    Layers are found by name, not by position, so a change inside a block does not move the target.
    Below 64 px DenseNet sits inside `UpsampleTo`, which adds the prefix `network.`.
    """
    from monai.networks.nets import DenseNet, ResNet

    from pipeline.models import CNNGRU, VGGGAP, LogitsOnly, SeedCNN, UpsampleTo

    inner, prefix = (network.network, "network.") if isinstance(network, UpsampleTo) else (network, "")
    if isinstance(inner, (SeedCNN, CNNGRU, VGGGAP)):
        layer = "features"
    elif isinstance(inner, ResNet):
        layer = "layer4"
    elif isinstance(inner, DenseNet):
        layer = "class_layers.relu"
    elif isinstance(inner, LogitsOnly):
        raise CxrError(
            "Grad-CAM explanations are not available for vit models yet (a transformer has no convolutional "
            "feature map to weigh); run `cxr predict` without --explain, or explain a CNN model "
            "(train.model: seed_cnn, resnet18, resnet34, densenet121, cnn_gru or vgg_gap)"
        )
    else:
        raise CxrError(f"cannot explain a {type(inner).__name__} network: Grad-CAM knows the cxr model families only")
    name = prefix + layer
    if name not in dict(network.named_modules()):
        raise CxrError(f"cannot explain this {type(inner).__name__}: it has no layer '{name}' (trained with another version?)")
    return name


def network_to_explain(model) -> nn.Module:  # model: mlflow.pyfunc.PyFuncModel
    """The torch network inside a loaded cxr pyfunc, checked to be explainable before any prediction runs.

    `unwrap_python_model()` gives the `CxrClassifier` (also for a models-from-code pyfunc); its `.model` is the
    network `load_context` rebuilt from the logged checkpoint, so nothing is downloaded or loaded twice.
    """
    from mlflow.exceptions import MlflowException
    from torch import nn

    try:
        network = getattr(model.unwrap_python_model(), "model", None)
    except MlflowException:
        network = None
    if not isinstance(network, nn.Module):
        raise CxrError("this model is not a cxr classifier with a torch network, so it cannot be explained; drop --explain")
    from pipeline.models import members_of

    for member in members_of(network):
        target_layer(member)
    return network


def scale_each_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Stretch each (N, 1, H, W) map to 0..1; an all-zero map (no evidence anywhere) stays 0.

    Replaces MONAI's default normaliser, which maps the maximum to 0: the reverse of a heat map.
    """
    maps = maps.detach()
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def grad_cam(network: nn.Module, images: np.ndarray, class_index: int | None = -1, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heat maps (N, S, S) float32 in 0..1 for stored uint8 images (N, S, S), for one class.

    `class_index` -1 is the positive class of a binary model (the last label), whose probability the model
    reports; the same class for every film keeps the maps comparable. None explains each film's own highest
    output: the predicted class of a multiclass model, the top label of a multilabel one. Runs on the device the
    network is on; the network is not changed.

    A deep ensemble (pipeline.models.Ensemble) gets the mean of its members' maps for the same class, stretched to
    0..1 again: with None, the class the ensemble predicts, not each member's own.
    """
    from pipeline.models import members_of

    members = members_of(network)
    if len(members) == 1:
        return _member_grad_cam(network, images, class_index, batch_size)
    if class_index is None:
        from pipeline.models import predict_proba

        top = predict_proba(network, images, next(network.parameters()).device, lambda logits: logits).argmax(axis=1)
        maps = np.zeros(images.shape, dtype=np.float32)
        for index in np.unique(top):
            maps[top == index] = grad_cam(network, images[top == index], int(index), batch_size)
        return maps
    import torch

    mean = np.mean([_member_grad_cam(member, images, class_index, batch_size) for member in members], axis=0)
    return scale_each_to_unit(torch.from_numpy(mean[:, None]))[:, 0].numpy().astype(np.float32)


def _member_grad_cam(network: nn.Module, images: np.ndarray, class_index: int | None, batch_size: int) -> np.ndarray:
    """grad_cam of one network (not an ensemble), through MONAI's GradCAM."""
    import torch
    from monai.visualize import GradCAM

    from pipeline.models import to_tensor

    layer = target_layer(network)
    # MONAI leaves its hooks on the module it is given and switches off the target layer's in-place ReLU:
    # a copy keeps the served network as it was.
    cam = GradCAM(nn_module=copy.deepcopy(network).eval(), target_layers=layer, postprocessing=scale_each_to_unit)
    device = next(network.parameters()).device
    maps = []
    # cuDNN's GRU computes gradients in training mode only; the plain kernels also do it in eval mode.
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        for start in range(0, len(images), batch_size):
            # An input that needs gradients makes the backward hook on `features` fire normally.
            batch = to_tensor(images[start : start + batch_size]).to(device).requires_grad_(True)
            maps.append(cam(batch, class_idx=class_index)[:, 0].cpu().numpy())
    if not maps:
        return np.zeros((0, *images.shape[1:]), dtype=np.float32)
    return np.concatenate(maps).astype(np.float32)


def overlay_paths(files: list[Path], out_dir: Path) -> list[Path]:
    """`<stem>_gradcam.png` in `out_dir` for each file; a repeated stem gets `_2`, `_3`, ... so none overwrites another.

    Names are compared case-insensitively, as macOS and Windows file systems compare them.
    """
    taken: set[str] = set()
    paths = []
    for file in files:
        name, copy_number = f"{file.stem}_gradcam.png", 1
        while name.lower() in taken:
            copy_number += 1
            name = f"{file.stem}_{copy_number}_gradcam.png"
        taken.add(name.lower())
        paths.append(out_dir / name)
    return paths


def write_overlay(image: np.ndarray, heat: np.ndarray, path: Path, caption: str) -> None:
    """The overlay PNG (overlay_png) written atomically to `path`: `cxr predict --explain`'s files."""
    png = overlay_png(image, heat, caption)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def overlay_png(image: np.ndarray, heat: np.ndarray, caption: str) -> bytes:
    """A PNG of the grey film with the heat map blended on top in colour, and a caption strip below, drawn in memory:
    pages that carry their images inside (the report, the label review page) never write a file for one.

    The film is enlarged (bilinear) by a whole factor to at least 256 px a side. The colour's opacity follows the
    heat, so the film stays visible where the model found nothing.
    """
    import io

    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    height, width = image.shape
    scale = max(1, math.ceil(OVERLAY_MIN_SIZE / min(height, width)))
    size = (width * scale, height * scale)
    film = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255.0
    heat = np.clip(np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    colour = colormaps[COLOUR_MAP](heat)[..., :3]
    opacity = OVERLAY_OPACITY * heat[..., None]
    blended = (1.0 - opacity) * film + opacity * colour

    font_size = max(12, size[0] // 20)
    font = ImageFont.load_default(size=font_size)
    line_height = font_size + 4
    lines = caption.splitlines()
    canvas = Image.new("RGB", (size[0], size[1] + line_height * len(lines) + 6), "black")
    canvas.paste(Image.fromarray(np.round(blended * 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((4, size[1] + 3 + number * line_height), line, fill="white", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
