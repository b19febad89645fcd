"""Out of scope is an answer: which films the model refuses by their header, and why (pipeline.scope)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.imaging import DecodeLimits, decode_file
from pipeline.scope import Scope, contract, out_of_scope


def _chest(source: Path, target: Path, **header) -> Path:
    """A real DICOM (pydicom's MR_small, grey 64 x 64) with a chest film's header, then `header` on top."""
    import pydicom

    dataset = pydicom.dcmread(source)
    for keyword, value in {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", **header}.items():
        setattr(dataset, keyword, value)
    dataset.save_as(target)
    return target


def test_a_chest_film_is_in_scope_and_ct_mr_nm_are_not(pydicom_test_files, tmp_path):
    scope = Scope()
    assert out_of_scope(decode_file(_chest(pydicom_test_files / "MR_small.dcm", tmp_path / "cr.dcm")), scope) is None
    for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("JPEG2000.dcm", "NM")):
        reason = out_of_scope(decode_file(pydicom_test_files / name), scope)
        assert reason == f"modality: {modality} is not one of CR, DX, DR", name


@pytest.mark.parametrize(("header", "expected"), [
    ({"BodyPartExamined": "KNEE"}, "body_part: KNEE is not one of"),
    ({"ViewPosition": "LL"}, "view: LL is not one of PA, AP"),
    ({"Modality": "US"}, "modality: US is not one of"),
])
def test_a_header_outside_the_contract_is_refused_with_its_reason(pydicom_test_files, tmp_path, header, expected):
    film = decode_file(_chest(pydicom_test_files / "MR_small.dcm", tmp_path / "film.dcm", **header))
    assert out_of_scope(film, Scope()).startswith(expected)


def test_absent_header_values_are_not_held_against_a_film(pydicom_test_files, tmp_path):
    """A PNG has no header; a DICOM without BodyPartExamined or ViewPosition is not refused for it."""
    from PIL import Image

    png = tmp_path / "film.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(png)
    assert out_of_scope(decode_file(png), Scope()) is None
    film = decode_file(_chest(pydicom_test_files / "MR_small.dcm", tmp_path / "film.dcm", BodyPartExamined="", ViewPosition=""))
    assert out_of_scope(film, Scope()) is None


def test_colour_is_refused_but_grey_stored_as_rgb_is_not(pydicom_test_files, tmp_path):
    from PIL import Image

    everything = Scope(modalities=("OT", "US"))
    assert out_of_scope(decode_file(pydicom_test_files / "SC_rgb_rle.dcm"), everything).startswith("colour:")
    assert out_of_scope(decode_file(pydicom_test_files / "examples_palette.dcm"), everything).startswith("colour:")
    grey = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(np.stack([grey, 255 - grey, grey // 2], axis=-1)).save(tmp_path / "colour.png")
    assert out_of_scope(decode_file(tmp_path / "grey_rgb.png"), Scope()) is None
    assert out_of_scope(decode_file(tmp_path / "colour.png"), Scope()).startswith("colour:")


@pytest.mark.parametrize("offset", range(4))
def test_colour_between_any_sampled_pixels_is_still_refused(tmp_path, offset):
    """The colour check works on 4 x 4 block means (for speed): a grey film tinted in three of every four columns,
    whichever column is left grey, is colour all the same."""
    from PIL import Image

    grey = np.random.default_rng(0).integers(60, 200, (128, 128)).astype(int)
    rgb = np.stack([grey] * 3, axis=-1)
    tinted = np.arange(128) % 4 != offset
    rgb[:, tinted, 0] += 40
    rgb[:, tinted, 2] -= 40
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "tinted.png")
    assert out_of_scope(decode_file(tmp_path / "tinted.png"), Scope()).startswith("colour:")


def test_a_multi_frame_film_is_refused_when_the_limits_let_it_decode(pydicom_test_files, tmp_path):
    import pydicom

    dataset = pydicom.dcmread(_chest(pydicom_test_files / "MR_small.dcm", tmp_path / "one.dcm"))
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData * 2
    dataset.save_as(tmp_path / "two.dcm")
    film = decode_file(tmp_path / "two.dcm", limits=DecodeLimits(max_frames=2))
    assert out_of_scope(film, Scope()) == "multi_frame: 2 frames; a chest radiograph is one"


def test_the_contract_is_serve_params_else_the_training_films_else_the_defaults():
    assert contract(["dx"], [], [], ["CR", ""], ["PA"]) == Scope(modalities=("DX",), views=("PA",))
    assert contract([], [], [], ["", ""], []) == Scope()
    assert Scope.from_dict(contract([], [], ["chest"], ["CR"], ["AP", "PA"]).as_dict()) == \
        Scope(modalities=("CR",), views=("AP", "PA"), body_parts=("CHEST",))
    assert Scope.from_dict(None) == Scope()  # a model registered before scopes were recorded
