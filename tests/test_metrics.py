"""Metrics with bootstrap intervals and calibration."""

import json

import numpy as np
import pytest

from pipeline.metrics import binary_metrics, bootstrap_intervals, calibration_table


def _scores(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    return truth, np.clip(truth * 0.35 + rng.random(n) * 0.65, 0, 1)


def test_intervals_contain_the_estimate_and_narrow_with_more_films():
    truth, probability = _scores(100)
    point = binary_metrics(truth, probability, 0.5)
    small = bootstrap_intervals(truth, probability, 0.5, rounds=500)
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        low, high = small[name]
        assert low <= point[name] <= high, name
    big_truth, big_probability = _scores(2000)
    big = bootstrap_intervals(big_truth, big_probability, 0.5, rounds=500)
    assert big["auc"][1] - big["auc"][0] < (small["auc"][1] - small["auc"][0]) / 2


def test_perfect_classifier_has_a_degenerate_interval_and_seed_fixes_it():
    truth = np.array([0, 1] * 30)
    perfect = truth * 0.9 + 0.05
    assert bootstrap_intervals(truth, perfect, 0.5, rounds=200)["auc"] == [1.0, 1.0]
    truth, probability = _scores(80)
    assert bootstrap_intervals(truth, probability, 0.5, seed=3) == bootstrap_intervals(truth, probability, 0.5, seed=3)


def test_calibration_error_is_zero_when_probabilities_match_frequencies_and_large_when_not():
    truth = np.array([0] * 8 + [1] * 2 + [0] * 2 + [1] * 8)
    calibrated = np.array([0.2] * 10 + [0.8] * 10)
    rows, error = calibration_table(truth, calibrated, bins=10)
    assert error == pytest.approx(0.0) and [row["count"] for row in rows] == [10, 10]
    _, overconfident = calibration_table(truth, np.array([0.0] * 10 + [1.0] * 10), bins=10)
    assert overconfident == pytest.approx(0.2)


def test_metrics_json_carries_intervals_and_calibration(tiny_project):
    test = json.loads(tiny_project.paths.metrics.read_text())["test"]
    low, high = test["ci95"]["accuracy"]
    assert low <= test["accuracy"] <= high
    assert 0.0 <= test["ece"] <= 1.0
    for name in ("roc", "pr", "calibration", "confusion"):
        assert (tiny_project.paths.plots / f"{name}.csv").exists() and (tiny_project.paths.plots / f"{name}.png").exists()


def test_metrics_json_has_subgroups_by_format_and_view(tiny_project):
    subgroups = json.loads(tiny_project.paths.metrics.read_text())["test"]["subgroups"]
    assert set(subgroups["format"]) <= {"dicom", "png", "jpeg"} and len(subgroups["format"]) >= 2
    assert sum(group["n"] for group in subgroups["format"].values()) == json.loads(tiny_project.paths.metrics.read_text())["test"]["n"]


def test_external_validation_scores_another_source_and_reports_the_shift(tiny_project, tmp_path):
    """A second demo set (another seed: other synthetic patients) scored as an external site."""
    from pipeline.config import load_config
    from pipeline.demo_data import write_demo_data
    from pipeline.evaluate import evaluate_stage

    external = tmp_path / "site_b"
    write_demo_data(external, n=30, seed=11, size=64)
    project = tiny_project.paths
    backup = project.metrics.read_bytes()
    config = load_config(tiny_project.params, [f"evaluate.external=[{external}]"])
    try:
        result = evaluate_stage(project, config)
    finally:
        project.metrics.write_bytes(backup)  # the shared project's metrics stay as the other tests expect them
    site = result.metrics["external"][str(external)]
    assert site["n"] == 30 and site["unreadable"] == 3  # the three files broken on purpose
    assert site["shift_from_internal_test"]["accuracy"] == pytest.approx(site["accuracy"] - result.metrics["test"]["accuracy"])
    assert site["ci95"]["accuracy"][0] <= site["accuracy"] <= site["ci95"]["accuracy"][1]


def test_temperature_scaling_recovers_the_overconfidence_and_keeps_the_ranking():
    from scipy.stats import spearmanr

    from pipeline.models import apply_temperature, fit_temperature

    rng = np.random.default_rng(0)
    calibrated = rng.uniform(0.02, 0.98, 4000)
    truth = (rng.random(4000) < calibrated).astype(int)  # outcomes drawn from the calibrated probabilities
    overconfident = apply_temperature(calibrated, 1 / 3)  # logits tripled
    temperature = fit_temperature(truth, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.15)
    recalibrated = apply_temperature(overconfident, temperature)
    assert calibration_table(truth, recalibrated)[1] < calibration_table(truth, overconfident)[1] / 2
    assert spearmanr(recalibrated, overconfident).statistic == pytest.approx(1.0)
    assert np.array_equal(apply_temperature(overconfident, 1.0), overconfident)


@pytest.mark.slow
def test_served_model_applies_the_temperature_fitted_on_validation(tmp_path):
    import mlflow
    import torch

    from pipeline.models import apply_temperature, load_checkpoint, predict_proba
    from pipeline.tracking import connect
    from tests.conftest import run_all_stages, write_tiny_project

    project = run_all_stages(write_tiny_project(tmp_path, n=60), ["evaluate.temperature_scaling=true"])
    temperature = json.loads(project.paths.metrics.read_text())["temperature"]
    assert temperature != 1.0
    connect(project.paths.root)
    served = mlflow.pyfunc.load_model("models:/cxr-pneumonia@champion")
    films = np.load(project.paths.images)[:5]
    network, _ = load_checkpoint(project.paths.checkpoint)
    expected = apply_temperature(predict_proba(network, films, torch.device("cpu"))[:, -1], temperature)
    assert np.allclose(served.predict(films)["probability"], expected, atol=1e-6)
