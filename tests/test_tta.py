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
