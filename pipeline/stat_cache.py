"""What ingest knows about files from their stat alone, so an unchanged archive re-ingests without reading it.

Two tables under data/cache, both local speed-ups that ingest rebuilds when they are missing or damaged:

- `file_hashes.parquet`: each source file's content key (pipeline.files.content_key: BLAKE3 of its bytes) by a
  keyed hash of its path (a PACS export's folders are named after patients), size, mtime, ctime and inode (git and
  DVC keep such a table). A file whose stat is unchanged is not read again. The ctime is there because no program
  can set it back: a file rewritten with the same size and its mtime restored (`os.utime`, `touch -r`, `cp -p`)
  still shows a new ctime. A hash taken less than RACY_NS after the file last changed is not kept (git's
  "racily clean" entries): a write within the same timestamp tick would leave its stat unchanged.
- `last_ingest.json`: the fingerprint of the last ingest's inputs (every listed film's path, label and hash, the
  data params, the de-identification key's fingerprint, the pipeline code) and the stat and sha256 of the outputs
  it wrote. When both still hold, ingest would write the same bytes again, so it keeps the outputs as they are.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.files import atomic_path, content_key_of, sha256_of, write_json

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000  # FAT keeps mtimes to 2 s; ext4, XFS and tmpfs tick every few milliseconds
StatKey = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
Seen = tuple[StatKey, int]  # a file's stat, and the time (ns) before it was read


def stat_key(path: Path) -> StatKey | None:
    """What a file's stat says about its bytes; None when it is not a regular file."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino


@dataclass
class FileHashes:
    """Content keys (pipeline.files.content_key) of files by their stat, loaded from and saved to one parquet table;
    files are known by a keyed hash of their path (`key`: the de-identification key), never by the path itself."""

    path: Path
    key: bytes
    known: dict[str, tuple[StatKey, str]] = field(default_factory=dict)
    _used: dict[str, tuple[StatKey, str]] = field(default_factory=dict)
    n_hashed: int = 0  # files read this run

    @classmethod
    def load(cls, path: Path, key: bytes) -> FileHashes:
        hashes = cls(path, key)
        if path.exists():
            try:
                table = pq.read_table(path).to_pydict()  # a nightly no-op reads this table whole: pyarrow, not pandas
                if "path" in table:  # written before paths were keyed: it names files in clear, so it goes
                    path.unlink()
                    return hashes
                if "file_key" not in table:  # sha256s, from before content keys: the decode cache knows none of them
                    return hashes
                hashes.known = {file: ((size, mtime, ctime, inode), file_key) for file, size, mtime, ctime, inode, file_key in zip(
                    table["path_hmac"], table["size"], table["mtime_ns"], table["ctime_ns"], table["inode"], table["file_key"],
                    strict=True)}
            except Exception as exc:  # damaged: every file is hashed again
                log.warning("ingest: %s is unreadable (%s); hashing every file again", path, type(exc).__name__)
        return hashes

    def remembered(self, file: Path) -> str | None:
        """The file's content key from the table when its stat is unchanged since it was hashed, else None."""
        name = self._name(file)
        known = self.known.get(name)
        if known is None or stat_key(file) != known[0]:
            return None
        self._used[name] = known
        return known[1]

    def key_of(self, file: Path) -> str | None:
        """The file's content key, from the table when its stat is unchanged; None when it is not a regular file or
        cannot be read (decoding then says why). Safe to call from several threads."""
        key = stat_key(file)
        if key is None:
            return None
        name = self._name(file)
        known = self.known.get(name)
        if known is not None and known[0] == key:
            self._used[name] = known
            return known[1]
        started = time.time_ns()
        try:
            digest = content_key_of(file)
        except OSError:  # e.g. no read permission: one file's problem, not the run's
            return None
        self.n_hashed += 1  # a counter for the log: a lost update under threads costs nothing
        self.learn(file, (key, started), digest)
        return digest

    def learn(self, file: Path, seen: Seen, digest: str) -> None:
        """Remember the content key of what was read from `file` after `seen` (its stat and the time before the read,
        from `before_reading`): a file changed after that stat shows another stat next run, so is read again; a
        hash taken within RACY_NS of its last change is not kept (the same timestamp tick may hide a change)."""
        key, started = seen
        if max(key[1], key[2]) < started - RACY_NS:
            self._used[self._name(file)] = (key, digest)

    @classmethod
    def add_to(cls, path: Path, key: bytes, learned: list[tuple[Path, Seen, str]]) -> None:
        """Add hashes taken elsewhere (decode workers hash the bytes they decode) to the table at `path`, keeping
        the entries it holds."""
        if not learned:
            return
        hashes = cls.load(path, key)
        hashes._used = dict(hashes.known)
        hashes.known = {}  # so save() writes
        for file, seen, digest in learned:
            hashes.learn(file, seen, digest)
        hashes.save()

    def save(self) -> None:
        """Keep the entries of the files seen this run (older ones are dropped); writes only when something changed."""
        if self._used == self.known:
            return
        entries = sorted(self._used.items())
        columns = {"path_hmac": [file for file, _ in entries]}
        for position, (name, kind) in enumerate((("size", pa.uint64()), ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()),
                                                 ("inode", pa.uint64()))):  # inode numbers may use all 64 bits
            columns[name] = pa.array([key[position] for _, (key, _) in entries], type=kind)
        columns["file_key"] = [file_key for _, (_, file_key) in entries]
        with atomic_path(self.path) as tmp:
            pq.write_table(pa.table(columns), tmp)
        self.known = dict(self._used)

    def _name(self, file: Path) -> str:
        """How the table knows a file: another key (or a rotated one) makes every file unknown, so hashed again."""
        return hmac.new(self.key, os.fsencode(file), hashlib.sha256).hexdigest()[:32]


def before_reading(file: Path) -> Seen | None:
    """A file's stat and the time it was taken, before another process reads the file (FileHashes.learn); None
    when it is not a regular file."""
    key = stat_key(file)
    return None if key is None else (key, time.time_ns())


@functools.cache  # the code this process runs is the code it imported
def code_fingerprint() -> str:
    """sha256 over the pipeline package's source, so a code change (an update, a branch switch) reruns ingest in full."""
    import pipeline

    digest = hashlib.sha256()
    package = Path(pipeline.__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def unchanged_ingest(record_path: Path, fingerprint: str, outputs: list[Path]) -> dict | None:
    """The recorded result when the last ingest had this fingerprint and its outputs are still the bytes it wrote.

    Outputs are compared by stat, and by sha256 when their stat changed (DVC may relink them after a run).
    """
    try:
        record = json.loads(record_path.read_text())
        if record["fingerprint"] != fingerprint or sorted(record["outputs"]) != sorted(map(str, outputs)):
            return None
        refreshed = False
        for output in outputs:
            recorded = record["outputs"][str(output)]
            key = stat_key(output)
            if key is None:
                return None
            if list(key) != recorded["stat"]:
                if sha256_of(output) != recorded["sha256"]:
                    return None
                recorded["stat"], refreshed = list(key), True
        if refreshed:
            write_json(record_path, record)
        return record["result"]
    except (OSError, ValueError, KeyError, TypeError):  # no record, or a damaged one: ingest in full
        return None


def record_ingest(record_path: Path, fingerprint: str, outputs: list[Path], result: dict) -> None:
    """Remember what this ingest read and wrote, for unchanged_ingest."""
    written = {str(output): {"stat": list(stat_key(output) or ()), "sha256": sha256_of(output)} for output in outputs}
    write_json(record_path, {"fingerprint": fingerprint, "outputs": written, "result": result})
