"""Atomic output writing: a stage that dies half-way never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    """Sorted, indented JSON so that reruns on the same inputs give the same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints and image stores can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_of(path: Path) -> str:
    """Hex md5 of a file's bytes: what DVC 3 records for a file output in dvc.lock and .dvc files."""
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file an earlier stage wrote; `what` names the stage to run when it is missing."""
    from pipeline.errors import CxrError

    if not path.exists():
        raise CxrError(f"{path} is missing: run {what} first")
    return json.loads(path.read_text())
