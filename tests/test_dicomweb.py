"""DICOMweb in and out against a real PACS: Debian's Orthanc with its DICOMweb plugin, started per module on a free
port with a temporary storage folder. It admits only a bearer token or an HTTP basic sign-in (a Lua request filter
checks the Authorization header), so every request here proves the credentials were sent."""

import base64
import json
import secrets
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pipeline.errors import CxrError
from tests.servers import free_port, stop, wait_for

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
PLUGIN = next((p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                           Path("/usr/lib/orthanc/libOrthancDicomWeb.so")) if p.exists()), None)
TOKEN, USER, PASSWORD = secrets.token_hex(16), "radiology", secrets.token_hex(12)

pytestmark = pytest.mark.skipif(ORTHANC is None or PLUGIN is None,
                                reason="Orthanc with its DICOMweb plugin is not installed (Debian: apt-get install orthanc "
                                       "orthanc-dicomweb; .ci/run installs them)")


class Pacs:
    """A running Orthanc: its DICOMweb root and REST calls signed in with the test token."""

    def __init__(self, root: str) -> None:
        self.root, self.dicomweb = root, f"{root}/dicom-web"

    def call(self, path: str, data: bytes | None = None) -> dict | list:
        request = urllib.request.Request(self.root + path, data=data, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def upload(self, file: Path) -> None:
        self.call("/instances", file.read_bytes())

    def reports(self, study_uid: str) -> list[dict]:
        """The study's SR instances, each with its content as Orthanc's simplified JSON tags."""
        found = self.call("/tools/find", json.dumps({"Level": "Instance", "Expand": True,
                                                     "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}).encode())
        return [self.call(f"/instances/{item['ID']}/simplified-tags") for item in found]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("orthanc")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (folder / "filter.lua").write_text(
        "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
        f"  local given = httpHeaders['authorization']\n  return given == 'Bearer {TOKEN}' or given == 'Basic {basic}'\nend\n")
    port = free_port()
    (folder / "orthanc.json").write_text(json.dumps({
        "Name": "cxr-test", "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "Plugins": [str(PLUGIN)], "LuaScripts": [str(folder / "filter.lua")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(urllib.request.Request(f"http://127.0.0.1:{port}/system", headers={"Authorization": f"Bearer {TOKEN}"}),
                 process, seconds=60)
        yield Pacs(f"http://127.0.0.1:{port}")
    finally:
        stop(process)


def chest_films(root: Path, n: int) -> list[Path]:
    """`n` demo DICOM films, each its own study (the broken demo files left out)."""
    return sorted(p for p in (root / "data" / "raw" / "demo").rglob("*.dcm") if not p.name.startswith("broken"))[:n]


@pytest.fixture(scope="module")
def one_study(pacs, tmp_path_factory: pytest.TempPathFactory):
    """A demo film on the PACS (demo data written here: no model needed); its header."""
    import pydicom

    from pipeline.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("films")
    write_demo_data(out / "data" / "raw" / "demo", n=12, seed=3, size=32)
    film = chest_films(out, 1)[0]
    pacs.upload(film)
    return pydicom.dcmread(film, stop_before_pixels=True)


@pytest.mark.parametrize("credentials", [TOKEN, (USER, PASSWORD)], ids=["bearer", "basic"])
def test_a_study_is_retrieved_with_a_token_or_a_basic_sign_in(pacs, one_study, tmp_path, credentials):
    from pipeline.dicomweb import open_client, parse_address, retrieve_films

    address = parse_address(f"{pacs.dicomweb}/studies/{one_study.StudyInstanceUID}/")
    films = retrieve_films(open_client(address.base_url, credentials), address, tmp_path)
    assert [film.file.name for film in films] == [f"{one_study.SOPInstanceUID}.dcm"]
    assert films[0].url.endswith(f"/series/{one_study.SeriesInstanceUID}/instances/{one_study.SOPInstanceUID}")
    assert "PixelData" not in films[0].header


@pytest.mark.parametrize("credentials", [None, "wrong-token", (USER, "wrong-password")], ids=["none", "token", "password"])
def test_a_refused_sign_in_is_one_line_that_says_how_and_shows_no_secret(pacs, one_study, tmp_path, credentials):
    from pipeline.dicomweb import open_client, parse_address, retrieve_films

    address = parse_address(f"{pacs.dicomweb}/studies/{one_study.StudyInstanceUID}")
    with pytest.raises(CxrError, match=r"refused .*HTTP 403.*CXR_DICOMWEB_TOKEN") as refused:
        retrieve_films(open_client(address.base_url, credentials), address, tmp_path)
    assert "\n" not in str(refused.value) and "wrong" not in str(refused.value) and TOKEN not in str(refused.value)


def test_an_unknown_study_or_a_silent_server_is_a_clear_error(pacs, tmp_path):
    from pipeline.dicomweb import open_client, parse_address, retrieve_films

    missing = parse_address(f"{pacs.dicomweb}/studies/1.2.3.4")
    with pytest.raises(CxrError, match=r"studies/1\.2\.3\.4 was not found .*404"):
        retrieve_films(open_client(missing.base_url, TOKEN), missing, tmp_path)
    silent = parse_address(f"http://127.0.0.1:{free_port()}/dicom-web/studies/1.2.3.4")
    with pytest.raises(CxrError, match=r"did not answer"):
        retrieve_films(open_client(silent.base_url, TOKEN), silent, tmp_path)


def test_a_result_sr_goes_into_the_films_study_and_a_film_that_failed_gets_none(pacs, one_study, tmp_path):
    from pipeline.dicomweb import ModelIdentity, open_client, parse_address, retrieve_films, store_results
    from pipeline.predict import Prediction

    address = parse_address(f"{pacs.dicomweb}/studies/{one_study.StudyInstanceUID}")
    client = open_client(address.base_url, TOKEN)
    films = retrieve_films(client, address, tmp_path)
    identity = ModelIdentity("cxr-multilabel", "7", {"effusion": 0.5, "nodule": 0.25})
    assert store_results(client, films, [Prediction(path=films[0].url, error="unreadable_dicom: ...")], identity) == []
    assert pacs.reports(one_study.StudyInstanceUID) == []

    answer = Prediction(path=films[0].url, label="effusion", probabilities={"effusion": 0.91234, "nodule": 0.1})
    stored = store_results(client, films, [answer], identity)
    reports = pacs.reports(one_study.StudyInstanceUID)
    assert [r["SOPInstanceUID"] for r in reports] == stored and len(stored) == 1
    report = reports[0]
    assert report["Modality"] == "SR" and report["StudyInstanceUID"] == one_study.StudyInstanceUID
    assert report["SeriesInstanceUID"] != one_study.SeriesInstanceUID
    content = {item["ConceptNameCodeSequence"][0]["CodeMeaning"]: item for item in report["ContentSequence"]}
    assert content["Source of Measurement"]["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"] == one_study.SOPInstanceUID
    assert {name: content[name].get("TextValue") for name in ("Finding", "Probability", "Decision threshold",
                                                              "Algorithm Name", "Algorithm Version")} == {
        "Finding": "effusion", "Probability": "effusion=0.9123; nodule=0.1000",
        "Decision threshold": '{"effusion": 0.5, "nodule": 0.25}', "Algorithm Name": "cxr-multilabel", "Algorithm Version": "7"}
    # the study now holds a report: it has no pixels, so it is not a film to classify
    assert [film.url for film in retrieve_films(client, address, tmp_path)] == [films[0].url]
