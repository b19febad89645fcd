"""DICOMweb in and out: classify the films of a study or series on a PACS, and store the answers back there.

`cxr predict` takes `http://host/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]` beside files.
The instances are retrieved with WADO-RS into a private temporary folder that is removed afterwards, and classified
by `pipeline.predict.predict_files` exactly as local files are; each answer is named by the instance's WADO-RS URL
(its SOP Instance UID), never by a patient identifier. With `store_results`, each classified film gets one DICOM
Comprehensive SR (new Series and SOP Instance UIDs, referencing the film) stored with STOW-RS into the same study
on the same server, and with `explain` also a Grad-CAM Secondary Capture (the overlay as RGB): the results go back
only where the films came from, and nothing of the headers is written to the project's outputs (the overlays are
drawn in the temporary folder, never in the project, and an answer names its capture by its instance URL). Sign-in comes from the environment (`pipeline.config.dicomweb_credentials`) and is never logged.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.dicomweb_client import (
    ANY_TRANSFER_SYNTAX,
    answering,
    check_service_url,
    open_client,
)
from pipeline.errors import CxrError
from pipeline.imaging import DecodeLimits
from pipeline.predict import Prediction, predict_files

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^(?P<base>https?://[^?#]+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
_RESULT_SERIES_NUMBER = 9901
_OVERLAY_SERIES_NUMBER = 9902
# What a result in the film's study must repeat of the film's header (the Type 2 attributes of the Patient and
# General Study modules), so the PACS files it with the film: nothing else of the header is copied. Keyword →
# highdicom's argument name.
_STUDY_ATTRIBUTES = {"PatientName": "patient_name", "PatientID": "patient_id", "PatientBirthDate": "patient_birth_date",
                     "PatientSex": "patient_sex", "AccessionNumber": "accession_number", "StudyID": "study_id",
                     "StudyDate": "study_date", "StudyTime": "study_time", "ReferringPhysicianName": "referring_physician_name"}


@dataclass(frozen=True)
class DicomwebAddress:
    """A study, or one series of it, on a DICOMweb server; `base_url` is the service root (…/dicom-web)."""

    base_url: str
    study_uid: str
    series_uid: str | None = None

    def instance_url(self, series_uid: str, sop_uid: str) -> str:
        """The WADO-RS URL of one instance: how a retrieved film is named in answers."""
        return f"{self.base_url}/studies/{self.study_uid}/series/{series_uid}/instances/{sop_uid}"

    def __str__(self) -> str:
        series = f"/series/{self.series_uid}" if self.series_uid else ""
        return f"{self.base_url}/studies/{self.study_uid}{series}"


@dataclass(frozen=True)
class RemoteFilm:
    """One retrieved instance: its file in the temporary folder, its URL, and its header without pixels (what the
    result SR references and takes its patient and study module from, for the same PACS only)."""

    file: Path
    url: str
    address: DicomwebAddress
    header: object  # pydicom.Dataset


@dataclass(frozen=True)
class ReportedModel:
    """What a result SR says produced it."""

    name: str
    version: str
    threshold: object  # a float, {label: float} (multilabel) or None (multiclass), as the model stores it


def is_url(text: str) -> bool:
    """True for an http(s) address: such an input is a DICOMweb study or series, never a local path."""
    return text.lower().startswith(("http://", "https://"))


def parse_address(text: str) -> DicomwebAddress:
    """A study or series URL, checked; anything else is a clear error naming it. Credentials inside the URL are
    refused: they would be echoed wherever the URL is (answers, logs, shell history)."""
    check_service_url(text)
    match = _ADDRESS.match(text)
    if match is None:
        raise CxrError(f"{text} is not a DICOMweb study or series URL: expected "
                       "http(s)://host/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]")
    return DicomwebAddress(match["base"], match["study"], match["series"])


def retrieve_films(client, address: DicomwebAddress, folder: Path) -> list[RemoteFilm]:
    """Every film of the study or series, written to `folder` as <SOPInstanceUID>.dcm; instances without pixel
    data (reports, key objects) are skipped. An empty study or series is a clear error naming the URL."""
    from pydicom.uid import UID

    with answering(str(address), address.base_url):
        if address.series_uid is None:
            instances = client.iter_study(address.study_uid, media_types=ANY_TRANSFER_SYNTAX)
        else:
            instances = client.iter_series(address.study_uid, address.series_uid, media_types=ANY_TRANSFER_SYNTAX)
        films = []
        for dataset in instances:
            if "PixelData" not in dataset:
                continue
            sop_uid = str(dataset.SOPInstanceUID)
            if not UID(sop_uid).is_valid:  # it becomes a file name: a UID is digits and dots, nothing else
                raise CxrError(f"{address} holds an instance whose SOP Instance UID is not a valid UID")
            file = folder / f"{sop_uid}.dcm"
            dataset.save_as(file, enforce_file_format=True)
            del dataset.PixelData
            films.append(RemoteFilm(file, address.instance_url(str(dataset.SeriesInstanceUID), sop_uid), address, dataset))
    if not films:
        raise CxrError(f"{address} holds no images to classify")
    log.info("dicomweb: retrieved %d film(s) from %s", len(films), address.base_url)
    return films


def predict_dicomweb(model, addresses: list[DicomwebAddress], credentials: tuple[str, str] | str | None,
                     identity: ReportedModel | None = None, explain: bool = False,
                     limits: DecodeLimits = DecodeLimits()) -> list[Prediction]:
    """Retrieve each address's films into a private temporary folder, classify them as local files, name each
    answer by its instance URL, and with `identity` store one result SR per classified film back into its study
    (with `explain`, also its Grad-CAM overlay as a Secondary Capture, which the answer's `explanation` names by
    its instance URL; without `identity` no overlay is drawn, since it could go nowhere but the project). The folder (it holds the films, headers and all, and their overlays) is removed as soon as
    the results are stored, whatever happens."""
    answers: list[Prediction] = []
    for address in addresses:
        client = open_client(address.base_url, credentials)
        with tempfile.TemporaryDirectory(prefix="cxr-dicomweb-") as folder:  # mode 0700; one study's films at a time
            films = retrieve_films(client, address, Path(folder))
            overlays = Path(folder) / "overlays" if explain and identity is not None else None
            predictions = predict_files(model, [film.file for film in films], explain_dir=overlays, limits=limits)
            named = [_named_by_url(p, film) for p, film in zip(predictions, films)]
            if identity is not None:
                named = store_results(client, films, named, identity)
        answers += named
    return answers


def store_results(client, films: list[RemoteFilm], predictions: list[Prediction], identity: ReportedModel) -> list[Prediction]:
    """One result SR per answered film (a probability, or out of scope and why), and a Grad-CAM Secondary Capture
    for each that has an overlay PNG (`explanation`), stored with STOW-RS into the film's study. Returns the
    answers as stored: `explanation` is the capture's WADO-RS URL (the PNG, in the temporary folder, is not kept)."""
    instances, answers = [], []
    for film, prediction in zip(films, predictions):
        if prediction.error is not None:
            answers.append(prediction)
            continue
        instances.append(result_report(film, prediction, identity))
        capture = overlay_capture(film, Path(prediction.explanation)) if prediction.explanation else None
        if capture is not None:
            instances.append(capture)
            url = film.address.instance_url(str(capture.SeriesInstanceUID), str(capture.SOPInstanceUID))
            prediction = replace(prediction, explanation=url)
        answers.append(prediction)
    if instances:
        with answering(str(films[0].address), films[0].address.base_url):
            client.store_instances(instances, study_instance_uid=films[0].address.study_uid)
        log.info("dicomweb: stored %d result instance(s) in %s", len(instances), films[0].address.base_url)
    return answers


def result_report(film: RemoteFilm, prediction: Prediction, identity: ReportedModel):  # -> highdicom.sr.ComprehensiveSR
    """A Comprehensive SR in the film's study: a new series and instance, the film as source image, and the
    finding, probability (or why the film is out of scope), threshold and model name and version as text, so any
    PACS viewer can show it."""
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        ContainerContentItem,
        ImageContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS

    def text(name, value: str) -> TextContentItem:
        return TextContentItem(name=name, value=value, relationship_type=contains)

    if prediction.out_of_scope is not None:  # an answer, not a probability: the reason instead
        answer = [text(codes.DCM.Finding, "out of scope"),
                  text(CodedConcept("OUT_OF_SCOPE", "99CXR", "Out of scope"), prediction.out_of_scope)]
    else:
        if prediction.probabilities is None:
            probability = f"{prediction.probability:.4f}"
        else:
            probability = "; ".join(f"{label}={p:.4f}" for label, p in prediction.probabilities.items())
        answer = [text(codes.DCM.Finding, prediction.label or "none of the labels"), text(codes.DCM.Probability, probability)]
    items = [
        ImageContentItem(name=codes.DCM.SourceOfMeasurement, referenced_sop_class_uid=film.header.SOPClassUID,
                         referenced_sop_instance_uid=film.header.SOPInstanceUID, relationship_type=contains),
        *answer,
        text(CodedConcept("THRESHOLD", "99CXR", "Decision threshold"), json.dumps(identity.threshold)),
        text(codes.DCM.AlgorithmName, identity.name),
        text(codes.DCM.AlgorithmVersion, identity.version),
    ]
    root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    report = hd.sr.ComprehensiveSR(evidence=[_as_evidence(film.header)], content=root, series_instance_uid=hd.UID(),
                                   series_number=_RESULT_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                   manufacturer="cxr-pipeline", series_description="cxr classifier result")
    return report


def overlay_capture(film: RemoteFilm, overlay: Path):  # -> highdicom.sc.SCImage
    """The Grad-CAM overlay PNG as an RGB Secondary Capture in the film's study: a new series and instance, the
    film as its source image, and of the film's header only what DICOM needs for the same study (_STUDY_ATTRIBUTES)
    and the film's own patient orientation (the overlay keeps its rows and columns; a caption strip is added
    below, so the capture says it has burned-in text)."""
    import highdicom as hd
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset

    with Image.open(overlay) as png:
        pixels = np.asarray(png.convert("RGB"))
    header = film.header
    capture = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced below by the film's own (or none)
        study_instance_uid=header.StudyInstanceUID, series_instance_uid=hd.UID(), series_number=_OVERLAY_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cxr-pipeline",
        **{argument: header.get(keyword) or None for keyword, argument in _STUDY_ATTRIBUTES.items()},
    )
    capture.PatientOrientation = header.get("PatientOrientation", "")
    capture.SeriesDescription = "cxr Grad-CAM overlay"
    capture.DerivationDescription = "Grad-CAM heat map of the classifier's evidence over the film, with its answer"
    capture.BurnedInAnnotation = "YES"
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    capture.SourceImageSequence = [source]
    return capture


def reported_model(model, model_uri: str, paths) -> ReportedModel:  # paths: pipeline.paths.ProjectPaths
    """The registered name and version behind `model_uri` (models:/name@alias or models:/name/version); any other
    URI is named as given, with its run id as the version."""
    from pipeline import tracking

    threshold = model.metadata.metadata.get("threshold")
    match = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", model_uri)
    if match is None:
        return ReportedModel(model_uri, f"run {model.metadata.run_id}", threshold)
    name, alias, version = match.groups()
    if alias is not None:
        version = tracking.client(paths).get_model_version_by_alias(name, alias).version
    return ReportedModel(name, str(version), threshold)


def _as_evidence(header):  # -> pydicom.Dataset
    """The film's header with the patient and study attributes an SR must carry (Type 2) present, empty when the
    film lacks them, so highdicom can copy them into the report."""
    evidence = header.copy()
    for keyword in _STUDY_ATTRIBUTES:
        if keyword not in evidence:
            setattr(evidence, keyword, "")
    return evidence


def _named_by_url(prediction: Prediction, film: RemoteFilm) -> Prediction:
    """The answer named by the instance URL; an error message that quotes the temporary file quotes the URL."""
    error = prediction.error.replace(str(film.file), film.url) if prediction.error is not None else None
    return replace(prediction, path=film.url, error=error)
