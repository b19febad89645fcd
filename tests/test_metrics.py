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
    small = bootstrap_intervals(truth, probability, 0.5, rounds=500, clusters=np.arange(100))
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        low, high = small[name]
        assert low <= point[name] <= high, name
    big_truth, big_probability = _scores(2000)
    big = bootstrap_intervals(big_truth, big_probability, 0.5, rounds=500, clusters=np.arange(2000))
    assert big["auc"][1] - big["auc"][0] < (small["auc"][1] - small["auc"][0]) / 2


def test_perfect_classifier_has_a_degenerate_interval_and_seed_fixes_it():
    truth = np.array([0, 1] * 30)
    perfect = truth * 0.9 + 0.05
    assert bootstrap_intervals(truth, perfect, 0.5, rounds=200, clusters=np.arange(60))["auc"] == [1.0, 1.0]
    truth, probability = _scores(80)
    films = np.arange(80)
    assert (bootstrap_intervals(truth, probability, 0.5, seed=3, clusters=films)
            == bootstrap_intervals(truth, probability, 0.5, seed=3, clusters=films))
    assert (bootstrap_intervals(truth, probability, 0.5, seed=3, clusters=films)
            != bootstrap_intervals(truth, probability, 0.5, seed=4, clusters=films))


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
    import pandas as pd

    test = json.loads(tiny_project.paths.metrics.read_text())["test"]
    subgroups = test["subgroups"]
    assert set(subgroups["format"]) <= {"dicom", "png", "jpeg"} and len(subgroups["format"]) >= 2
    assert sum(group["n"] for group in subgroups["format"].values()) == test["n"]
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    held_out = manifest[manifest["split"] == "test"]
    for column in ("format", "view"):
        # One group per value present in the test split (films without the field, e.g. a PNG's view, in none).
        counts = held_out[column].fillna("").astype(str).loc[lambda values: values != ""].value_counts().to_dict()
        assert len(counts) >= 2, f"the tiny test split needs two {column}s for this test"
        assert {kind: group["n"] for kind, group in subgroups[column].items()} == counts, column
    assert sum(group["n"] for group in subgroups["view"].values()) == int((held_out["view"].fillna("") != "").sum())


def test_external_validation_scores_another_source_and_reports_the_shift(tmp_path):
    """A second demo set (another seed: other synthetic patients) scored as an external site."""
    from pipeline.demo_data import write_demo_data
    from tests.conftest import run_all_stages, write_tiny_project

    external = tmp_path / "site_b"
    write_demo_data(external, n=30, seed=11, size=64)
    project = run_all_stages(write_tiny_project(tmp_path / "project", n=60), [f"evaluate.external=[{external}]"])
    result = project.results["evaluate"]
    site = result.metrics["external"][str(external)]
    assert site["n"] == 30 and site["unreadable"] == 3  # the three files broken on purpose
    assert site["shift_from_internal_test"]["accuracy"] == pytest.approx(site["accuracy"] - result.metrics["test"]["accuracy"])
    assert site["ci95"]["accuracy"][0] <= site["accuracy"] <= site["ci95"]["accuracy"][1]


def test_temperature_scaling_recovers_the_overconfidence_and_keeps_the_ranking():
    from scipy.stats import spearmanr

    from pipeline.metrics import apply_temperature, fit_temperature

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
    import torch

    from pipeline.metrics import apply_temperature
    from pipeline.models import load_checkpoint, predict_proba
    from pipeline.predict import load_model
    from tests.conftest import run_all_stages, write_tiny_project

    project = run_all_stages(write_tiny_project(tmp_path, n=60), ["evaluate.temperature_scaling=true"])
    temperature = json.loads(project.paths.metrics.read_text())["temperature"]
    assert temperature != 1.0
    served = load_model("models:/cxr-pneumonia@champion", project.paths)
    films = np.load(project.paths.images)[:5]
    network, _ = load_checkpoint(project.paths.checkpoint)
    softmax = lambda logits: torch.softmax(logits, dim=1)  # noqa: E731 (a binary model's activation)
    expected = apply_temperature(predict_proba(network, films, torch.device("cpu"), softmax)[:, -1], temperature)
    assert np.allclose(served.predict(films)["probability"], expected, atol=1e-6)


# --- the operating point, chosen on validation ---------------------------------------------------


def test_youden_threshold_is_the_hand_computed_one():
    """J by hand: 0.1→0, 0.3→.25, 0.35→.5, 0.4→.75, 0.55→.5, 0.6→.25, 0.7→.5, 0.9→.25; the best is 0.4."""
    from pipeline.metrics import choose_threshold

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probability = np.array([0.1, 0.3, 0.35, 0.6, 0.4, 0.55, 0.7, 0.9])
    assert choose_threshold(truth, probability, "youden") == 0.4
    point = binary_metrics(truth, probability, 0.4)
    assert (point["sensitivity"], point["specificity"]) == (1.0, 0.75)
    # J is 0.5 at both 0.4 and 0.8: the tie goes to the lower threshold (the higher sensitivity)
    assert choose_threshold(np.array([0, 1, 0, 1]), np.array([0.2, 0.4, 0.6, 0.8]), "youden") == 0.4
    assert choose_threshold(truth, probability, "fixed", fixed=0.3) == 0.3


def test_sensitivity_target_is_met_on_validation_by_the_highest_such_threshold():
    from pipeline.metrics import choose_threshold

    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probability = np.array([0.1, 0.3, 0.35, 0.6, 0.4, 0.55, 0.7, 0.9])
    assert choose_threshold(truth, probability, "sensitivity", target_sensitivity=0.75) == 0.55  # 3 of 4 positives
    truth, probability = _scores(500, seed=4)
    for target in (0.5, 0.8, 0.95, 1.0):
        threshold = choose_threshold(truth, probability, "sensitivity", target_sensitivity=target)
        assert binary_metrics(truth, probability, threshold)["sensitivity"] >= target
        higher = probability[probability > threshold]
        if len(higher):  # any higher threshold misses the target
            assert binary_metrics(truth, probability, higher.min())["sensitivity"] < target


def test_a_threshold_cannot_be_chosen_without_both_classes_in_validation():
    from pipeline.errors import CxrError
    from pipeline.metrics import choose_threshold

    with pytest.raises(CxrError, match="no negative films.*threshold_method=fixed"):
        choose_threshold(np.array([1, 1]), np.array([0.2, 0.7]), "youden")
    with pytest.raises(CxrError, match="no positive films"):
        choose_threshold(np.array([0, 0]), np.array([0.2, 0.7]), "sensitivity")


def test_the_threshold_chosen_on_validation_is_reported_and_stored_with_the_served_model(tiny_project):
    """Default youden: metrics.json, predictions.csv, the run, the version's tags and the pyfunc all hold one threshold."""
    import pandas as pd

    from pipeline.metrics import choose_threshold
    from pipeline.predict import load_model
    from pipeline.tracking import client as tracking_client, read_run_id

    paths = tiny_project.paths
    metrics = json.loads(paths.metrics.read_text())
    threshold = metrics["threshold"]
    assert metrics["threshold_method"] == "youden_mid"
    predictions = pd.read_csv(paths.predictions)
    val = predictions[predictions["split"] == "val"]
    assert threshold == pytest.approx(choose_threshold(val["truth"], val["probability"], "youden_mid"), abs=1e-6)
    spread = metrics["threshold_spread"]
    rounds = tiny_project.config.evaluate.bootstrap_rounds
    assert spread["ci95"][0] <= threshold <= spread["ci95"][1] and spread["rounds"] == rounds and spread["sd"] >= 0
    assert f"threshold chosen again on {rounds} resamples of validation patients" in (paths.reports / "report.html").read_text()
    assert np.allclose(predictions["threshold"], threshold, atol=1e-6)
    test = predictions[predictions["split"] == "test"]
    assert metrics["test"]["tp"] == int(((test["probability"] >= threshold) & (test["truth"] == 1)).sum())

    client = tracking_client(paths)
    run = client.get_run(read_run_id(paths))
    assert run.data.metrics["threshold"] == pytest.approx(threshold)
    assert run.data.tags["threshold_method"] == "chosen on validation in the middle of the thresholds of maximal Youden's J"
    version = client.get_model_version("cxr-pneumonia", str(tiny_project.results["register"].version))
    assert float(version.tags["threshold"]) == threshold
    assert f"{threshold:.4f}" in version.description and "Youden" in version.description
    assert "resamples of validation patients: 95 % range" in version.description
    served = load_model("models:/cxr-pneumonia@champion", paths)
    assert served.metadata.metadata["threshold"] == threshold
    films = np.load(paths.images)[:20]
    table = served.predict(films)
    expected = np.where(table["probability"] >= threshold, "pneumonia", "normal")
    assert list(table["label"]) == list(expected)


@pytest.mark.slow
def test_the_served_model_calls_positives_at_a_changed_stored_threshold(tmp_path):
    """Re-evaluated with a fixed threshold at the median served probability (films on both sides of it), the new
    champion calls positives at that stored threshold, in the pyfunc and in `cxr predict`'s code path."""

    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_stage
    from pipeline.register import register_stage
    from pipeline.predict import load_model
    from tests.conftest import run_all_stages, write_tiny_project

    project = run_all_stages(write_tiny_project(tmp_path, n=60))
    films = np.load(project.paths.images)
    answered = load_model("models:/cxr-pneumonia@champion", project.paths).predict(films)["probability"]
    # the out-of-distribution threshold lets about 99 % of in-distribution films through: keep the answered ones
    assert answered.notna().mean() >= 0.9
    films = films[answered.notna().to_numpy()]
    first = answered.dropna().to_numpy(dtype=float)
    median = float(np.median(first))
    config = load_config(project.params, ["evaluate.threshold_method=fixed", f"evaluate.threshold={median}",
                                          "register.min_gate_films=5"])  # the tiny test split
    evaluate_stage(project.paths, config)
    result = register_stage(project.paths, config)
    assert result.version == 2 and result.is_champion  # the same network: an equal AUC, difference 0
    served = load_model("models:/cxr-pneumonia@champion", project.paths)
    assert served.metadata.metadata["threshold"] == median
    table = served.predict(films)
    assert np.allclose(table["probability"], first)
    assert list(table["label"]) == list(np.where(first >= median, "pneumonia", "normal"))
    assert 0 < (table["label"] == "pneumonia").sum() < len(films)
    from pipeline.predict import expand_inputs, load_model, predict_files

    files = expand_inputs([project.paths.root / "data" / "raw" / "demo" / "pneumonia"])[:8]
    for prediction in predict_files(load_model("models:/cxr-pneumonia@champion", project.paths), files):
        assert prediction.error or prediction.out_of_scope or \
            prediction.label == ("pneumonia" if prediction.probability >= median else "normal")


def test_a_cluster_bootstrap_resamples_whole_patients_and_is_not_fooled_by_repeated_films():
    """Five identical films per patient carry no more evidence than one: resampling films treats them as five
    patients and gives a narrower interval than the data hold; resampling patients gives the interval of one film each."""
    from pipeline.metrics import bootstrap

    truth, probability = _scores(40, seed=1)
    patients = np.repeat(np.arange(40), 5)
    repeated_truth, repeated_probability = np.repeat(truth, 5), np.repeat(probability, 5)

    picks = []
    bootstrap(lambda pick: picks.append(pick) or {}, len(patients), rounds=100, clusters=patients)
    for pick in picks:  # every drawn patient comes with all five of its films
        drawn, counts = np.unique(patients[pick], return_counts=True)
        assert (counts % 5 == 0).all() and np.isin(drawn, patients).all()
    assert len({len(pick) for pick in picks}) == 1 and len(picks[0]) == 200  # as many patients as there are, with replacement

    one_each = bootstrap_intervals(truth, probability, 0.5, rounds=1000, clusters=np.arange(40))["auc"]
    by_film = bootstrap_intervals(repeated_truth, repeated_probability, 0.5, rounds=1000, clusters=np.arange(200))["auc"]
    by_patient = bootstrap_intervals(repeated_truth, repeated_probability, 0.5, rounds=1000, clusters=patients)["auc"]
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(by_film) < 0.6 * width(one_each)  # films resampled: about 1/sqrt(5) as wide, falsely sure
    assert width(by_patient) == pytest.approx(width(one_each), rel=0.25)
    with pytest.raises(ValueError, match="cluster ids"):
        bootstrap(lambda pick: {}, 10, clusters=np.arange(9))


@pytest.mark.parametrize("name, labels", [("binary", ["normal", "pneumonia"]), ("multilabel", ["effusion", "pneumonia"])])
def test_every_tasks_intervals_resample_patients_so_five_copies_of_a_film_add_no_certainty(name, labels):
    """The test split's intervals (Task.intervals, what evaluate calls) take the patient of each film: five
    identical films of one patient are one patient's evidence, not five."""
    from pipeline.metrics import bootstrap
    from pipeline.tasks import Scored, task_for

    task = task_for(name, labels)
    truth, probability = _scores(40, seed=2)
    if name == "multilabel":
        other_truth, other_probability = _scores(40, seed=5)
        truth, probability = np.column_stack([truth, other_truth]), np.column_stack([probability, other_probability])
    threshold = 0.5 if name == "binary" else {label: 0.5 for label in labels}
    patients = np.repeat(np.arange(40), 5)
    repeated = Scored(np.repeat(truth, 5, axis=0), np.repeat(probability, 5, axis=0))

    def width(intervals: dict) -> float:
        return intervals["auc"][1] - intervals["auc"][0]

    one_each = width(task.intervals(Scored(truth, probability), threshold, 1000, 0, np.arange(40)))
    by_film = width(task.intervals(repeated, threshold, 1000, 0, np.arange(200)))
    by_patient = width(task.intervals(repeated, threshold, 1000, 0, patients))
    assert by_patient > 1.5 * by_film and by_patient == pytest.approx(one_each, rel=0.25)

    drawn = []  # the oracle: each resample holds n_patients patients (with replacement), all films of each
    bootstrap(lambda pick: drawn.append(pick) or {}, len(patients), rounds=50, clusters=patients)
    for pick in drawn:
        films_per_patient = np.bincount(patients[pick], minlength=40)
        assert (films_per_patient % 5 == 0).all() and films_per_patient.sum() // 5 == 40


def test_subgroups_carry_patient_clustered_intervals_and_say_n_too_small_under_the_minimum():
    import pandas as pd

    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import SUBGROUP_COLUMNS, subgroup_metrics
    from pipeline.tasks import Scored, task_for

    truth, probability = _scores(72, seed=4)
    patients = np.repeat([f"p{i}" for i in range(36)], 2)  # two films each: 33 women, 3 men
    rows = pd.DataFrame({column: "" for column in SUBGROUP_COLUMNS}, index=range(72))
    rows["patient_hash"], rows["sex"] = patients, np.where(np.arange(72) < 66, "F", "M")
    task, settings = task_for("binary", ["normal", "pneumonia"]), EvaluateConfig(bootstrap_rounds=200)

    groups = subgroup_metrics(rows, task, Scored(truth, probability), 0.5, settings)

    assert list(groups) == ["sex"]  # columns with one value or none are skipped
    women, men = groups["sex"]["F"], groups["sex"]["M"]
    assert (women["n"], women["n_patients"]) == (66, 33)
    inside = np.arange(72) < 66
    assert women["ci95"] == {name: interval for name, interval in task.intervals(
        Scored(truth[inside], probability[inside]), 0.5, 200, 0, patients[inside]).items()
        if name in ("auc", "accuracy", "sensitivity", "specificity")}
    for name in ("auc", "sensitivity", "specificity"):
        assert women["ci95"][name][0] <= women[name] <= women["ci95"][name][1], name
    assert men == {"n": 6, "n_patients": 3, "note": "n too small"}  # 3 patients < evaluate.min_subgroup_patients (10)


def test_metrics_json_and_report_say_what_was_resampled_and_n_too_small(tiny_project):
    import pandas as pd

    test = json.loads(tiny_project.paths.metrics.read_text())["test"]
    manifest = pd.read_parquet(tiny_project.paths.manifest)
    assert test["ci_method"] == "patient-clustered percentile bootstrap, 1000 rounds"
    assert test["n_patients"] == manifest.loc[manifest["split"] == "test", "patient_hash"].nunique() < test["n"]
    low, high = test["ci95"]["ece"]
    assert low <= test["ece"] <= high
    small = [group for groups in test["subgroups"].values() for group in groups.values()
             if group["n_patients"] < test["min_subgroup_patients"]]
    assert small, "the tiny test split needs a subgroup of fewer than 10 patients"
    assert all(group == {"n": group["n"], "n_patients": group["n_patients"], "note": "n too small"} for group in small)
    page = (tiny_project.paths.reports / "report.html").read_text()
    assert "<td>n too small</td>" in page and "patient-clustered percentile bootstrap, 1000 rounds" in page


def test_youden_mid_takes_the_middle_of_the_optimal_gap_where_youden_takes_its_edge():
    """Perfect separation: every threshold in (0.30, 0.90] has J = 1. youden takes 0.90 (the lowest positive), so a
    positive at 0.89 is missed; youden_mid takes 0.60 and calls the same validation films as youden."""
    from pipeline.metrics import choose_threshold

    truth = np.array([0, 0, 0, 1, 1, 1])
    probability = np.array([0.05, 0.2, 0.3, 0.9, 0.95, 0.99])
    assert choose_threshold(truth, probability, "youden") == 0.9
    assert choose_threshold(truth, probability, "youden_mid") == pytest.approx(0.6)
    assert binary_metrics(truth, probability, 0.6) == binary_metrics(truth, probability, 0.9)
    # One optimal threshold (0.4, J 0.75 in the hand-computed case): the middle of the gap below it, (0.35, 0.4]
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probability = np.array([0.1, 0.3, 0.35, 0.6, 0.4, 0.55, 0.7, 0.9])
    assert choose_threshold(truth, probability, "youden_mid") == pytest.approx(0.375)
    # Two optimal runs, (0.2, 0.4] and (0.6, 0.8]: equally wide, the lower (more sensitive) one
    assert choose_threshold(np.array([0, 1, 0, 1]), np.array([0.2, 0.4, 0.6, 0.8]), "youden_mid") == pytest.approx(0.3)


def test_the_threshold_spread_is_wide_where_validation_pins_nothing_and_narrow_where_it_does():
    """Resampling patients moves youden's edge with the lowest drawn positive; the spread says so, in probability."""
    from pipeline.metrics import threshold_spread

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 100)
    separated = np.concatenate([rng.uniform(0.0, 0.1, 100), rng.uniform(0.3, 1.0, 100)])
    patients = np.arange(200)
    edge = threshold_spread(truth, separated, "youden", 200, 0, clusters=patients)
    middle = threshold_spread(truth, separated, "youden_mid", 200, 0, clusters=patients)
    assert edge["ci95"][0] >= 0.29 and middle["ci95"][1] < 0.25  # youden sits on the positives, the middle in the gap
    assert edge["rounds"] == 200 and 0 < middle["sd"] < 0.05
    assert threshold_spread(truth, separated, "fixed", 200, 0, clusters=patients) is None
    # Films of one patient are drawn together: 200 films of 2 patients cannot pin anything, most draws hold one class
    assert threshold_spread(truth, separated, "youden", 200, 0, clusters=np.repeat([0, 1], 100)) is None
