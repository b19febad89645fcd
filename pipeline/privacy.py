"""Outputs that hold film pixels are created readable by their owner only.

images.npy, the decode cache, report.html and Grad-CAM overlays carry the films themselves; on a shared machine
the usual umask (022) would let every local user read them. Each command and stage that writes runs under
`privacy.umask` (default 077: files 0600, folders 0700). The umask belongs to the process, so nested and
concurrent holders (the flow runs stages from several threads) share one setting, restored when the last leaves.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_guard = threading.Lock()
_holders = 0
_before = 0


@contextmanager
def private_umask(mask: int) -> Iterator[None]:
    """Run the block under umask `mask` (the first holder's mask, while several hold it), then restore the old one."""
    global _holders, _before
    with _guard:
        if _holders == 0:
            _before = os.umask(mask)
        _holders += 1
    try:
        yield
    finally:
        with _guard:
            _holders -= 1
            if _holders == 0:
                os.umask(_before)
