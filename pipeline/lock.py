"""One writer at a time: the project lock, `.cxr.lock` at the project root, held around every stage that writes.

A second run on the same project (another `cxr` command, `dvc repro`, a scheduled flow) waits for the first,
saying once whom it waits for, and refuses with a one-line CxrError after `CXR_LOCK_TIMEOUT` seconds (600 by
default). The lock belongs to a process, not to a call: a process that holds it runs further stages without
waiting for itself (the flow runs every stage, from several threads). The operating system drops it when its
holder dies, so a killed run leaves nothing to clean up; `.cxr.lock.owner` only says who holds it.

Under torchrun every process runs the train stage; only local rank 0 takes the lock, since a rank waiting for
the lock while rank 0 waits for it in the process group would never return.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.errors import CxrError

log = logging.getLogger(__name__)

LOCK_FILE = ".cxr.lock"
OWNER_FILE = ".cxr.lock.owner"  # beside it: some filelock versions empty the lock file when a waiter opens it


@dataclass
class _Held:
    lock: object  # filelock.FileLock
    pid: int  # the process that acquired it (a forked child shares the OS lock but must never release it)
    depth: int = 1


_held: dict[Path, _Held] = {}
_guard = threading.Lock()


@contextmanager
def project_lock(root: Path) -> Iterator[None]:
    """Hold the project lock of `root` for the block: at once if this process holds it already, else after the
    run holding it ends (a one-line message while waiting); a CxrError when CXR_LOCK_TIMEOUT runs out."""
    from pipeline.distributed import torchrun_world

    if torchrun_world().local_rank != 0:
        yield
        return
    path = (Path(root) / LOCK_FILE).resolve()
    with _guard:  # one thread acquires at a time, so two threads of one process never wait for each other
        held = _held.get(path)
        if held is not None:
            held.depth += 1
        else:
            held = _held[path] = _Held(_acquire(path), os.getpid())
    try:
        yield
    finally:
        with _guard:
            held.depth -= 1
            if held.depth == 0 and held.pid == os.getpid():
                del _held[path]
                (path.parent / OWNER_FILE).unlink(missing_ok=True)
                held.lock.release()


def _acquire(path: Path):  # -> filelock.FileLock
    from filelock import FileLock, Timeout

    from pipeline.config import lock_timeout

    timeout = lock_timeout()
    lock = FileLock(path, thread_local=False)  # re-entrancy is counted above, per process
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for the run holding %s (%s)", path, _owner(path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise CxrError(
                f"another run holds {path} ({_owner(path)}) and did not finish within {timeout:g} s: let it finish "
                "or stop it, then run again (CXR_LOCK_TIMEOUT=SECONDS waits longer)"
            ) from None
    try:
        _write_owner(path.parent / OWNER_FILE)
    except OSError:
        pass  # the message loses its pid, the lock stays good
    return lock


def _write_owner(owner: Path) -> None:
    from pipeline.files import atomic_path

    command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    with atomic_path(owner) as tmp:
        tmp.write_text(json.dumps({"pid": os.getpid(), "started": started, "command": command[:200]}) + "\n")


def _owner(path: Path) -> str:
    """Who holds the lock, as the holder wrote it: 'pid N, started at …: command'."""
    try:
        owner = json.loads((path.parent / OWNER_FILE).read_text())
        return f"pid {owner['pid']}, started at {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
