"""Patient identifiers become keyed hashes before anything is written.

The key (HMAC-SHA256) lives outside the data and the outputs, so a manifest that leaks cannot be
reversed by hashing a list of MRNs. The same key gives the same hash, so splits stay stable.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import config
from pipeline.errors import CxrError

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 32  # 128 bits of hex; an empty key makes the pseudonym an unkeyed, reversible sha256
ENV_KEY = "CXR_DEID_KEY"
ROTATE_HINT = "a project already ingested with it moves to a new key with `cxr key rotate --new-key-file NEW`"


def load_key(root: Path | None = None, scope: config.KeyScope = "user", *, strict: bool = True) -> bytes:
    """The de-identification key: CXR_DEID_KEY if set, else the key file of `scope` (created on first use).

    Refused with a one-line CxrError when it could not keep a pseudonym secret: shorter than MIN_KEY_CHARS, or a
    key file that is a symlink, not a regular file, or readable or writable by group or others. Callers load the
    key before they write anything, so a refused key leaves no output behind. `strict=False` accepts a short key
    (only `cxr key rotate`, to retire such a key), never an exposed file.
    """
    from_env = config.deid_key_from_env()
    if from_env is not None:
        return _checked(from_env, ENV_KEY, strict)
    key_file = config.deid_key_file(root, scope)
    if not os.path.lexists(key_file):
        create_key_file(key_file)
    return read_key_file(key_file, strict=strict)


def read_key_file(path: Path, *, strict: bool = True) -> bytes:
    """A key file's key, refused when the file is a symlink, not a regular file, open to group or others, or (with
    `strict`) shorter than MIN_KEY_CHARS."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the run
    except FileNotFoundError:
        raise CxrError(f"de-identification key file {path} does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise CxrError(f"de-identification key file {path} is a symlink; a key file must be the file itself "
                           f"(replace the link by the file it points to, mode 600)") from None
        raise CxrError(f"de-identification key file {path} cannot be read ({exc.strerror})") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise CxrError(f"de-identification key file {path} is not a regular file")
        if found.st_mode & 0o077:
            raise CxrError(f"de-identification key file {path} has mode {stat.S_IMODE(found.st_mode):03o}: group or "
                           f"others can use it; `chmod 600 {path}`, and if anyone else could have read it, "
                           f"{ROTATE_HINT}")
        if found.st_uid != os.getuid():
            raise CxrError(f"de-identification key file {path} belongs to another user (uid {found.st_uid}); a key "
                           f"file must be owned by the user running cxr")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(4096)
    finally:
        os.close(fd)
    return _checked(raw.strip(), str(path), strict)


def _checked(key: bytes, where: str, strict: bool) -> bytes:
    """The key, when long enough to be a secret (characters counted as written)."""
    if not key:
        raise CxrError(f"de-identification key {where} is empty; an empty key makes pseudonyms reversible: give at "
                       f"least {MIN_KEY_CHARS} random characters, e.g. the output of `python -c 'import secrets; "
                       f"print(secrets.token_hex(32))'`")
    try:
        length = len(key.decode("utf-8"))
    except UnicodeDecodeError:
        raise CxrError(f"de-identification key {where} is not UTF-8 text; write it as hex, e.g. the output of "
                       f"`python -c 'import secrets; print(secrets.token_hex(32))'`") from None
    if strict and length < MIN_KEY_CHARS:
        raise CxrError(f"de-identification key {where} has {length} characters, fewer than {MIN_KEY_CHARS}: a short "
                       f"key can be guessed; give at least {MIN_KEY_CHARS} random characters (`python -c 'import "
                       f"secrets; print(secrets.token_hex(32))'`); {ROTATE_HINT}")
    return key


def create_key_file(path: Path) -> bytes:
    """Write a new random key to `path` (which must not exist), mode 0600, fsync'd, and say once where it is.

    The key is written to a temporary file opened with O_CREAT | O_EXCL | O_NOFOLLOW and then hard-linked into
    place, which fails rather than replace a file: two runs creating the key at once keep the first one's, and no
    reader ever sees a half-written key.
    """
    key = secrets.token_hex(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = write_private_file(path.parent, key + b"\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return read_key_file(path)  # another run created it first: theirs is the key
    finally:
        tmp.unlink()
    fsync_folder(path.parent)
    log.warning("de-identification key created at %s (mode 600); back it up: pseudonyms made with it can be matched "
                "by no other key", path)
    return key


def install_key_file(path: Path, key: bytes) -> None:
    """Replace the key file at `path` by one holding `key` in one atomic rename (mode 0600, fsync'd)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = write_private_file(path.parent, key + b"\n")
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def write_private_file(folder: Path, content: bytes) -> Path:
    """A new file in `folder` holding `content`, mode 0600 whatever the umask, on disk (fsync'd); its path."""
    tmp = folder / f".deid.key.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def fsync_folder(folder: Path) -> None:
    """Make a rename or link in `folder` durable (its entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    return frozenset(_identifier_hash(text, key) for text in _identifier_texts(values))


def _identifier_texts(values: Iterable[str]) -> Iterator[str]:
    """What identifier_hashes hashes: each value, a name's parts and long digit runs (the MRN inside "XMRN7730100",
    which no word boundary shows), by letters and digits, casefolded, where their length is an identifier's."""
    for value in values:
        for variant in (value, *re.split(r"[\^=\s]+", value), *re.findall(r"\d{6,}", value)):
            text = _normalised(variant)
            if IDENTIFIER_MIN_CHARS <= len(text) <= IDENTIFIER_MAX_CHARS:
                yield text


def _normalised(text: str) -> str:
    return "".join(_COARSE.findall(text)).casefold()


def _identifier_hash(normalised: str, key: bytes) -> str:
    """Keyed BLAKE2b (a MAC, five times faster than HMAC-SHA256: Redactor hashes every run of words of every path)
    under a subkey of its own, so an identifier's pseudonym is never equal to a patient_hash or an image_id.
    Redactor.text makes the same hash a word at a time from the same keyed state (UTF-8 of the joined words)."""
    digest = _identifier_mac(key).copy()  # the keyed state, copied: half the cost of keying BLAKE2b for each run
    digest.update(normalised.encode("utf-8"))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _identifier_mac(key: bytes):  # -> hashlib.blake2b, keyed and empty (never updated itself: only its copies are)
    subkey = hmac.digest(key, b"cxr identifier", "sha256")  # 32 bytes: BLAKE2b takes at most 64, a key file may hold more
    return hashlib.blake2b(key=subkey, digest_size=10)


class Redactor:
    """Replaces every identifier the run learned (by its pseudonym: the raw values are gone) found in a path or a
    message by `redacted-` and 8 characters of its pseudonym.

    An identifier is found when a run of whole words of the text, or of letter and digit runs inside a word,
    equals it by letters and digits, ignoring case: "MRN7730100", "mrn_7730100" and "IMG7730100" (for the ID
    7730100) are found; glued into a longer word ("XMRN7730100"), only its run of 6 or more digits is.
    """

    def __init__(self, hashes: Iterable[str], key: bytes, lengths: Iterable[int] | None = None) -> None:
        """`lengths`: the lengths of the identifiers behind every one of `hashes`, when all are known; only runs
        of those lengths are then hashed (redacting the file names of a folder of JPEGs takes half the time).
        None, as for a header's pseudonyms, which come without theirs: runs of every length are."""
        self.hashes = frozenset(hashes)
        self._digests = frozenset(bytes.fromhex(pseudonym) for pseudonym in self.hashes)  # compared as bytes
        self._mac = _identifier_mac(key)
        self._lengths = None if lengths is None else frozenset(lengths)
        self._longest = IDENTIFIER_MAX_CHARS if self._lengths is None else max(self._lengths, default=0)
        self._parts: dict[str, str] = {}

    @classmethod
    def from_values(cls, values: Iterable[str], key: bytes, header_hashes: frozenset[str] = frozenset()) -> Redactor:
        """A Redactor for raw identifying values (as identifier_hashes takes them) and headers' pseudonyms. Each
        value is normalised once: its pseudonym and its length come from the same text. The lengths (in memory
        only, never written) let it hash only runs as long as an identifier, unless a header named anyone: a
        header's pseudonyms come without their lengths, so then it hashes every run."""
        texts = set(_identifier_texts(values))
        hashes = {_identifier_hash(text, key) for text in texts} | header_hashes
        return cls(hashes, key, None if header_hashes else {len(text) for text in texts})

    def path(self, path: str) -> str:
        """A relative path, folder by folder (folders repeat across films, so each is redacted once)."""
        return "/".join(self._part(part) for part in path.split("/"))

    def text(self, text: str) -> str:
        """Any text, e.g. a quarantine message.

        One pass over the runs of letter and digit runs (_FINE) tries the runs of whole words (_COARSE) too: a
        word's boundaries are boundaries of its letter and digit runs, and both runs join the same characters. A
        run ends at IDENTIFIER_MAX_CHARS characters (a 64-character DICOM UID has at most 32 numbers), or at the
        longest identifier's length when the lengths are known. Each run starting at a word is hashed as it grows,
        a word at a time (a hash's digest leaves it open to more), so a name of w words costs w keyed states and
        one update and digest per run, not a hash of each run anew.
        """
        if not self.hashes:
            return text
        words = []  # (start, stop, characters, UTF-8): each word encoded once, then joined into many runs
        for match in _FINE.finditer(text):
            word = match.group().casefold()
            words.append((match.start(), match.end(), len(word), word.encode("utf-8")))
        found = []
        lengths, longest = self._lengths, self._longest
        for first, (start, _, _, _) in enumerate(words):
            state, length = self._mac.copy(), 0
            for _, stop, chars, word in words[first:first + longest]:  # a word has a character at least
                length += chars
                if length > longest:
                    break
                state.update(word)
                if (length >= IDENTIFIER_MIN_CHARS and (lengths is None or length in lengths)
                        and state.digest() in self._digests):
                    found.append((start, stop, state.hexdigest()))
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
