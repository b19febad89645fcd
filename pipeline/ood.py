"""Out of distribution: a score that says how unlike the training films an image looks to the network, the
threshold above which the model refuses to answer, and one cheap image check (pipeline.scope decides).

A softmax probability is no guard: a network trained on chest films gives a photograph or a CT slice a confident
pneumonia probability. What the network *sees* is more telling. The score is the Mahalanobis distance (Lee et al.
2018) of an image's penultimate features (the input of the network's last `nn.Linear`, found by a hook, so the same
code serves every `train.model`: seed_cnn, cnn_gru, resnet18/34, densenet121, vit) to the nearest of the training
films' class-conditional Gaussians, which share one covariance (each feature standardised, then Ledoit-Wolf shrunk,
so 50 training films and 1,000 feature dimensions still give an invertible one). The threshold is the 99th
percentile of the validation films' scores (`PASS_SHARE`, `threshold_for`; with fewer than `MIN_HELD_OUT` of them,
cross-fitted training films join them: `calibrate`): about 99 % of in-distribution films pass.

Why this score, as measured by benchmarks/scope.py (a cnn_gru trained 3 epochs on PneumoniaMNIST at 28 px; README
"Out-of-scope answers"): the Mahalanobis distance put CT and MR slices, a photograph, elevation maps, noise at the
model's size 1.3 to 3.9 times above the threshold. An energy score (-logsumexp of the logits) refused
none of them: a two-class network is as confident on noise as on a film, and energy tracks confidence. Adding image
statistics (a 7 x 7 thumbnail, contrast, pixel steps) to the Gaussian model refused no more and refused real
full-resolution films the network accepts, because those statistics follow the resize, not the anatomy.

What the features miss is an image without structure: a flat grey or white image, or noise larger than the model's
input, which the resize averages to an almost flat grey, lands among the films' features (the network has nothing to
respond to). `layout_spread` catches those: the spread of a 7 x 7 thumbnail, in grey levels. The least structured
of PneumoniaMNIST's 3,992 training films has 4.4; a blank image has 0, 512 px uniform noise at 28 px 0.8. Under
`MIN_LAYOUT_SPREAD` (or half the least structured training film's, where that is lower: a low-contrast archive)
an image is refused as blank whatever its score.

Score and threshold travel with the registered model (`Statistics`, an artifact, and the `ood` entry of its metadata
and model_config: method, threshold, validation scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

METHOD = "mahalanobis"  # penultimate features, class-conditional Gaussians, one shared (shrunk) covariance
PASS_SHARE = 0.99  # of the validation films at or under the threshold
MAX_STORED_SCORES = 2000  # validation scores kept with the model (the monitoring's drift reference)
MIN_HELD_OUT = 100  # validation films a 99th percentile needs; with fewer, cross-fitted training films join them
THUMBNAIL_CELLS = 7  # a side of the layout thumbnail
MIN_LAYOUT_SPREAD = 3.0  # grey levels (of 255): under it an image shows no anatomy (blank, or averaged-out noise),
# or under half the least structured training film's spread, where that is lower (a low-contrast archive)


@dataclass(frozen=True)
class Statistics:
    """What scoring needs: the class means (K, D) and the shared precision matrix (D, D) of the features."""

    means: np.ndarray
    precision: np.ndarray

    def save(self, path: Path) -> Path:
        np.savez(path, means=self.means.astype(np.float64), precision=self.precision.astype(np.float64))
        return path

    @classmethod
    def load(cls, path: Path) -> Statistics:
        with np.load(path) as stored:
            return cls(means=stored["means"], precision=stored["precision"])


@dataclass(frozen=True)
class Judged:
    """One image's out-of-distribution evidence: its score and its coarse structure (pipeline.scope judges them)."""

    score: float
    layout_spread: float  # grey levels


def head_layer(network: nn.Module) -> nn.Module:
    """The network's last linear layer (its output layer in every cxr model family): its input is the penultimate
    features. Found by type, not by name, so a new family needs no entry here."""
    from torch import nn

    from pipeline.errors import CxrError

    linears = [module for module in network.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise CxrError(f"cannot score a {type(network).__name__} for out-of-distribution: it has no linear output layer")
    return linears[-1]


def network_features(network: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, S, S) uint8 images → (N, D) float64: what the network's last linear layer receives, in eval mode.

    A deep ensemble (pipeline.models.Ensemble) gives its members' features side by side (D = the sum of theirs):
    each member learnt its own feature space, so averaging them would mix unrelated coordinates, while side by side
    an image has to look like the training films to every member to score low."""
    import torch

    from pipeline.models import members_of, to_tensor

    layers = [head_layer(member) for member in members_of(network)]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda _, inputs, box=box: box.append(inputs[0].detach().flatten(1)))
             for layer, box in zip(layers, captured)]
    device = next(network.parameters()).device
    network.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                network(to_tensor(np.asarray(images[start : start + batch_size])).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    if not captured[0]:
        return np.zeros((0, sum(layer.in_features for layer in layers)))
    return torch.cat([torch.cat(box) for box in captured], dim=1).cpu().double().numpy()


def layout_spread(images: np.ndarray) -> np.ndarray:
    """(N, S, S) uint8 images → (N,) the standard deviation of each image's 7 x 7 mean thumbnail, in grey levels:
    how much coarse structure (lungs, mediastinum, body outline) it holds. Pixel noise averages out of it."""
    pixels = np.asarray(images, dtype=np.float64)
    if len(pixels) == 0:
        return np.zeros(0)
    rows = np.array_split(np.arange(pixels.shape[1]), THUMBNAIL_CELLS)
    columns = np.array_split(np.arange(pixels.shape[2]), THUMBNAIL_CELLS)
    thumbnail = np.stack([pixels[:, r][:, :, c].mean(axis=(1, 2)) for r in rows for c in columns], axis=1)
    return thumbnail.std(axis=1)


def fit(features: np.ndarray, groups: np.ndarray) -> Statistics:
    """Class-conditional Gaussians with one shared covariance of the training films' features: each feature
    standardised (a feature with a tiny spread would otherwise be flattened by the shrinkage), Ledoit-Wolf shrunk,
    the scaling folded back into the precision. `groups` names each film's class (one group: one Gaussian)."""
    from sklearn.covariance import LedoitWolf

    kinds = sorted(set(groups.tolist()))
    means = np.stack([features[groups == kind].mean(axis=0) for kind in kinds])
    centred = features - means[np.searchsorted(kinds, groups)]
    spread = centred.std(axis=0)
    spread = np.maximum(spread, 1e-3 * max(float(spread.max()), 1e-12))  # a dead feature (always 0) stays finite
    covariance = LedoitWolf(assume_centered=True).fit(centred / spread).covariance_
    precision = np.linalg.pinv(covariance, hermitian=True) / spread[:, None] / spread[None, :]
    return Statistics(means=means, precision=precision)


def scores(statistics: Statistics, features: np.ndarray) -> np.ndarray:
    """(N,) Mahalanobis distances to the nearest class mean: higher is further from the training films."""
    if len(features) == 0:
        return np.zeros(0)
    offsets = features[:, None, :] - statistics.means[None, :, :]  # (N, K, D)
    squared = np.einsum("nkd,de,nke->nk", offsets, statistics.precision, offsets)
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


def judge_images(network: nn.Module, statistics: Statistics, images: np.ndarray) -> list[Judged]:
    """(N, S, S) uint8 images at the model's size → each one's score and layout spread."""
    distances = scores(statistics, network_features(network, images))
    return [Judged(round(float(d), 4), round(float(s), 4)) for d, s in zip(distances, layout_spread(images))]


def threshold_for(validation_scores: np.ndarray, pass_share: float = PASS_SHARE) -> float:
    """The score at or under which `pass_share` of the validation films fall: the empirical quantile, or that of a
    normal fitted to the scores where it is higher. With a few hundred validation films the two agree (the empirical
    one is the larger for PneumoniaMNIST's 517); with a dozen the empirical 99th percentile is about their maximum,
    which a new in-distribution film exceeds one time in n + 1, not one in a hundred, and the normal's extrapolates."""
    from statistics import NormalDist

    scores = np.asarray(validation_scores, dtype=np.float64)
    empirical = float(np.quantile(scores, pass_share))
    if len(scores) < 2:
        return empirical
    return max(empirical, float(scores.mean() + NormalDist().inv_cdf(pass_share) * scores.std(ddof=1)))


def cross_fitted_scores(features: np.ndarray, groups: np.ndarray, folds: int = 5) -> np.ndarray:
    """Each training film's score under Gaussians fitted without its fold: held-out scores from the training films."""
    fold = np.arange(len(features)) % folds
    held_out = np.zeros(len(features))
    for k in range(folds):
        statistics = fit(features[fold != k], groups[fold != k])
        held_out[fold == k] = scores(statistics, features[fold == k])
    return held_out


def calibrate(network: nn.Module, train_images: np.ndarray, train_groups: np.ndarray,
              validation_images: np.ndarray) -> tuple[Statistics, dict]:
    """Fit on the training films, set the threshold on held-out films. Returns the statistics and the `ood` entry the
    model's metadata and model_config store: method, threshold, and the validation scores (at most
    MAX_STORED_SCORES: evenly spaced quantiles when there are more).

    Held out means the validation films; where there are fewer than MIN_HELD_OUT of them, also the training films
    scored by Gaussians fitted without them (5 folds). A few dozen films in 128 or more feature dimensions put every
    training film close to its own fit and every new one far, so a dozen validation scores alone would set a
    threshold that refuses many new in-distribution films."""
    features = network_features(network, train_images)
    statistics = fit(features, train_groups)
    validation = scores(statistics, network_features(network, validation_images))
    held_out = validation
    if len(validation) < MIN_HELD_OUT and len(features) >= 10:
        held_out = np.concatenate([validation, cross_fitted_scores(features, train_groups)])
    kept = validation if len(validation) <= MAX_STORED_SCORES else \
        np.quantile(validation, np.linspace(0, 1, MAX_STORED_SCORES))
    floor = min(MIN_LAYOUT_SPREAD, 0.5 * float(layout_spread(train_images).min())) if len(train_images) else MIN_LAYOUT_SPREAD
    threshold = threshold_for(held_out)
    size = int(np.shape(train_images)[-1])  # the model's: the probes are resized to it
    entry = {"method": METHOD, "threshold": threshold,
             "validation_scores": [round(float(s), 4) for s in kept], "min_layout_spread": round(floor, 4),
             "n_train": int(len(features)), "n_features": int(features.shape[1]),
             **probe_results(network, statistics, threshold, floor, size)}
    return statistics, entry


PROBES = ("ct_slice", "mr_slice", "photograph", "noise", "smooth_field")  # probe_images makes them


def probe_images(size: int) -> dict[str, np.ndarray]:
    """Images no chest-film model should answer for, as the served model would see them at `size` (decoded and
    resized by pipeline.imaging): a real CT and a real MR slice (the DICOM files pydicom ships), a photograph (the
    one matplotlib ships), pixel noise at four times the size (the resize averages it to a low-contrast grey, the
    kind that passes a loose guard) and a smooth random field (the light and shade of a photograph or an elevation
    map). Deterministic; a shipped file that is missing leaves its probe out.

    They are registration's self-check of the guard (`probes_answered`), never part of its fitting or threshold."""
    import matplotlib
    import pydicom.data
    from PIL import Image

    from pipeline.imaging import UnreadableImage, decode_file, resize

    files = {"ct_slice": Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm",
             "mr_slice": Path(pydicom.data.__file__).parent / "test_files" / "MR_small.dcm",
             "photograph": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    rng = np.random.default_rng(0)
    coarse = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    images = {"noise": resize(rng.integers(0, 256, (4 * size, 4 * size), dtype=np.uint8), size),
              "smooth_field": np.round((field - field.min()) / max(float(np.ptp(field)), 1e-9) * 255).astype(np.uint8)}
    for name, file in files.items():
        try:
            images[name] = resize(decode_file(file).film, size)
        except (OSError, UnreadableImage):  # a trimmed install: one probe fewer, never a failed registration
            continue
    return {name: images[name] for name in PROBES if name in images}


def probe_results(network: nn.Module, statistics: Statistics, threshold: float, floor: float, size: int) -> dict:
    """The `probes` tried and the `probes_answered`: those the guard would answer for, judged as a served film is
    (pipeline.scope.pixel_reason). None, for a network that learnt what a chest film looks like. A network trained on
    a few dozen films, or for an epoch, has barely moved from its random start, and a few dozen films set a loose
    threshold: then some pass, and registration says so (a warning, and the model card)."""
    from pipeline.scope import pixel_reason

    probes = probe_images(size)
    judged = judge_images(network, statistics, np.stack(list(probes.values())))
    return {"probes": list(probes),
            "probes_answered": [name for name, verdict in zip(probes, judged) if pixel_reason(verdict, threshold, floor) is None]}
