"""A cache of decoded, windowed, resized films, so re-ingesting after adding files decodes only the new ones.

Keyed by the content key (pipeline.files.content_key: BLAKE3) of each file's bytes, inside a folder named after
the preprocessing (image size, crop and decoder version). Pixels live in a few large .npy shard files (one per
ingest run that decoded something), never a file per image, each film read back by its row. Files that failed are
remembered with their reason, so they are not retried until they change. Only technical fields, sex and the age
band are cached: a DICOM's identity is re-read from its header each run, so the cache holds nothing identifying
(never an age or a birth date, and no film's name: a failure's message names it `{file}`).

A shard is named after its content and written atomically, so no two writers ever write the same name; one
left by a writer killed before it wrote the index is deleted when the cache is next opened.
Each film's index row carries a checksum of its file key, fields and pixels: a shard that is missing,
truncated or unreadable, a film that does not match its checksum, or an index that cannot be read is
logged as a warning and decoded again; the cache never serves another film's pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.deid import NO_IDENTITY, Identity
from pipeline.files import FILM_BUFFER_BYTES, atomic_path, write_npy_rows

log = logging.getLogger(__name__)

# Bump when decoding changes a film's stored pixels or fields (2: content-named shards, checksums; 3: sex and
# age_band; 4: JPEG and JPEG 2000 decoded at a reduced scale, sha256 of the decoded rather than the full-size
# pixels; 5: sha256 of the stored pixels; 6: files keyed by BLAKE3 rather than sha256, 8-bit
# PNGs averaged down before the resize; 7: blank judged on the stored pixels, so a flat film under fine noise is
# refused). A new version is a new folder, and ingest's fingerprint holds it, so
# every film decodes once again: a film stored before a change is never served, or de-duplicated, beside one
# stored after it.
CACHE_VERSION = 7
INDEX_COLUMNS = ("file_key", "shard", "row", "checksum")
FAILURE_COLUMNS = ("file_key", "reason", "message")


@dataclass(frozen=True)
class Decoded:
    """One decoded film: stored pixels, the manifest fields that come from decoding, and its header's identity as
    pseudonyms only (decode workers return these, and Prefect or Dask may persist or spill them)."""

    pixels: np.ndarray  # or, once ingest spooled it, a pipeline.ingest.SpooledFilm that numpy reads as the array
    fields: dict
    identity: Identity = NO_IDENTITY
    file_key: str | None = None  # content key of the file's bytes, when the decoder read them (never from the cache)


@dataclass(frozen=True)
class Failure:
    """Why one film could not be used. The message names the film `{file}` (FILE): whoever writes it puts in the
    film's redacted path, since only the whole run knows every identifier a path may hold."""

    reason: str
    message: str
    identity: Identity = NO_IDENTITY
    file_key: str | None = None  # content key of the file's bytes, when the decoder read them


FILE = "{file}"  # stands for the film's name in a failure's message


@dataclass
class DecodeCache:
    folder: Path
    index: pd.DataFrame = field(init=False)  # decoded films: file_key → shard, row, checksum and manifest fields
    failures: pd.DataFrame = field(init=False)  # failed files: file_key → reason, message

    def __post_init__(self) -> None:
        self._shards: dict[str, _Shard | None] = {}  # None: unreadable
        # _row's lookup: each file key's position in the index and the index's columns as arrays, made from the
        # index `_rows_of` (made again once the index is replaced)
        self._positions: dict[str, int] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._rows_of: pd.DataFrame | None = None
        self.index = _read_table(self.folder / "index.parquet", INDEX_COLUMNS)
        if self.index is None:  # its shards cannot be found without it: start over (_remove_leftovers deletes them)
            self.index = pd.DataFrame()
        self.failures = _read_table(self.folder / "failures.parquet", FAILURE_COLUMNS)
        if self.failures is None:
            self.failures = pd.DataFrame()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete what a writer killed halfway left: a shard the index does not name (written, and the process killed
        before the index was) and temporary files. They hold films' pixels that nothing reads and `cxr forget` would
        never find. Safe: whoever writes the cache holds the project lock, so no other writer is halfway now."""
        named = set(self.index["shard"]) if "shard" in self.index.columns else set()
        for path in [*self.folder.glob("shard-*.npy"), *self.folder.glob(".*.tmp*")]:
            if path.name not in named:
                path.unlink(missing_ok=True)

    @classmethod
    def for_size(cls, cache_root: Path, image_size: int, crop: str = "none") -> DecodeCache:
        """The cache of films made at this size and crop (data.crop): a cropped run never reads squeezed pixels,
        nor the reverse. `none` keeps the folder name it had before crops existed."""
        cropped = "" if crop == "none" else f"-{crop}"
        return cls(cache_root / f"decoded-{image_size}px{cropped}-v{CACHE_VERSION}")

    def is_empty(self) -> bool:
        """Whether it holds no film and no failure (a first ingest at this size and crop)."""
        return self.index.empty and self.failures.empty

    def has(self, file_key: str | None) -> bool:
        return file_key is not None and (file_key in self.index.index or file_key in self.failures.index)

    def drop_unreadable(self, file_keys: list[str | None]) -> None:
        """Forget the films of these keys whose shard is missing, truncated or unreadable, so they are decoded again."""
        if self.index.empty:
            return
        # As objects: pandas 3's Arrow strings make isin build a scalar per value it is given (8 µs each, 1.6 s for
        # 200,000 keys); object isin hashes them (0.5 µs).
        wanted = self.index[self.index.index.astype(object).isin([key for key in file_keys if key is not None])]
        bad = [shard for shard in wanted["shard"].unique() if self._shard(shard) is None]
        if bad:
            self._forget(self.index["shard"].isin(bad))
            for shard in bad:
                (self.folder / shard).unlink(missing_ok=True)

    def get(self, file_key: str) -> Decoded | Failure | None:
        """The cached outcome for a file's bytes. None when the cache does not hold it, or holds it damaged (then it
        is forgotten, with a warning naming the film by its content hash: its path may hold an identifier)."""
        if file_key in self.failures.index:
            entry = self.failures.loc[[file_key]].iloc[0]
            return Failure(entry["reason"], entry["message"])
        entry = self._row(file_key)
        if entry is None:
            return None
        shard = self._shard(entry["shard"])
        fields = {column: _plain(value) for column, value in entry.items() if column not in INDEX_COLUMNS}
        try:
            pixels = None if shard is None else shard.film(int(entry["row"]))
        except OSError as exc:  # the shard was truncated or removed since it was opened
            log.warning("decode cache: the film of file key %s… could not be read from %s (%s); decoding it again",
                        file_key[:12], entry["shard"], exc)
            pixels = shard = None
        if pixels is None or _checksum(file_key, fields, pixels) != entry["checksum"]:
            if shard is not None:
                log.warning("decode cache: the film of file key %s… does not match its checksum in %s; decoding it again",
                            file_key[:12], entry["shard"])
            self._forget(self.index.index == file_key)
            return None
        return Decoded(pixels=pixels, fields=fields)

    def _row(self, file_key: str) -> dict | None:
        """The index's row for a file key ({column: value}; the first, if an old cache holds the key twice), or None.

        Read from a position per key and the columns as arrays, made once per index: pandas' `.loc` of one key
        took about 1.4 ms, so a re-ingest after new films arrived spent 70 s fetching 50,000 cached films.
        """
        if self._rows_of is not self.index:  # the index was read, added to or trimmed since
            self._positions = {}
            for position, key in enumerate(self.index.index.tolist()):
                self._positions.setdefault(key, position)
            self._columns = {column: self.index[column].to_numpy() for column in self.index.columns}
            self._rows_of = self.index
        position = self._positions.get(file_key)
        if position is None:
            return None
        return {column: values[position] for column, values in self._columns.items()}

    def add(self, entries: list[tuple[str, Decoded | Failure]]) -> None:
        """Remember (file key, outcome) pairs: one new shard for the pixels, then the tables (all atomic)."""
        unique: dict[str, tuple[str, Decoded | Failure]] = {}
        for entry in entries:
            if not self.has(entry[0]):
                unique.setdefault(entry[0], entry)  # byte-identical files share one key: store it once
        entries = list(unique.values())
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        decoded = [(key, outcome) for key, outcome in entries if isinstance(outcome, Decoded)]
        if decoded:
            checksums: list[str] = []  # made as the shard is written: each film is read once (a spooled one from disk)

            def films():  # -> Iterator[np.ndarray]
                for key, outcome in decoded:
                    pixels = np.asarray(outcome.pixels)
                    checksums.append(_checksum(key, outcome.fields, pixels))
                    yield pixels

            shard_name = _write_shard(self.folder, films(), (len(decoded), *decoded[0][1].pixels.shape))
            rows = [{"file_key": key, "shard": shard_name, "row": row, "checksum": checksum, **outcome.fields}
                    for row, ((key, outcome), checksum) in enumerate(zip(decoded, checksums, strict=True))]
            self.index = _append(self.index, rows, self.folder / "index.parquet")
        failed = [{"file_key": key, "reason": outcome.reason, "message": outcome.message}
                  for key, outcome in entries if isinstance(outcome, Failure)]
        if failed:
            self.failures = _append(self.failures, failed, self.folder / "failures.parquet")

    def forget_films(self, pixel_sha256s: set[str]) -> int:
        """Remove every film whose stored pixels hash to one of `pixel_sha256s` (the manifest's sha256 column), and
        rewrite each shard that held one without it, so no copy of the pixels is left (`cxr forget`); how many."""
        if self.index.empty or "sha256" not in self.index.columns:
            return 0
        table = self.index.reset_index()
        gone = table["sha256"].isin(pixel_sha256s)
        if not gone.any():
            return 0
        touched = sorted(table.loc[gone, "shard"].unique())
        kept = table[~gone].copy()
        for name in touched:
            rows = kept.index[kept["shard"] == name]
            shard = self._shard(name) if len(rows) else None
            if shard is None:  # nothing else in it, or unreadable: its other films are decoded again
                kept = kept.drop(rows)
                continue
            films = (shard.film(int(row)) for row in kept.loc[rows, "row"])
            renamed = _write_shard(self.folder, films, (len(rows), *shard.shape[1:]))
            kept.loc[rows, "shard"], kept.loc[rows, "row"] = renamed, np.arange(len(rows))
        self.index = kept.set_index("file_key")
        with atomic_path(self.folder / "index.parquet") as tmp:  # the index first: it never names a missing shard
            kept.to_parquet(tmp, index=False)
        self._shards.clear()
        in_use = set(kept["shard"])
        for name in touched:
            if name not in in_use:
                (self.folder / name).unlink(missing_ok=True)
        return int(gone.sum())

    def _shard(self, name: str) -> _Shard | None:
        """A shard, or None (with a warning, once) when it is missing, truncated or unreadable."""
        if name not in self._shards:
            rows = self.index.loc[self.index["shard"] == name, "row"]
            try:
                shard = _Shard.open(self.folder / name)
                if len(shard.shape) != 3 or shard.shape[0] <= rows.max():
                    raise ValueError(f"{shard.shape[0]} films of shape {shard.shape[1:]}, the index expects {rows.max() + 1}")
            except (OSError, ValueError, EOFError) as exc:
                log.warning("decode cache: shard %s is missing, truncated or unreadable (%s); its %d films are decoded again",
                            name, exc, len(rows))
                shard = None
            self._shards[name] = shard
        return self._shards[name]

    def _forget(self, rows: np.ndarray | pd.Series) -> None:
        self.index = self.index[~np.asarray(rows)]
        with atomic_path(self.folder / "index.parquet") as tmp:
            self.index.reset_index().to_parquet(tmp, index=False)


@dataclass(frozen=True)
class _Shard:
    """Where a shard's films lie in its .npy file, each read by its row with one plain read. Not a memory map: the
    pages of one that were read count in the process's resident memory as long as it is open, so a re-ingest that
    served 200,000 cached films at 64 px through memory maps added their 800 MB to its peak."""

    path: Path
    offset: int  # where the first film starts, after the .npy header
    shape: tuple[int, ...]  # (films, *one film's shape)
    dtype: np.dtype

    @classmethod
    def open(cls, path: Path) -> _Shard:
        """The shard at `path`, its header read and its length checked (by numpy's own reader: no page of pixels
        is touched), or OSError / ValueError when it is missing, truncated or not an .npy of C-ordered films."""
        mapped = np.load(path, mmap_mode="r")
        if not isinstance(mapped, np.memmap) or not mapped.flags.c_contiguous:
            raise ValueError("not an .npy array in C order")
        return cls(path, mapped.offset, mapped.shape, mapped.dtype)

    def film(self, row: int) -> np.ndarray:
        """The film of `row`, an array of its own; OSError when the file no longer holds it whole."""
        pixels = np.empty(self.shape[1:], dtype=self.dtype)
        with self.path.open("rb") as handle:  # buffered: its readinto reads on until the film is whole or the file ends
            handle.seek(self.offset + row * pixels.nbytes)
            read = handle.readinto(pixels)
        if read != pixels.nbytes:
            raise OSError(f"the file ends before film {row}")
        return pixels


def _write_shard(folder: Path, films: Iterable[np.ndarray], shape: tuple[int, ...]) -> str:
    """Write `shape[0]` films of one shape to a new shard named after their bytes (BLAKE3, as np.stack(films).tobytes()
    would hash), streamed so no stacked copy is made; its name. Written under a temporary name, then renamed."""
    from blake3 import blake3

    digest = blake3(max_threads=1)
    tmp = folder / f".shard-writing.tmp{os.getpid()}.npy"  # its name is known only once it is written
    try:
        with tmp.open("wb", buffering=FILM_BUFFER_BYTES) as handle:
            write_npy_rows(handle, films, shape, digest)
        name = f"shard-{digest.hexdigest(length=16)}.npy"
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name


def _checksum(file_key: str, fields: dict, pixels: np.ndarray) -> str:
    """Ties a film's pixels and fields to its file key: a row served for another key, or damaged, cannot match."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(file_key.encode())
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    digest.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels))  # the array's buffer in place: no copy
    return digest.hexdigest()


def _read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """The table by file_key; empty when it does not exist, None (with a warning) when it cannot be read."""
    if not path.exists():
        return pd.DataFrame()
    try:
        table = pd.read_parquet(path)
        missing = set(columns) - set(table.columns)
        if missing:
            raise ValueError(f"no column {', '.join(sorted(missing))}")
        return table.set_index("file_key")
    except Exception as exc:  # any damage (pyarrow raises several types): rebuild rather than stop the run
        log.warning("decode cache: %s is unreadable (%s: %s); rebuilding it, so its films are decoded again",
                    path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        path.unlink(missing_ok=True)
        return None


def _append(table: pd.DataFrame, rows: list[dict], path: Path) -> pd.DataFrame:
    new = pd.DataFrame(rows).set_index("file_key")
    table = new if table.empty else pd.concat([table, new])
    with atomic_path(path) as tmp:
        table.reset_index().to_parquet(tmp, index=False)
    return table


def _plain(value):
    """numpy scalars from a parquet row back to Python values, so rows from the cache equal fresh ones."""
    return value.item() if isinstance(value, np.generic) else value
