"""The storage SCP: pynetdicom AE, C-STORE/C-ECHO handlers and association auditing.

The C-STORE handler does the minimum that makes an acknowledgement safe (node/receive/store.py,
shared with STOW-RS): read the routing tags and check the whole data set is well-formed, refuse a
SOP Instance UID that is already held elsewhere, write the bytes as received, fsync, rename,
index. Everything heavier happens after the study is complete, off the DIMSE thread.

Association checks (calling AE allowed, called AE ours, a free slot) run when the
A-ASSOCIATE-RQ arrives (EVT_REQUESTED), so that a rejection is logged with the check that
failed, and so that only requested associations hold a slot (see node/receive/workers.py).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.association import Association
from pynetdicom.events import Event

from common import logs
from node.config import NodeConfig
from node.receive.counts import Counted, ReceiveCounts
from node.receive.signals import SIGNAL_SOP_CLASSES, SignalScp
from node.store.index import Index, IndexFailure
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail, Outcome
from node.store.signals import CompletionSignals
from node.store.spool import Spool
from node.receive import pynetdicom_internals as internals
from node.receive.store import SUCCESS, TRANSFER_SYNTAXES, Incoming, InstanceStore

log = logging.getLogger("node.receive")
ALERT_INTERVAL_S = 60.0  # refused callers: one audit record a minute per (calling AE, address)
ALERTS_TRACKED = 10_000





class NodeAE(AE):
    """The node's AE. Its association checks are StorageSCP._on_requested, not pynetdicom's."""

    def __init__(self, config: NodeConfig):
        super().__init__(ae_title=config.scp.ae_title)
        # read by PduSocket: the most data-set bytes one DIMSE message may carry
        self.max_message_bytes = config.scp.max_instance_mb << 20
        self.pdu_timeout = config.scp.timeouts.pdu  # read by PduSocket: a whole PDU's deadline
        self.direct_store: internals.DirectStore | None = None  # read by PduSocket (see StorageSCP.make_ae)


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
        self.store = InstanceStore(config, index, spool, on_study_opened)
        self.slot_limit = slot_limit or config.scp.max_associations
        self.on_slots = on_slots
        self._titles = set(config.scp.called_ae_titles())
        self.counts = ReceiveCounts(index)
        self.trail = AuditTrail(index)
        self._alerted: dict[tuple[str, str], tuple[float, int]] = {}  # (calling AE, address) -> last record, refusals since
        self.signals = SignalScp(CompletionSignals(index), on_signal, config.completion.mpps_forward)
        # Keyed by the Association itself (identity), so no entry can ever be taken for another's.
        self._stats: dict[Association, _AssociationStats] = {}
        self._slots: set[Association] = set()
        self._accepted: weakref.WeakSet[Association] = weakref.WeakSet()  # accepted by _check_request
        self._aborts_counted: weakref.WeakSet[Association] = weakref.WeakSet()
        # Connections closed (EVT_CONN_CLOSE, on the DUL thread), possibly while _check_request was
        # still deciding or opening the row: it must then end the association itself.
        self._closed: weakref.WeakSet[Association] = weakref.WeakSet()
        self._lock = threading.Lock()

    # -- AE --------------------------------------------------------------------------------

    def make_ae(self) -> NodeAE:
        scp = self.config.scp
        ae = NodeAE(self.config)
        # Slots are counted by _on_requested; pynetdicom's own count would include connections
        # that never sent an A-ASSOCIATE-RQ.
        ae.maximum_associations = 1 << 16
        ae.maximum_pdu_size = scp.pdu_limit()  # announced; PduSocket refuses longer PDUs
        # read by PduSocket: C-STOREs taken off pynetdicom's DIMSE path (see PduSocket, Direct)
        ae.direct_store = self.store_direct
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
            (evt.EVT_ABORTED, self._on_aborted),
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
                if assoc in self._closed:  # the peer went away while we were deciding
                    return
                taken = len(self._slots)
                if taken >= self.slot_limit:
                    failed = ("too many associations", 0x02, 0x03, 0x02)  # transient, local limit
                    detail = {"associations": taken, "limit": self.slot_limit}
                else:
                    self._slots.add(assoc)
                    taken += 1
        if failed is not None:
            logs.event(log, "association_rejected", logging.WARNING, reason=failed[0],
                       calling_ae=calling, called_ae=called, peer=peer, **detail)
            internals.reject(assoc, *failed[1:])
            self._count(Counted.ASSOCIATION_REJECTED, failed[0])
            if failed[1] == 0x01:  # refused for who the caller is, not for our load: a security alert
                self._alert(calling, peer, failed[0])
            return
        # The association's row is opened here, before the A-ASSOCIATE-AC goes out (pynetdicom
        # sends it before EVT_ACCEPTED), so no C-STORE can come before it exists. A peer that
        # goes away meanwhile (its own timeout while the index is busy) is finished here.
        try:
            record = self.index.open_association(calling, called, peer, time.time())
        except BaseException:
            with self._lock:
                self._slots.discard(assoc)
            raise
        stats = _AssociationStats(record, calling, called, peer, time.time())
        with self._lock:
            self._accepted.add(assoc)
            closed = assoc in self._closed
            if not closed:
                self._stats[assoc] = stats
            taken = len(self._slots)
        if closed:  # the peer went away while the row was being opened (_on_closed freed the slot)
            self._finish(assoc, stats)
            return
        self.on_slots(taken)
        if called:
            internals.answer_as(assoc, called)

    def _on_rejected(self, event: Event) -> None:
        """A rejection by pynetdicom itself (ours are logged by _on_requested)."""
        assoc = event.assoc
        with self._lock:
            stats = self._stats.pop(assoc, None)
            self._accepted.discard(assoc)
        if stats is not None:  # we had accepted it: its row goes, nothing happened on it
            try:
                self.index.discard_association(stats.record_id)
            except IndexFailure as exc:
                logs.event(log, "association_record_failed", logging.WARNING, error=type(exc).__name__)
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

    def _on_aborted(self, event: Event) -> None:
        """EVT_ABORTED, on the association's thread: also for an abort EVT_CONN_CLOSE could not
        see yet (a dropped connection queues its A-P-ABORT only after the close)."""
        self._count_abort(event.assoc)

    def _count_abort(self, assoc: Association) -> bool:
        """Count an accepted association's abort once, whichever event saw it first."""
        with self._lock:
            if assoc not in self._accepted:
                return False
            if assoc in self._aborts_counted:
                return True
            self._aborts_counted.add(assoc)
        self._count(Counted.ASSOCIATION_ABORTED)
        return True

    def _on_closed(self, event: Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._closed.add(assoc)
            stats = self._stats.pop(assoc, None)
            held = assoc in self._slots
            self._slots.discard(assoc)
            taken = len(self._slots)
        if held:
            self.on_slots(taken)
        if stats is not None:
            self._finish(assoc, stats)

    def _finish(self, assoc: Association, stats: _AssociationStats) -> None:
        """The association ended: its row closed, its transfer audited, an abort counted, logged."""
        aborted = self._count_abort(assoc) if internals.ended_in_abort(assoc) else False
        now = time.time()
        self.index.close_association(stats.record_id, stats.instances, stats.failures, now)
        if stats.studies or stats.failures:
            self._audit(AuditRecord(AuditEvent.INSTANCES_TRANSFERRED, "C",
                                    Outcome.SUCCESS if not stats.failures else Outcome.MINOR_FAILURE,
                                    stats.calling_ae, stats.peer, studies=dict(stats.studies),
                                    patients=dict(stats.patients)))
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
        """EVT_C_STORE: the C-STOREs the direct path leaves to pynetdicom (PduSocket, Direct)."""
        request = event.request
        raw: BytesIO = request.DataSet  # type: ignore[assignment]
        return self.store_direct(event.assoc, str(event.context.transfer_syntax), str(request.AffectedSOPClassUID),
                                 _uid(request), raw.getbuffer())

    def store_direct(self, assoc: Association, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str,
                     payload: memoryview) -> int:
        """Store one C-STORE's data set; the status is its C-STORE-RSP's."""
        stats = self._stats.get(assoc)
        stored = self.store.store(Incoming(
            payload, transfer_syntax, sop_class_uid, sop_instance_uid,
            stats.calling_ae if stats else assoc.requestor.ae_title, stats.called_ae if stats else "",
            stats.peer if stats else "", stats.record_id if stats else None))
        if stats is not None:
            if stored.status == SUCCESS and stored.study_uid is not None:
                stats.instances += 1
                stats.studies[stored.study_uid] = stats.studies.get(stored.study_uid, 0) + 1
                stats.patients[stored.study_uid] = stored.patient_id or ""
            else:
                stats.failures += 1
        if stored.status != SUCCESS:
            self._count(Counted.CSTORE_FAILURE, f"0x{stored.status:04X}")
        return stored.status


def _uid(request: object) -> str:
    return str(getattr(request, "AffectedSOPInstanceUID", "") or "")
