"""Patient identifiers become keyed hashes before anything is written.

The key (HMAC-SHA256) lives outside the data and the outputs, so a manifest that leaks cannot be
reversed by hashing a list of MRNs. The same key gives the same hash, so splits stay stable.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline import config


def load_key() -> bytes:
    """CXR_DEID_KEY if set, else the key file (created once, readable by its owner only)."""
    from_env = config.deid_key_from_env()
    if from_env:
        return from_env
    key_file = config.deid_key_file()
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        os.replace(tmp, key_file)
    return key_file.read_text().strip().encode()


def patient_hash(patient_id: str, key: bytes) -> str:
    """A 20-hex-character keyed hash: unique enough for grouping, useless without the key."""
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def key_check(key: bytes) -> str:
    """A short fingerprint of the key (its hash of a text no patient ID is), so the split registry can tell that
    its pseudonyms came from another key; it reveals no more than any pseudonym does."""
    return patient_hash("\x00cxr split registry key check", key)[:12]


IDENTIFIER_MIN_CHARS = 3  # shorter values (a name's initial, "DX") would redact half of every path
IDENTIFIER_MAX_CHARS = 64  # the longest DICOM UID; longer runs of a path are never one identifier
_FINE = re.compile(r"[^\W\d_]+|\d+")  # runs of letters or of digits: "MRN7730100" → "MRN", "7730100"
_COARSE = re.compile(r"[^\W_]+")  # runs of letters and digits: "MRN7730100_1.dcm" → "MRN7730100", "1", "dcm"


@dataclass(frozen=True)
class Identity:
    """What a film's header says about whom it shows, as keyed pseudonyms only: made where the header is read (in
    the decode worker), so no raw identifier crosses a process, task or network boundary.

    `patient` is the PatientID's pseudonym (patient_hash: the manifest's patient_hash); `hashes` the pseudonyms of
    every identifying value and a name's parts (identifier_hashes), which let Redactor find them in any path.
    """

    patient: str | None = None
    hashes: frozenset[str] = frozenset()


NO_IDENTITY = Identity()  # PNG, JPEG, npz films, and DICOMs read without a key


def identity_of(patient_id: str | None, values: Iterable[str], key: bytes) -> Identity:
    """An Identity from raw header values (PatientID, names, dates, accession number, UIDs), which die here."""
    return Identity(patient_hash(patient_id, key) if patient_id else None, identifier_hashes(values, key))


def identifier_hashes(values: Iterable[str], key: bytes) -> frozenset[str]:
    """Keyed pseudonyms of identifying values and of a person name's parts ("DOE^JOHN": also DOE and JOHN), each
    compared by its letters and digits only, ignoring case: "MRN-7730100" in a folder name is "mrn7730100" too."""
    hashes = set()
    for value in values:
        # the value, a name's parts, and long digit runs (the MRN inside "XMRN7730100", which no word boundary shows)
        for variant in (value, *re.split(r"[\^=\s]+", value), *re.findall(r"\d{6,}", value)):
            text = _normalised(variant)
            if IDENTIFIER_MIN_CHARS <= len(text) <= IDENTIFIER_MAX_CHARS:
                hashes.add(_identifier_hash(text, key))
    return frozenset(hashes)


def _normalised(text: str) -> str:
    return "".join(_COARSE.findall(text)).casefold()


def _identifier_hash(normalised: str, key: bytes) -> str:
    """Keyed BLAKE2b (a MAC, five times faster than HMAC-SHA256: Redactor hashes every run of words of every path)
    under a subkey of its own, so an identifier's pseudonym is never equal to a patient_hash or an image_id."""
    return hashlib.blake2b(normalised.encode("utf-8"), key=_subkey(key), digest_size=10).hexdigest()


@functools.lru_cache(maxsize=4)
def _subkey(key: bytes) -> bytes:
    return hmac.digest(key, b"cxr identifier", "sha256")  # 32 bytes: BLAKE2b takes at most 64, a key file may hold more


class Redactor:
    """Replaces every identifier the run learned (by its pseudonym: the raw values are gone) found in a path or a
    message by `redacted-` and 8 characters of its pseudonym.

    An identifier is found when a run of whole words of the text, or of letter and digit runs inside a word,
    equals it by letters and digits, ignoring case: "MRN7730100", "mrn_7730100" and "IMG7730100" (for the ID
    7730100) are found; glued into a longer word ("XMRN7730100"), only its run of 6 or more digits is.
    """

    MAX_WORDS = 32  # a DICOM UID is at most 32 numbers

    def __init__(self, hashes: Iterable[str], key: bytes) -> None:
        self.hashes = frozenset(hashes)
        self.key = key
        self._parts: dict[str, str] = {}

    def path(self, path: str) -> str:
        """A relative path, folder by folder (folders repeat across films, so each is redacted once)."""
        return "/".join(self._part(part) for part in path.split("/"))

    def text(self, text: str) -> str:
        """Any text, e.g. a quarantine message."""
        if not self.hashes:
            return text
        found, tried = [], set()
        for pattern in (_COARSE, _FINE):
            words = [(m.start(), m.end(), m.group().casefold()) for m in pattern.finditer(text)]
            for first in range(len(words)):
                joined = ""
                for last in range(first, min(first + self.MAX_WORDS, len(words))):
                    joined += words[last][2]
                    if len(joined) > IDENTIFIER_MAX_CHARS:
                        break
                    span = (words[first][0], words[last][1])
                    if len(joined) >= IDENTIFIER_MIN_CHARS and span not in tried:  # a coarse word may be a fine one
                        tried.add(span)
                        pseudonym = _identifier_hash(joined, self.key)
                        if pseudonym in self.hashes:
                            found.append((*span, pseudonym))
        kept, end = [], -1
        for start, stop, pseudonym in sorted(found, key=lambda match: (match[0], -match[1])):  # longest first
            if start >= end:
                kept.append((start, stop, pseudonym))
                end = stop
        for start, stop, pseudonym in reversed(kept):
            text = f"{text[:start]}redacted-{pseudonym[:8]}{text[stop:]}"
        return text

    def _part(self, part: str) -> str:
        if part not in self._parts:
            self._parts[part] = self.text(part)
        return self._parts[part]
