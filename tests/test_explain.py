"""Grad-CAM explanations: heat maps for every CNN family, overlay PNGs, and `cxr predict --explain` as a user runs it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import CxrError
from pipeline.explain import grad_cam, network_to_explain, overlay_paths, target_layer, write_overlay
from pipeline.imaging import decode_file, resize
from pipeline.models import SeedCNN, build_model
from pipeline.predict import load_model
from tests.test_cli import cxr

CNN_FAMILIES = ["seed_cnn", "resnet18", "resnet34", "densenet121", "cnn_gru", "vgg_gap"]


@pytest.fixture(scope="module")
def champion(tiny_project):
    """The tiny project's registered champion, loaded as `cxr predict` loads it."""
    return load_model("models:/cxr-pneumonia@champion", tiny_project.paths)


def demo_films(tiny_project, size: int, count: int = 2) -> np.ndarray:
    """Demo pneumonia films decoded and resized as prediction does: (count, size, size) uint8."""
    folder = tiny_project.paths.root / "data" / "raw" / "demo" / "pneumonia"
    return np.stack([resize(decode_file(path).pixels, size) for path in sorted(folder.glob("*.png"))[:count]])


def is_constant(heat: np.ndarray) -> bool:
    return float(heat.max() - heat.min()) < 1e-6


def test_heat_maps_of_the_champion_have_the_film_shape_and_lie_in_0_to_1(tiny_project, champion):
    films = demo_films(tiny_project, 32, count=3)
    heat = grad_cam(network_to_explain(champion), films)
    assert heat.shape == films.shape and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0


def test_explaining_leaves_the_served_network_unchanged(tiny_project, champion):
    """MONAI leaves hooks on the module it wraps and switches off in-place ReLUs: grad_cam must work on a copy."""
    films = demo_films(tiny_project, 32)
    network = network_to_explain(champion)
    before = champion.predict(films)["probability"].to_numpy()
    grad_cam(network, films)
    assert not any(module._forward_hooks or module._backward_hooks for module in network.modules())
    assert np.array_equal(champion.predict(films)["probability"].to_numpy(), before)


def test_heat_map_of_the_champion_on_a_pneumonia_film_is_not_uniform(tiny_project, champion):
    """Only structure is checked, not where it lies: the 1-epoch tiny model has not learnt where pneumonia is.

    Each film's most probable class is explained (class_index None): for a barely trained model the other class can
    have no evidence at all (an all-zero map, which `cxr predict` says in the caption). That other class can be the
    predicted label too, since the operating threshold is chosen on validation rather than fixed at 0.5.
    """
    films = demo_films(tiny_project, 32)
    network = network_to_explain(champion)
    for film in films:
        heat = grad_cam(network, film[None], class_index=None)[0]
        assert not is_constant(heat)
        top = int(network(torch.from_numpy(film[None, None] / 255.0).float()).argmax())
        assert np.array_equal(heat, grad_cam(network, film[None], class_index=top)[0])


def brightness_scorer(size: int) -> SeedCNN:
    """A SeedCNN whose positive score is the total brightness its layers pass on: the evidence is where the film is bright.

    Each conv passes the image through channel 0 (centre tap 1, everything else 0), the first dense unit sums
    channel 0 of the last map, and the positive logit is that unit; the negative logit is always 0.
    """
    model = SeedCNN(size, 2, dropout=0.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for block in model.features:
            block[0].weight[0, 0, 1, 1] = 1.0
        cells = (size // 8) ** 2  # Flatten is channel-major: channel 0 comes first
        model.classifier[1].weight[0, :cells] = 1.0
        model.classifier[4].weight[1, 0] = 1.0
    return model.eval()


def test_grad_cam_peaks_where_the_evidence_is_and_is_zero_without_evidence():
    """A case where the evidence is known by construction: one bright square, a network that scores brightness."""
    film = np.zeros((1, 32, 32), dtype=np.uint8)
    film[0, 16:24, 8:16] = 255
    model = brightness_scorer(32)
    heat = grad_cam(model, film, class_index=1)[0]
    row, column = np.unravel_index(heat.argmax(), heat.shape)
    assert 16 <= row < 24 and 8 <= column < 16
    assert heat[16:24, 8:16].mean() > 0.5 and heat[:8, 24:].max() == 0.0
    assert (grad_cam(model, film, class_index=0) == 0.0).all()  # nothing drives the negative logit: no evidence, not NaN


@pytest.mark.parametrize(("name", "size"), [(name, 32) for name in CNN_FAMILIES] + [("seed_cnn", 28)])
def test_grad_cam_works_for_every_cnn_family(tiny_project, name, size):
    """Random weights: a map for either class may be all zero (no positive evidence), so one of the two must vary."""
    torch.manual_seed(0)
    model = build_model(name, size, 2, 0.5).eval()
    films = demo_films(tiny_project, size, count=1)
    maps = [grad_cam(model, films, class_index=index) for index in (0, 1)]
    for heat in maps:
        assert heat.shape == films.shape and heat.min() >= 0.0 and heat.max() <= 1.0
    assert any(not is_constant(map_) for heat in maps for map_ in heat)


def test_target_layers_are_found_by_name():
    assert target_layer(build_model("seed_cnn", 32, 2, 0.5)) == "features"
    assert target_layer(build_model("cnn_gru", 32, 2, 0.5)) == "features"
    assert target_layer(build_model("vgg_gap", 32, 2, 0.5)) == "features"
    assert target_layer(build_model("resnet18", 32, 2, 0.5)) == "layer4"
    assert target_layer(build_model("densenet121", 64, 2, 0.5)) == "class_layers.relu"
    assert target_layer(build_model("densenet121", 32, 2, 0.5)) == "network.class_layers.relu"  # inside UpsampleTo


def test_vit_is_refused_with_a_clear_error():
    with pytest.raises(CxrError, match="not available for vit"):
        grad_cam(build_model("vit", 32, 2, 0.5), np.zeros((1, 32, 32), dtype=np.uint8))


def test_overlay_names_repeat_no_stem(tmp_path):
    files = [Path("a/P1.png"), Path("b/P1.dcm"), Path("c/p1.jpg"), Path("P1_2.png")]
    names = [path.name for path in overlay_paths(files, tmp_path)]
    assert names == ["P1_gradcam.png", "P1_2_gradcam.png", "p1_3_gradcam.png", "P1_2_2_gradcam.png"]


def test_overlays_are_readable_pngs_that_differ_between_films(tiny_project, champion, tmp_path):
    films = demo_films(tiny_project, 32)
    heat = grad_cam(network_to_explain(champion), films, class_index=0)
    paths = [tmp_path / "first.png", tmp_path / "second.png"]
    for film, map_, path in zip(films, heat, paths):
        write_overlay(film, map_, path, caption="normal  P(pneumonia) 0.100\nGrad-CAM: evidence for normal")
    pictures = []
    for path in paths:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 256
            pictures.append(np.asarray(picture.convert("RGB")))
    assert pictures[0].shape == pictures[1].shape and not np.array_equal(pictures[0], pictures[1])


def test_predict_explain_writes_one_overlay_per_classified_file_and_names_it(tiny_project, tmp_path):
    demo = tiny_project.paths.root / "data" / "raw" / "demo"
    first, second = sorted((demo / "pneumonia").glob("*.png"))[:2]
    twin = tmp_path / "other" / first.name  # same stem as `first`: its overlay must not overwrite first's
    twin.parent.mkdir()
    shutil.copy(second, twin)
    empty = tmp_path / "empty.png"
    empty.touch()
    out_dir = tmp_path / "explained"

    out = cxr("predict", str(first), str(empty), str(twin), "--explain", str(out_dir), "--json", cwd=tiny_project.paths.root)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert "explanation" not in results[1] and results[1]["error"].startswith("empty_file")
    explained = [Path(results[0]["explanation"]), Path(results[2]["explanation"])]
    assert [path.name for path in explained] == [f"{first.stem}_gradcam.png", f"{first.stem}_2_gradcam.png"]
    assert sorted(out_dir.iterdir()) == sorted(explained)
    for path in explained:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 256

