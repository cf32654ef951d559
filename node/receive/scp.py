"""The storage SCP: pynetdicom AE, C-STORE/C-ECHO handlers and association auditing.

The C-STORE handler does the minimum that makes an acknowledgement safe: read the routing tags
and check the whole data set is well-formed (no pixel decoding), refuse a SOP Instance UID that
is already held elsewhere, write the bytes as received, fsync, rename, index. Everything heavier
happens after the study is complete, off the DIMSE thread.

Association checks (calling AE allowed, called AE ours, a free slot) run when the
A-ASSOCIATE-RQ arrives (EVT_REQUESTED), so that a rejection is logged with the check that
failed, and so that only requested associations hold a slot (see node/receive/workers.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Callable

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.association import Association
from pynetdicom.events import Event

from common import logs
from node.config import NodeConfig
from node.store.filemeta import encode_file_meta
from node.receive.counts import Counted, ReceiveCounts
from node.receive.signals import SIGNAL_SOP_CLASSES, SignalScp
from node.store.index import Index, IndexFailure, InstanceConflict, InstanceRecord, Placement
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail, Outcome
from node.store.signals import CompletionSignals
from node.store.spool import OutOfSpace, Spool, same_dataset
from node.receive import pynetdicom_internals as internals
from node.receive.tags import UnreadableDataset, read_routing_tags
from node.receive.validate import MalformedDataset, check_dataset

log = logging.getLogger("node.receive")
ALERT_INTERVAL_S = 60.0  # refused callers: one audit record a minute per (calling AE, address)
ALERTS_TRACKED = 10_000

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# C-STORE statuses (PS3.4 B.2.3; 0xCxxx is "Error: Cannot understand", the xxx ours)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk below storage.min_free_mb, or the write failed
CANNOT_UNDERSTAND = 0xC210  # routing tags unreadable, UIDs missing or invalid
PROCESSING_FAILURE = 0xC211  # dataset does not match the C-STORE request (SOP class/instance UID)
MALFORMED_DATASET = 0xC212  # not well-formed to its end (lengths, items, sequences, trailing bytes)
PIXEL_DATA_INVALID = 0xC213  # native Pixel Data of the wrong size, or a broken fragment sequence
SOP_INSTANCE_CONFLICT = 0xC214  # SOP Instance UID already held by another study/series/SOP class



class NodeAE(AE):
    """The node's AE. Its association checks are StorageSCP._on_requested, not pynetdicom's."""

    def __init__(self, config: NodeConfig):
        super().__init__(ae_title=config.scp.ae_title)
        # read by PduSocket: the most data-set bytes one DIMSE message may carry
        self.max_message_bytes = config.scp.max_instance_mb << 20
        self.pdu_timeout = config.scp.timeouts.pdu  # read by PduSocket: a whole PDU's deadline


@dataclass
class _AssociationStats:
    record_id: int
    calling_ae: str
    called_ae: str
    peer: str
    started: float
    instances: int = 0
    failures: int = 0
    studies: dict[str, int] = field(default_factory=dict)  # Study Instance UID -> instances stored
    patients: dict[str, str] = field(default_factory=dict)  # Study Instance UID -> Patient ID (audit trail)


class StorageSCP:
    """Handlers for one receiver process. `on_study_opened` tells the service to arm a timer."""

    def __init__(
        self,
        config: NodeConfig,
        index: Index,
        spool: Spool,
        on_study_opened: Callable[[str, float], None],
        slot_limit: int | None = None,
        on_slots: Callable[[int], None] = lambda n: None,
        on_signal: Callable[[str], None] = lambda study_uid: None,
    ):
        """`on_signal(study_uid)`: a completion signal for the study arrived (an MPPS step ended,
        an IAN): the service checks its completion at once."""
        self.config = config
        self.index = index
        self.spool = spool
        self.on_study_opened = on_study_opened
        self.slot_limit = slot_limit or config.scp.max_associations
        self.on_slots = on_slots
        self._titles = set(config.scp.called_ae_titles())
        self.counts = ReceiveCounts(index)
        self.trail = AuditTrail(index)
        self._alerted: dict[tuple[str, str], tuple[float, int]] = {}  # (calling AE, address) -> last record, refusals since
        self.signals = SignalScp(CompletionSignals(index), on_signal, config.completion.mpps_forward)
        self._stats: dict[int, _AssociationStats] = {}
        self._slots: set[int] = set()
        self._called: dict[int, str] = {}
        self._lock = threading.Lock()

    # -- AE --------------------------------------------------------------------------------

    def make_ae(self) -> NodeAE:
        scp = self.config.scp
        ae = NodeAE(self.config)
        # Slots are counted by _on_requested; pynetdicom's own count would include connections
        # that never sent an A-ASSOCIATE-RQ.
        ae.maximum_associations = 1 << 16
        ae.maximum_pdu_size = scp.pdu_limit()  # announced; PduSocket refuses longer PDUs
        ae.acse_timeout = scp.timeouts.acse
        ae.dimse_timeout = scp.timeouts.dimse
        ae.network_timeout = scp.timeouts.network
        ae.require_called_aet = False  # checked against every title in _on_requested
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        for sop_class in SIGNAL_SOP_CLASSES:
            ae.add_supported_context(sop_class, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        return ae

    def handlers(self) -> list[tuple[evt.EventType, Callable]]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_N_CREATE, self.signals.handle_create),
            (evt.EVT_N_SET, self.signals.handle_set),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    # -- association audit -----------------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        """The A-ASSOCIATE-RQ arrived: check it, take a slot, answer with the called AE asked for."""
        try:
            self._check_request(event.assoc)
        except Exception as exc:  # pynetdicom would log and go on negotiating: never unchecked
            logs.event(log, "association_rejected", logging.ERROR, reason="check failed",
                       error=type(exc).__name__, peer=event.assoc.requestor.address)
            internals.reject(event.assoc, 0x02, 0x01, 0x01)
            self._count(Counted.ASSOCIATION_REJECTED, "check failed")

    def _check_request(self, assoc: Association) -> None:
        calling, called = internals.requested_titles(assoc)
        peer = assoc.requestor.address
        scp = self.config.scp
        failed: tuple[str, int, int, int] | None = None
        detail: dict[str, object] = {}
        if scp.allowed_callers and not any(
            c.ae_title.strip() == calling and c.admits_host(peer) for c in scp.allowed_callers
        ):
            failed = ("calling AE not allowed", 0x01, 0x01, 0x03)  # rejected-permanent
        elif scp.require_called_ae_title and called not in self._titles:
            failed = ("called AE unknown", 0x01, 0x01, 0x07)  # rejected-permanent
            detail = {"our_ae_titles": sorted(self._titles)}
        else:
            with self._lock:
                taken = len(self._slots)
                if taken >= self.slot_limit:
                    failed = ("too many associations", 0x02, 0x03, 0x02)  # transient, local limit
                    detail = {"associations": taken, "limit": self.slot_limit}
                else:
                    self._slots.add(id(assoc))
                    self._called[id(assoc)] = called
                    taken += 1
        if failed is not None:
            logs.event(log, "association_rejected", logging.WARNING, reason=failed[0],
                       calling_ae=calling, called_ae=called, peer=peer, **detail)
            internals.reject(assoc, *failed[1:])
            self._count(Counted.ASSOCIATION_REJECTED, failed[0])
            if failed[1] == 0x01:  # refused for who the caller is, not for our load: a security alert
                self._alert(calling, peer, failed[0])
            return
        self.on_slots(taken)
        if called:
            internals.answer_as(assoc, called)

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        with self._lock:
            called = self._called.get(id(assoc)) or internals.requested_titles(assoc)[1]
        peer = assoc.requestor.address
        record = self.index.open_association(calling, called, peer, time.time())
        with self._lock:
            self._stats[id(assoc)] = _AssociationStats(record, calling, called, peer, time.time())

    def _on_rejected(self, event: Event) -> None:
        """A rejection by pynetdicom itself (ours are logged by _on_requested)."""
        assoc = event.assoc
        calling, called = internals.requested_titles(assoc)
        logs.event(log, "association_rejected", logging.WARNING, reason="refused by pynetdicom",
                   calling_ae=calling, called_ae=called, peer=assoc.requestor.address)
        self._count(Counted.ASSOCIATION_REJECTED, "refused by pynetdicom")

    def _alert(self, calling: str, peer: str, reason: str) -> None:
        """A refused caller in the audit trail: once a minute per (calling AE, address), the
        refusals in between counted in the next record (a peer that retries in a loop must not
        fill the trail, nor hold the write lock C-STOREs need)."""
        now = time.time()
        key = (calling, peer)
        with self._lock:
            last, suppressed = self._alerted.get(key, (0.0, 0))
            if now - last < ALERT_INTERVAL_S:
                self._alerted[key] = (last, suppressed + 1)
                return
            if len(self._alerted) >= ALERTS_TRACKED:
                self._alerted.clear()
            self._alerted[key] = (now, 0)
        more = f" ({suppressed} more since the last record)" if suppressed else ""
        self._audit(AuditRecord(AuditEvent.SECURITY_ALERT, "E", Outcome.MINOR_FAILURE, calling, peer,
                                AuditEventType.NODE_AUTHENTICATION, reason=reason + more))

    def _audit(self, record: AuditRecord) -> None:
        """Into the audit trail; a busy index must not change the answer to the peer (logged)."""
        try:
            self.trail.record(record, time.time())
        except IndexFailure as exc:
            logs.event(log, "audit_failed", logging.ERROR, event=record.event.value, error=type(exc).__name__)

    def _count(self, kind: Counted, detail: str = "") -> None:
        """Count for /metrics; a busy index must not change the answer to the peer."""
        try:
            self.counts.add(kind, detail)
        except IndexFailure as exc:
            logs.event(log, "count_failed", logging.WARNING, kind=kind.value, error=type(exc).__name__)

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
            self._called.pop(id(event.assoc), None)
            held = id(event.assoc) in self._slots
            self._slots.discard(id(event.assoc))
            taken = len(self._slots)
        if held:
            self.on_slots(taken)
        if stats is None:
            return
        now = time.time()
        self.index.close_association(stats.record_id, stats.instances, stats.failures, now)
        if stats.studies or stats.failures:
            self._audit(AuditRecord(AuditEvent.INSTANCES_TRANSFERRED, "C",
                                    Outcome.SUCCESS if not stats.failures else Outcome.MINOR_FAILURE,
                                    stats.calling_ae, stats.peer, studies=dict(stats.studies),
                                    patients=dict(stats.patients)))
        aborted = event.assoc.is_aborted  # set by the reactor thread as the A-ABORT is handled
        if aborted:
            self._count(Counted.ASSOCIATION_ABORTED)
        logs.event(
            log,
            "association",
            association_id=stats.record_id,
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer=stats.peer,
            instances=stats.instances,
            failures=stats.failures,
            studies=sorted(stats.studies),
            seconds=round(now - stats.started, 3),
            aborted=aborted,
        )

    # -- C-STORE ---------------------------------------------------------------------------

    def handle_store(self, event: Event) -> int:
        stats = self._stats.get(id(event.assoc))
        status = self._store(event, stats)
        if stats is not None:
            if status == SUCCESS:
                stats.instances += 1
            else:
                stats.failures += 1
        if status != SUCCESS:
            self._count(Counted.CSTORE_FAILURE, f"0x{status:04X}")
        return status

    def _store(self, event: Event, stats: _AssociationStats | None) -> int:
        request = event.request
        raw: BytesIO = request.DataSet  # type: ignore[assignment]
        payload = raw.getbuffer()
        if not self.spool.has_room(len(payload)):
            logs.event(log, "store_refused_disk_low", logging.ERROR, sop_instance_uid=_uid(request))
            return OUT_OF_RESOURCES
        transfer_syntax = event.context.transfer_syntax
        calling = stats.calling_ae if stats else event.assoc.requestor.ae_title
        header = encode_file_meta(
            str(request.AffectedSOPClassUID), _uid(request), str(transfer_syntax), calling
        )
        chunks = (header, payload)
        try:
            tags = read_routing_tags(payload, transfer_syntax)
            if tags.sop_instance_uid != _uid(request):
                raise _Mismatch("SOPInstanceUID differs from the request's Affected SOP Instance UID")
            if tags.sop_class_uid != str(request.AffectedSOPClassUID):
                raise _Mismatch("SOPClassUID differs from the request's Affected SOP Class UID")
            check_dataset(payload, transfer_syntax)
        except (UnreadableDataset, _Mismatch, MalformedDataset) as exc:
            if isinstance(exc, MalformedDataset):
                status = PIXEL_DATA_INVALID if exc.pixel else MALFORMED_DATASET
            else:
                status = CANNOT_UNDERSTAND if isinstance(exc, UnreadableDataset) else PROCESSING_FAILURE
            where = self.spool.quarantine(chunks, f"{exc} (transfer syntax {transfer_syntax})")
            logs.event(
                log,
                "instance_quarantined",
                logging.WARNING,
                reason=str(exc),
                status=f"0x{status:04X}",
                file=where.name,
                sop_instance_uid=_uid(request) if isinstance(exc, MalformedDataset) else None,
                calling_ae=stats.calling_ae if stats else None,
            )
            return status

        target = self.spool.instance_path(tags.study_uid, tags.series_uid, tags.sop_instance_uid)
        record = InstanceRecord(
            sop_instance_uid=tags.sop_instance_uid,
            sop_class_uid=tags.sop_class_uid,
            series_uid=tags.series_uid,
            study_uid=tags.study_uid,
            patient_id=tags.patient_id,
            transfer_syntax=str(transfer_syntax),
            path=str(target.relative_to(self.spool.root)),
            size=len(header) + payload.nbytes,
            calling_ae=calling,
            called_ae=stats.called_ae if stats else "",
            peer=stats.peer if stats else "",
            series=tags.series,
            association_id=stats.record_id if stats else None,
        )
        # The SOP Instance UID rule (README, "Receiving"): never move or replace an instance
        # indexed under another study, series or SOP class; in the same series compare bytes
        # before writing anything, so an identical resend touches nothing. The rule is checked
        # again under the index's write lock, where the staged file is renamed into place.
        existing = self.index.find_instance(tags.sop_instance_uid)
        try:
            InstanceConflict.check(record, existing)
        except InstanceConflict as exc:
            return self._conflict(exc, chunks, record, None)
        identical = (
            existing is not None
            and existing["path"] == record.path
            and existing["transfer_syntax"] == record.transfer_syntax
            and same_dataset(target, payload)
        )
        staged: Path | None = None
        previous: Path | None = None  # the copy a replacement renames over, until the index commits
        placed = False
        placed_inode = 0

        def place() -> None:  # under the index's write lock: the rename only, its fsync after
            nonlocal staged, placed, previous, placed_inode
            if staged is None:  # it was identical, and the indexed copy went meanwhile (retention)
                staged = self.spool.stage(chunks)
            placed_inode = staged.stat().st_ino
            previous = self.spool.keep_previous(target)
            placed = True  # from here the file at `target` may be the newcomer's
            self.spool.place(staged, target, durable=False)
            staged = None

        def unplace() -> None:  # the transaction failed after place(): still under the write lock
            nonlocal placed, previous
            if placed and previous is not None:  # the acknowledged copy it replaced goes back
                self.spool.restore(previous, target)
            elif placed:  # a new instance: its row is never committed
                self.spool.discard(target)
            elif previous is not None:
                self.spool.discard(previous)
            placed, previous = False, None

        completion = self.config.completion
        now = 0.0
        try:
            if not identical:
                staged = self.spool.stage(chunks)
            now = time.time()
            arrival = self.index.record_instance(
                record,
                now=now,
                quiet_period=completion.quiet_period_for(calling),
                reopen=completion.after_complete == "reprocess",
                identical=identical,
                place=place,
                unplace=unplace,
                also=lambda db: CompletionSignals.note_instance(db, tags.study_uid, tags.sop_instance_uid,
                                                                tags.accession_number, tags.count),
            )
        except InstanceConflict as exc:  # the same UID committed elsewhere since find_instance
            return self._conflict(exc, chunks, record, staged)
        except OSError as exc:
            self._discard(staged)
            if placed:
                self._undo_failed_commit(record, now, target, placed_inode, previous)
            logs.event(log, "store_refused_disk_full" if isinstance(exc, OutOfSpace) else "store_failed",
                       logging.ERROR, sop_instance_uid=tags.sop_instance_uid, error=exc.strerror)
            return OUT_OF_RESOURCES
        except BaseException:  # the index failed: nothing was acknowledged, nothing stays behind
            self._discard(staged)  # (a failure before the COMMIT was undone under the lock: unplace)
            if placed:
                self._undo_failed_commit(record, now, target, placed_inode, previous)
            raise
        if previous is not None:
            self.spool.discard(previous)
        if placed:  # before the acknowledgement (a crash before it: reconcile marks the row missing)
            try:
                self.spool.make_durable(target)
            except OSError as exc:  # indexed, but the rename may not survive a power cut: not acknowledged
                logs.event(log, "store_failed", logging.ERROR, sop_instance_uid=tags.sop_instance_uid,
                           error=exc.strerror)
                return OUT_OF_RESOURCES
        if arrival.placement is Placement.KEPT_ASIDE and staged is not None and same_dataset(target, payload):
            # the copy a racing association placed first: the same bytes, nothing to keep aside
            self.spool.discard(staged)
            logs.event(log, "instance_identical_resend", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        elif arrival.placement is Placement.KEPT_ASIDE and staged is not None:
            where = self.spool.quarantine_file(staged, (
                f"a different copy of instance {tags.sop_instance_uid} arrived after study {tags.study_uid} "
                "completed; completion.after_complete is 'ignore', so the copy its results were made from stays"))
            logs.event(log, "instance_after_completion_kept_aside", logging.WARNING, study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid, file=where.name)
        elif arrival.duplicate and arrival.placement is Placement.PLACED:
            logs.event(log, "instance_replaced", study_uid=tags.study_uid, sop_instance_uid=tags.sop_instance_uid)
        if stats is not None:
            stats.studies[tags.study_uid] = stats.studies.get(tags.study_uid, 0) + 1
            stats.patients[tags.study_uid] = tags.patient_id
        if arrival.identical and not arrival.opened:
            logs.event(log, "instance_identical_resend", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        if arrival.ignored_after_complete:
            logs.event(log, "instance_after_completion_ignored", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        if arrival.opened:
            logs.event(log, "study_reopened" if arrival.reopened else "study_receiving",
                       study_uid=tags.study_uid, calling_ae=calling)
            self.on_study_opened(tags.study_uid, arrival.deadline)
        return SUCCESS

    def _discard(self, staged: Path | None) -> None:
        if staged is not None:
            self.spool.discard(staged)

    def _undo_failed_commit(self, record: InstanceRecord, now: float, target: Path, placed_inode: int,
                            previous: Path | None) -> None:
        """The COMMIT itself failed after the file was placed. Under the write lock again: if the
        row did commit after all (a connection lost during COMMIT) or another copy was placed
        since, nothing is undone; else the placement is. If the index cannot be reached, the next
        start's reconcile decides."""
        try:
            with self.index.transaction():
                row = self.index.find_instance(record.sop_instance_uid)
                try:
                    ours_in_place = target.stat().st_ino == placed_inode
                except FileNotFoundError:
                    ours_in_place = False
                if ours_in_place and (row is None or row["received_at"] < now):
                    if previous is not None:
                        self.spool.restore(previous, target)
                    else:
                        self.spool.discard(target)
                elif previous is not None:
                    self.spool.discard(previous)
        except Exception as exc:  # noqa: BLE001 - the failure being handled is re-raised by the caller
            logs.event(log, "store_undo_deferred", logging.WARNING, sop_instance_uid=record.sop_instance_uid,
                       error=type(exc).__name__)

    def _conflict(self, exc: InstanceConflict, chunks: tuple[bytes, memoryview], record: InstanceRecord,
                  staged: Path | None) -> int:
        """Refuse an instance whose SOP Instance UID is held elsewhere; the held one stays (the
        newcomer was only staged: it never reached the held instance's path)."""
        reason = f"{exc}; refused: this one is in study {record.study_uid}, series {record.series_uid}"
        if staged is not None:
            where = self.spool.quarantine_file(staged, reason)
        else:
            where = self.spool.quarantine(chunks, reason)
        logs.event(
            log,
            "instance_uid_conflict",
            logging.WARNING,
            integrity=True,
            status=f"0x{SOP_INSTANCE_CONFLICT:04X}",
            sop_instance_uid=exc.sop_instance_uid,
            study_uid=record.study_uid,
            series_uid=record.series_uid,
            sop_class_uid=record.sop_class_uid,
            held_by_study=exc.study_uid,
            held_by_series=exc.series_uid,
            held_sop_class_uid=exc.sop_class_uid,
            calling_ae=record.calling_ae,
            file=where.name,
        )
        return SOP_INSTANCE_CONFLICT


class _Mismatch(ValueError):
    pass


def _uid(request: object) -> str:
    return str(getattr(request, "AffectedSOPInstanceUID", "") or "")
