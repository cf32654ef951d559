"""Memory for a volume, made ready on another core while the series' headers are parsed.

Why (issue 28): the first write to fresh memory costs the page faults that give it pages, and
on a virtual machine whose host takes back what the guest frees those are dear. Measured on the
benchmark machine: writing a new 157 MB array (a 300x512x512 CT) took 0.37-0.42 s, nearly all
of it system time; the same write into pages just faulted in took 0.008 s. A job's volume is
fresh memory every time (the service gives a finished job's memory back, node.jobs.heap), and
its size is known once the first header is parsed. So a second thread faults its pages in
(madvise MADV_POPULATE_WRITE, Linux 5.14 and later: the faults of a write, without the write,
in one system call that waits without the GIL) while this one parses the other headers.

The pages' contents are never written by the advice: reading frames into the buffer while it
still runs is safe (a page already there is left as it is). Where the kernel does not know the
advice the buffer is ordinary memory, faulted in by its first write as before. Written by
hand: neither numpy nor the standard library populates memory (Python's mmap.madvise holds the
GIL through the call and knows no MADV_POPULATE_WRITE before 3.13).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import threading

import numpy as np

log = logging.getLogger("inference")

MADV_POPULATE_WRITE = 23  # include/uapi/asm-generic/mman-common.h
# Below this a volume's faults cost too little to be worth a thread (a 50x256x256 MR is 6.5 MB).
MIN_BYTES = 16 << 20
CHUNK_BYTES = 32 << 20  # a multiple of the page size
_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True)
_MADVISE = getattr(_LIBC, "madvise", None)
if _MADVISE is not None:
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _MADVISE.restype = ctypes.c_int


class PrefaultedBuffer:
    """`nbytes` of memory whose pages a thread is faulting in; `take` hands them over once."""

    def __init__(self, nbytes: int):
        self._buffer: np.ndarray | None = np.empty(nbytes, dtype=np.uint8)
        self._unwanted = threading.Event()  # let go untaken: the thread stops at its next chunk
        self._thread = threading.Thread(target=_populate, args=(self._buffer, self._unwanted), name="prefault",
                                        daemon=True)
        self._thread.start()

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes if self._buffer is not None else 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The buffer as an array of `shape` and `dtype` when it is exactly that size, else None;
        either way this object lets go of it (one volume takes it at most)."""
        buffer, self._buffer = self._buffer, None
        if buffer is None or buffer.nbytes != math.prod(shape) * np.dtype(dtype).itemsize:
            self._unwanted.set()
            return None
        return buffer.view(dtype).reshape(shape)

    def release(self) -> None:
        """Let go of the buffer if no volume took it (the thread's hold ends with its chunk)."""
        if self._buffer is not None:
            self._buffer = None
            self._unwanted.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the thread is done: every page faulted in, the buffer let go, or the advice declined."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def prefaulted(nbytes: int) -> PrefaultedBuffer | None:
    """A buffer being made ready, or None where it is not worth it (small) or not possible (no
    memory or no thread to spare now: the volume then allocates its memory as before)."""
    if nbytes < MIN_BYTES or _MADVISE is None:
        return None
    try:
        return PrefaultedBuffer(nbytes)
    except (MemoryError, RuntimeError) as exc:  # RuntimeError: can't start new thread (a pids limit)
        log.debug("prefault skipped: %s", type(exc).__name__)
        return None


def _populate(buffer: np.ndarray, unwanted: threading.Event) -> None:
    """In chunks, so that memory let go untaken is not filled further (a series that fails to
    load). A series that turns out to hold several volumes (echoes, time points) is only known
    once every header is parsed, by when the thread has usually faulted the whole buffer in: that
    work is lost, and each volume's memory is faulted in by its own first write as before."""
    start = buffer.ctypes.data & ~(_PAGE - 1)
    end = buffer.ctypes.data + buffer.nbytes
    while start < end and not unwanted.is_set():
        length = min(CHUNK_BYTES, end - start)
        if _MADVISE(start, length, MADV_POPULATE_WRITE) != 0:  # EINVAL before Linux 5.14: faulted on first write
            log.debug("prefault declined: errno %d", ctypes.get_errno())
            return
        start += length
