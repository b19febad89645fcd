"""data/erasures.jsonl: the append-only record of patients erased by `cxr forget`.

One JSON object a line: when, the patient's pseudonym (a keyed hash: no identifier), the key_check of the key
that made it, and what was removed. Ingest reads it to skip the films of erased patients whose source files are
still there (quarantine reason `erased`), so a forgotten patient never silently comes back. The file is small and
holds no identifier, so git keeps it (deleting it would let such films return).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import CxrError


def read_erasures(path: Path) -> list[dict]:
    """Every entry of the record, oldest first; none when the file does not exist."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry["patient_hash"], entry["key_check"]  # noqa: B018 (both must be there)
        except (ValueError, KeyError, TypeError):
            raise CxrError(f"{path} line {number} is not an erasure entry; restore the file from git") from None
        entries.append(entry)
    return entries


def erased_patients(path: Path, key_check: str) -> dict[str, str]:
    """Pseudonyms (under the key with this key_check) of erased patients → when they were erased."""
    return {entry["patient_hash"]: entry["at"] for entry in read_erasures(path) if entry["key_check"] == key_check}


def append_erasure(path: Path, entry: dict) -> dict:
    """Append one entry (stamped with the time, UTC) and flush it to disk; the entry as written."""
    entry = {"at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return entry
