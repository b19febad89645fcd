"""A cache of decoded, windowed, resized films, so re-ingesting after adding files decodes only the new ones.

Keyed by the sha256 of each file's bytes, inside a folder named after the preprocessing (image size and
decoder version). Pixels live in a few large memory-mapped shard files (one per ingest run that decoded
something), never a file per image. Files that failed are remembered with their reason, so they are not
retried until they change. Only technical fields are cached: patient identifiers are re-read from the
headers each run, so the cache holds nothing identifying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.files import atomic_path

CACHE_VERSION = 1  # bump when decoding changes what a film's stored pixels are


@dataclass(frozen=True)
class Decoded:
    """One decoded film: stored pixels plus the manifest fields that come from decoding.

    `patient_id` and `identifiers` are raw header values for hashing and redaction, held in memory only.
    """

    pixels: np.ndarray
    fields: dict
    patient_id: str | None = None
    identifiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    """Why one film could not be used; identifiers are kept only to redact them from what is written."""

    reason: str
    message: str
    identifiers: tuple[str, ...] = ()


FILE = "{file}"  # stands for the film's name in a cached failure message


@dataclass
class DecodeCache:
    folder: Path
    index: pd.DataFrame = field(init=False)  # decoded films: file_key → shard, row and manifest fields
    failures: pd.DataFrame = field(init=False)  # failed files: file_key → reason, message

    def __post_init__(self) -> None:
        self.index = _read_table(self.folder / "index.parquet")
        self.failures = _read_table(self.folder / "failures.parquet")
        self._shards: dict[str, np.ndarray] = {}

    @classmethod
    def for_size(cls, cache_root: Path, image_size: int) -> DecodeCache:
        return cls(cache_root / f"decoded-{image_size}px-v{CACHE_VERSION}")

    def has(self, file_key: str | None) -> bool:
        return file_key is not None and (file_key in self.index.index or file_key in self.failures.index)

    def get(self, file_key: str, name: str) -> Decoded | Failure | None:
        """The cached outcome for a file's bytes; `name` goes into a failure's message."""
        if file_key in self.failures.index:
            entry = self.failures.loc[[file_key]].iloc[0]
            return Failure(entry["reason"], entry["message"].replace(FILE, name))
        if file_key not in self.index.index:
            return None
        entry = self.index.loc[[file_key]].iloc[0]  # [[key]]: one row even if an old cache holds a key twice
        shard = self._shards.get(entry["shard"])
        if shard is None:
            shard = self._shards[entry["shard"]] = np.load(self.folder / entry["shard"], mmap_mode="r")
        fields = {column: _plain(value) for column, value in entry.items() if column not in ("shard", "row")}
        return Decoded(pixels=np.asarray(shard[int(entry["row"])]), fields=fields)

    def add(self, entries: list[tuple[str, str, Decoded | Failure]]) -> None:
        """Remember (file key, film name, outcome) triples: one new shard for the pixels, then the tables (all atomic)."""
        unique: dict[str, tuple[str, str, Decoded | Failure]] = {}
        for entry in entries:
            if not self.has(entry[0]):
                unique.setdefault(entry[0], entry)  # byte-identical files share one key: store it once
        entries = list(unique.values())
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        decoded = [(key, outcome) for key, _, outcome in entries if isinstance(outcome, Decoded)]
        if decoded:
            shard_name = f"shard-{len(list(self.folder.glob('shard-*.npy'))):05d}.npy"
            with atomic_path(self.folder / shard_name) as tmp, tmp.open("wb") as handle:
                np.save(handle, np.stack([outcome.pixels for _, outcome in decoded]))
            rows = [{"file_key": key, "shard": shard_name, "row": row, **outcome.fields} for row, (key, outcome) in enumerate(decoded)]
            self.index = _append(self.index, rows, self.folder / "index.parquet")
        failed = [{"file_key": key, "reason": outcome.reason, "message": outcome.message.replace(name, FILE)}
                  for key, name, outcome in entries if isinstance(outcome, Failure)]
        if failed:
            self.failures = _append(self.failures, failed, self.folder / "failures.parquet")


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).set_index("file_key") if path.exists() else pd.DataFrame()


def _append(table: pd.DataFrame, rows: list[dict], path: Path) -> pd.DataFrame:
    new = pd.DataFrame(rows).set_index("file_key")
    table = new if table.empty else pd.concat([table, new])
    with atomic_path(path) as tmp:
        table.reset_index().to_parquet(tmp, index=False)
    return table


def _plain(value):
    """numpy scalars from a parquet row back to Python values, so rows from the cache equal fresh ones."""
    return value.item() if isinstance(value, np.generic) else value
