"""Test-time augmentation (pipeline.tta): the views move films as they say, and never flip them."""

import numpy as np
import pytest


def _moved(image: np.ndarray, view: dict) -> np.ndarray:
    import torch

    from pipeline.tta import moved, view_matrix

    return moved(torch.from_numpy(image[None, None].astype(np.float32)), view_matrix(view))[0, 0].numpy()


def test_a_shift_moves_the_film_right_or_down_by_its_fraction_of_the_side():
    image = np.zeros((8, 8))
    image[2, 5] = 1.0
    assert np.argwhere(_moved(image, {"shift_x": 1 / 8}) > 0.99).tolist() == [[2, 6]]
    assert np.argwhere(_moved(image, {"shift_y": -2 / 8}) > 0.99).tolist() == [[0, 5]]
    assert np.allclose(_moved(image, {}), image)  # the identity view changes nothing


def test_a_zoom_keeps_the_centre_and_moves_the_rest_outward():
    image = np.tile(np.arange(16, dtype=float), (16, 1))  # a horizontal ramp
    zoomed = _moved(image, {"scale": 1.25})
    assert zoomed[8, 7:9].mean() == pytest.approx(image[8, 7:9].mean(), abs=1e-5)  # the centre stays
    assert np.ptp(zoomed[8]) < np.ptp(image[8])  # a zoom in shows less of the ramp
    assert np.all(np.diff(zoomed[8]) >= 0)  # still left to right: no flip


def test_views_are_refused_outside_small_moves():
    from pydantic import ValidationError

    from pipeline.config import TtaView

    with pytest.raises(ValidationError):
        TtaView(shift_x=0.5)
    with pytest.raises(ValidationError):
        TtaView(scale=-1.0)  # a negative scale would be a flip
    with pytest.raises(ValidationError):
        TtaView(flip=True)


VIEWS = [{"shift_x": 0.06, "shift_y": 0.0, "scale": 1.0}, {"shift_x": 0.0, "shift_y": -0.06, "scale": 1.1}]


@pytest.mark.slow
def test_with_tta_on_the_served_model_still_refuses_what_is_out_of_scope_and_averages_the_rest(
        tmp_path, pydicom_test_files):
    """evaluate.tta on, the registered model and `cxr predict` give no probability to a CT (refused by its header),
    a CT slice saved as PNG, noise and a blank image (refused by their pixels): moved copies of a refused film are
    never classified. An in-scope film's probability is the mean over the film and each view computed here
    separately, after the stored temperature, and differs from the plain one."""
    import base64
    import json
    from pathlib import Path

    import pandas as pd
    import torch
    import yaml

    from pipeline.config import load_config
    from pipeline.models import load_checkpoint, to_tensor
    from pipeline.paths import ProjectPaths
    from pipeline.predict import load_model
    from pipeline.stages import run_stages
    from pipeline.tasks import task_for
    from pipeline.tta import moved, view_matrix
    from tests.conftest import source_files, write_tiny_project
    from tests.test_cli import cxr
    from tests.test_ood import CHAMPION, LEARNT_EPOCHS, LEARNT_FILMS, _non_chest

    # a network that has learnt what a chest film looks like, as tests/test_ood.py's trained_project
    params = write_tiny_project(tmp_path / "project", n=LEARNT_FILMS)
    settings = yaml.safe_load(params.read_text())
    settings["evaluate"]["tta"] = VIEWS  # in the file: `cxr predict` below reads the same project
    settings["train"]["epochs"] = LEARNT_EPOCHS
    params.write_text(yaml.safe_dump(settings, sort_keys=False))
    paths, config = ProjectPaths(params.parent), load_config(params)
    run_stages(paths, config, until="register")
    model = load_model(CHAMPION, paths)
    assert model.metadata.metadata["tta"] == VIEWS

    refused = {**_non_chest(tmp_path, pydicom_test_files), "ct_dicom": pydicom_test_files / "CT_small.dcm"}
    manifest = pd.read_parquet(paths.manifest)
    film_row = manifest[(manifest["split"] == "test") & (manifest["format"] == "png")].iloc[:1]
    [film] = source_files(paths, config, film_row)
    files = [*refused.values(), film]
    out = cxr("predict", *map(str, files), "--json", cwd=paths.root)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    served = model.predict(pd.DataFrame({"image": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]}))
    for name, answer, (_, row) in zip(refused, answers, served.iterrows(), strict=False):
        assert "probability" not in answer and "label" not in answer, (name, answer)
        assert pd.isna(row["probability"]) and pd.isna(row["label"]) and row["out_of_scope"], (name, row.to_dict())
        expected = "modality: CT is not one of" if name == "ct_dicom" else "ood: "
        assert answer["out_of_scope"].startswith(expected) and row["out_of_scope"] == answer["out_of_scope"], name

    network, state = load_checkpoint(paths.checkpoint)
    task = task_for(state["task"], state["labels"])
    pixels = np.load(paths.images)[film_row["store_index"].to_numpy()]
    with torch.no_grad():
        batch = to_tensor(pixels)
        views = [task.activation(network.eval()(batch)).numpy()]
        views += [task.activation(network(moved(batch, view_matrix(view)))).numpy() for view in VIEWS]
    temperature = float(model.metadata.metadata["temperature"])
    averaged = task.apply_temperature(np.mean(views, axis=0), temperature)[0, -1]
    plain = task.apply_temperature(views[0], temperature)[0, -1]
    assert abs(averaged - plain) > 1e-4  # the views move the answer: the checks below tell the two apart
    assert served["probability"].iloc[-1] == pytest.approx(averaged, abs=1e-5)
    assert answers[-1]["probability"] == pytest.approx(averaged, abs=1e-4)
    assert model.predict(pixels)["probability"].iloc[0] == pytest.approx(averaged, abs=1e-5)
