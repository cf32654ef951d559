"""Giving the memory of a finished job back to the operating system.

A job allocates and frees tens of arrays of 1-300 MB (volume, model grid, probabilities, labels,
SEG frames). glibc serves them from its heap once its dynamic mmap threshold has grown, and
keeps the freed pages: measured here, the service grew from 532 to 926 MB over 15 studies of
100x512x512 and stayed there. `malloc_trim` after each job returns them (flat at 532 MB over
the same 15 studies) and costs a few milliseconds. No Python or numpy API does this.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None
_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only; elsewhere a no-op


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when the C library did (glibc)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
