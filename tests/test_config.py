"""params.yaml parsing and `--set` overrides: typed values, clear one-line errors."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import CxrError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_file_spells_out_exactly_the_code_defaults(tmp_path):
    config = load_config(REPO_PARAMS)
    defaults = load_config(tmp_path / "missing.yaml")
    assert config.model_dump() == defaults.model_dump()  # every param (the configs differ only in the file they name)
    assert [source.path for source in config.data.sources] == ["data/raw/demo"]
    assert config.data.labels[-1] == "pneumonia"
    assert config.registry.model_name == "cxr-pneumonia"


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(
        tmp_path / "params.yaml",
        ["data.sources=[data/raw/a, data/raw/b]", "train.epochs=2", "augment.enabled=false", "register.model_name=other"],
    )
    assert [source.path for source in config.data.sources] == ["data/raw/a", "data/raw/b"]
    assert config.train.epochs == 2
    assert config.augment.enabled is False
    assert config.registry.model_name == "other"


def test_override_keeps_sibling_keys_from_the_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    config = load_config(params, ["train.epochs=3"])
    assert (config.train.epochs, config.train.lr) == (3, 0.01)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epoch=2", "unknown key 'train.epoch'"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("train.epochs=many", "'train.epochs'"),
        ("train.epochs=0", "'train.epochs'"),
        ("data.split.train=0.9", "must add up to 1"),
        ("rebalance.method=smote_magic", "'rebalance.method'"),
        ("train", "expected section.key=value"),
        ("data.sources=[a", "not valid YAML"),
        ("validation.severity.intensity=sometimes", "'validation.severity.intensity'"),
    ],
)
def test_bad_overrides_give_one_line_errors_naming_the_key(tmp_path, override, expected):
    with pytest.raises(CxrError) as raised:
        load_config(tmp_path / "params.yaml", [override])
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_in_params_file_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochz: 3\n")
    with pytest.raises(CxrError, match="unknown key 'train.epochz'"):
        load_config(params)


def _leaf_paths(tree: dict, prefix: str = "") -> dict:
    """Dotted paths of a YAML tree's leaves (a non-empty mapping is a branch; lists, scalars and {} are leaves)."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves |= _leaf_paths(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_flat_dict_has_every_leaf_for_mlflow(tmp_path):
    import yaml

    flat = load_config(tmp_path / "params.yaml").as_flat_dict()
    assert flat["train.model"] == "vgg_gap"
    assert flat["data.split.test"] == 0.15
    assert flat["register.gate_metric"] == "test_auc"
    leaves = _leaf_paths(yaml.safe_load(REPO_PARAMS.read_text()))
    assert set(flat) == set(leaves)
    # params.yaml spells out the defaults, so each leaf's value is the file's (sources are expanded to mappings).
    assert [source["path"] for source in flat["data.sources"]] == leaves["data.sources"]
    assert {key: flat[key] for key in leaves if key != "data.sources"} == {key: value for key, value in leaves.items() if key != "data.sources"}


def test_three_labels_need_a_multiclass_or_multilabel_task(tmp_path):
    with pytest.raises(CxrError, match="data.task binary needs exactly two labels.*set data.task: multiclass"):
        load_config(tmp_path / "params.yaml", ["data.labels=[normal, bacterial, viral]"])
    config = load_config(tmp_path / "params.yaml", ["data.labels=[normal, bacterial, viral]", "data.task=multiclass"])
    assert config.data.labels == ["normal", "bacterial", "viral"]


def test_params_folder_instead_of_file_is_a_clear_error(tmp_path):
    with pytest.raises(CxrError, match="is a folder"):
        load_config(tmp_path)


def test_a_gate_setting_changed_on_the_command_line_says_so_and_what_the_params_file_says(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("register:\n  margin: 0.01\n")
    config = load_config(params, ["register.margin=1", "register.gate_metric=test_accuracy", "register.min_gate_films=30"])
    assert config.setting("register.margin") == "margin 1 (set on the command line; params.yaml says 0.01)"
    assert config.setting("register.gate_metric") == ("gate_metric test_accuracy (set on the command line; params.yaml "
                                                      "leaves the default test_auc)")
    assert config.setting("register.min_gate_films") == "min_gate_films 30"  # the same value as before: nothing to say
    assert load_config(params).setting("register.margin") == "margin 0.01"
    whole = load_config(params, ["register={margin: 0.5}"])  # a whole section set at once
    assert whole.setting("register.margin") == "margin 0.5 (set on the command line; params.yaml says 0.01)"


def test_the_gate_compares_on_test_films_only(tmp_path):
    with pytest.raises(CxrError, match="register.gate_metric"):
        load_config(tmp_path / "params.yaml", ["register.gate_metric=val_auc"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.label_smoothing=0.1", "train.loss=focal"], "train.label_smoothing works with train.loss cross_entropy only"),
    (["train.label_smoothing=0.1", "data.task=multilabel"], "train.label_smoothing is for binary and multiclass"),
])
def test_label_smoothing_is_refused_where_it_would_mean_something_else(tmp_path, overrides, message):
    with pytest.raises(CxrError, match=message) as raised:
        load_config(tmp_path / "params.yaml", overrides)
    assert "\n" not in str(raised.value)
    smoothed = load_config(tmp_path / "params.yaml", ["train.label_smoothing=0.1", "data.labels=[a, b, c]", "data.task=multiclass"])
    assert smoothed.train.label_smoothing == 0.1


def test_the_generalisation_switches_are_off_by_default_and_bounded(tmp_path):
    config = load_config(tmp_path / "params.yaml")
    assert (config.train.ema_decay, config.train.label_smoothing, config.augment.mixup_alpha, config.augment.erasing) == (0, 0, 0, 0)
    for bad in ("train.ema_decay=1", "train.label_smoothing=-0.1", "augment.mixup_alpha=-1", "augment.erasing=1.5"):
        with pytest.raises(CxrError, match=bad.split("=")[0].split(".")[1]):
            load_config(tmp_path / "params.yaml", [bad])
