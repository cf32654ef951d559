"""Reconcile the spool with the index at start-up, before any association is accepted.

A crash can leave two kinds of files behind (and a row can lose its file, see the end):
- a file renamed into ``studies/`` whose index row was never committed (the crash fell
  between the rename and the commit: the instance was never acknowledged), or whose row a power
  cut took after the acknowledgement (on SQLite, a new instance's commit does not wait for the
  disk: Index.record_instance's `lazy_commit`; its file and folder were fsynced first);
- a partial write in ``tmp/`` (the crash fell before the rename).

Each is checked exactly like a received instance (routing tags, whole-data-set check, the
SOP Instance UID rule). A complete, valid one is indexed as an arrival in its study, in the
order the files were placed, with the calling AE, called AE and peer its file meta names
(node/store/filemeta.py; a STOW-RS part's or a file of an earlier release: the study's latest
row's), so routing does not change; anything else goes to
``quarantine/`` with a reason. An identical copy of an indexed instance is removed. An index
row whose file is gone is recorded in `missing_files`: a job on its series fails with that reason
and the console counts it. Counts are logged as one ``reconciled`` event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy.exc import DataError, IntegrityError

from common import logs
from node.config import NodeConfig
from node.receive.store import reopens_study
from node.receive.tags import RoutingTags, UnreadableDataset, read_routing_tags
from node.receive.validate import MalformedDataset, check_dataset
from node.store.filemeta import peer_of
from node.store.index import Index, InstanceConflict, InstanceRecord
from node.store.signals import CompletionSignals
from node.store.spool import Spool, dataset_offset, modified_at, same_dataset

log = logging.getLogger("node.receive")
# A temporary file not written to for this long on a shared spool is a dead replica's partial write
# (a live association writes each instance within the DIMSE timeout).
SHARED_PARTIAL_AGE_S = 600.0


class _Refused(Exception):
    pass


class SpoolNotMounted(Exception):
    """The index lists instances, and not one of their files is under the data folder: the data
    volume is most likely not mounted. Receiving onto the bare mount point would put
    acknowledged instances where the volume, once mounted, hides them; the node does not start."""


@dataclass(frozen=True)
class _Origin:
    """Who sent an instance, as its file meta says (node/store/filemeta.py). A C-STORE's file
    names its called AE title (so reconcile trusts it whole); a STOW-RS part's, or a file of an
    earlier release, at most the calling AE title ("" for what it does not name)."""

    calling_ae: str
    called_ae: str
    peer: str


def _inspect(path: Path) -> tuple[RoutingTags, str, _Origin, memoryview]:
    """Routing tags, transfer syntax, origin and data set of a part-10 file, checked."""
    try:
        data = path.read_bytes()
        offset = dataset_offset(data)
        # the node's own group only: pydicom's reader would go on into group 0002 elements a
        # sender put at the start of its data set, and take their values for the node's
        meta = dcmread(BytesIO(data[:offset])).file_meta
        ts = str(meta.TransferSyntaxUID)
        sent_by = _Origin(str(meta.get("SendingApplicationEntityTitle", "")
                              or meta.get("SourceApplicationEntityTitle", "") or "").strip(),
                          str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip(),
                          peer_of(str(meta.get("SendingPresentationAddress", "") or "")))
    except Exception as exc:
        raise _Refused(f"not a complete part-10 file written by the node ({type(exc).__name__})") from None
    payload = memoryview(data)[offset:]
    try:
        tags = read_routing_tags(payload, ts)
        if not tags.whole:
            check_dataset(payload, ts)
    except (UnreadableDataset, MalformedDataset) as exc:
        raise _Refused(f"{exc} (transfer syntax {ts})") from None
    if str(meta.get("MediaStorageSOPInstanceUID", "")) != tags.sop_instance_uid:
        raise _Refused("SOPInstanceUID differs from the file meta's Media Storage SOP Instance UID")
    return tags, ts, sent_by, payload


def _keeps_own_origin(sent_by: _Origin, written: float, surviving: dict[str, Any] | None) -> bool:
    """Whether a file in place without a row (`written`: its modification time) is indexed with
    the origin its file meta names. Its row becomes the study's latest (received now), whose
    origin routing reads: a C-STORE's file written after the study's latest surviving row was
    received (rows a power cut took come after every durable one) is; one written before it
    (never acknowledged: a crash between rename and commit) leaves the study's origin as it was;
    a STOW-RS part's or an earlier release's file names none."""
    return bool(sent_by.called_ae) and (surviving is None or written > surviving["received_at"])


def reconcile(config: NodeConfig, spool: Spool, index: Index) -> dict[str, int]:
    started = time.monotonic()
    counts = {"orphans_indexed": 0, "orphans_quarantined": 0, "partial_indexed": 0,
              "partial_quarantined": 0, "duplicates_removed": 0, "missing_marked": 0, "missing_found": 0,
              "replaced_copies_removed": 0, "replaced_copies_restored": 0}

    def refuse(path: Path, reason: str, kind: str) -> None:
        where = spool.quarantine_file(path, f"reconcile at start-up: {reason}")
        counts[f"{kind}_quarantined"] += 1
        logs.event(log, "reconcile_quarantined", logging.WARNING, kind=kind, reason=reason, file=where.name)

    def index_it(path: Path, tags: RoutingTags, ts: str, sent_by: _Origin, kind: str, own_origin: bool) -> None:
        """`own_origin`: the row takes the origin the file names (see `_keeps_own_origin`), else
        the study's latest row's, whole."""
        target = spool.instance_path(tags.study_uid, tags.series_uid, tags.sop_instance_uid)
        origin: Any = asdict(sent_by) if own_origin else index.study_origin(tags.study_uid) or {
            "calling_ae": sent_by.calling_ae, "called_ae": "", "peer": ""}
        record = InstanceRecord(
            sop_instance_uid=tags.sop_instance_uid, sop_class_uid=tags.sop_class_uid,
            series_uid=tags.series_uid, study_uid=tags.study_uid, patient_id=tags.patient_id,
            transfer_syntax=ts, path=str(target.relative_to(spool.root)), size=path.stat().st_size,
            calling_ae=origin["calling_ae"] or sent_by.calling_ae, called_ae=origin["called_ae"] or "",
            peer=origin["peer"] or "", series=tags.series)
        existing = index.find_instance(tags.sop_instance_uid)
        try:
            InstanceConflict.check(record, existing)
        except InstanceConflict as exc:
            refuse(path, str(exc), kind)
            return
        if path != target:  # a partial write (or a rename a power cut undid: its row has no file)
            if existing is not None and target.exists():
                if same_dataset(target, _dataset_of(path)):
                    path.unlink()
                    counts["duplicates_removed"] += 1
                else:
                    refuse(path, "a never acknowledged version of an indexed instance", kind)
                return
            spool.adopt(path, target)
        completion = config.completion
        try:
            # what the receiver's transaction notes too: a row a power cut took after the instance
            # was acknowledged (a lazy commit, Index.record_instance) comes back whole
            index.record_instance(record, now=time.time(), quiet_period=completion.quiet_period_for(record.calling_ae),
                                  reopen=reopens_study(config, record.sop_class_uid),
                                  also=lambda db: CompletionSignals.note_instance(
                                      db, tags.study_uid, tags.sop_instance_uid, tags.accession_number, tags.count))
        except (DataError, IntegrityError) as exc:  # values the database refuses: never acknowledged, set aside
            refuse(path if path.exists() else target, f"the index refused it ({type(exc.orig).__name__})", kind)
            return
        counts[f"{kind}_indexed"] += 1
        logs.event(log, "reconcile_indexed", kind=kind, study_uid=tags.study_uid,
                   sop_instance_uid=tags.sop_instance_uid)

    # A replaced instance's previous copy, kept until the index committed (Spool.keep_previous),
    # that a crash left behind: put back if the replacement never committed, else removed. First:
    # a copy put back without a row (its lazy commit lost to a power cut) is indexed below.
    for previous in spool.replaced_copies(older_than_s=SHARED_PARTIAL_AGE_S if index.shared else 0.0):
        try:
            tags = _inspect(previous)[0]
        except _Refused:
            tags = None
        if tags is not None and _restore_if_uncommitted(index, spool, previous, tags):
            counts["replaced_copies_restored"] += 1
            logs.event(log, "reconcile_restored_replaced_copy", logging.WARNING, study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        else:
            spool.discard(previous)
            counts["replaced_copies_removed"] += 1

    # On a shared spool a file younger than this may be another replica's, renamed in place and
    # about to be indexed by it.
    settled = time.time() - SHARED_PARTIAL_AGE_S if index.shared else float("inf")
    for study_dir in sorted(spool.studies.iterdir()):
        known = {r["path"] for r in index.study_instances(study_dir.name)}
        files = [study_dir] if study_dir.is_file() else [
            p for p in study_dir.rglob("*") if p.is_file() and str(p.relative_to(spool.root)) not in known]
        # (regular files only: reading a FIFO someone made there would hold the start for ever)
        # in the order they were placed: the last one indexed is the study's latest row
        surviving = index.study_origin(study_dir.name)
        written = {path: modified_at(path) for path in files}
        for path in sorted(files, key=lambda p: (written[p], p)):
            if written[path] > settled:
                continue
            try:
                tags, ts, sent_by, _ = _inspect(path)
            except _Refused as exc:
                refuse(path, str(exc), "orphans")
                continue
            if path != spool.instance_path(tags.study_uid, tags.series_uid, tags.sop_instance_uid):
                refuse(path, "its path does not match its study, series and SOP instance UIDs", "orphans")
                continue
            index_it(path, tags, ts, sent_by, "orphans", _keeps_own_origin(sent_by, written[path], surviving))

    # On a shared spool another replica may be writing its temporary files right now.
    for part in spool.partial_writes(older_than_s=SHARED_PARTIAL_AGE_S if index.shared else 0.0):
        try:
            tags, ts, sent_by, _ = _inspect(part)
        except _Refused as exc:
            refuse(part, str(exc), "partial")
            continue
        index_it(part, tags, ts, sent_by, "partial",  # never acknowledged: the study's origin stays
                 bool(sent_by.called_ae) and index.study_origin(tags.study_uid) is None)

    # Index rows whose file is gone (deleted by hand, a volume restored from an older backup):
    # marked, never forgotten, so the study's job and the console can say what is missing; a
    # mark whose file is back is cleared. Existence is checked here without the lock, then again
    # for each candidate under it (Index.mark_missing).
    rows = index.instance_paths()

    def present(path: str) -> bool:
        return (spool.root / path).exists()

    found = [r["sop_instance_uid"] for r in rows if r["missing"] and present(r["path"])]
    if found:
        index.clear_missing(found)
        counts["missing_found"] = len(found)
    unmarked = [r for r in rows if not r["missing"]]
    candidates = [r["sop_instance_uid"] for r in unmarked if not present(r["path"])]
    if len(unmarked) > 1 and len(candidates) == len(unmarked):
        # not one indexed file on disk: a data volume not mounted, not files deleted one by one
        logs.event(log, "spool_files_all_gone", logging.ERROR, indexed=len(unmarked), data_dir=str(spool.root))
        raise SpoolNotMounted(
            f"the index lists {len(unmarked)} instances and not one of their files is under {spool.root}: is the"
            " data volume mounted? (to start afresh on purpose, move the index away as well)")
    for study_uid, gone in index.mark_missing(candidates, present, time.time()).items():
        counts["missing_marked"] += len(gone)
        logs.event(log, "instances_missing", logging.WARNING, study_uid=study_uid, instances=len(gone),
                   sop_instance_uids=gone[:20])

    logs.event(log, "reconciled", seconds=round(time.monotonic() - started, 3), **counts)
    return counts


def _restore_if_uncommitted(index: Index, spool: Spool, previous: Path, tags: RoutingTags) -> bool:
    """Under the write lock (a replica may be replacing the instance now): if the index row
    describes the kept copy and not the file in place (by size: clocks on a shared spool cannot
    be trusted), or on SQLite there is no row, the replacement never committed and the kept copy
    goes back. Equal sizes cannot tell the two apart: the file in place stays."""
    target = spool.instance_path(tags.study_uid, tags.series_uid, tags.sop_instance_uid)
    with index.transaction():
        row = index.find_instance(tags.sop_instance_uid)
        if row is None and not index.shared:
            # No row at all: the replacement never committed (it commits durably, and every
            # earlier row with it), and the kept copy's own row was a lazy commit a power cut
            # took (Index.record_instance): the kept copy is the acknowledged one. Its study's
            # row (a durable commit) and a file in place show it was not retention that removed
            # the instance since (a receiver killed before discarding its kept copy).
            if index.study_state(tags.study_uid) is None or not target.exists():
                return False
            spool.restore(previous, target)
            return True
        if row is None or row["path"] != str(target.relative_to(spool.root)):
            return False
        try:
            in_place = target.stat().st_size
        except FileNotFoundError:
            in_place = None
        if previous.stat().st_size == row["size"] != in_place:
            spool.restore(previous, target)
            return True
    return False


def _dataset_of(path: Path) -> bytes:
    data = path.read_bytes()
    return data[dataset_offset(data):]

