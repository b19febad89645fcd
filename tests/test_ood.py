"""Out of scope by image: the network's out-of-distribution score (pipeline.ood), its threshold set on validation and
stored with the model, and the refusals it gives films without a header, in `cxr predict` and the served model."""

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.test_cli import cxr

CHAMPION = "models:/cxr-pneumonia@champion"


@pytest.mark.parametrize("family", ["seed_cnn", "cnn_gru", "resnet18", "densenet121", "vit", "vgg_gap"])
def test_the_features_are_what_the_output_layer_reads_in_every_model_family(family):
    """The hook finds the layer before the head by type: fed to the head, the features give the network's logits."""
    import torch

    from pipeline.models import build_model, to_tensor
    from pipeline.ood import head_layer, network_features

    torch.manual_seed(0)
    network = build_model(family, 32, 2, 0.5).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    features = network_features(network, images)
    head = head_layer(network)
    assert features.shape == (3, head.in_features)
    with torch.no_grad():
        logits = network(to_tensor(images)).double()
        assert torch.allclose(head.double()(torch.from_numpy(features)), logits, atol=1e-6)


def test_the_threshold_lets_99_percent_of_validation_pass_and_the_score_is_the_distance_to_the_nearest_class():
    """With many validation films the threshold is their 99th percentile; with a dozen, not their maximum (which a
    new in-distribution film would exceed one time in 13), but a normal fit's 99th percentile above it."""
    from pipeline.ood import fit, scores, threshold_for

    rng = np.random.default_rng(0)
    train = np.vstack([rng.normal(0, 1, (500, 4)), rng.normal(10, 1, (500, 4))])
    statistics = fit(train, np.array(["a"] * 500 + ["b"] * 500))
    validation = scores(statistics, np.vstack([rng.normal(0, 1, (500, 4)), rng.normal(10, 1, (500, 4))]))
    threshold = threshold_for(validation)
    assert 0.985 <= np.mean(validation <= threshold) <= 0.995
    few = validation[:12]
    assert threshold_for(few) > few.max()
    near_a, near_b, between = scores(statistics, np.array([[0.0] * 4, [10.0] * 4, [5.0] * 4]))
    assert near_a < 1 and near_b < 1 and between > 2 * threshold  # halfway between the classes is far from both (one Gaussian would put it at its mean)


def _non_chest(folder: Path, pydicom_test_files: Path) -> dict[str, Path]:
    """Header-less images that are not chest films: noise, a blank image, a grey photograph, a CT slice as PNG."""
    import matplotlib.cbook as cbook
    from PIL import Image

    from pipeline.imaging import decode_file

    images = {
        "noise": np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8),
        "blank": np.full((64, 64), 128, dtype=np.uint8),
        "photograph": np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("L")),
        "ct_slice": decode_file(pydicom_test_files / "CT_small.dcm").pixels,
    }
    paths = {}
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
        paths[name] = folder / f"{name}.png"
    return paths


# A network that has learnt what a chest film looks like, at test sizes (32 px, one network): LEARNT_FILMS demo films,
# LEARNT_EPOCHS epochs. Fewer is too little for the promise that it refuses a CT slice: with 300 films the CT slice
# scored under the threshold for 3 of 6 training seeds on one CPU (and for seed 0 on one CPU and not another); with
# 400, for none of 18 seeds (the least score 1.2 times the threshold, the median 1.7).
LEARNT_FILMS, LEARNT_EPOCHS = 400, 6


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """A model that has learnt what a chest film looks like (LEARNT_FILMS, LEARNT_EPOCHS).

    The shared tiny project (80 films, 1 epoch) is too little for this promise: its network has barely moved from its
    random start, and the threshold that a few dozen films set on 128 features is loose enough to pass a CT slice."""
    from tests.conftest import run_all_stages, write_tiny_project

    params = write_tiny_project(tmp_path_factory.mktemp("ood-trained"), n=LEARNT_FILMS)
    return run_all_stages(params, [f"train.epochs={LEARNT_EPOCHS}"])


def test_noise_blank_a_photograph_and_a_ct_slice_as_png_are_refused_by_cxr_predict_and_the_served_model(
        trained_project, pydicom_test_files, tmp_path):
    from pipeline.predict import load_model

    tiny_project = trained_project
    images = _non_chest(tmp_path, pydicom_test_files)
    out = cxr("predict", *map(str, images.values()), "--json", cwd=tiny_project.paths.root)
    assert out.returncode == 1, out.stderr  # nothing classified
    answers = {Path(answer["path"]).stem: answer for answer in json.loads(out.stdout)}
    for name in images:
        assert answers[name]["out_of_scope"].startswith("ood: "), answers[name]
        assert "probability" not in answers[name] and "label" not in answers[name]
    for name in ("noise", "photograph", "ct_slice"):  # scored by the network, and the score is said
        assert answers[name]["ood_score"] > 0 and answers[name]["out_of_scope"].startswith("ood: score ")
    served = load_model(CHAMPION, tiny_project.paths).predict(
        pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images.values()]}))
    assert served["out_of_scope"].str.startswith("ood: ").all(), served["out_of_scope"].tolist()
    assert served["probability"].isna().all() and served["label"].isna().all() and (served["error"] == "").all()
    assert served["out_of_scope"].tolist() == [answers[name]["out_of_scope"] for name in images]  # the same answers


def test_registration_self_checks_the_guard_on_non_chest_images_and_the_card_says_it_refused_them(trained_project):
    """A network that learnt what a chest film looks like refuses every probe (real CT and MR slices, a photograph,
    noise, a smooth field), as stored with the model and written in its card, without a warning."""
    from pipeline.ood import PROBES
    from pipeline.predict import load_model

    stored = load_model(CHAMPION, trained_project.paths).metadata.metadata["ood"]
    assert stored["probes"] == list(PROBES) and stored["probes_answered"] == []
    assert stored["n_train"] > 0 and stored["n_features"] == 128  # vgg_gap's pooled features
    card = (trained_project.paths.models / "model_card.md").read_text()
    assert f"Self-check at registration: {len(PROBES)} of {len(PROBES)} non-chest test images refused" in card
    assert "Warning: the guard would answer" not in card


def test_the_self_check_reports_the_probes_a_guard_fitted_on_their_like_would_answer():
    """The hostile case: a guard whose training films look like the probes (the probes themselves, jittered) cannot
    refuse them, and the self-check must say so instead of reporting a clean sheet."""
    import torch

    from pipeline.models import build_model
    from pipeline.ood import PROBES, calibrate, probe_images

    torch.manual_seed(0)
    network = build_model("seed_cnn", 32, 2, 0.5).eval()
    probes = np.stack(list(probe_images(32).values())).astype(np.int16)
    rng = np.random.default_rng(0)
    films = np.clip(np.repeat(probes, 40, axis=0) + rng.integers(-4, 5, (40 * len(probes), 32, 32)), 0, 255).astype(np.uint8)
    groups = np.resize(np.array(["normal", "pneumonia"]), len(films))
    _, entry = calibrate(network, films[::2], groups[::2], films[1::2])
    assert entry["probes"] == list(PROBES)
    assert set(entry["probes_answered"]) == set(PROBES), entry["probes_answered"]


def test_arrays_without_a_header_are_judged_by_the_score_too(tiny_project):
    from pipeline.predict import load_model

    model = load_model(CHAMPION, tiny_project.paths)
    size = int(model.metadata.metadata["image_size"])
    stored = np.load(tiny_project.paths.images)[:2]
    noise = np.random.default_rng(1).integers(0, 256, (1, size, size), dtype=np.uint8)
    blank = np.full((1, size, size), 200, dtype=np.uint8)
    table = model.predict(np.concatenate([stored, noise, blank]))
    assert table["out_of_scope"].tolist()[:2] == ["", ""] and table["probability"][:2].notna().all()
    assert table["out_of_scope"][2].startswith("ood: score ") and table["out_of_scope"][3].startswith("ood: blank: ")
    assert table["probability"][2:].isna().all()
    assert all(isinstance(score, float) for score in table["ood_score"])


def test_the_threshold_and_the_validation_scores_are_stored_with_the_registered_model(tiny_project):
    """In its metadata and model_config (iface: method, threshold, validation scores), and the statistics as an
    artifact; the stored scores are the validation films' own, and about 99 % of them pass."""
    import mlflow.artifacts

    from pipeline.ood import judge_images
    from pipeline.predict import load_model
    from pipeline.tracking import fluent_store

    model = load_model(CHAMPION, tiny_project.paths)
    stored = model.metadata.metadata["ood"]
    assert {"method", "threshold", "validation_scores"} <= set(stored) and stored["method"] == "mahalanobis"
    assert 0 < stored["min_layout_spread"] <= 3
    with fluent_store(tiny_project.paths):
        local = Path(mlflow.artifacts.download_artifacts(CHAMPION))
    flavour = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavour["config"]["ood"] == stored and (local / flavour["artifacts"]["ood"]["path"]).is_file()

    manifest = pd.read_parquet(tiny_project.paths.manifest)
    validation = np.load(tiny_project.paths.images)[np.sort(manifest.loc[manifest["split"] == "val", "store_index"].to_numpy())]
    served = model.unwrap_python_model()
    rescored = sorted(j.score for j in judge_images(served.model, served.ood, validation))
    assert np.allclose(rescored, sorted(stored["validation_scores"]), atol=1e-3)
    scores = np.array(stored["validation_scores"])
    assert np.mean(scores <= stored["threshold"]) >= 1 - 1 / len(scores) and stored["threshold"] > np.median(scores)


def test_a_model_registered_before_scores_were_stored_still_answers_by_header_only(tiny_project, pydicom_test_files, tmp_path):
    """The champion's files with the `ood` entries and artifact taken out, as a version registered earlier holds them:
    it loads, refuses a CT by its header, and answers a header-less photograph with a probability and no score."""
    import mlflow.artifacts
    import mlflow.pyfunc

    from pipeline.predict import predict_files
    from pipeline.serving import ServedModel
    from pipeline.tracking import fluent_store

    with fluent_store(tiny_project.paths):
        local = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "model")))
    description = yaml.safe_load((local / "MLmodel").read_text())
    flavour = description["flavors"]["python_function"]
    (local / flavour["artifacts"].pop("ood")["path"]).unlink()
    del flavour["config"]["ood"], description["metadata"]["ood"]
    (local / "MLmodel").write_text(yaml.safe_dump(description))

    model = ServedModel(mlflow.pyfunc.load_model(str(local)))
    assert model.unwrap_python_model().ood is None
    images = _non_chest(tmp_path, pydicom_test_files)
    answers = predict_files(model, [pydicom_test_files / "CT_small.dcm", images["photograph"]])
    assert answers[0].out_of_scope.startswith("modality: CT") and answers[0].ood_score is None
    assert answers[1].out_of_scope is None and 0 <= answers[1].probability <= 1 and answers[1].ood_score is None
    assert "ood_score" not in answers[1].as_dict()


def test_a_multi_frame_object_is_out_of_scope_not_an_error_for_cxr_predict_and_the_served_model(tiny_project, pydicom_test_files):
    """data.max_frames refuses a multi-frame object before decoding it (a header costs nothing to forge); what that
    object is (a cine loop, a colour capture) is still an answer about scope, not a broken file."""
    from pipeline.predict import load_model

    film = pydicom_test_files / "SC_rgb_rle_2frame.dcm"
    out = cxr("predict", str(film), "--json", cwd=tiny_project.paths.root)
    [answer] = json.loads(out.stdout)
    assert answer["out_of_scope"].startswith("multi_frame: ") and "error" not in answer and "probability" not in answer
    served = load_model(CHAMPION, tiny_project.paths).predict(pd.DataFrame({"image": [base64.b64encode(film.read_bytes()).decode()]}))
    assert served["out_of_scope"].tolist() == [answer["out_of_scope"]] and served["error"].tolist() == [""]
    assert served["probability"].isna().all()
