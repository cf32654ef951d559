"""Turns at a SQLite index's write lock, taken across the node's processes and handed over at once.

Why (issue 28): a SQLite writer that finds the database locked sleeps in SQLite's busy handler
(1, 2, 5, 10 ... ms between tries) while the holder needs about 0.3 ms. With four receivers
filing small instances at once a third of their `BEGIN IMMEDIATE`s waited 1 ms or more, and the
lock sat free while they slept. So before `BEGIN IMMEDIATE` a writer takes its turn here:

- the turn is an flock(2) on ``.<index>-writers``, beside the index as SQLite's ``-wal`` and
  ``-shm`` are, but hidden: a copy of ``index.sqlite*`` (the index with its WAL) must not open a
  named pipe, where it would wait for ever; the kernel lets the turn go when its holder dies,
  however it dies;
- that file is a named pipe: a holder writes one byte to it as it lets the turn go, and a writer
  waiting for its turn sleeps in poll(2) on it, so it wakes the moment the turn is free. A
  wake-up that is missed (a holder killed while it held the turn) costs one RECHECK_S;
- the wait is bounded: past its deadline the writer gets TurnTimeout (the index's callers get an
  index failure, as for a lock held too long); after its turn a writer still meets SQLite's busy
  timeout, but only a writer that takes no turn can keep it waiting there, and only for what is
  left of the same deadline (`node.store.index._busy_timeout_ms`).

SQLite's lock stays the one that decides: a writer that takes no turn (an older release, the
sqlite3 shell) is still waited for in SQLite's busy handler, and where the pipe cannot be made
(a read-only folder, a file system without named pipes, a plain file left at its path) writers go
without turns, as before, and say so in the log.

Written by hand: filelock, fasteners and portalocker wait for a held lock by sleeping and trying
again, which is what this replaces, and a blocking flock(2) cannot be given a timeout.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import time
import weakref

from common import logs

log = logging.getLogger("node.store")
RECHECK_S = 0.01  # a waiter tries again this often even without a wake-up
_DRAIN_BYTES = 1 << 16  # a pipe's capacity on Linux: one read empties it


class TurnTimeout(TimeoutError):
    """The turn was not free before the deadline."""


class WriterTurns:
    """This process's turns at the write lock of one SQLite index. One writer of this process
    at a time (the Index's own thread lock sees to that)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._wake = select.poll()  # (select(2) takes no descriptor above 1023)
        self._wake.register(fd, select.POLLIN)
        self.close = weakref.finalize(self, os.close, fd)

    @classmethod
    def beside(cls, index_path: str) -> WriterTurns | None:
        """The turns of the index at `index_path`; None (logged) where the pipe cannot be made:
        this process's writers then go without turns, as before."""
        folder, name = os.path.split(index_path)
        fd = _open_pipe(os.path.join(folder, f".{name}-writers"), index_path)
        return cls(fd) if fd is not None else None

    def take(self, deadline: float) -> None:
        """Wait for the turn until `deadline` (time.monotonic()); TurnTimeout past it."""
        fd = self._fd
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TurnTimeout()
            self._wake.poll(max(1, int(min(left, RECHECK_S) * 1000)))
            try:  # the wake-ups so far: whoever finds the turn free takes it, the others wait again
                os.read(fd, _DRAIN_BYTES)
            except BlockingIOError:
                pass

    def give(self) -> None:
        """Let the turn go and wake the writers waiting for it. Never fails: it follows a COMMIT
        (an error here is logged; a turn this process could not let go ends with its process)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.write(self._fd, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups nobody waited for: a waiter wakes anyway
            pass
        except OSError as exc:
            logs.event(log, "index_writer_turn_not_given", logging.ERROR, error=exc.strerror or type(exc).__name__)


def _open_pipe(path: str, index_path: str) -> int | None:
    """The named pipe at `path`, made if missing (with the index file's permissions and, made by
    root, its owner, as SQLite makes its -wal and -shm files: whichever of the node's processes
    comes first, the others can open it), open for reading and writing without blocking; None
    (logged) where that cannot be."""
    try:
        try:
            os.mkfifo(path, 0o644)  # SQLite's mode for a new database file (the umask applies to both)
            try:
                index = os.stat(index_path)
            except FileNotFoundError:  # a new index: SQLite makes its file at the first connection
                pass
            else:
                os.chmod(path, index.st_mode & 0o666)
                if os.geteuid() == 0:
                    os.chown(path, index.st_uid, index.st_gid)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError as exc:
        logs.event(log, "index_writer_turns_unavailable", logging.WARNING, path=path,
                   error=exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__))
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # poll(2) would find a plain file always readable
        os.close(fd)
        logs.event(log, "index_writer_turns_unavailable", logging.WARNING, path=path, error="not a named pipe")
        return None
    return fd
