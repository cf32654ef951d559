"""The storage SCP: pynetdicom AE, C-STORE/C-ECHO handlers and association auditing.

The C-STORE handler does the minimum that makes an acknowledgement safe: read the routing tags
(no pixels), write the bytes as received, fsync, rename, index. Everything heavier happens after
the study is complete, off the DIMSE thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
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
from pynetdicom.events import Event

from node import logs
from node.config import NodeConfig
from node.store.filemeta import encode_file_meta
from node.store.index import Index, InstanceRecord
from node.store.spool import OutOfSpace, Spool
from node.receive.tags import UnreadableDataset, read_routing_tags

log = logging.getLogger("node.receive")

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

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0xC211  # dataset does not match the C-STORE request


class NodeAE(AE):
    """An AE whose calling-AE allow-list may depend on the peer's address.

    pynetdicom checks ``require_calling_aet`` inside the association's own thread while
    negotiating, so the list can be computed for the peer of the current association.
    """

    def __init__(self, config: NodeConfig):
        super().__init__(ae_title=config.scp.ae_title)
        self._callers = config.scp.allowed_callers

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if not self._callers:
            return []
        assoc = threading.current_thread()
        peer = getattr(getattr(assoc, "requestor", None), "address", "") or ""
        allowed = [c.ae_title for c in self._callers if c.admits_host(peer)]
        # A non-empty list that matches nothing makes pynetdicom reject with
        # "calling AE title not recognised" (rejected-permanent).
        return allowed or ["\\"]

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:  # pynetdicom sets [] at init
        pass


@dataclass
class _AssociationStats:
    record_id: int
    calling_ae: str
    called_ae: str
    peer: str
    started: float
    instances: int = 0
    failures: int = 0
    studies: set[str] = field(default_factory=set)


class StorageSCP:
    """Handlers for one receiver process. `on_study_opened` tells the service to arm a timer."""

    def __init__(
        self,
        config: NodeConfig,
        index: Index,
        spool: Spool,
        on_study_opened: Callable[[str, float], None],
    ):
        self.config = config
        self.index = index
        self.spool = spool
        self.on_study_opened = on_study_opened
        self._stats: dict[int, _AssociationStats] = {}
        self._lock = threading.Lock()

    # -- AE --------------------------------------------------------------------------------

    def make_ae(self) -> NodeAE:
        scp = self.config.scp
        ae = NodeAE(self.config)
        ae.maximum_associations = scp.max_associations
        ae.maximum_pdu_size = scp.max_pdu
        ae.acse_timeout = scp.timeouts.acse
        ae.dimse_timeout = scp.timeouts.dimse
        ae.network_timeout = scp.timeouts.network
        ae.require_called_aet = scp.require_called_ae_title
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def handlers(self) -> list[tuple[evt.EventType, Callable]]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    # -- association audit -----------------------------------------------------------------

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        called = assoc.acceptor.ae_title
        peer = assoc.requestor.address
        record = self.index.open_association(calling, called, peer, time.time())
        with self._lock:
            self._stats[id(assoc)] = _AssociationStats(record, calling, called, peer, time.time())

    def _on_rejected(self, event: Event) -> None:
        assoc = event.assoc
        logs.event(
            log,
            "association_rejected",
            logging.WARNING,
            calling_ae=assoc.requestor.ae_title,
            called_ae=assoc.acceptor.ae_title,
            peer=assoc.requestor.address,
        )

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        now = time.time()
        self.index.close_association(stats.record_id, stats.instances, stats.failures, now)
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
            aborted=event.assoc.is_aborted,
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
        except (UnreadableDataset, _Mismatch) as exc:
            where = self.spool.quarantine(chunks, f"{exc} (transfer syntax {transfer_syntax})")
            logs.event(
                log,
                "instance_quarantined",
                logging.WARNING,
                reason=str(exc),
                file=where.name,
                calling_ae=stats.calling_ae if stats else None,
            )
            return CANNOT_UNDERSTAND if isinstance(exc, UnreadableDataset) else PROCESSING_FAILURE

        target = self.spool.instance_path(tags.study_uid, tags.series_uid, tags.sop_instance_uid)
        try:
            size = self.spool.store(target, chunks)
        except OutOfSpace:
            logs.event(log, "store_refused_disk_full", logging.ERROR, sop_instance_uid=tags.sop_instance_uid)
            return OUT_OF_RESOURCES
        except OSError as exc:
            logs.event(log, "store_failed", logging.ERROR, sop_instance_uid=tags.sop_instance_uid, error=exc.strerror)
            return OUT_OF_RESOURCES

        completion = self.config.completion
        arrival = self.index.record_instance(
            InstanceRecord(
                sop_instance_uid=tags.sop_instance_uid,
                sop_class_uid=tags.sop_class_uid,
                series_uid=tags.series_uid,
                study_uid=tags.study_uid,
                patient_id=tags.patient_id,
                transfer_syntax=str(transfer_syntax),
                path=str(target.relative_to(self.spool.root)),
                size=size,
                calling_ae=calling,
                called_ae=stats.called_ae if stats else "",
                peer=stats.peer if stats else "",
                series=tags.series,
            ),
            now=time.time(),
            quiet_period=completion.quiet_period_for(calling),
            reopen=completion.after_complete == "reprocess",
        )
        if stats is not None:
            stats.studies.add(tags.study_uid)
        if arrival.ignored_after_complete:
            logs.event(log, "instance_after_completion_ignored", study_uid=tags.study_uid,
                       sop_instance_uid=tags.sop_instance_uid)
        if arrival.opened:
            logs.event(log, "study_reopened" if arrival.reopened else "study_receiving",
                       study_uid=tags.study_uid, calling_ae=calling)
            self.on_study_opened(tags.study_uid, arrival.deadline)
        return SUCCESS


class _Mismatch(ValueError):
    pass


def _uid(request: object) -> str:
    return str(getattr(request, "AffectedSOPInstanceUID", "") or "")


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    tls = config.scp.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.client_ca:
        context.load_verify_locations(str(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
