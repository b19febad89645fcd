"""DICOMweb in and out against a real PACS: Debian's Orthanc with its DICOMweb plugin, started per module on a free
port with a temporary storage folder. It admits only a bearer token or an HTTP basic sign-in (a Lua request filter
checks the Authorization header), so every request here proves the credentials were sent."""

import base64
import json
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.errors import CxrError
from tests.servers import free_port, stop, wait_for

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
PLUGIN = next((p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                           Path("/usr/lib/orthanc/libOrthancDicomWeb.so")) if p.exists()), None)
CXR = str(Path(sys.executable).parent / "cxr")
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


def cxr(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([CXR, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ | env)


def project_files(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_films_on_a_pacs_are_classified_as_local_files_and_get_a_result_sr_each(tiny_project, pacs, tmp_path):
    import pydicom

    from pipeline.demo_data import phi_values
    from pipeline.predict import load_model

    root = tiny_project.paths.root
    films = chest_films(root, 3)
    headers = [pydicom.dcmread(film, stop_before_pixels=True) for film in films]
    assert len({h.StudyInstanceUID for h in headers}) == 3
    for film in films:
        pacs.upload(film)
    # two studies by their study URL, the third by its series URL
    urls = [f"{pacs.dicomweb}/studies/{h.StudyInstanceUID}" for h in headers[:2]]
    urls.append(f"{pacs.dicomweb}/studies/{headers[2].StudyInstanceUID}/series/{headers[2].SeriesInstanceUID}")
    local = cxr("predict", "--json", *map(str, films), env={}, cwd=root)
    assert local.returncode == 0, local.stderr
    before = project_files(root)
    temp = tmp_path / "temp"
    temp.mkdir()
    remote = cxr("predict", "--json", "--store-results", *urls, cwd=root,
                 env={"CXR_DICOMWEB_TOKEN": TOKEN, "TMPDIR": str(temp)})
    assert remote.returncode == 0, remote.stderr

    expected = {h.SOPInstanceUID: answer for h, answer in zip(headers, json.loads(local.stdout))}
    answers = json.loads(remote.stdout)
    assert [a["path"].rsplit("/instances/", 1)[1] for a in answers] == [h.SOPInstanceUID for h in headers]
    for answer, header in zip(answers, headers):
        assert answer["path"] == (f"{pacs.dicomweb}/studies/{header.StudyInstanceUID}/series/{header.SeriesInstanceUID}"
                                  f"/instances/{header.SOPInstanceUID}")
        local_answer = expected[header.SOPInstanceUID]
        assert {k: v for k, v in answer.items() if k not in ("path", "ood_score")} == \
            {k: v for k, v in local_answer.items() if k not in ("path", "ood_score")}
        # the score's float32 features may differ in the last bits with the batch a film is scored in
        assert answer["ood_score"] == pytest.approx(local_answer["ood_score"], abs=1e-3)
    # nothing identifying reaches the output, the logs or the project; the token is never shown; no films stay behind
    phi = {value for value in phi_values(root / "data" / "raw" / "demo") if value}
    shown = remote.stdout + remote.stderr
    assert TOKEN not in shown and not [value for value in phi if value in shown]
    changed = [p for p, mtime in project_files(root).items() if before.get(p) != mtime]
    assert not [p for p in changed if any(value.encode() in p.read_bytes() for value in phi)]
    assert not list(temp.rglob("*.dcm")) and not list(temp.glob("cxr-dicomweb-*"))

    registered = json.loads(tiny_project.paths.registered.read_text())
    assert registered["is_champion"]
    threshold = load_model(f"models:/{registered['model_name']}@champion", tiny_project.paths).metadata.metadata["threshold"]
    for header, answer in zip(headers, answers):
        reports = pacs.reports(header.StudyInstanceUID)
        assert len(reports) == 1, f"study {header.StudyInstanceUID} holds {len(reports)} result SRs"
        report = reports[0]
        assert report["SeriesInstanceUID"] != header.SeriesInstanceUID and report["SOPInstanceUID"] != header.SOPInstanceUID
        content = {item["ConceptNameCodeSequence"][0]["CodeMeaning"]: item for item in report["ContentSequence"]}
        assert content["Source of Measurement"]["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"] == header.SOPInstanceUID
        assert content["Finding"]["TextValue"] == answer["label"]
        assert content["Probability"]["TextValue"] == f"{answer['probability']:.4f}"
        assert content["Decision threshold"]["TextValue"] == json.dumps(threshold)
        assert content["Algorithm Name"]["TextValue"] == registered["model_name"]
        assert content["Algorithm Version"]["TextValue"] == str(registered["version"])

    # the study now holds our SR too: it is not a film, so asking again classifies the one film only
    again = cxr("predict", "--json", urls[0], cwd=root, env={"CXR_DICOMWEB_USER": USER, "CXR_DICOMWEB_PASSWORD": PASSWORD})
    assert again.returncode == 0, again.stderr
    assert [a["path"] for a in json.loads(again.stdout)] == [answers[0]["path"]]


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
    from pipeline.dicomweb import ReportedModel, open_client, parse_address, retrieve_films, store_results
    from pipeline.predict import Prediction

    address = parse_address(f"{pacs.dicomweb}/studies/{one_study.StudyInstanceUID}")
    client = open_client(address.base_url, TOKEN)
    films = retrieve_films(client, address, tmp_path)
    identity = ReportedModel("cxr-multilabel", "7", {"effusion": 0.5, "nodule": 0.25})
    failed = Prediction(path=films[0].url, error="unreadable_dicom: ...")
    assert store_results(client, films, [failed], identity) == [failed]
    assert pacs.reports(one_study.StudyInstanceUID) == []

    answer = Prediction(path=films[0].url, label="effusion", probabilities={"effusion": 0.91234, "nodule": 0.1})
    assert store_results(client, films, [answer], identity) == [answer]
    reports = pacs.reports(one_study.StudyInstanceUID)
    assert len(reports) == 1
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


def captures(pacs: Pacs, study_uid: str) -> list[dict]:
    """The study's Secondary Capture instances, as Orthanc's simplified JSON tags."""
    found = pacs.call("/tools/find", json.dumps({"Level": "Instance", "Expand": True,
                                                 "Query": {"StudyInstanceUID": study_uid, "Modality": "OT"}}).encode())
    return [pacs.call(f"/instances/{item['ID']}/simplified-tags") for item in found]


def test_an_overlay_goes_into_the_films_study_as_a_capture_of_it_carrying_only_the_study_attributes(pacs, tmp_path):
    import numpy as np
    import pydicom
    from PIL import Image

    from pipeline.demo_data import write_demo_data
    from pipeline.dicomweb import ReportedModel, open_client, parse_address, retrieve_films, store_results
    from pipeline.explain import write_overlay
    from pipeline.predict import Prediction

    write_demo_data(tmp_path / "data" / "raw" / "demo", n=12, seed=11, size=32)
    film = chest_films(tmp_path, 1)[0]
    source = pydicom.dcmread(film)
    source.OtherPatientIDs, source.PatientAge = "OTHER-7730100", "047Y"  # identifying, and not needed by a capture
    source.save_as(film)
    pacs.upload(film)
    address = parse_address(f"{pacs.dicomweb}/studies/{source.StudyInstanceUID}")
    client = open_client(address.base_url, TOKEN)
    (tmp_path / "retrieved").mkdir()
    films = retrieve_films(client, address, tmp_path / "retrieved")
    png = tmp_path / "overlay.png"
    write_overlay(np.full((32, 32), 90, np.uint8), np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), png,
                  "pneumonia  P(pneumonia) 0.800\nGrad-CAM: evidence for pneumonia")
    answer = Prediction(path=films[0].url, label="pneumonia", probability=0.8, explanation=str(png))
    stored = store_results(client, films, [answer], ReportedModel("cxr-pneumonia", "3", 0.5))

    [capture] = captures(pacs, source.StudyInstanceUID)
    assert len(pacs.reports(source.StudyInstanceUID)) == 1
    assert stored[0].explanation == (f"{pacs.dicomweb}/studies/{source.StudyInstanceUID}/series/"
                                     f"{capture['SeriesInstanceUID']}/instances/{capture['SOPInstanceUID']}")
    assert capture["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert capture["SeriesInstanceUID"] != source.SeriesInstanceUID and capture["SOPInstanceUID"] != source.SOPInstanceUID
    assert [(r["ReferencedSOPClassUID"], r["ReferencedSOPInstanceUID"]) for r in capture["SourceImageSequence"]] == [
        (source.SOPClassUID, source.SOPInstanceUID)]
    # the same patient and study as the film (so the PACS files it there), and nothing more of the header
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID"):
        assert capture[keyword] == str(source[keyword].value), keyword
    assert not {"InstitutionName", "OtherPatientIDs", "PatientAge"} & set(capture)
    # its pixels are the overlay, RGB, as drawn
    with urllib.request.urlopen(urllib.request.Request(f"{pacs.root}/instances/{_orthanc_id(pacs, capture)}/file",
                                                       headers={"Authorization": f"Bearer {TOKEN}"})) as response:
        (tmp_path / "capture.dcm").write_bytes(response.read())
    stored_capture = pydicom.dcmread(tmp_path / "capture.dcm")
    assert stored_capture.PhotometricInterpretation == "RGB"
    assert np.array_equal(stored_capture.pixel_array, np.asarray(Image.open(png).convert("RGB")))


def _orthanc_id(pacs: Pacs, tags: dict) -> str:
    [found] = pacs.call("/tools/lookup", tags["SOPInstanceUID"].encode())
    return found["ID"]


@pytest.mark.slow
def test_explain_stores_a_capture_per_film_beside_its_sr_and_leaves_nothing_identifying_in_the_project(tiny_project, pacs,
                                                                                                        tmp_path):
    import pydicom

    from pipeline.demo_data import phi_values

    root = tiny_project.paths.root
    films = chest_films(root, 5)[3:5]  # studies no other test here uses
    headers = [pydicom.dcmread(film, stop_before_pixels=True) for film in films]
    for film in films:
        pacs.upload(film)
    urls = [f"{pacs.dicomweb}/studies/{h.StudyInstanceUID}" for h in headers]
    before = project_files(root)
    temp = tmp_path / "temp"
    temp.mkdir()
    remote = cxr("predict", "--json", "--store-results", "--explain", str(root / "overlays"), *urls, cwd=root,
                 env={"CXR_DICOMWEB_TOKEN": TOKEN, "TMPDIR": str(temp)})
    assert remote.returncode == 0, remote.stderr

    answers = json.loads(remote.stdout)
    assert len(answers) == 2 and all("probability" in a for a in answers)
    for header, answer in zip(headers, answers):
        [report], [capture] = pacs.reports(header.StudyInstanceUID), captures(pacs, header.StudyInstanceUID)
        assert answer["explanation"] == (f"{pacs.dicomweb}/studies/{header.StudyInstanceUID}/series/"
                                         f"{capture['SeriesInstanceUID']}/instances/{capture['SOPInstanceUID']}")
        assert capture["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] == header.SOPInstanceUID
        assert capture["SeriesInstanceUID"] not in (header.SeriesInstanceUID, report["SeriesInstanceUID"])
    # no overlay, and nothing of the headers (UIDs included), in the project, the logs or the temporary folder
    assert not (root / "overlays").exists()
    identifiers = {value for value in phi_values(root / "data" / "raw" / "demo") if value}
    identifiers |= {str(h[k].value) for h in headers for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    assert not [value for value in identifiers if value in remote.stderr]
    assert not [value for value in phi_values(root / "data" / "raw" / "demo") if value and value in remote.stdout]
    changed = [p for p, mtime in project_files(root).items() if before.get(p) != mtime]
    assert not [p for p in changed if any(value.encode() in p.read_bytes() for value in identifiers)]
    assert not [p for p in temp.rglob("*") if p.is_file()]


def test_explain_for_a_pacs_film_without_store_results_is_refused_before_anything_is_read(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    refused = cxr("predict", "--explain", str(tmp_path / "overlays"), "http://127.0.0.1:9/dicom-web/studies/1.2",
                  env={}, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: --explain with DICOMweb URLs stores each overlay back into its study as a Secondary Capture: add "
        "--store-results (overlays of PACS films are never written to the project)"]
    assert not (tmp_path / "overlays").exists()


def test_a_label_table_of_instances_on_a_pacs_is_ingested_once_with_patients_pseudonymised(pacs, tmp_path, monkeypatch):
    import pandas as pd
    import pydicom
    import yaml

    from pipeline.config import load_config
    from pipeline.deid import load_key, patient_hash
    from pipeline.demo_data import phi_values, write_demo_data
    from pipeline.ingest import ingest_stage
    from pipeline.paths import ProjectPaths
    from tests.conftest import tiny_params_text
    from tests.servers import FailingProxy

    write_demo_data(tmp_path / "films" / "data" / "raw" / "demo", n=12, seed=21, size=32)
    films = chest_films(tmp_path / "films", 4)
    unusable = pydicom.dcmread(films.pop(), stop_before_pixels=True)  # on the server, but its row has a bad label
    headers = [pydicom.dcmread(film, stop_before_pixels=True) for film in films]
    for film in chest_films(tmp_path / "films", 4):
        pacs.upload(film)
    asked: list[str] = []
    proxy = FailingProxy(pacs.root, fails=lambda method, path: asked.append(f"{method} {path}") and False)
    proxy.failing = True  # every request passes `fails` (which counts it) and goes on to Orthanc
    missing = "1.2.826.0.1.3680043.8.498.4242424242424242"
    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    pd.DataFrame({"sop_instance_uid": [h.SOPInstanceUID for h in headers] + [unusable.SOPInstanceUID, missing],
                  "label": [film.parent.name for film in films] + ["cardiomegaly", "normal"]}).to_csv(
        root / "data" / "raw" / "labels.csv", index=False)
    params = yaml.safe_load(tiny_params_text())
    params["data"]["sources"] = [{"path": "data/raw/labels.csv", "dicomweb": f"{proxy.url}/dicom-web",
                                  "match": "sop_instance_uid", "path_column": "sop_instance_uid"}]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    paths, config = ProjectPaths(root), load_config(root / "params.yaml")
    for name in ("CXR_DICOMWEB_TOKEN", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.raises(CxrError, match=r"^the DICOMweb server refused the instance search at .*HTTP 403.*TOKEN$"):
            ingest_stage(paths, config)  # not signed in: one line, and nothing written
        assert not paths.manifest.exists() and not list((paths.decode_cache / "dicomweb").glob("*.dcm"))
        monkeypatch.setenv("CXR_DICOMWEB_TOKEN", TOKEN)
        asked.clear()
        first = ingest_stage(paths, config)
        fetched, asked[:] = list(asked), []
        second = ingest_stage(paths, config, reassign_splits=True)  # writes everything again, from the cache
    finally:
        proxy.close()
    quarantine = pd.read_csv(paths.quarantine)
    # with every row retrieved, ingest needs neither the server (gone now) nor a sign-in
    labels = root / "data" / "raw" / "labels.csv"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:4]))
    monkeypatch.delenv("CXR_DICOMWEB_TOKEN")
    assert ingest_stage(paths, config).n_images == 3 and len(pd.read_csv(paths.quarantine)) == 0

    # each usable film was retrieved once (a search by UID, then WADO-RS), the unusable row's never; the second
    # ingest only asks again after the instance that was missing (it may have arrived since), and retrieves nothing
    retrievals = [request for request in fetched if "/studies/" in request]
    assert sorted(r.rsplit("/instances/", 1)[1] for r in retrievals) == sorted(h.SOPInstanceUID for h in headers)
    assert len(asked) == 1 and asked[0].startswith("GET /dicom-web/instances?") and missing in asked[0], asked
    assert (first.n_images, first.n_decoded, second.n_images, second.n_decoded) == (3, 3, 3, 0)
    key = load_key(root, config.deid.key_scope)
    manifest = pd.read_parquet(paths.manifest).sort_values("image_id")
    by_uid = {h.SOPInstanceUID: (h, film.parent.name) for h, film in zip(headers, films)}
    expected = sorted((patient_hash(str(h.PatientID), key), label) for h, label in by_uid.values())
    assert sorted(zip(manifest["patient_hash"], manifest["label"])) == expected
    assert set(manifest["format"]) == {"dicom"} and manifest["path"].str.startswith("redacted-").all()
    assert list(quarantine["reason"]) == ["label_not_in_set", "missing_instance"]
    assert quarantine["message"][1].startswith("data/raw/labels.csv line 6: SOP Instance UID 'redacted-")
    assert quarantine["message"][1].endswith(f"' is not on {proxy.url}/dicom-web")
    assert missing not in quarantine.to_csv() and quarantine["path"][1].startswith("redacted-")
    # no identifier of the headers, nor any UID the table names, in what ingest wrote
    identifiers = phi_values(tmp_path / "films" / "data" / "raw" / "demo") | {missing, unusable.SOPInstanceUID} | {
        str(h[k].value) for h in headers for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    written = [p for p in root.rglob("*") if p.is_file() and "dicomweb" not in p.parts and p.name != "labels.csv"]
    assert not [(p, v) for p in written for v in identifiers if v and v.encode() in p.read_bytes()]
    assert not [v for v in identifiers if v and v in quarantine.to_csv()]  # the second ingest's, rewritten since
    kept = list((paths.decode_cache / "dicomweb").iterdir())
    assert len(kept) == 3 and all(p.stat().st_mode & 0o077 == 0 for p in kept)
    # forgetting a patient deletes the instances retrieved for them, and only those
    from pipeline.forget import forget_patient

    patient = manifest["patient_hash"].iloc[0]
    forget_patient(paths, config, patient)
    left = sorted((paths.decode_cache / "dicomweb").iterdir())
    assert len(left) == 3 - (manifest["patient_hash"] == patient).sum() and set(left) < set(kept)


def test_a_film_out_of_scope_gets_an_sr_with_the_reason_and_no_probability(pacs, tmp_path):
    import pydicom

    from pipeline.demo_data import write_demo_data
    from pipeline.dicomweb import ReportedModel, open_client, parse_address, retrieve_films, store_results
    from pipeline.predict import Prediction

    write_demo_data(tmp_path / "data" / "raw" / "demo", n=12, seed=12, size=32)
    source = pydicom.dcmread(chest_films(tmp_path, 1)[0], stop_before_pixels=True)
    pacs.upload(chest_films(tmp_path, 1)[0])
    address = parse_address(f"{pacs.dicomweb}/studies/{source.StudyInstanceUID}")
    client = open_client(address.base_url, TOKEN)
    (tmp_path / "retrieved").mkdir()
    films = retrieve_films(client, address, tmp_path / "retrieved")
    refused = Prediction(path=films[0].url, out_of_scope="Modality CT is not one the model was trained on (CR, DX)")
    assert store_results(client, films, [refused], ReportedModel("cxr-pneumonia", "3", 0.5)) == [refused]
    [report] = pacs.reports(source.StudyInstanceUID)
    content = {item["ConceptNameCodeSequence"][0]["CodeMeaning"]: item.get("TextValue") for item in report["ContentSequence"]}
    assert content["Finding"] == "out of scope" and content["Out of scope"] == refused.out_of_scope
    assert "Probability" not in content and captures(pacs, source.StudyInstanceUID) == []
