"""The intake journal: a new instance made durable with one fdatasync instead of three syncs.

Why (issue 28): on one association the node waited more than it computed. Each new instance's
file was fsynced (0.37-0.75 ms on this disk), then its folder (0.13 ms), before the
acknowledgement. Now the file is written and renamed into ``studies/`` without a sync, its bytes
are written once more into this process's journal, a zero-filled file overwritten in place, and
the journal alone is fdatasync'ed before the acknowledgement (0.25 ms for 64 KB measured; a file
over RECORD_MAX_BYTES, where the second copy costs more than that saves, is fsynced). Behind
the acknowledgements a checkpoint makes the files durable themselves (one syncfs(2) of the
spool's file system for all of them) and only then retires their records. Two segments take
turns: records go to one while the other's files are synced, so the checkpoint never holds up an
acknowledgement.

After a crash `replay` (at start-up before reconcile, and on any journal a process claims) checks
each record against its path: the very file it recorded (same inode, and same inode generation:
ext4 gives a freed inode number to the next new file at once) with other bytes, or no file there
at all, is written again from the record, durably, with its modification time; another file
there was put there since by a replacement, which is made durable the ordinary way, and stays.
A record whose path is blocked (a file holds a folder's name, a folder or a link holds the
file's) goes to quarantine/ with its path instead; any other failure (disk full, I/O error)
stops the start and the journal stays for the next. Then every recorded file is made durable
and the journal emptied. Of a journal of this boot (a process restarted) each file still the
recorded one is written again from its record, as a new file exchanged for it in one step
(`_written_again`: a sync alone would not write the pages a failed write-back left in the page
cache), and one removed or replaced since is left as it is.

Each process holds its journal by flock(2) on its slot's lock file: a live replica's journal on a
shared spool is never replayed by another, and a dead process's is claimed and replayed by the
next. Written by hand: neither the standard library nor a maintained package keeps a write-ahead
log of files, and SQLite's WAL would take the bytes through the index's single write lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from common import logs

log = logging.getLogger("node.store")
MAGIC = b"DNJ2"
# magic, fill (a random id of the segment's current fill), sequence, inode, inode generation (-1:
# none known), mtime_ns, data length, path length, crc32 of the path and the data (taken outside
# the lock), crc32 of the header before it
HEADER = struct.Struct("<4sQQQqqIHII")
# The first layout (no generation), still read: a journal a crash left under the previous version
HEADER_V1 = struct.Struct("<4sQQQqIHII")
_LAYOUTS = {MAGIC: HEADER, b"DNJ1": HEADER_V1}
SLOTS = 64  # journals one spool holds: a receiver process, or a service, each
GROW_BYTES = 4 << 20  # a segment is zero-filled this much at a time, as far as its capacity
REPLAY_COUNTS = ("records", "restored", "superseded", "quarantined")
SWITCH_WAIT_S = 30.0  # an append waits this long at most for the other segment's checkpoint
# A file larger than this (file meta and data set) is made durable by the fsyncs of its file and
# folder instead: a record copies, checksums and writes its bytes a second time, which for a CT
# image (512 KB) costs more than the file system's flush of the file itself (side by side, CT:
# 1.23x the rate over one association, 1.34x over four; 257 KB over one: the same; 128 KB: the
# journal 1.16x over one association, 0.83x over four; README, Performance)
RECORD_MAX_BYTES = 256 << 10
_PATH_MAX_BYTES = 256  # a record's path: studies/ and three UIDs of up to 64 characters, .dcm (210)
_ZEROS = bytes(1 << 20)
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)  # glibc 2.28 and later
_SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_WRITE_FAILED = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# moves a file into quarantine/ with its reason, under a name given (Spool.quarantine_file)
Quarantine = Callable[[Path, str, str], Path]
_LONG = ctypes.sizeof(ctypes.c_long)
FS_IOC_GETVERSION = (2 << 30) | (_LONG << 16) | (ord("v") << 8) | 1  # _IOR('v', 1, long): the inode's generation


@dataclass(frozen=True)
class FileIdentity:
    """Which file a name held. An inode number alone does not say: ext4 gives a freed number to
    the next new file at once (measured), so the generation the file system draws for each new
    inode goes with it; -1 where FS_IOC_GETVERSION is not answered (tmpfs, overlayfs, NFS, CIFS),
    and then the number alone decides (on overlayfs over ext4, a container's spool not on a
    volume, the numbers are ext4's: the reuse above is not told apart there)."""

    inode: int
    generation: int
    mtime_ns: int

    def same_file(self, other: FileIdentity) -> bool:
        return self.inode == other.inode and (
            self.generation == other.generation or -1 in (self.generation, other.generation))

    def unchanged(self, other: FileIdentity) -> bool:
        """The same file, not written since (its mtime tells that, too, where no generation does)."""
        return self.same_file(other) and self.mtime_ns == other.mtime_ns


class NotARegularFile(ValueError):
    """Something other than a regular file holds the name (a folder, a link, a FIFO...)."""


def identify_open(fd: int) -> FileIdentity:
    """The identity of the open file `fd`."""
    st = os.fstat(fd)
    try:  # the kernel writes an int, in the machine's order, into the long the request names
        generation = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(_LONG))[:4], sys.byteorder)
    except OSError:  # ENOTTY: not answered on this file system
        generation = -1
    return FileIdentity(st.st_ino, generation, st.st_mtime_ns)


def identify(path: Path | str) -> FileIdentity | None:
    """The identity of the regular file at `path`; None if nothing is there (nor a folder on the
    way). NotARegularFile if something else holds the name; any other error is raised (nothing
    can be said: an I/O error, no descriptor left)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise NotARegularFile(f"not a regular file: {path}")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO swapped in does not block
        except BlockingIOError:  # a lease held on the file (NFS, Samba): lstat said it is a regular file
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link or a socket swapped in since the lstat
            raise NotARegularFile(f"not a regular file: {path}") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"not a regular file: {path}")
        return identify_open(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Record:
    fill: int
    seq: int
    path: str  # relative to the spool's root
    file: FileIdentity  # the file placed there
    data: memoryview


class _Segment:
    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.offset = 0
        self.fill = 0
        self.pending = 0  # records not yet checkpointed
        self.since = 0.0  # when its first pending record was written (monotonic)

    @classmethod
    def pair(cls, folder: Path, slot: str) -> list[_Segment]:
        """A slot's two segments, opened (created if new); neither is left open if one fails."""
        first = cls(folder / f"{slot}-a.wal")
        try:
            return [first, cls(folder / f"{slot}-b.wal")]
        except BaseException:
            os.close(first.fd)
            raise

    def renew(self) -> None:
        self.offset, self.fill, self.pending, self.since = 0, int.from_bytes(os.urandom(8), "little"), 0, 0.0

    def grow(self, needed: int, capacity: int) -> None:
        """Zero-fill ahead of the writes (an overwrite's fdatasync writes no metadata), durably."""
        target = min(capacity, -(-needed // GROW_BYTES) * GROW_BYTES)
        while self.size < target:
            step = min(len(_ZEROS), target - self.size)
            self.size += os.pwrite(self.fd, _ZEROS[:step], self.size)
        os.fdatasync(self.fd)

    def records(self) -> Iterator[_Record]:
        """The chain of whole records from the start of the segment, as a crash left it."""
        data = memoryview(_read_whole(self.fd, self.size))
        offset, fill = 0, None
        while offset + HEADER_V1.size <= len(data):
            layout = _LAYOUTS.get(bytes(data[offset:offset + 4]))
            if layout is None or offset + layout.size > len(data):
                return
            fields = layout.unpack_from(data, offset)
            if layout is HEADER_V1:  # no generation recorded
                fields = (*fields[:4], -1, *fields[4:])
            magic, this_fill, seq, inode, generation, mtime_ns, size, path_len, body_crc, head_crc = fields
            end = offset + layout.size + path_len + size
            if (zlib.crc32(data[offset:offset + layout.size - 4]) != head_crc
                    or (fill is not None and this_fill != fill) or end > len(data)):
                return
            body = data[offset + layout.size:end]
            if zlib.crc32(body) != body_crc:
                return  # torn: never acknowledged (a later record's fdatasync would have written it)
            fill = this_fill
            path = bytes(body[:path_len]).decode("utf-8", "replace")
            yield _Record(this_fill, seq, path, FileIdentity(inode, generation, mtime_ns), body[path_len:])
            offset = end

    def retire(self) -> None:
        """Its records are satisfied: the chain's first header is zeroed, durably."""
        if self.size:
            os.pwrite(self.fd, bytes(HEADER.size), 0)
            os.fdatasync(self.fd)
        self.renew()


class IntakeJournal:
    """This process's journal under `root`/journal, claimed at its first record; `segment_bytes`
    each; `quarantine` keeps what a replay of a claimed journal cannot write back."""

    def __init__(self, root: Path, segment_bytes: int, quarantine: Quarantine, checkpoint_s: float = 0.5):
        self.root = Path(root)
        self.quarantine = quarantine
        self.folder = self.root / "journal"
        self.segment_bytes = segment_bytes
        self.checkpoint_s = checkpoint_s
        self._cond = threading.Condition()
        self._segments: list[_Segment] = []
        self._lock_fd: int | None = None
        self._root_fd: int | None = None  # syncfs on one descriptor for the journal's life: errors reach it
        self._active = 0
        self._seq = 0
        self._switch_asked = False
        self._closing = False
        self._unusable = False
        self._thread: threading.Thread | None = None

    def takes(self, size: int) -> bool:
        """Whether a file of `size` bytes is made durable by a record (else by its own fsync), a
        record's path being at most _PATH_MAX_BYTES long."""
        return size <= RECORD_MAX_BYTES and HEADER.size + _PATH_MAX_BYTES + size <= self.segment_bytes

    def record(self, relative: str, placed: FileIdentity, chunks: Sequence[bytes | memoryview]) -> bool:
        """Make the file placed at `relative` (the rename done, its bytes `chunks`) durable before
        the acknowledgement: its record written and the journal fdatasync'ed. False: the journal
        does not take it (a file over RECORD_MAX_BYTES or a segment, closed, unusable): the
        caller syncs the file. The first call claims a slot either way, replaying what a dead
        predecessor left there."""
        path = relative.encode()
        size = sum(memoryview(c).nbytes for c in chunks)
        need = HEADER.size + len(path) + size
        taken = size <= RECORD_MAX_BYTES and need <= self.segment_bytes
        body_crc = zlib.crc32(path)
        for chunk in chunks if taken else ():  # before the lock: 20 µs for 64 KB (none for a file not taken)
            body_crc = zlib.crc32(chunk, body_crc)
        with self._cond:
            if self._closing or self._unusable:
                return False
            try:
                if not self._segments:
                    self._claim()
                if not taken:
                    return False
                segment = self._room(need)
                if segment is None:
                    return False
                if segment.offset + need > segment.size:
                    segment.grow(segment.offset + need, self.segment_bytes)
                self._seq += 1
                head = HEADER.pack(MAGIC, segment.fill, self._seq, placed.inode, placed.generation, placed.mtime_ns,
                                   size, len(path), body_crc, 0)[:-4]
                head += zlib.crc32(head).to_bytes(4, "little")
                written = os.pwritev(segment.fd, [head, path, *chunks], segment.offset)
                if written != need:
                    raise OSError(errno.EIO, "short write to the intake journal")
            except OSError as exc:
                self._give_up(exc)
                return False
            segment.offset += need
            segment.pending += 1
            if not segment.since:
                segment.since = time.monotonic()
                self._cond.notify_all()
            fd = segment.fd
        try:
            os.fdatasync(fd)  # outside the lock: appends of other associations go on meanwhile
        except OSError as exc:
            with self._cond:
                self._give_up(exc)
            return False
        with self._cond:  # Linux reports a write error to one fdatasync of the file only
            return not self._unusable

    def close(self) -> None:
        """Checkpoint what is pending and let the slot go (a process that ends cleanly leaves an
        empty journal; one that does not leaves it to the next claim's replay)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:  # no append writes once _closing is set; one still syncing gets EBADF and syncs its file
            for segment in self._segments:
                os.close(segment.fd)
            for fd in (self._lock_fd, self._root_fd):
                if fd is not None:
                    os.close(fd)  # the lock's: releases the flock
            self._segments, self._lock_fd, self._root_fd = [], None, None

    # -- inside: under self._cond ---------------------------------------------------------------------

    def _claim(self) -> None:
        self.folder.mkdir(exist_ok=True)
        fsync_dir(self.root)
        for slot in range(SLOTS):
            fd = _try_lock(self.folder / f"{slot}.lock")
            if fd is None:
                continue
            try:
                self._segments = _Segment.pair(self.folder, str(slot))
                replay(self.root, str(slot), self._segments, fd, self.quarantine)
                os.pwrite(fd, _boot_id(), 0)  # whose records these are: in the same boot replay only writes files again
                os.fsync(fd)
                self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:
                for segment in self._segments:
                    os.close(segment.fd)
                self._segments = []
                os.close(fd)
                raise
            self._lock_fd = fd
            self._thread = threading.Thread(target=self._checkpoints, name=f"journal-{slot}", daemon=True)
            self._thread.start()
            return
        raise OSError(errno.EBUSY, f"all {SLOTS} intake journal slots are held")

    def _room(self, need: int) -> _Segment | None:
        """The active segment, once it has room for `need` bytes (a full one is switched for the
        other as soon as that one's checkpoint is done)."""
        deadline = time.monotonic() + SWITCH_WAIT_S
        while True:
            segment = self._segments[self._active]
            if segment.offset + need <= self.segment_bytes:
                return segment
            self._switch_asked = True
            self._cond.notify_all()
            left = deadline - time.monotonic()
            if left <= 0 or self._unusable or self._closing:
                return None
            self._cond.wait(left)

    def _give_up(self, exc: Exception) -> None:
        """After a failed write or sync nothing says what reached the disk (fsync errors are not
        repeated): no more records; what is recorded stays for the next start's replay."""
        if not self._unusable:
            self._unusable = True
            logs.event(log, "intake_journal_unusable", logging.ERROR,
                       error=getattr(exc, "strerror", None) or type(exc).__name__)
        self._cond.notify_all()

    # -- the checkpoint thread ------------------------------------------------------------------------

    def _checkpoints(self) -> None:
        while True:
            with self._cond:
                while True:
                    active = self._segments[self._active]
                    due = active.since and time.monotonic() - active.since >= self.checkpoint_s
                    if self._unusable or (self._closing and not active.pending):
                        return
                    if active.pending and (due or self._switch_asked or self._closing):
                        break
                    self._cond.wait(self.checkpoint_s if active.pending else None)
                self._active ^= 1  # the other is empty: this thread retires a segment before it switches again
                self._switch_asked = False
                self._cond.notify_all()
            try:
                _make_durable(self._root_fd)
                active.retire()
            except Exception as exc:  # noqa: BLE001 - an OSError, or a segment too large to read back
                with self._cond:  # (MemoryError): never a checkpoint thread gone and the journal on
                    self._give_up(exc)
                return


def replay(root: Path, slot: str, segments: Sequence[_Segment], lock_fd: int, quarantine: Quarantine) -> dict[str, int]:
    """Put back what a crash took of the recorded files, make them all durable, empty the segments.

    Only a journal written before the machine's last boot can have lost a file's name or inode
    (a process that dies leaves its files to the page cache, and its journal to a later claim,
    perhaps long after, when retention may have removed the files and live writers replaced
    them): of one written in this boot (its lock file names the boot) each file still the
    recorded one is written again (`_written_again`). `slot`: the journal's, whose
    lock is held; `quarantine(path, reason)` keeps a record that cannot be written back."""
    for left in (root / "tmp").glob(f"{slot}-*.journal"):  # a crash during an earlier replay of this slot
        left.unlink(missing_ok=True)
    latest: dict[str, _Record] = {}
    for record in sorted((r for s in segments for r in s.records()), key=lambda r: r.seq):
        latest[record.path] = record  # a path recorded twice: its last copy
    counts = dict.fromkeys(REPLAY_COUNTS, 0)
    counts["records"] = len(latest)
    written_again = 0
    if latest:
        if os.pread(lock_fd, 64, 0) != _boot_id():
            staged = _staged(root)
            # records of this slot a start that stopped later quarantined already (`_write_back` names them)
            kept = {p.name.split("-", 1)[1].removesuffix(".dcm")
                    for p in (root / "quarantine").glob(f"*-journal-{slot}-*.dcm")}
            for record in latest.values():
                outcome = _replay_one(root, slot, record, staged, kept, quarantine)
                if outcome:
                    counts[outcome] += 1
        else:  # its files are in the page cache, but perhaps not on disk (see `_written_again`)
            written_again = sum(_written_again(root, slot, record) for record in latest.values())
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _make_durable(fd)
        finally:
            os.close(fd)
        lost = counts["restored"] or counts["quarantined"]
        logs.event(log, "intake_journal_replayed", logging.WARNING if lost else logging.INFO, **counts,
                   written_again=written_again)
    for segment in segments:
        segment.retire()
    return counts


def recover(root: Path, quarantine: Quarantine) -> dict[str, int]:
    """At start-up, before reconcile: replay every journal no live process holds."""
    totals = dict.fromkeys(REPLAY_COUNTS, 0)
    folder = Path(root) / "journal"
    for lock in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        fd = _try_lock(lock)
        if fd is None:
            continue  # a live process's (a replica on a shared spool)
        segments: list[_Segment] = []
        try:
            segments = _Segment.pair(folder, lock.stem)
            for key, value in replay(Path(root), lock.stem, segments, fd, quarantine).items():
                totals[key] += value
        finally:
            for segment in segments:
                os.close(segment.fd)
            os.close(fd)
    return totals


def _replay_one(root: Path, slot: str, record: _Record, staged: dict[int, list[tuple[FileIdentity, Path]]],
                kept: set[str], quarantine: Quarantine) -> str | None:
    target = _inside(root, record.path)
    if target is None:
        return None
    recorded = record.file
    for identity, part in staged.get(recorded.inode, ()):
        if identity.unchanged(recorded):  # the recorded file, under its staged name: a power cut took the rename
            part.unlink(missing_ok=True)
    try:
        there = identify(target)
    except NotARegularFile:  # a folder, a link: never written over
        return _write_back(root, slot, record, target, kept, quarantine,
                           blocked="something other than a file holds its name")
    if there is not None and not there.same_file(recorded):
        return "superseded"  # replaced since, durably (Spool.stage's default), even under a reused inode number
    if there is not None and _holds(target, record.data):
        return None
    return _write_back(root, slot, record, target, kept, quarantine)


# A path a file, a folder or a link blocks (or leads off the file system): its record goes to
# quarantine. Anything else raises.
_BLOCKED = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.ELOOP, errno.EXDEV)


def _write_back(root: Path, slot: str, record: _Record, target: Path, kept: set[str], quarantine: Quarantine,
                blocked: str = "") -> str:
    """The record's copy at `target`, durably, with its mtime ("restored"); to quarantine/ if
    the path is `blocked` or turns out so ("quarantined"). A failure to write the copy at all
    (disk full) is raised: the start stops, the journal stays for the next (this slot's
    temporary copies are removed then)."""
    name = f"journal-{slot}-{record.fill:016x}-{record.seq}"  # the same at every replay of this record
    if name in kept:  # a start that stopped later quarantined it already
        return "quarantined"
    tmp = _durable_copy(root, slot, record)
    for attempt in (1, 2):
        if blocked:
            break
        try:
            missing = [p for p in (target.parent, *target.parent.parents) if not p.exists() and root in p.parents]
            target.parent.mkdir(parents=True, exist_ok=True)
            for folder in missing:
                fsync_dir(folder.parent)
            os.replace(tmp, target)
            return "restored"
        except OSError as exc:
            if exc.errno == errno.ENOENT and attempt == 1:
                continue  # a folder on the way removed meanwhile (retention on a live replica): once more
            if exc.errno not in _BLOCKED:
                raise
            blocked = os.strerror(exc.errno)
    quarantine(tmp, f"the intake journal's copy of {record.path}, acknowledged before a power cut, "
                    f"could not be written back there: {blocked}", name)
    logs.event(log, "intake_journal_record_quarantined", logging.ERROR, path=record.path, reason=blocked)
    return "quarantined"


def _make_durable(root_fd: int) -> None:
    """Every file and rename on the spool's filesystem on disk: syncfs(2), one flush of the disk's
    cache for all the files a checkpoint covers. A file's fsync each, and its folder's, were two
    flushes per instance again, and this disk takes flushes one at a time: with them the journal
    saved 0.13 of 0.92 ms per instance, with syncfs 0.33 (measured). The os module has no
    syncfs, hence ctypes; Linux reports writeback errors through it since 5.8, once to each
    descriptor: the journal keeps its own."""
    if _LIBC.syncfs(root_fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _boot_id() -> bytes:
    """This boot of the machine (Linux's random boot id), padded to the 64 bytes the lock file holds."""
    return Path("/proc/sys/kernel/random/boot_id").read_bytes().strip().ljust(64, b" ")


def _staged(root: Path) -> dict[int, list[tuple[FileIdentity, Path]]]:
    """The staged files in tmp/, by inode number."""
    staged: dict[int, list[tuple[FileIdentity, Path]]] = {}
    for part in (root / "tmp").glob("*.part"):
        try:
            identity = identify(part)
        except NotARegularFile:  # not one the node staged
            continue
        if identity is not None:  # else gone meanwhile
            staged.setdefault(identity.inode, []).append((identity, part))
    return staged


def _written_again(root: Path, slot: str, record: _Record) -> bool:
    """A journal of this boot: the recorded file, if it is still at its path, written again from
    its record as a new file swapped in for it (`_swap_in`): True. Its page cache may hold bytes
    the disk does not: Linux marks the pages a write-back failed on clean and tells of the error
    once (perhaps to the dead process's checkpoint only), so no later sync writes them; and on
    ext4 the blocks of a failed write-back can stay unwritten extents that a rewrite in place
    does not convert (measured on a failing loop device, ext4 without its journal: zeros read
    back), hence a new file. A file removed or replaced since is left as it is: False."""
    target = _inside(root, record.path)
    if target is None or not _still_recorded(target, record.file):
        return False
    return _swap_in(_durable_copy(root, slot, record), target, record.file)


def _swap_in(copy: Path, target: Path, recorded: FileIdentity) -> bool:
    """`copy` put at `target` only if the recorded file is what it replaces, with no moment where
    something else is lost: the two names exchanged at once (renameat2 RENAME_EXCHANGE, which
    fails where `target` is gone: a file retention removed is never brought back), then what
    came out looked at; a replacement renamed there meanwhile goes back. Where the file system
    cannot exchange names, the file is looked at just before a plain rename."""
    try:
        exchanged = _exchange(copy, target)
    except FileNotFoundError:
        copy.unlink()
        return False
    if not exchanged:
        if not _still_recorded(target, recorded):
            copy.unlink()
            return False
        os.replace(copy, target)
        return True
    try:
        came_out_recorded = _still_recorded(copy, recorded)  # `copy` now names what was at `target`
    except BaseException:
        os.replace(copy, target)  # as it was (a replay's clean-up would remove it under this name)
        raise
    if came_out_recorded:
        copy.unlink()
        return True
    os.replace(copy, target)  # a replacement came between the look and the exchange: it goes back
    return False


def _durable_copy(root: Path, slot: str, record: _Record) -> Path:
    """The record's bytes in a new file in tmp/ (a replay of `slot` removes what a crash leaves),
    fsynced, with the recorded modification time (retention and reconcile compare it)."""
    tmp = root / "tmp" / f"{slot}-{uuid.uuid4().hex}.journal"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), "wb") as f:  # as received files
        f.write(record.data)
        f.flush()
        os.fsync(f.fileno())
    mtime = record.file.mtime_ns
    os.utime(tmp, ns=(mtime, mtime))
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """The names `a` and `b` exchanged in one step: True; False where the C library or the file
    system has no RENAME_EXCHANGE (EINVAL, ENOSYS). FileNotFoundError if either is gone. The os
    module has no renameat2, hence ctypes."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _still_recorded(target: Path, recorded: FileIdentity) -> bool:
    """Whether the file at `target` is the one recorded: the same inode, told apart from a number
    handed out again by its generation, or where there is none by its modification time."""
    try:
        there = identify(target)
    except NotARegularFile:
        return False
    return there is not None and there.same_file(recorded) and (
        -1 not in (there.generation, recorded.generation) or there.mtime_ns == recorded.mtime_ns)


def _read_whole(fd: int, size: int) -> bytearray:
    """The first `size` bytes of `fd` (a segment: pread(2) returns at most 2 GiB - 4 KiB at once)."""
    data = bytearray(size)
    with memoryview(data) as view:
        done = 0
        while done < size:
            got = os.preadv(fd, [view[done:]], done)
            if not got:
                break
            done += got
    del data[done:]
    return data


def _holds(path: Path, data: memoryview) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def _inside(root: Path, relative: str) -> Path | None:
    """A recorded path, only under studies/ (the journal is the node's own, but never trusted to
    name a place outside the spool)."""
    parts = Path(relative).parts
    if len(parts) < 2 or parts[0] != "studies" or any(p in ("..", "") for p in parts) or Path(relative).is_absolute():
        return None
    return root / relative


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to the disk, without waiting (sync_file_range(2) with
    SYNC_FILE_RANGE_WRITE alone), so that the fsync that makes it durable later waits for less:
    a CT image's (512 KB) fsyncs before its acknowledgement took 1.1-1.3 ms after 0.7 ms of other
    work, and 0.42-0.55 ms when its write-back had been started before that work (measured). A
    hint, never a promise: a write-back error still reaches the fsync through this descriptor
    (only the call's WAIT flags check and consume it: fs/sync.c), but one the file system returns
    while the writes are submitted (ext4's allocation, for one) may be reported here only, so those
    are raised: the file is not acknowledged. Any other (ESPIPE, EINVAL, ENOSYS) is a hint not
    taken. The os module has no sync_file_range, hence ctypes."""
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        code = ctypes.get_errno()
        if code in _WRITE_FAILED:  # a failure the file system may report here only (not to the fsync)
            raise OSError(code, os.strerror(code))


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so the names made or renamed in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
