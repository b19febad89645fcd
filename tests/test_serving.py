"""The registered model is the thing a hospital deploys: it takes file bytes, decodes them as ingest did, refuses
what it was not trained for, and `mlflow models serve` answers as `cxr predict` does."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import default_tracking_uri
from tests.conftest import source_files
from tests.servers import free_port, stop, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHAMPION = "models:/cxr-pneumonia@champion"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _films(tiny_project, formats=("dicom", "png", "jpeg")) -> tuple[list[int], list[Path]]:
    """One manifest row and its source file per format the demo data has (a DICOM, a PNG, a JPEG)."""
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    files = source_files(tiny_project.paths, tiny_project.config, manifest)
    rows = [int(np.flatnonzero(manifest["format"].to_numpy() == fmt)[0]) for fmt in formats if (manifest["format"] == fmt).any()]
    assert {"dicom", "png"} & set(formats) <= set(manifest["format"]), "the demo data should hold DICOMs and PNGs"
    return rows, [files[row] for row in rows]


def test_the_same_file_through_ingest_and_through_the_served_model_gives_identical_tensors_and_probabilities(tiny_project):
    from pipeline.imaging import decode_bytes, resize
    from pipeline.predict import load_model

    rows, files = _films(tiny_project)
    model = load_model(CHAMPION, tiny_project.paths)
    size = int(model.metadata.metadata["image_size"])
    stored = np.load(tiny_project.paths.images)[rows]  # what ingest made of these files, what training saw
    served_tensors = np.stack([resize(decode_bytes(f.read_bytes(), f.name, size=size).pixels, size) for f in files])
    assert np.array_equal(served_tensors, stored)
    from_bytes = model.predict(pd.DataFrame({"image": [_b64(f) for f in files]}))  # through MLflow's signature check
    from_arrays = model.predict(stored)
    assert (from_bytes["out_of_scope"] == "").all() and (from_bytes["error"] == "").all()
    assert np.array_equal(from_bytes["probability"].to_numpy(), from_arrays["probability"].to_numpy())
    assert list(from_bytes["label"]) == list(from_arrays["label"])


def test_the_signature_and_input_example_show_the_bytes_form_and_the_scope_travels_with_the_model(tiny_project):
    import mlflow.artifacts

    from pipeline.imaging import limits_of
    from pipeline.predict import load_model
    from pipeline.tracking import fluent_store

    model = load_model(CHAMPION, tiny_project.paths)
    inputs = model.metadata.get_input_schema().to_dict()
    assert inputs == [{"type": "string", "name": "image", "required": True}]
    outputs = {column["name"] for column in model.metadata.get_output_schema().to_dict()}
    assert {"probability", "label", "out_of_scope", "error"} <= outputs
    with fluent_store(tiny_project.paths):
        example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{CHAMPION}/serving_input_example.json")).read_text())
    (content,) = [row[0] for row in example["dataframe_split"]["data"]]
    assert base64.b64decode(content).startswith(b"\x89PNG")
    # the demo films are CR and DX, PA and AP: the contract recorded is theirs, and the served model holds it
    assert model.metadata.metadata["scope"]["modalities"] == ["CR", "DX"]
    assert model.metadata.metadata["scope"]["views"] == ["AP", "PA"]
    served = model.unwrap_python_model()
    assert served.scope.modalities == ("CR", "DX") and served.scope.views == ("AP", "PA")
    assert served.limits == limits_of(tiny_project.config.data)  # data.max_pixels and max_frames, as at ingest


def test_serve_params_override_the_training_films_contract(tiny_project):
    from pipeline.register import training_scope
    from pipeline.scope import DEFAULT_BODY_PARTS, Scope
    from pipeline.tasks import task_for

    config, task = tiny_project.config, task_for(tiny_project.config.data.task, tiny_project.config.data.labels)
    assert training_scope(tiny_project.paths, config, task) == Scope(("CR", "DX"), ("AP", "PA"), DEFAULT_BODY_PARTS)
    serve = config.serve.model_copy(update={"modalities": ["dx"], "body_parts": ["CHEST"]})
    chosen = training_scope(tiny_project.paths, config.model_copy(update={"serve": serve}), task)
    assert chosen == Scope(("DX",), ("AP", "PA"), ("CHEST",))


def test_a_bad_row_is_an_answer_with_a_reason_and_the_others_are_classified(tiny_project, pydicom_test_files, tmp_path):
    from PIL import Image

    from pipeline.predict import load_model

    _, files = _films(tiny_project)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8)).save(tmp_path / "big.png")
    rows = [_b64(files[0]), _b64(pydicom_test_files / "CT_small.dcm"), _b64(pydicom_test_files / "MR_truncated.dcm"),
            "not base64!", base64.b64encode((tmp_path / "big.png").read_bytes()[:300]).decode(), _b64(files[1])]
    table = load_model(CHAMPION, tiny_project.paths).predict(pd.DataFrame({"image": rows}))
    assert table["out_of_scope"].tolist()[:2] == ["", "modality: CT is not one of CR, DX"]
    assert [error.split(":")[0] for error in table["error"]] == ["", "", "decode_failed", "not_base64", "decode_failed", ""]
    answered = table["out_of_scope"].eq("") & table["error"].eq("")
    assert answered.tolist() == [True, False, False, False, False, True]
    assert table.loc[answered, "probability"].between(0, 1).all() and table.loc[~answered, "probability"].isna().all()
    assert table.loc[~answered, "label"].isna().all()  # never both a reason and a probability


def test_mlflow_models_serve_answers_file_bytes_as_cxr_predict_does_and_refuses_a_ct(tiny_project, pydicom_test_files):
    from pipeline.predict import load_model, predict_files

    root = tiny_project.paths.root
    _, files = _films(tiny_project)
    files = [*files, pydicom_test_files / "CT_small.dcm", pydicom_test_files / "MR_truncated.dcm"]
    expected = [p.as_dict() for p in predict_files(load_model(CHAMPION, tiny_project.paths), files)]
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=default_tracking_uri(root), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process)
        answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[_b64(f)] for f in files]}})
        images = np.load(tiny_project.paths.images)[:3]  # the form the model took before it took bytes still works
        arrays = _post(port, {"inputs": images.tolist()})["predictions"]
    finally:
        stop(process)
    in_process = load_model(CHAMPION, tiny_project.paths).predict(images)["probability"].to_numpy()
    assert np.allclose([row["probability"] for row in arrays], in_process, atol=1e-6)
    assert all(row["error"] == "" and row["out_of_scope"] == "" for row in arrays)
    rows = answer["predictions"]
    assert len(rows) == len(files)
    threshold = json.loads(tiny_project.paths.metrics.read_text())["threshold"]  # chosen on validation, stored with the model
    for row, mine in zip(rows[:-2], expected[:-2]):
        assert row["out_of_scope"] == "" and row["error"] == ""
        assert abs(row["probability"] - mine["probability"]) < 1e-4 and row["label"] == mine["label"]
        assert row["label"] == ("pneumonia" if row["probability"] >= threshold else "normal")
    ct, truncated = rows[-2:]
    assert ct["out_of_scope"] == expected[-2]["out_of_scope"] == "modality: CT is not one of CR, DX"
    assert ct["probability"] is None and ct["label"] is None
    assert truncated["error"].startswith("decode_failed") and expected[-1]["error"].startswith("decode_failed")
    assert truncated["probability"] is None


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


LOAD_WITHOUT_THE_PROJECT = """
import base64, sys
# Forget the project's own install (an editable one is a finder on sys.meta_path, a regular one a path entry):
# the model must run on the code it carries.
sys.meta_path = [finder for finder in sys.meta_path if "editable" not in str(getattr(finder, "__module__", ""))]
sys.path = [entry for entry in sys.path if entry not in ("", sys.argv[2])]
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
films = [base64.b64encode(open(film, "rb").read()).decode() for film in sys.argv[3:]]
answer = model.predict(pd.DataFrame({"image": films}))
import pipeline
print(pipeline.__file__)
print(answer.to_json())
"""


def test_the_registered_model_runs_on_the_code_it_carries_without_the_project_installed(tiny_project, tmp_path):
    import mlflow.artifacts

    from pipeline.tracking import fluent_store
    from tests.conftest import REPO

    _, files = _films(tiny_project)  # one film of each format: each format's decoder is code the model carries
    with fluent_store(tiny_project.paths):
        local = mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "model"))
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_THE_PROJECT, local, str(REPO), *map(str, files)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, answer = out.stdout.strip().splitlines()[-2:]
    assert str(REPO) not in where and where.startswith(local)  # the copy inside the model, not the project
    answer = json.loads(answer)
    assert set(answer) == {"probability", "label", "out_of_scope", "error", "ood_score"}
    assert sorted(file.suffix for file in files) == [".dcm", ".jpg", ".png"], files  # the demo data holds all three
    for row, file in enumerate(files):  # decoded with the code it carries, whatever the format
        assert answer["error"][str(row)] == "" and 0 <= answer["probability"][str(row)] <= 1, (file.name, answer)


def test_with_tta_evaluate_and_the_served_model_give_the_same_probabilities_for_the_same_film(tmp_path):
    """evaluate.tta averages each film over moved copies; the registered model records the views and averages over
    them too, for arrays and for file bytes, so the threshold chosen on validation means the same when served."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import load_checkpoint, predict_proba
    from pipeline.paths import ProjectPaths
    from pipeline.predict import load_model
    from pipeline.stages import run_stages
    from tests.conftest import write_tiny_project

    params = write_tiny_project(tmp_path / "tta", n=48)
    views = [{"shift_x": 0.06, "shift_y": 0.0, "scale": 1.0}, {"shift_x": 0.0, "shift_y": -0.06, "scale": 1.1}]
    # 4 epochs: a network whose answers depend on the film (after one epoch on 48 films they hardly do)
    config = load_config(params, ["evaluate.tta=[{shift_x: 0.06}, {shift_y: -0.06, scale: 1.1}]", "train.epochs=4"])
    paths = ProjectPaths(params.parent)
    run_stages(paths, config, until="register")

    metrics = json.loads(paths.metrics.read_text())
    assert metrics["tta"] == views
    predictions = pd.read_csv(paths.predictions)
    test = predictions[predictions["split"] == "test"]
    films = np.load(paths.images)[test["store_index"].to_numpy()]
    model = load_model(CHAMPION, paths)
    assert model.metadata.metadata["tta"] == views
    answers = model.predict(films)
    answered = answers["probability"].notna().to_numpy()  # a film refused as out of distribution has none
    assert answered.mean() >= 0.8
    films, served = films[answered], answers["probability"][answered].to_numpy(dtype=float)
    assert np.allclose(served, test["probability"][answered], atol=1e-6)
    network, _ = load_checkpoint(paths.checkpoint)
    plain = predict_proba(network, films, torch.device("cpu"), lambda logits: torch.softmax(logits, dim=1))[:, -1]
    assert np.abs(plain - served).max() > 1e-4  # the views change the probabilities: the test above could fail

    manifest = pd.read_parquet(paths.manifest).set_index("store_index")
    png = (manifest.loc[test["store_index"], "format"].to_numpy() == "png") & answered
    row = int(np.flatnonzero(png)[0])
    file = source_files(paths, config, manifest.loc[[test["store_index"].iloc[row]]].reset_index())[0]
    from_bytes = model.predict(pd.DataFrame({"image": [_b64(file)]}))["probability"].to_numpy(dtype=float)
    assert from_bytes[0] == pytest.approx(test["probability"].iloc[row], abs=1e-6)  # as `cxr predict` answers a file
