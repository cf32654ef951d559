"""Durable spool: instances are written exactly as received, crash-safe, under UID-named paths.

A file is either absent or complete at its final path: it is written to a temporary file on
the same filesystem and renamed into place; before it is acknowledged either its bytes are in
the intake journal (node/store/journal.py: a new instance of up to 256 KB, one fdatasync), or
the file was fsynced before the rename and its folder after it (a replacement), or the file and
its folder were fsynced after the rename (a larger new instance, no journal; an identical
resend's copy). Names come only from validated UIDs, so no tag text ever reaches the filesystem.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Sequence

from node.store.journal import FileIdentity, IntakeJournal, identify_open, recover, start_writeback
from node.store.journal import fsync_dir as _fsync_dir

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
KNOWN_DIRS_MAX = 4096  # folders a process remembers having made
# A file written after its index row (a newer copy renamed over it) has an mtime later than the
# row's received_at by more than this; less may be clock granularity or a shared filesystem's.
MTIME_SLACK_S = 2.0
# A path as the receive path passes it: text. Every arriving instance names four files and
# folders, and pathlib's joins, parents and conversions back to text were a tenth of a
# receiver's Python time over four associations of small instances (py-spy, 2026-11-26).
StrPath = str | os.PathLike[str]


def _unique() -> str:
    """A name no other file in tmp/ has: 128 random bits, as uuid4().hex but without building a UUID
    (5.5 against 1 µs; two per arriving instance)."""
    return os.urandom(16).hex()


class InvalidUID(ValueError):
    pass


class OutOfSpace(OSError):
    pass


def checked_uid(value: object, name: str) -> str:
    """Return `value` as a UID safe for paths; raise InvalidUID with the attribute name."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidUID(f"{name} is missing or not a valid UID")
    return text


class Spool:
    """The on-disk store: ``studies/<study>/<series>/<sop>.dcm`` plus ``quarantine/``."""

    def __init__(self, root: Path, min_free_mb: float, journal_mb: float = 0):
        """`journal_mb`: this process's intake journal (two segments of half that); 0, none."""
        self.root = Path(root)
        self.studies = self.root / "studies"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.min_free_bytes = 0
        self.set_watermark(min_free_mb)
        for folder in (self.studies, self.tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._root_text = os.fspath(self.root)
        self._tmp_text = os.fspath(self.tmp)
        self._known_dirs: set[str] = set()
        self.journal = (IntakeJournal(self.root, int(journal_mb * 1024 * 1024) // 2, self.quarantine_file)
                        if journal_mb else None)

    def recover(self) -> dict[str, int]:
        """At start-up, before reconcile: what crashed processes recorded in their journals is
        put back and made durable (node/store/journal.py)."""
        return recover(self.root, self.quarantine_file)

    def close(self) -> None:
        """This process's journal checkpointed and let go."""
        if self.journal is not None:
            self.journal.close()

    def set_watermark(self, min_free_mb: float) -> None:
        """Below this much free space nothing more is written (storage.min_free_mb; live)."""
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)

    def has_room(self, incoming: int = 0) -> bool:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize - incoming >= self.min_free_bytes

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / self.instance_name(study_uid, series_uid, sop_uid)

    def located(self, name: str) -> str:
        """The path of `name` (a path under the root, as the index records it), as text."""
        return f"{self._root_text}/{name}"

    @staticmethod
    def instance_name(study_uid: str, series_uid: str, sop_uid: str) -> str:
        """An instance's path under the spool's root, as the index records it (built as text: the
        UIDs hold no separator, see checked_uid; three pathlib joins and relative_to cost 17 µs)."""
        return f"studies/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def store(self, target: StrPath, chunks: Iterable[bytes | memoryview]) -> int:
        """Write `chunks` durably to `target` (replacing it); return the size in bytes."""
        staged = self.stage(chunks)
        size = os.stat(staged).st_size
        self.place(staged, target)
        return size

    def stage(self, chunks: Iterable[bytes | memoryview], durable: bool = True) -> str:
        """Write `chunks` to a temporary file in tmp/ (not yet anywhere a reader looks), fsynced
        unless `durable` is False, and closed (a write error NFS reports at close(2) fails it)."""
        with ExitStack() as held:
            tmp = self.stage_held(chunks, held, durable)[0]
            try:
                held.close()
            except OSError as exc:
                raise _staging_failed(tmp, exc) from None
        return tmp

    def stage_held(self, chunks: Iterable[bytes | memoryview], held: ExitStack,
                   durable: bool = True) -> tuple[str, FileIdentity, int]:
        """`stage`, with the staged file's identity (the intake journal records it) and the
        descriptor it was written through, left open until `held` closes: `settle` fsyncs through
        it. Linux reports a write-back error once to each file description open when it happened,
        and to no descriptor opened after another has seen it: one opened later by path could be
        told all is well because a racing store of the same instance (an identical resend's
        fsync) took the error.

        The receiver stages first and lets the index `place` it under its write lock, so the
        checks on the SOP Instance UID and the rename happen as one step across processes."""
        tmp = f"{self._tmp_text}/{_unique()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            held.callback(os.close, fd)
            size = 0
            for chunk in chunks:
                view = memoryview(chunk)
                size += view.nbytes
                while view:
                    view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
            elif self.journal is None or not self.journal.takes(size):  # fsynced by `settle`, after
                start_writeback(fd)  # the index's transaction: its pages go to the disk meanwhile
            identity = identify_open(fd)
        except OSError as exc:
            raise _staging_failed(tmp, exc) from None
        return tmp, identity, fd

    def place(self, staged: StrPath, target: StrPath, durable: bool = True) -> None:
        """Rename a staged file to `target` (replacing it) and make the rename durable (or leave
        that to `make_durable`, when the rename happens under a lock the fsync need not hold)."""
        folder = _folder(target)
        self._ensure_dir(folder)
        try:
            os.replace(staged, target)
        except FileNotFoundError:
            if not os.path.exists(staged):
                raise
            # retention removed the (emptied) study folder since this process made it
            self._known_dirs.clear()
            self._ensure_dir(folder)
            os.replace(staged, target)
        if durable:
            self.make_durable(target)

    def keep_previous(self, target: StrPath) -> str | None:
        """A hard link in tmp/ to the file at `target`, before a replacement renames over it:
        `restore` puts it back if the index then refuses the replacement. None: no file there."""
        previous = f"{self._tmp_text}/{_unique()}.prev"
        try:
            os.link(target, previous)
        except FileNotFoundError:
            return None
        except OSError:  # a filesystem without hard links: a copy does (replacements are rare)
            try:
                shutil.copy2(target, previous)  # with its mtime: retention compares it
                _fsync_file(previous)
            except BaseException:
                _unlink(previous)
                raise
        # on disk before the rename over `target` can be: after a power cut, reconcile finds the
        # acknowledged copy here if the replacement's commit was lost (its data too: a new
        # instance's file may so far be durable only by its journal record, which replay then
        # takes for superseded)
        _fsync_file(previous)
        _fsync_dir(self._tmp_text)
        return previous

    def restore(self, previous: StrPath, target: StrPath) -> None:
        """Undo a replacement: the copy `keep_previous` kept goes back to `target`."""
        folder = _folder(target)
        self._ensure_dir(folder)
        os.replace(previous, target)
        _unlink(previous)  # rename() leaves both names when they are one file already
        _fsync_dir(folder)

    def replaced_copies(self, older_than_s: float = 0.0) -> list[Path]:
        """Copies `keep_previous` kept that a crash left behind (reconcile decides which copy
        stays). Aged by when the link was made (its ctime), not by the file's mtime, which is
        the replaced copy's own."""
        cutoff = time.time() - older_than_s
        return sorted(p for p in self.tmp.glob("*.prev") if not older_than_s or _changed_at(p) < cutoff)

    @staticmethod
    def make_durable(target: StrPath) -> None:
        """fsync the folder that holds `target`, so its rename survives a power cut."""
        _fsync_dir(_folder(target))

    def settle(self, name: str, placed: FileIdentity, chunks: Sequence[bytes | memoryview],
               synced: bool, fd: int) -> None:
        """Make a placed file (`name`: its path under the root, as the index records it) durable
        before its acknowledgement: one not `synced` (staged with durable=False) by its record in
        the intake journal, else, or when the journal does not take it, by the fsyncs of the file
        (through `fd`, the descriptor it was written through: `stage_held`) and of its folder."""
        if not synced and self.journal is not None and self.journal.record(name, placed, chunks):
            return
        if not synced:
            os.fsync(fd)
        _fsync_dir(_folder(self.located(name)))

    @staticmethod
    def sync_placed(target: StrPath) -> None:
        """fsync a file in place and its folder: also before an identical resend's acknowledgement,
        since the copy indexed before may still be on its way to the disk (another association
        between its commit and its settle)."""
        _fsync_file(target)
        _fsync_dir(_folder(target))

    @staticmethod
    def sync(path: StrPath) -> None:
        """fsync a file (a staged one, before it is renamed over another)."""
        _fsync_file(path)

    def discard(self, staged: StrPath) -> None:
        _unlink(staged)

    def quarantine(self, chunks: Iterable[bytes | memoryview], reason: str) -> Path:
        """Keep an unusable dataset for inspection; it is never indexed."""
        return self.quarantine_file(self.stage(chunks), reason)

    def quarantine_file(self, path: StrPath, reason: str, name: str | None = None) -> Path:
        """Move a file that is already on this filesystem into quarantine, with its reason, as
        `<time>-<name>.dcm` (a random name by default; the intake journal names a record's copy
        so that a later replay finds it there)."""
        stem = time.strftime("%Y%m%dT%H%M%S") + "-" + (name or uuid.uuid4().hex[:12])
        target = self.quarantine_dir / f"{stem}.dcm"
        _fsync_file(path)  # a new instance's staged file is not (Spool.stage, durable=False)
        os.replace(path, target)
        _fsync_dir(self.quarantine_dir)
        _fsync_dir(_folder(path))
        fd = os.open(self.quarantine_dir / f"{stem}.reason.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as why:
            why.write(reason + "\n")
        return target

    def adopt(self, path: StrPath, target: StrPath) -> None:
        """Make a file already on this filesystem (a partial write found complete) durable at `target`."""
        _fsync_file(path)
        folder = _folder(target)
        self._ensure_dir(folder)
        os.replace(path, target)
        _fsync_dir(folder)

    def partial_writes(self, older_than_s: float = 0.0) -> list[Path]:
        """Temporary files a crash left behind (never acknowledged); with `older_than_s`, only those
        not written to for that long (on a shared spool, younger ones may be another replica's)."""
        cutoff = time.time() - older_than_s
        return sorted(p for p in self.tmp.glob("*.part") if not older_than_s or modified_at(p) < cutoff)

    def _ensure_dir(self, folder: str) -> None:
        if folder in self._known_dirs:
            return
        created = []
        path = Path(folder)
        for parent in reversed((path, *path.parents)):
            if not parent.exists():
                try:
                    parent.mkdir()
                    created.append(parent)
                except FileExistsError:
                    pass
        for new in created:  # make the new folder entries themselves durable
            _fsync_dir(new.parent)
        if len(self._known_dirs) >= KNOWN_DIRS_MAX:  # one per series: bounded in a long-lived receiver
            self._known_dirs.clear()
        self._known_dirs.add(folder)


def _staging_failed(tmp: str, exc: OSError) -> OSError:
    """The staged file removed; what to raise: OutOfSpace for a full disk or quota."""
    _unlink(tmp)
    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return OutOfSpace(exc.errno, "no space left for the instance")
    return exc


def _folder(path: StrPath) -> str:
    """The folder that holds `path` ("." for a bare name, as Path.parent has it)."""
    return os.path.dirname(path) or "."


def _unlink(path: StrPath) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_file(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dataset_offset(head: bytes) -> int:
    """Where the data set starts in a part-10 file written by the node (after its meta group)."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a part-10 file with a File Meta Information Group Length")
    return 144 + int.from_bytes(head[140:144], "little")


def same_dataset(path: StrPath, payload: bytes | memoryview) -> bool:
    """True if the part-10 file at `path` holds exactly `payload` as its data set."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[dataset_offset(data):] == bytes(payload)
    except (OSError, ValueError):
        return False


def _changed_at(path: Path) -> float:
    try:
        return path.stat().st_ctime
    except FileNotFoundError:
        return float("inf")


def modified_at(path: Path) -> float:
    """When the file was last written; infinitely recent if it is gone (moved meanwhile by a
    replica: renamed into place, quarantined, deleted by retention)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
