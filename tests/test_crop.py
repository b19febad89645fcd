"""data.crop (issue 10): with `center`, a film that is not square keeps only its central square before the resize,
as MedMNIST made its images; with `none` the whole film is squeezed. Ingest, the served model and `cxr predict`
crop alike, the registered model records the crop, and the decode cache never mixes the two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.files import read_text_csv
from pipeline.imaging import (
    REDUCED_MARGIN,
    center_square,
    decode_bytes,
    decode_file,
    resize,
)
from pipeline.ingest import decode_one

SIZE = 32
KEY = b"test-key-0123456789-0123456789-abcdef"


def banded(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A non-square film whose central square is textured and whose margins (left/right or top/bottom) are white:
    squeezed, the white shows in the stored image; cropped, none of it does."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width), 255, dtype=np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top:top + side, left:left + side] = rng.integers(0, 200, (side, side), dtype=np.uint8)
    return pixels


@pytest.mark.parametrize(("height", "width"), [(90, 151), (151, 90), (64, 64)])
def test_center_keeps_the_central_square_and_none_squeezes_the_whole_film(height, width):
    pixels = banded(height, width)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[top:top + side, left:left + side]
    assert np.array_equal(center_square(pixels), square)
    cropped = resize(pixels, SIZE, "center")
    assert np.array_equal(cropped, np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    squeezed = resize(pixels, SIZE, "none")
    assert np.array_equal(squeezed, np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    if height != width:
        assert cropped.max() < 255 and squeezed.max() == 255  # the white margins are in the squeezed image only
    else:
        assert np.array_equal(cropped, squeezed)


def test_a_reduced_jpeg_decode_keeps_the_cropped_square_above_the_margin_and_ingest_agrees_with_serving(tmp_path):
    """A wide JPEG decoded for a 32 px store is reduced (libjpeg's 1/2..1/8) only while its short edge, the cropped
    square's side, stays at least REDUCED_MARGIN times the size; ingest (decode_one) and the served model's path
    (decode_bytes, then resize with the crop) give the same pixels, and they are the central square's."""
    path = tmp_path / "wide.jpg"
    Image.fromarray(banded(300, 700)).save(path, quality=95)
    reduced = decode_file(path, size=SIZE)
    assert reduced.pixels.shape[0] < 300  # really reduced
    assert center_square(reduced.pixels).shape[0] >= REDUCED_MARGIN * SIZE
    ingested = decode_one(path, SIZE, KEY, crop="center")
    served = resize(decode_bytes(path.read_bytes(), "row 0", size=SIZE).pixels, SIZE, "center")
    assert np.array_equal(ingested.pixels, served)
    assert np.array_equal(decode_one(path, SIZE, KEY).pixels, resize(reduced.pixels, SIZE))  # none: squeezed
    full = resize(decode_file(path).pixels, SIZE, "center")
    assert np.abs(full.astype(int) - ingested.pixels.astype(int)).mean() < 1.0
    assert ingested.pixels.max() < 250  # no white margin


PADDED_SOURCE, PADDED_COPY = "P0002_1.png", "P098_1.png"  # P0002_1 is a pneumonia PNG of the tiny project


@pytest.fixture(scope="module")
def cropped_project(tmp_path_factory):
    """A tiny project with two wide films (a demo film, mirrored so that no other film looks the same, in the middle
    of white margins) and a padded copy of a demo film (PADDED_COPY), ingested first with data.crop none, then run
    through every stage with data.crop center."""
    from pipeline.config import load_config
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths
    from tests.conftest import run_all_stages, write_tiny_project

    params = write_tiny_project(tmp_path_factory.mktemp("crop"), n=60)
    demo = params.parent / "data" / "raw" / "demo"
    wide = []
    for index, source in enumerate(sorted((demo / "pneumonia").glob("*.png"))[:2]):
        film = np.asarray(Image.open(source).convert("L"))
        canvas = np.full((film.shape[0], film.shape[1] + 40), 255, dtype=np.uint8)
        canvas[:, 20:20 + film.shape[1]] = np.fliplr(film)
        target = demo / "pneumonia" / f"P09{index}_1.png"
        Image.fromarray(canvas).save(target)
        wide.append(target)
    film = np.asarray(Image.open(demo / "pneumonia" / PADDED_SOURCE).convert("L"))
    Image.fromarray(np.pad(film, ((0, 0), (30, 30)), constant_values=255)).save(demo / "pneumonia" / PADDED_COPY)
    squeezed = ingest_stage(ProjectPaths(params.parent), load_config(params))
    return run_all_stages(params, ["data.crop=center"]), squeezed, wide


@pytest.mark.slow
def test_switching_data_crop_decodes_the_films_again_rather_than_reusing_squeezed_pixels(cropped_project):
    from pipeline.imaging import decode_file

    project, squeezed, wide = cropped_project
    cropped = project.results["ingest"]
    assert squeezed.n_decoded > 0 and cropped.n_decoded == squeezed.n_decoded  # every film decoded again
    folders = sorted(p.name for p in project.paths.decode_cache.glob("decoded-*"))
    assert len(folders) == 2 and any("-center-" in name for name in folders)
    manifest = pd.read_parquet(project.paths.manifest)
    stored = np.load(project.paths.images)
    ids = _ids_of(project, wide)
    for file, image_id in zip(wide, ids):
        row = int(np.flatnonzero(manifest["image_id"].to_numpy() == image_id)[0])
        pixels = decode_file(file).pixels
        assert np.array_equal(stored[row], resize(pixels, SIZE, "center"))
        assert not np.array_equal(stored[row], resize(pixels, SIZE, "none"))


@pytest.mark.slow
def test_a_copy_with_margins_the_crop_removes_is_a_duplicate_of_its_film(cropped_project):
    """With data.crop center the model sees a film and its copy padded with margins as the same pixels: one copy is
    kept, the other is listed as a dropped duplicate (else a copy in test would score a film train holds)."""
    project, _, _ = cropped_project
    folder = project.paths.root / "data" / "raw" / "demo" / "pneumonia"
    ids = _ids_of(project, [folder / PADDED_SOURCE, folder / PADDED_COPY])
    manifest = pd.read_parquet(project.paths.manifest)
    dropped = read_text_csv(project.paths.dropped_duplicates)  # an id may look like a number to pandas' guess
    films = pd.concat([manifest[["image_id", "sha256"]], dropped[["image_id", "sha256"]]])
    pair = films[films["image_id"].isin(ids)]
    quarantine = read_text_csv(project.paths.quarantine)
    assert len(pair) == 2 and pair["sha256"].nunique() == 1, f"{pair}\nquarantined:\n{quarantine.to_string()}"
    assert manifest["image_id"].isin(ids).sum() == 1 and dropped["image_id"].isin(ids).sum() == 1


@pytest.mark.slow
def test_the_registered_model_records_the_crop_and_serves_and_predicts_with_it(cropped_project):
    """Ingest's stored pixels of a wide film are the served model's, bit for bit, and the model answers the file's
    bytes as it answers those pixels; `cxr predict` crops as the model records, not squeezes."""
    import base64

    from pipeline.predict import load_model, predict_files

    project, _, wide = cropped_project
    model = load_model("models:/cxr-pneumonia@champion", project.paths)
    assert model.metadata.metadata["crop"] == "center"
    assert model.pyfunc.model_config["crop"] == "center"
    assert model.unwrap_python_model().crop == "center"
    manifest = pd.read_parquet(project.paths.manifest)
    rows = [int(np.flatnonzero(manifest["image_id"].to_numpy() == image_id)[0]) for image_id in _ids_of(project, wide)]
    stored = np.load(project.paths.images)[rows]
    served = np.stack([resize(decode_bytes(f.read_bytes(), f.name, size=SIZE).pixels, SIZE, "center") for f in wide])
    assert np.array_equal(served, stored)
    from_bytes = model.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in wide]}))
    from_arrays = model.predict(stored)
    squeezed = model.predict(np.stack([resize(decode_file(f).pixels, SIZE, "none") for f in wide]))
    assert np.array_equal(from_bytes["ood_score"].to_numpy(), from_arrays["ood_score"].to_numpy())
    assert from_bytes["probability"].equals(from_arrays["probability"]) and list(from_bytes["out_of_scope"]) == list(from_arrays["out_of_scope"])
    assert not np.allclose(from_arrays["ood_score"].to_numpy(), squeezed["ood_score"].to_numpy())
    predicted = predict_files(model, wide)
    assert [p.error for p in predicted] == [None, None]
    assert [p.ood_score for p in predicted] == [round(float(s), 4) for s in from_arrays["ood_score"]]


def _ids_of(project, files: list[Path]) -> list[str]:
    from pipeline.deid import load_key
    from pipeline.ingest import image_id_of
    from pipeline.sources import read_source

    key = load_key(project.paths.root, project.config.deid.key_scope)
    wanted = {f.resolve() for f in files}
    found = {item.file.resolve(): image_id_of(item, key) for spec in project.config.data.sources
             for item in read_source(spec, project.paths.root, project.config.data)[0] if item.file is not None}
    return [found[f.resolve()] for f in files if f.resolve() in wanted]


@pytest.mark.slow
def test_a_model_registered_before_the_crop_was_recorded_squeezes_as_it_was_trained(cropped_project):
    """A model_config without `crop` (every version registered before data.crop existed) serves squeezed films."""
    import base64

    from mlflow.pyfunc import PythonModelContext

    from pipeline.predict import load_model
    from pipeline.serving import CxrClassifier

    project, _, wide = cropped_project
    config = dict(load_model("models:/cxr-pneumonia@champion", project.paths).pyfunc.model_config)
    del config["crop"]
    old = CxrClassifier()
    old.load_context(PythonModelContext({"checkpoint": str(project.paths.checkpoint)}, config))
    assert old.crop == "none"
    answered = old.answer_files([base64.b64encode(f.read_bytes()).decode() for f in wide])
    squeezed = old.classify(np.stack([resize(decode_file(f).pixels, SIZE, "none") for f in wide]))
    cropped = old.classify(np.stack([resize(decode_file(f).pixels, SIZE, "center") for f in wide]))
    assert answered["probability"].equals(squeezed["probability"])
    assert not cropped["probability"].equals(squeezed["probability"])
