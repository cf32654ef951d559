"""The intake journal (node/store/journal.py): a new instance acknowledged after one fdatasync of
its record, its file synced behind the acknowledgement, and what a crash took of the files put
back from the records before reconcile runs.

A power cut cannot be made here; what it may leave of files written without a sync (a rename not
on disk, a file whose data blocks were never written, a newer copy renamed over it) is made by
hand, after the process that journalled them is gone (its flock released, as by its death), and
the boot its journal names made an earlier one (replay restores only across a reboot)."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import shutil
import sqlite3
import stat
import uuid
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

from node.config import NodeConfig
from node.receive.store import Incoming, InstanceStore
from node.store import journal
from node.store import spool as spool_module
from node.store.journal import HEADER, HEADER_V1, RECORD_MAX_BYTES, FileIdentity, IntakeJournal, identify
from node.store.index import Index
from node.store.spool import Spool
from tests.peers import HOOKS, dataset_bytes, make_study, storescu, wait_for

SEGMENT = 1 << 20


def journalled_spool(root: Path, segment_bytes: int = SEGMENT, checkpoint_s: float = 3600.0) -> Spool:
    spool = Spool(root, 0)
    spool.journal = IntakeJournal(spool.root, segment_bytes, spool.quarantine_file, checkpoint_s=checkpoint_s)
    return spool


def recover(root: Path) -> dict[str, int]:
    """What the service does at start-up (Spool.recover)."""
    return Spool(root, 0).recover()


def receive(spool: Spool, name: str, data: bytes, study: str = "1.2.3", series: str = "1.2.3.4") -> Path:
    """A new instance as InstanceStore stores it: staged without a sync, renamed, settled."""
    target = spool.instance_path(study, series, name)
    with ExitStack() as held:
        staged, placed, fd = spool.stage_held([data[:100], memoryview(data)[100:]], held, durable=False)
        spool.place(staged, target, durable=False)
        spool.settle(Spool.instance_name(study, series, name), placed, [data[:100], memoryview(data)[100:]],
                     synced=False, fd=fd)
    return target


def die(spool: Spool, reboot: bool = True) -> None:
    """The process that holds the journal is gone: its flock with it, nothing checkpointed; with
    `reboot`, the machine went down with it (its journal names an earlier boot)."""
    assert spool.journal is not None and spool.journal._lock_fd is not None
    os.close(spool.journal._lock_fd)
    spool.journal._lock_fd = None
    if reboot:
        earlier_boot(spool.root)


def earlier_boot(root: Path) -> None:
    for lock in (root / "journal").glob("*.lock"):
        lock.write_bytes(b"an earlier boot".ljust(64))


def pending(spool: Spool) -> int:
    assert spool.journal is not None
    return sum(s.pending for s in spool.journal._segments)


def test_what_a_crash_took_of_journalled_files_is_written_again_and_a_newer_copy_stays(tmp_path):
    spool = journalled_spool(tmp_path)
    data = {name: os.urandom(70_000 + i) for i, name in enumerate(("1.1", "1.2", "1.3", "1.4"))}
    paths = {name: receive(spool, name, blob) for name, blob in data.items()}
    mtimes = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    assert pending(spool) == 4
    die(spool)
    # 1.1: the rename never reached the disk (the file is still under its staged name)
    os.rename(paths["1.1"], spool.tmp / "0123456789abcdef.part")
    # 1.2: the name did, its data blocks did not (same inode, zeros)
    with open(paths["1.2"], "r+b") as f:
        f.write(bytes(len(data["1.2"])))
    # 1.3: a replacement renamed over it since (another inode): it stays
    newer = spool.tmp / "newer"
    newer.write_bytes(b"a newer copy")
    os.replace(newer, paths["1.3"])

    assert recover(tmp_path) == {"records": 4, "restored": 2, "superseded": 1, "quarantined": 0}
    for name in ("1.1", "1.2", "1.4"):
        assert paths[name].read_bytes() == data[name]
        assert paths[name].stat().st_mtime_ns == mtimes[name]  # reconcile orders orphans by it
    assert paths["1.3"].read_bytes() == b"a newer copy"
    assert not list(spool.tmp.iterdir())
    assert recover(tmp_path) == {"records": 0, "restored": 0, "superseded": 0, "quarantined": 0}  # retired


def replace_durably(spool: Spool, target: Path, data: bytes, inode: int | None = None) -> None:
    """A replacement as InstanceStore makes one: staged and fsynced, the acknowledged copy kept
    aside while it is renamed over it, then let go. `inode`: staged under that inode number (a new
    file is staged until the file system hands it out again)."""
    for _ in range(200):
        with ExitStack() as held:
            staged, identity, _ = spool.stage_held([data], held)
        if inode is None or identity.inode == inode:
            break
        spool.discard(staged)
    else:
        pytest.skip("this file system did not hand the freed inode number out again")
    previous = spool.keep_previous(target)
    spool.place(staged, target)
    if previous is not None:
        spool.discard(previous)


def test_a_newer_copy_under_the_recorded_files_reused_inode_number_stays(tmp_path):
    """ext4 gives a freed inode number to the next new file: a journalled file replaced twice
    within a checkpoint can have its number back on the second replacement. Replay tells the two
    apart by the inode's generation and keeps the newer copy."""
    spool = journalled_spool(tmp_path)
    first = receive(spool, "7.1", os.urandom(3000))
    recorded = identify(first)
    assert recorded is not None
    if recorded.generation == -1:
        pytest.skip("this file system keeps no inode generations: the number alone decides")
    replace_durably(spool, first, b"second copy")  # the recorded inode is freed once its kept copy goes
    replace_durably(spool, first, b"third copy", inode=recorded.inode)
    now = identify(first)
    assert now is not None and now.inode == recorded.inode and now.generation != recorded.generation
    die(spool)
    assert recover(tmp_path) == {"records": 1, "restored": 0, "superseded": 1, "quarantined": 0}
    assert first.read_bytes() == b"third copy"


def test_a_record_whose_path_is_blocked_is_quarantined_and_the_start_goes_on(tmp_path):
    """One recorded file's folder is gone and a file holds its name; a folder holds another's
    name: each record's bytes go to quarantine/ with the path and the reason, nothing is lost or
    written over, and the start goes on. A replay's own temporary files a crash left in tmp/ are
    removed by the next replay of its slot."""
    spool = journalled_spool(tmp_path)
    data, other = os.urandom(4000), os.urandom(5000)
    target = receive(spool, "8.1", data)
    in_the_way = spool.instance_path("1.2.9", "1.2.9.4", "8.2")
    assert receive(spool, "8.2", other, study="1.2.9", series="1.2.9.4") == in_the_way
    die(spool)
    in_the_way.unlink()
    (in_the_way / "a.txt").parent.mkdir()
    (in_the_way / "a.txt").write_bytes(b"somebody's folder")
    left_behind = spool.tmp / "0-0123456789abcdef.journal"  # slot 0's, from a replay cut short
    left_behind.write_bytes(b"half a copy")
    series = target.parent
    for f in series.iterdir():
        f.unlink()
    series.rmdir()
    series.write_bytes(b"a file where the series folder was")

    assert recover(tmp_path) == {"records": 2, "restored": 0, "superseded": 0, "quarantined": 2}
    reasons = {k.with_suffix("").with_suffix(".reason.txt").read_text(): k.read_bytes()
               for k in spool.quarantine_dir.glob("*.dcm")}
    assert sorted(reasons.values()) == sorted([data, other])
    for path, blob in (("studies/1.2.3/1.2.3.4/8.1.dcm", data), ("studies/1.2.9/1.2.9.4/8.2.dcm", other)):
        reason = next(r for r in reasons if path in r)
        assert "could not be written back" in reason and reasons[reason] == blob
    assert (in_the_way / "a.txt").read_bytes() == b"somebody's folder"
    assert not left_behind.exists() and not list(spool.tmp.glob("*.journal"))
    assert recover(tmp_path)["records"] == 0


def test_a_replay_that_fails_stops_the_start_keeps_the_journal_and_quarantines_nothing_twice(tmp_path, monkeypatch):
    """An I/O error writing one record back stops the start with the journal kept; the next start
    replays it, and a record quarantined by the first start is not quarantined again. A restored
    file is readable by the node's group only, as received files are. A link at a recorded path
    is never written through: the record is quarantined and the link stays."""
    spool = journalled_spool(tmp_path)
    blocked, failing, linked = (os.urandom(1000 + i) for i in range(3))
    blocked_at = receive(spool, "10.1", blocked, series="1.2.3.5")
    failing_at = receive(spool, "10.2", failing)
    linked_at = receive(spool, "10.3", linked, series="1.2.3.6")
    die(spool)
    shutil.rmtree(blocked_at.parent)
    blocked_at.parent.write_bytes(b"a file where the series folder was")
    failing_at.unlink()
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(b"not the node's")
    linked_at.unlink()
    linked_at.symlink_to(elsewhere)

    replace = os.replace

    def failing_replace(source, target):  # an I/O error cannot be made on this disk: the one fault mocked
        if Path(target) == failing_at:
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(journal.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        recover(tmp_path)
    monkeypatch.undo()
    first = list(spool.quarantine_dir.iterdir())  # the blocked record's, before the failure
    assert len(first) == 2
    for made in first:  # as at a start in another second (the time begins the name)
        made.rename(made.with_name("20260101T000000-" + made.name.split("-", 1)[1]))

    assert recover(tmp_path) == {"records": 3, "restored": 1, "superseded": 0, "quarantined": 2}
    assert failing_at.read_bytes() == failing and failing_at.stat().st_mode & 0o777 == 0o640
    kept = sorted(k.read_bytes() for k in spool.quarantine_dir.glob("*.dcm"))
    assert kept == sorted([blocked, linked])  # each once
    assert linked_at.is_symlink() and elsewhere.read_bytes() == b"not the node's"
    assert not list(spool.tmp.glob("*.journal"))
    assert recover(tmp_path)["records"] == 0


def journal_descriptors(root: Path) -> set[tuple[str, str]]:
    """This process's open descriptors on files of the journal folder under `root`."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if target.startswith(str(root / "journal")):
            held.add((fd, target))
    return held


def test_a_segment_that_cannot_be_opened_stops_the_start_and_leaves_no_descriptor_open(tmp_path):
    """A slot whose second segment cannot be opened (a folder in its place) stops the replay
    with the error, the first segment and the lock closed again; a receiver's claim of that slot
    gives the journal up (its instance synced itself) without a descriptor left open either; the
    records stay for a start once the slot is mended."""
    spool = journalled_spool(tmp_path)
    data = os.urandom(5000)
    at = receive(spool, "11.1", data)
    die(spool)
    at.unlink()
    second = tmp_path / "journal" / "0-b.wal"
    second.unlink()
    second.mkdir()
    before = journal_descriptors(tmp_path)  # the dead process's segments: it never closed them
    with pytest.raises(IsADirectoryError):
        recover(tmp_path)
    assert journal_descriptors(tmp_path) == before
    claiming = journalled_spool(tmp_path)
    blob = os.urandom(100)
    assert receive(claiming, "11.2", blob).read_bytes() == blob
    assert claiming.journal is not None and claiming.journal._unusable
    assert journal_descriptors(tmp_path) == before
    second.rmdir()
    assert recover(tmp_path)["restored"] == 1 and at.read_bytes() == data


def test_a_torn_record_and_what_follows_it_are_not_replayed(tmp_path):
    """A record whose bytes did not all reach the disk was never acknowledged (its fdatasync had
    not returned): replay stops there."""
    spool = journalled_spool(tmp_path)
    first, second = receive(spool, "2.1", os.urandom(5000)), receive(spool, "2.2", os.urandom(5000))
    die(spool)
    segment = next(tmp_path.glob("journal/*-a.wal"))
    with open(segment, "r+b") as f:  # the last byte of the second record's data
        f.seek(2 * HEADER.size + 2 * len("studies/1.2.3/1.2.3.4/2.1.dcm") + 2 * 5000 - 1)
        last = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([last[0] ^ 0xFF]))
    first.unlink()
    second.unlink()
    assert recover(tmp_path) == {"records": 1, "restored": 1, "superseded": 0, "quarantined": 0}
    assert first.exists() and not second.exists()


def test_a_journal_in_the_first_layout_is_still_replayed(tmp_path):
    """Records written before the inode generation was recorded (magic DNJ1): a crash under the
    previous version is replayed by this one, the inode number alone deciding."""
    spool = Spool(tmp_path, 0)
    target = spool.instance_path("1.2.3", "1.2.3.4", "9.1")
    target.parent.mkdir(parents=True)
    target.write_bytes(bytes(3000))  # the name reached the disk, the data did not
    data, path = os.urandom(3000), b"studies/1.2.3/1.2.3.4/9.1.dcm"
    st = target.stat()
    head = HEADER_V1.pack(b"DNJ1", 7, 1, st.st_ino, st.st_mtime_ns, len(data), len(path), zlib.crc32(path + data), 0)[:-4]
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "0-a.wal").write_bytes(head + zlib.crc32(head).to_bytes(4, "little") + path + data)
    earlier_boot_lock = tmp_path / "journal" / "0.lock"
    earlier_boot_lock.write_bytes(b"an earlier boot".ljust(64))
    assert recover(tmp_path) == {"records": 1, "restored": 1, "superseded": 0, "quarantined": 0}
    assert target.read_bytes() == data


def test_a_journal_held_by_a_live_process_is_not_replayed_by_another(tmp_path):
    spool = journalled_spool(tmp_path)
    target = receive(spool, "3.1", os.urandom(1000))
    target.unlink()
    assert recover(tmp_path)["records"] == 0  # a replica on a shared spool starting: not its journal
    assert not target.exists() and pending(spool) == 1
    die(spool)
    assert recover(tmp_path)["restored"] == 1


def damage_in_place(path: Path) -> None:
    """What a failed write-back leaves: other bytes under the same inode and modification time
    (Linux marks the pages clean and tells of the error once; a later sync writes nothing)."""
    mtime = path.stat().st_mtime_ns
    with open(path, "r+b") as f:
        f.write(bytes(path.stat().st_size))
    os.utime(path, ns=(mtime, mtime))


def test_a_journal_of_this_boot_writes_its_files_again_and_undoes_nothing(tmp_path):
    """A process that died without a reboot left its files to the page cache, but perhaps not to
    the disk: a write-back error it was told of (and gave the journal up on) may be told to no one
    else, and the pages it failed on are marked clean. So each file still the recorded one is
    written again from its record, as a new file renamed over it; whatever else happened to them
    since (retention removed one, a replacement came) is not undone, however late the claim."""
    spool = journalled_spool(tmp_path)
    data = {name: os.urandom(1000 + i) for i, name in enumerate(("6.1", "6.2", "6.3", "6.4"))}
    removed, kept, damaged, replaced = (receive(spool, name, blob) for name, blob in data.items())
    recorded = identify(damaged)
    die(spool, reboot=False)
    removed.unlink()
    damage_in_place(damaged)
    replace_durably(spool, replaced, b"a newer copy")
    assert recover(tmp_path) == {"records": 4, "restored": 0, "superseded": 0, "quarantined": 0}
    assert not removed.exists() and kept.read_bytes() == data["6.2"]
    again = identify(damaged)
    assert damaged.read_bytes() == data["6.3"] and recorded is not None and again is not None
    assert again.inode != recorded.inode and again.mtime_ns == recorded.mtime_ns  # a new file, its mtime kept
    assert replaced.read_bytes() == b"a newer copy"
    assert not list(spool.tmp.iterdir())
    assert recover(tmp_path)["records"] == 0


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "no-exchange"])
@pytest.mark.parametrize("meanwhile", ["removed", "replaced"])
def test_a_file_removed_or_replaced_while_written_again_stays_so(tmp_path, monkeypatch, meanwhile, exchange):
    """Retention removes the study, or a replacement comes, while the claim writes the recorded
    file's new copy: the copy is exchanged for what is there only if that is still the recorded
    file, so nothing removed comes back and no newer copy is lost (where the file system cannot
    exchange names, it looks just before the rename)."""
    spool = journalled_spool(tmp_path)
    target = receive(spool, "6.5", os.urandom(2000))
    die(spool, reboot=False)
    if not exchange:
        monkeypatch.setattr(journal, "_RENAMEAT2", None)
    real_copy = journal._durable_copy

    def racing(root: Path, slot: str, record: Any) -> Path:
        copy = real_copy(root, slot, record)
        if meanwhile == "removed":
            shutil.rmtree(spool.studies / "1.2.3")
        else:
            replace_durably(spool, target, b"a newer copy")
        return copy

    monkeypatch.setattr(journal, "_durable_copy", racing)
    assert recover(tmp_path)["records"] == 1
    if meanwhile == "removed":
        assert not (spool.studies / "1.2.3").exists()
    else:
        assert target.read_bytes() == b"a newer copy"
    assert not list(spool.tmp.iterdir())


def checkpoint(spool: Spool) -> None:
    """The journal's next checkpoint, now (as its timer would), waited for."""
    intake = spool.journal
    assert intake is not None
    with intake._cond:
        segment = intake._segments[intake._active]
        intake._switch_asked = True
        intake._cond.notify_all()
    wait_for(lambda: segment.pending == 0 or intake._unusable, timeout=10)


def _failing_writeback(monkeypatch: pytest.MonkeyPatch, fail_next: list[Path], told: list[int]) -> None:
    """The next checkpoint's syncfs reports a write-back error of the files in `fail_next`
    (damaged in place, as the disk holds them), once. An I/O error cannot be made on this disk:
    the fault mocked."""
    real_syncfs = journal._make_durable

    def syncfs(root_fd: int) -> None:
        if not fail_next:
            real_syncfs(root_fd)
            return
        told.append(len(fail_next))
        for path in fail_next:
            damage_in_place(path)
        fail_next.clear()
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal, "_make_durable", syncfs)


def test_a_checkpoint_told_of_a_write_error_gives_up_and_the_next_claim_writes_the_files_again(
        tmp_path, monkeypatch):
    """syncfs(2) reports a write-back error of any file on the file system, once, and the pages it
    failed on stay in the page cache marked clean: the journal gives up (every later instance is
    fsynced itself), its records stay, and the next claim of its slot, in this boot as after a
    reboot, writes the files again from them."""
    spool = journalled_spool(tmp_path)
    data = {name: os.urandom(3000 + i) for i, name in enumerate(("8.1", "8.2"))}
    targets = [receive(spool, name, blob) for name, blob in data.items()]
    told: list[int] = []
    _failing_writeback(monkeypatch, [targets[0]], told)
    checkpoint(spool)
    assert told == [1] and spool.journal is not None and spool.journal._unusable and pending(spool) == 2
    receive(spool, "8.3", os.urandom(1000))
    assert pending(spool) == 2  # fsynced itself: the journal takes nothing more
    monkeypatch.undo()
    die(spool, reboot=False)
    assert recover(tmp_path)["records"] == 2
    assert [t.read_bytes() for t in targets] == list(data.values())


def test_checkpoints_retire_records_once_their_files_are_synced_and_segments_take_turns(tmp_path):
    """Forty 100 KB instances through segments of 300 KB: a full segment is switched for the
    other once its checkpoint is done, so every record is taken; after the checkpoints nothing is
    left to replay, and a clean close leaves the journal empty."""
    spool = journalled_spool(tmp_path, segment_bytes=300_000, checkpoint_s=0.05)
    blobs = [os.urandom(100_000) for _ in range(40)]
    targets = [receive(spool, f"4.{i}", blob) for i, blob in enumerate(blobs)]
    wait_for(lambda: pending(spool) == 0, timeout=10)
    assert spool.journal is not None
    for segment in spool.journal._segments:
        assert os.pread(segment.fd, HEADER.size, 0) == bytes(HEADER.size)  # retired durably
        assert segment.size <= 300_000
    spool.close()
    assert [t.read_bytes() for t in targets] == blobs
    assert recover(tmp_path)["records"] == 0


def _spy_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files and folders fsynced from now on, by path or through a descriptor
    kept open (they are still fsynced)."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_an_instance_larger_than_the_record_limit_is_synced_itself_and_kept_by_no_replay(tmp_path, monkeypatch):
    """A CT image (512 KB) costs less fsynced than recorded: over RECORD_MAX_BYTES the file and
    its folder are fsynced before the acknowledgement (Spool.settle), and no record is left. A
    restarted receiver whose first instance is such a one still claims a slot, and replays what
    its dead predecessor left there."""
    spool = journalled_spool(tmp_path, segment_bytes=4 * RECORD_MAX_BYTES)
    synced = _spy_syncs(monkeypatch)
    small = receive(spool, "6.1", os.urandom(RECORD_MAX_BYTES))
    assert pending(spool) == 1 and small.name not in synced  # (its new folders' parents were fsynced)
    synced.clear()
    big = receive(spool, "6.2", os.urandom(RECORD_MAX_BYTES + 1))
    assert pending(spool) == 1 and synced == [big.name, big.parent.name]
    die(spool, reboot=False)
    successor = journalled_spool(tmp_path, segment_bytes=4 * RECORD_MAX_BYTES)
    receive(successor, "6.3", os.urandom(RECORD_MAX_BYTES + 1))
    assert successor.journal is not None and successor.journal._lock_fd is not None and pending(successor) == 0
    die(successor)
    assert recover(tmp_path)["records"] == 0  # 6.1's record made durable and retired by the successor's claim


def _instance_store(tmp_path: Path, size: int, **config: Any) -> tuple[InstanceStore, Incoming, Path]:
    """An in-process InstanceStore over a journalled spool, one CT instance of size x size as a
    C-STORE brings it, and the path it is stored at."""
    spool = journalled_spool(tmp_path / "data")
    store = InstanceStore(NodeConfig.model_validate(config), Index(tmp_path / "data" / "index.sqlite"), spool,
                          lambda study_uid, deadline: None)
    return (store, *_new_instance(tmp_path / "ct", size, spool))


def _new_instance(folder: Path, size: int, spool: Spool) -> tuple[Incoming, Path]:
    """A CT instance of size x size in a study of its own, as a C-STORE brings it, and where
    `spool` stores it."""
    [path] = make_study(folder, slices=1, size=size)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    incoming = Incoming(payload=memoryview(dataset_bytes(path)), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                        sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                        calling="MODALITY", called="TESTNODE", peer="127.0.0.1", association_id=None)
    return incoming, spool.instance_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


@pytest.mark.parametrize("size", [16, 512])
def test_an_identical_resend_is_acknowledged_once_the_indexed_copy_is_durable(tmp_path, monkeypatch, size):
    """Two associations send the same instance: the second can find the first's row committed
    while the first still makes its file durable (Spool.settle runs after the commit). Its
    acknowledgement promises that copy too: the file and its folder are fsynced first,
    journalled or not."""
    store, incoming, target = _instance_store(tmp_path, size)
    assert store.store(incoming).status == 0
    synced = _spy_syncs(monkeypatch)
    assert store.store(incoming).status == 0
    assert synced == [target.name, target.parent.name]
    assert pending(store.spool) == (1 if size == 16 else 0)  # the first copy's record only: nothing new written
    store.spool.close()


def test_a_same_copy_kept_aside_is_acknowledged_once_the_indexed_copy_is_durable(tmp_path, monkeypatch):
    """The same race after the study completed (`after_complete: ignore`): the second looked for
    the instance before the first committed it, so it staged its copy and is kept aside, found the
    same and discarded; the first's copy is fsynced before the answer all the same. (The
    interleaving is made by hiding the committed row from the second's look.)"""
    store, incoming, target = _instance_store(tmp_path, 512, completion={"after_complete": "ignore"})
    assert store.store(incoming).status == 0
    store.index.query("UPDATE studies SET state='complete', completions=1")
    monkeypatch.setattr(store.index, "find_instance", lambda sop_instance_uid: None)
    synced = _spy_syncs(monkeypatch)
    assert store.store(incoming).status == 0
    assert synced == [target.name, target.parent.name]
    assert not list((tmp_path / "data" / "tmp").iterdir()) and not list((tmp_path / "data" / "quarantine").iterdir())
    store.spool.close()


def _variant(incoming: Incoming, **changes: Any) -> Incoming:
    """`incoming` with some attributes of its data set changed (in its transfer syntax)."""
    syntax = pydicom.uid.UID(incoming.transfer_syntax)
    ds = pydicom.filereader.read_dataset(DicomBytesIO(bytes(incoming.payload)), syntax.is_implicit_VR,
                                         syntax.is_little_endian)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    pydicom.filewriter.write_dataset(fp, ds)
    return dataclasses.replace(incoming, payload=memoryview(fp.getvalue()))


def test_new_instances_are_filed_without_a_look_up_and_the_others_as_before(tmp_path, monkeypatch):
    """A receiver takes an instance for new while the last one was (InstanceStore._file): no
    look-up of its SOP Instance UID before it is staged and indexed. One indexed after all is
    filed again, looked up first, with the outcome it always had: an identical resend is
    acknowledged and its indexed file left as it was, a changed copy replaces it, a copy in
    another study is refused (0xC214) and quarantined; nothing stays in tmp/."""
    store, first, target = _instance_store(tmp_path, 16)
    find = store.index.find_instance
    looked_up: list[str] = []
    monkeypatch.setattr(store.index, "find_instance", lambda uid: looked_up.append(uid) or find(uid))
    new = [_new_instance(tmp_path / f"ct{n}", 16, store.spool) for n in range(4)]
    assert [store.store(i).status for i in (first, new[0][0], new[1][0])] == [0, 0, 0]
    assert looked_up == []
    indexed = identify(target)
    assert store.store(first).status == 0  # an identical resend: looked up, compared, untouched
    assert looked_up == [first.sop_instance_uid] and identify(target) == indexed
    assert [store.store(i).status for i in (new[2][0], new[3][0])] == [0, 0]  # after a resend: one look-up
    assert looked_up == [first.sop_instance_uid, new[2][0].sop_instance_uid]
    changed = _variant(first, SeriesDescription="changed")
    assert store.store(changed).status == 0  # a replacement
    assert target.read_bytes().endswith(bytes(changed.payload)) and identify(target) != indexed
    elsewhere = _variant(first, StudyInstanceUID=pydicom.uid.generate_uid())
    assert store.store(elsewhere).status == 0xC214
    assert target.read_bytes().endswith(bytes(changed.payload))
    assert len(list((tmp_path / "data" / "quarantine").glob("*.dcm"))) == 1
    for incoming, path in [(first, target)] + new:
        row = find(incoming.sop_instance_uid)
        assert row is not None and tmp_path / "data" / row["path"] == path and path.exists()
    assert len(store.index.query("SELECT 1 FROM instances")) == 5
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    store.spool.close()


def test_an_identical_resend_taken_for_new_is_acknowledged_when_its_copy_cannot_be_staged(tmp_path, monkeypatch):
    """The disk refuses the copy a receiver stages for an instance it takes for new (the last
    one was new): a resend of an indexed instance is looked up, found identical and acknowledged
    (it writes nothing), as it always was; a new one is refused with 0xA700."""
    store, first, target = _instance_store(tmp_path, 16)
    assert store.store(first).status == 0
    indexed = identify(target)

    def disk_full(*_args: Any, **_kwargs: Any) -> None:
        raise spool_module.OutOfSpace(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.spool, "stage_held", disk_full)
    assert store.store(first).status == 0 and identify(target) == indexed
    incoming, path = _new_instance(tmp_path / "ct2", 16, store.spool)
    assert store.store(incoming).status == 0xA700 and not path.exists()
    assert store.index.find_instance(incoming.sop_instance_uid) is None
    store.spool.close()


class _WritebackError:
    """Linux's report of a write-back error on one file (mm/filemap.c, file_check_and_advance_wb_err,
    errseq_t): to each file description open when it happened, once, and to one opened later
    while nobody has seen it; any other fsync of the file succeeds, although its pages never
    reached the disk. (An I/O error cannot be made on this disk: the one fault mocked.)"""

    def __init__(self, path: Path):
        self.inode = os.stat(path).st_ino
        self.due = {fd for fd in map(int, os.listdir("/proc/self/fd")) if self._on_file(fd)}
        self.seen = False

    def _on_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == self.inode
        except OSError:
            return False

    def reported(self, fd: int) -> bool:
        if self._on_file(fd) and (fd in self.due or not self.seen):
            self.due.discard(fd)
            self.seen = True
            return True
        return False


def _eio(*args: Any) -> None:
    raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("size", [16, 512])
@pytest.mark.parametrize("racing_resend", [False, True])
def test_an_instance_whose_file_fails_its_sync_is_written_again_before_its_answer(
        tmp_path, monkeypatch, size, racing_resend):
    """The row commits before the file is made durable (Spool.settle). A write-back error is
    reported once, so no later fsync of that file can be trusted: the bytes are written to a new
    file, fsynced and renamed over it with its modification time, and only then acknowledged.
    The fsync goes through the descriptor the file was written through, which is told of the
    error even when an identical resend's fsync (by path, answered 0xA700) took it first. If the
    new copy fails too, the answer is 0xA700 and the file stays."""
    store, incoming, target = _instance_store(tmp_path, size)
    real_fsync, real_settle = os.fsync, store.spool.settle
    errors: list[_WritebackError] = []
    resent: list[int] = []

    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        if any(error.reported(fd) for error in errors):
            _eio()
        real_fsync(fd)

    def settle(*args: Any, **kwargs: Any) -> None:  # the placed file's pages fail to reach the disk now
        if not errors:
            first.append(os.stat(target))
            errors.append(_WritebackError(target))
            if racing_resend:
                resent.append(store.store(incoming).status)
        real_settle(*args, **kwargs)

    first: list[os.stat_result] = []
    real_place = store.spool.place
    under_lock: list[bool] = []

    def place(*args: Any, **kwargs: Any) -> None:  # every rename into studies/ while the index's write lock is held
        probe = sqlite3.connect(tmp_path / "data" / "index.sqlite", timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            under_lock.append(False)
        except sqlite3.OperationalError:  # database is locked
            under_lock.append(True)
        finally:
            probe.close()
        real_place(*args, **kwargs)

    monkeypatch.setattr(store.spool, "place", place)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store.spool, "settle", settle)
    monkeypatch.setattr(journal.os, "fdatasync", _eio)  # 16: the journal's record fails, the file is fsynced
    assert store.store(incoming).status == 0
    assert resent == ([0xA700] if racing_resend else [])  # the resend's fsync took the error first
    now = os.stat(target)
    assert now.st_ino != first[0].st_ino and now.st_mtime_ns == first[0].st_mtime_ns  # written again
    assert synced[-1] == target.parent.name  # and the rename made durable before the answer
    assert under_lock == [True, True]  # the first copy and the new one (the racing resend placed nothing)
    assert spool_module.same_dataset(target, incoming.payload) and store.index.missing_instances() == 0
    assert not list((tmp_path / "data" / "tmp").iterdir())

    other, other_target = _new_instance(tmp_path / "ct2", size, store.spool)
    monkeypatch.setattr(os, "fsync", lambda fd: _eio() if stat.S_ISREG(os.fstat(fd).st_mode) else real_fsync(fd))
    assert store.store(other).status == 0xA700  # its fsync failed, and the new copy's too
    assert spool_module.same_dataset(other_target, other.payload)  # as before: the file and its row stay
    assert not list((tmp_path / "data" / "tmp").iterdir())
    monkeypatch.undo()
    store.spool.close()


def test_a_copy_written_again_never_replaces_a_newer_one_placed_meanwhile(tmp_path, monkeypatch):
    """Between the failed fsync and the new copy's rename another association replaced the
    instance with different bytes, and was acknowledged: the new copy of the older bytes is not
    renamed over it, and the older is answered 0xA700."""
    store, incoming, target = _instance_store(tmp_path, 512)
    real_fsync, real_settle, real_write_again = os.fsync, store.spool.settle, store._write_again
    errors: list[_WritebackError] = []
    newer_data = bytearray(incoming.payload)
    newer_data[-1] ^= 1  # the last pixel's byte
    newer = dataclasses.replace(incoming, payload=memoryview(bytes(newer_data)))
    answers: list[int] = []

    def settle(*args: Any, **kwargs: Any) -> None:
        if not errors:
            errors.append(_WritebackError(target))
        real_settle(*args, **kwargs)

    def write_again(*args: Any) -> bool:
        answers.append(store.store(newer).status)
        return real_write_again(*args)

    monkeypatch.setattr(os, "fsync", lambda fd: _eio() if any(e.reported(fd) for e in errors) else real_fsync(fd))
    monkeypatch.setattr(store.spool, "settle", settle)
    monkeypatch.setattr(store, "_write_again", write_again)
    assert store.store(incoming).status == 0xA700
    assert answers == [0] and spool_module.same_dataset(target, newer.payload)
    assert not list((tmp_path / "data" / "tmp").iterdir())
    monkeypatch.undo()
    store.spool.close()


@pytest.mark.parametrize("size", [16, 512])
@pytest.mark.parametrize("persistent", [False, True])
def test_a_write_error_reported_at_close_is_answered_as_a_failed_fsync(tmp_path, monkeypatch, size, persistent):
    """NFS reports a delayed write error (EDQUOT, EIO) when the file is closed: the staged file's
    descriptor is closed before the answer, and an error there is answered as a failed fsync
    (written again, or 0xA700), never raised out of the store after its row committed."""
    store, incoming, target = _instance_store(tmp_path, size)
    real_open, real_close = os.open, os.close
    staged: set[int] = set()
    failures: list[int] = []

    def opening(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith(".part") and flags & os.O_WRONLY:
            staged.add(fd)
        return fd

    def closing(fd: int) -> None:  # a quota on an NFS server cannot be made here: the one fault mocked
        real_close(fd)
        if fd in staged:
            staged.discard(fd)
            if persistent or not failures:
                failures.append(fd)
                raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "close", closing)
    status = store.store(incoming).status
    monkeypatch.undo()
    assert len(failures) == 2 if persistent else len(failures) == 1  # the first copy's close, and the new one's
    assert status == (0xA700 if persistent else 0)
    assert spool_module.same_dataset(target, incoming.payload)  # (kept, as any copy whose new one failed too)
    assert not list((tmp_path / "data" / "tmp").iterdir())
    store.spool.close()


def test_an_instance_larger_than_a_segment_is_synced_itself_and_a_failed_sync_stops_the_journal(
        tmp_path, monkeypatch):
    spool = journalled_spool(tmp_path, segment_bytes=64_000)
    receive(spool, "5.1", os.urandom(100_000))
    assert pending(spool) == 0  # the file and its folder fsynced instead (Spool.settle)
    receive(spool, "5.2", os.urandom(1000))
    assert pending(spool) == 1

    def failing(fd: int) -> None:  # an I/O error cannot be made on this disk: the one fault mocked
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal.os, "fdatasync", failing)
    receive(spool, "5.3", os.urandom(1000))  # the record's sync fails: the file and its folder fsynced instead
    assert spool.journal is not None and spool.journal._unusable
    monkeypatch.undo()
    receive(spool, "5.4", os.urandom(1000))  # synced itself: the journal takes nothing more
    assert pending(spool) == 2  # 5.2, and 5.3's record whose sync failed: replayed at the next start
    die(spool)
    assert recover(tmp_path)["records"] == 2


def test_a_recorded_path_outside_studies_is_never_written(tmp_path):
    spool = journalled_spool(tmp_path)
    assert spool.journal is not None
    outside = tmp_path / "elsewhere.dcm"
    anyone = FileIdentity(inode=1, generation=-1, mtime_ns=0)
    assert spool.journal.record("../elsewhere.dcm", anyone, [b"evil"])
    assert spool.journal.record("index.sqlite", anyone, [b"evil"])
    die(spool)
    assert recover(tmp_path)["restored"] == 0
    assert not outside.exists() and not (tmp_path / "index.sqlite").exists()


def test_instances_a_power_cut_damaged_behind_their_acknowledgement_come_back_from_the_journal(
        start_node, tmp_path, monkeypatch):
    """Acknowledged by the node's receivers (the journal's checkpoints held back by the test hook),
    then the node killed and its files damaged as a power cut may leave them: at the next start
    every acknowledged instance is back, byte for byte, before reconcile looks, and none is marked
    missing. A clean stop leaves nothing to replay."""
    monkeypatch.setenv("PYTHONPATH", str(HOOKS))
    monkeypatch.setenv("DICOM_NODE_TEST_JOURNAL_HOLD", "1")
    files = make_study(tmp_path / "ct", slices=4, size=32)
    uid = pydicom.dcmread(files[0]).StudyInstanceUID
    node = start_node(scp={"workers": 1}, completion={"quiet_period_s": 600.0})
    sent_out = storescu(node.port, files)
    assert (sent_out.stdout + sent_out.stderr).count("(Success)") == 4
    rows = {r["sop_instance_uid"]: node.data_dir / r["path"] for r in node.query(
        "SELECT sop_instance_uid, path FROM instances")}
    sent = {pydicom.dcmread(f).SOPInstanceUID: dataset_bytes(f) for f in files}
    node.kill_all()
    earlier_boot(node.data_dir)  # the machine went down with it
    lost, zeroed = sorted(rows)[:2]
    os.rename(rows[lost], node.data_dir / "tmp" / f"{uuid.uuid4().hex}.part")
    size = rows[zeroed].stat().st_size
    with open(rows[zeroed], "r+b") as f:
        f.write(bytes(size))

    node.start()
    [started] = node.events("node_started")[-1:]
    assert started["journal_replayed"] == {"records": 4, "restored": 2, "superseded": 0, "quarantined": 0}
    reconciled = started["reconciled"]
    assert (reconciled["missing_marked"], reconciled["partial_quarantined"], reconciled["orphans_quarantined"]) == (0, 0, 0)
    assert {sop: dataset_bytes(path) for sop, path in rows.items()} == sent
    assert node.instance_count(uid) == 4 and not list((node.data_dir / "tmp").iterdir())
    node.stop()
    node.start()
    assert node.events("node_started")[-1]["journal_replayed"]["records"] == 0


def test_write_back_starts_at_staging_for_the_files_that_settle_fsyncs_and_only_those(tmp_path, monkeypatch):
    """A new instance the journal does not take (over RECORD_MAX_BYTES, or no journal) is fsynced
    with its folder after the index's transaction: its write-back is started as it is staged, so
    the disk works meanwhile (CT over one association: 1.30x the rate side by side). A file the
    journal takes is left to the checkpoint's one syncfs, and one staged durably was fsynced."""
    started: list[int] = []
    monkeypatch.setattr(spool_module, "start_writeback", lambda fd: started.append(os.fstat(fd).st_size))
    small, large = b"s" * 1000, b"L" * (RECORD_MAX_BYTES + 1)
    with ExitStack() as held:
        journalled = journalled_spool(tmp_path / "journalled")
        for chunks, durable in (([small], False), ([large[:9], large[9:]], False), ([large], True)):
            journalled.stage_held(chunks, held, durable=durable)
        assert started == [len(large)]
        Spool(tmp_path / "plain", 0).stage_held([small], held, durable=False)  # no journal: settle fsyncs it
        assert started == [len(large), len(small)]
        tiny = journalled_spool(tmp_path / "tiny", segment_bytes=4096)  # a journal too small for it
        tiny.stage_held([small * 4], held, durable=False)
        assert started == [len(large), len(small), 4 * len(small)]
    # the real call, on a file and on what it does not apply to (a pipe: ESPIPE): nothing raised
    read_end, write_end = os.pipe()
    try:
        journal.start_writeback(write_end)
        with open(tmp_path / "written", "wb") as f:
            f.write(large)
            f.flush()
            journal.start_writeback(f.fileno())
    finally:
        os.close(read_end)
        os.close(write_end)



def test_a_write_failure_reported_as_the_write_back_starts_fails_the_staging(tmp_path, monkeypatch):
    """A file system may return an error while the writes are submitted and record it nowhere the
    fsync would see it (ext4's allocation): such an error from sync_file_range fails the staging,
    and the instance is not acknowledged. A hint not taken (EINVAL, ESPIPE) changes nothing. The
    failure is mocked: a disk failing on cue is not at hand."""
    def failing(code: int) -> Any:
        def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> int:
            ctypes.set_errno(code)
            return -1
        return sync_file_range

    spool = Spool(tmp_path / "data", 0)
    with ExitStack() as held:
        monkeypatch.setattr(journal, "_SYNC_FILE_RANGE", failing(errno.EINVAL))
        assert Path(spool.stage_held([b"kept"], held, durable=False)[0]).read_bytes() == b"kept"
        monkeypatch.setattr(journal, "_SYNC_FILE_RANGE", failing(errno.EIO))
        with pytest.raises(OSError) as failed:
            spool.stage_held([b"lost"], held, durable=False)
    assert failed.value.errno == errno.EIO
    assert sorted(p.read_bytes() for p in (tmp_path / "data" / "tmp").iterdir()) == [b"kept"]  # the failed copy went
