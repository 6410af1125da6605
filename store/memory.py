"""Giving memory back to the operating system after a large request or an adaptation job.

glibc's allocator keeps freed memory in per-thread arenas and at the top of each heap; a process
that served one large request would hold that peak for good. :func:`limit_arenas` caps the
number of arenas (as ``MALLOC_ARENA_MAX`` does) and :func:`release_memory` runs a garbage
collection and ``malloc_trim(0)``. Both do nothing where the C library is not glibc.

A full collection walks every object the process holds (after a few adaptation jobs, millions),
so it is run once per job, never per request: after a pass, :func:`release_pass_memory` collects
only the young generations (the objects made since the last collection: a pass's own) and trims.
A pass's arrays are freed by reference counting as soon as it ends; the trim returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from functools import lru_cache

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` (call before threads start); True if applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, count) == 1)


def release_memory() -> None:
    """Collect garbage and return the allocator's free memory to the operating system."""
    gc.collect()
    trim_memory()


def release_pass_memory() -> None:
    """Collect the young generations (0 and 1: a cost of the objects made since the last
    collection, not of everything held) and return the allocator's free memory to the system."""
    gc.collect(1)
    trim_memory()


def trim_memory() -> None:
    """Return the allocator's free memory to the operating system (``malloc_trim(0)``; no GC)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux ``/proc``), in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
