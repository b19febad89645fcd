"""Talking to a DICOMweb server: signing in, retrying a busy server, turning refusals into one-line errors, and
fetching one instance by its SOP Instance UID.

Shared by `cxr predict` on study URLs (pipeline.dicomweb) and by label tables whose films live on a server
(pipeline.sources); it imports neither, so a stage that reads data.sources does not depend on the predictor.
Sign-in comes from the environment (`pipeline.config.dicomweb_credentials`) and is never logged or shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import CxrError

ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)  # the instances as stored: no transcoding on the way


def open_client(base_url: str, credentials: tuple[str, str] | str | None):  # -> dicomweb_client.DICOMwebClient
    """A WADO-RS/STOW-RS client for `base_url`, signed in with HTTP basic (user, password) or a bearer token.
    A busy server (429, 503, 504) or a dropped connection is tried three times, 1 s and 2 s apart: the library's
    default (five times, up to 16 s apart) keeps a user waiting half a minute for a server that is down."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if isinstance(credentials, tuple):
        session.auth = credentials
    elif isinstance(credentials, str):
        session.headers["Authorization"] = f"Bearer {credentials}"
    client = DICOMwebClient(base_url, session=session)
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
    return client


def check_service_url(url: str, where: str = "") -> None:
    """A DICOMweb URL must be http(s) and hold no credentials: they would be echoed wherever the URL is (answers,
    logs, params.yaml, shell history). `where` (e.g. the params key) prefixes the error."""
    from urllib.parse import urlsplit

    prefix = f"{where}: " if where else ""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise CxrError(f"{prefix}a DICOMweb URL must not hold credentials ({parts.hostname}): set CXR_DICOMWEB_USER "
                       "and CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN, instead")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CxrError(f"{prefix}'{url}' is not a DICOMweb URL: expected http(s)://host[:port]/...")


@contextmanager
def answering(what: str, base_url: str) -> Iterator[None]:
    """Turn the server's refusals into one-line errors naming `what` was asked (never the credentials): 401/403
    say how to sign in, 404 that it is not there, a connection failure that the server did not answer."""
    import requests

    try:
        yield
    except requests.RequestException as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise CxrError(f"the DICOMweb server refused {what} (HTTP {status}): set CXR_DICOMWEB_USER and "
                           "CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN") from None
        if status == 404:
            raise CxrError(f"{what} was not found on its DICOMweb server (HTTP 404)") from None
        if status is not None:
            raise CxrError(f"the DICOMweb server answered HTTP {status} for {what}") from None
        raise CxrError(f"the DICOMweb server at {base_url} did not answer ({type(error).__name__})") from None


def fetch_instance(client, base_url: str, sop_uid: str, file: Path) -> bool:
    """Write the instance `sop_uid` as stored on the server to `file` (found with QIDO-RS, retrieved with WADO-RS);
    False when the server does not hold it. Refusals and silence are one-line errors (`answering`)."""
    with answering(f"the instance search at {base_url}", base_url):
        found = client.search_for_instances(search_filters={"SOPInstanceUID": sop_uid}, fields=["0020000D", "0020000E"])
    places = [(study, series) for match in found
              if (study := _value(match, "0020000D")) and (series := _value(match, "0020000E"))]
    if not places:
        return False
    with answering(f"an instance at {base_url}", base_url):
        dataset = client.retrieve_instance(*places[0], sop_uid, media_types=ANY_TRANSFER_SYNTAX)
    dataset.save_as(file, enforce_file_format=True)
    return True


def _value(match: dict, tag: str) -> str | None:
    """One attribute of a QIDO-RS answer (DICOM JSON), or None."""
    values = match.get(tag, {}).get("Value") or [None]
    return values[0]
