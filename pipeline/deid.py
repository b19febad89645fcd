"""Patient identifiers become keyed hashes before anything is written.

The key (HMAC-SHA256) lives outside the data and the outputs, so a manifest that leaks cannot be
reversed by hashing a list of MRNs. The same key gives the same hash, so splits stay stable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

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


def redact(text: str, identifiers: tuple[str, ...], key: bytes) -> str:
    """Replace identifying header values (and a name's parts) found in a path or message by their keyed hash.

    PACS exports often name folders after the PatientID; the manifest and quarantine keep paths,
    so those must not carry it in clear.
    """
    variants: set[str] = set()
    for value in identifiers:
        variants.update({value, value.replace("^", "_"), value.replace("^", " "), value.replace("^", "")})
        variants.update(part for part in value.replace("^", " ").split() if len(part) >= 3)
    for variant in sorted((v for v in variants if len(v) >= 3), key=len, reverse=True):
        if variant in text:
            text = text.replace(variant, f"redacted-{patient_hash(variant, key)[:8]}")
    return text
