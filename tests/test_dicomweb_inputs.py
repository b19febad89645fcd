"""What `cxr predict` takes for a DICOMweb input, and how it signs in: checked before any server is asked."""

import pytest

from pipeline.config import dicomweb_credentials
from pipeline.dicomweb import DicomwebAddress, is_url, parse_address
from pipeline.errors import CxrError


def test_study_and_series_urls_are_parsed_to_the_service_root_and_uids():
    assert parse_address("http://pacs:8042/dicom-web/studies/1.2.3") == DicomwebAddress("http://pacs:8042/dicom-web", "1.2.3")
    assert parse_address("https://h/wado/rs/studies/1.2/series/1.2.9/") == DicomwebAddress("https://h/wado/rs", "1.2", "1.2.9")
    assert is_url("HTTP://pacs/dicom-web/studies/1") and not is_url("http_folder/film.dcm")


@pytest.mark.parametrize("text", ["http://pacs/dicom-web/studies/", "http://pacs/dicom-web/studies/1.2/instances/3",
                                  "http://pacs/dicom-web/studies/1.2/series/1.3/instances/1.4", "http://pacs/dicom-web/1.2",
                                  "http://pacs/dicom-web/studies/1.2?x=1"])
def test_other_urls_are_refused_naming_the_form_expected(text):
    with pytest.raises(CxrError, match=r"is not a DICOMweb study or series URL: expected .*studies/<StudyInstanceUID>"):
        parse_address(text)


def test_credentials_inside_a_url_are_refused_without_echoing_them():
    with pytest.raises(CxrError, match="must not hold credentials") as refused:
        parse_address("http://alice:s3cret@pacs/dicom-web/studies/1.2")
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"CXR_DICOMWEB_TOKEN": "t0k"}, "t0k"),
    ({"CXR_DICOMWEB_USER": "u", "CXR_DICOMWEB_PASSWORD": "p"}, ("u", "p")),
])
def test_sign_in_comes_from_the_environment(monkeypatch, env, expected):
    for name in ("CXR_DICOMWEB_TOKEN", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dicomweb_credentials() == expected


@pytest.mark.parametrize("env, message", [
    ({"CXR_DICOMWEB_TOKEN": "t", "CXR_DICOMWEB_USER": "u", "CXR_DICOMWEB_PASSWORD": "p"}, "not both"),
    ({"CXR_DICOMWEB_USER": "u"}, "go together"),
    ({"CXR_DICOMWEB_PASSWORD": "p"}, "go together"),
])
def test_half_or_doubled_sign_ins_are_refused(monkeypatch, env, message):
    for name in ("CXR_DICOMWEB_TOKEN", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CxrError, match=message):
        dicomweb_credentials()


def _params_with_source(tmp_path, source: dict):
    import yaml

    from tests.conftest import tiny_params_text

    params = yaml.safe_load(tiny_params_text())
    params["data"]["sources"] = [source]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "labels.csv").write_text("path,label\n1.2.3,normal\n")
    return tmp_path / "params.yaml"


def test_a_dicomweb_table_must_name_its_films_by_sop_instance_uid(tmp_path):
    from pipeline.config import load_config

    with pytest.raises(CxrError, match="a dicomweb table names its films by SOP Instance UID: add match: sop_instance_uid"):
        load_config(_params_with_source(tmp_path, {"path": "labels.csv", "dicomweb": "http://pacs/dicom-web"}))


@pytest.mark.parametrize("url, message", [("http://alice:s3cret@pacs/dicom-web", "must not hold credentials"),
                                          ("pacs:8042/dicom-web", "is not a DICOMweb URL")])
def test_a_dicomweb_source_url_with_a_password_or_without_a_scheme_is_refused_before_any_request(tmp_path, url, message):
    from pipeline.config import load_config
    from pipeline.sources import read_source

    config = load_config(_params_with_source(tmp_path, {"path": "labels.csv", "dicomweb": url, "match": "sop_instance_uid"}))
    with pytest.raises(CxrError, match=rf"data.sources 'labels.csv': .*{message}") as refused:
        read_source(config.data.sources[0], tmp_path, config.data)
    assert "s3cret" not in str(refused.value)
    assert not (tmp_path / "data").exists()
