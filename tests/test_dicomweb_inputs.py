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
