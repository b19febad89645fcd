"""Atomic output writing: a stage that dies half-way never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

# The buffer of a file written or read a film at a time (the ingest spool, images.npy, decode-cache shards): one
# system call per MiB instead of one per film. A 64 px film is 4 KB, the size of a default buffer, so each write was
# a system call, and right after a film's decode one costs 20 to 40 µs here, about 1% of the film's ingest.
FILM_BUFFER_BYTES = 1 << 20


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


def write_npy_rows(handle: BinaryIO, rows: Iterable, shape: tuple[int, ...], digest=None) -> None:
    """Write a uint8 array of `shape` to an open file as .npy (the very bytes np.save writes) one row at a time, from
    `rows` (arrays of shape[1:]): nothing is stacked, so writing 200,000 films takes one film's memory, not a second
    copy of all of them. Plain writes, not a memory map, whose pages would count in the process's resident memory.
    `digest` (a hashlib or blake3 object), when given, is fed the data bytes as written (the decode cache names shards
    by them).
    """
    import numpy as np

    np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    written = 0
    for row in rows:
        data = np.ascontiguousarray(row, dtype=np.uint8)
        if data.shape != tuple(shape[1:]):
            raise ValueError(f"row {written} has shape {data.shape}, not {tuple(shape[1:])}")
        handle.write(data.data)
        if digest is not None:
            digest.update(data.data)
        written += 1
    if written != shape[0]:
        raise ValueError(f"{written} rows written, {shape[0]} declared")


def shown_path(path: str | os.PathLike) -> str:
    """A path as text every writer takes (Parquet, CSV, logs): bytes of a file name that are not UTF-8, which
    Python keeps as lone surrogates so the file can still be opened, are shown as backslash escapes (b'caf\\xe9'
    becomes 'caf\\xe9'). Valid names come back unchanged. Only for writing: open the original path."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the file name's own bytes
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def write_json(path: Path, data: Any) -> None:
    """Sorted, indented JSON so that reruns on the same inputs give the same bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes, 1 MiB at a time (checkpoints, image stores and films can be large): what the digests read."""
    with path.open("rb") as handle:
        yield from iter(lambda: handle.read(1 << 20), b"")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def content_key(data: bytes) -> str:
    """The key ingest knows a source file's bytes by (the decode cache, data/cache/file_hashes.parquet): BLAKE3,
    a cryptographic hash like sha256 but about six times faster on one core here (sha256 of a real JPEG's bytes
    took about 4% of its cold ingest, BLAKE3 takes about 1%). One thread: a decode worker stays on its core."""
    from blake3 import blake3

    return blake3(data, max_threads=1).hexdigest()


def content_key_of(path: Path) -> str:
    """content_key of a file's bytes, read in chunks (the same key as content_key of the whole content)."""
    from blake3 import blake3

    digest = blake3(max_threads=1)
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def md5_of(path: Path) -> str:
    """Hex md5 of a file's bytes: what DVC 3 records for a file output in dvc.lock and .dvc files."""
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file an earlier stage wrote; `what` names the stage to run when it is missing."""
    from pipeline.errors import CxrError

    if not path.exists():
        raise CxrError(f"{path} is missing: run {what} first")
    return json.loads(path.read_text())


def read_text_csv(path: Path):  # -> pd.DataFrame
    """A CSV the project wrote whose columns are text (image ids, hashes, paths, reasons), read as text: pandas would
    read an image id such as '123456e789012345' as a float and '0123456789012345' as an int (a keyed hash is one
    now and then, whatever the key), and an empty cell as NaN; here each stays the string it was written as."""
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)
