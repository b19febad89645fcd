"""Which files code opens, seen from outside it: Python's audit hooks record every `open` by any library that
opens through Python, and Parquet reads (which pyarrow does in C++, past the hooks) are recorded at pyarrow's
entry points. Tests use it to prove a file was not read, or that a stage declares every file it reads."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_recording: list[tuple[str, bool]] | None = None  # (path, opened for reading only) while inside `files_opened`


def _audit(event: str, args: tuple) -> None:
    if _recording is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        reading = not any(letter in mode for letter in "wax+")
    else:
        reading = (flags or 0) & os.O_ACCMODE == os.O_RDONLY
    _recording.append((os.fsdecode(args[0]), reading))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside `files_opened`


def _recorded_parquet(read: Callable[..., Any]) -> Callable[..., Any]:
    def recorded(source, *args, **kwargs):
        if _recording is not None and isinstance(source, (str, os.PathLike)):
            _recording.append((os.fsdecode(source), True))
        return read(source, *args, **kwargs)

    return recorded


@contextmanager
def files_opened(under: Path) -> Iterator[list[tuple[Path, bool]]]:
    """While inside, the files under `under` that were opened, as (path relative to `under`, for reading only)."""
    import pyarrow.parquet as pq

    global _recording
    opened: list[tuple[Path, bool]] = []
    readers = {name: getattr(pq, name) for name in ("read_table", "read_schema", "read_metadata")}
    _recording = []
    for name, read in readers.items():
        setattr(pq, name, _recorded_parquet(read))
    try:
        yield opened
    finally:
        recorded, _recording = _recording, None
        for name, read in readers.items():
            setattr(pq, name, read)
        root = under.resolve()
        for path, reading in recorded:
            absolute = Path(os.path.abspath(path)).resolve()
            if absolute.is_relative_to(root):
                opened.append((absolute.relative_to(root), reading))


def opened_during(action: Callable[[], Any], under: Path) -> tuple[Any, list[str]]:
    """What `action()` returns, and the files under `under` that it opened (as given to open)."""
    with files_opened(under) as opened:
        result = action()
    return result, sorted({str(under.resolve() / path) for path, _ in opened})
