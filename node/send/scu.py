"""Opening associations as a requestor (echo, send, result delivery), with TCP_NODELAY."""

from __future__ import annotations

import socket
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context

MAX_REQUESTED_CONTEXTS = 128

# Send part-10 files as stored (streamed in chunks), never decoded and re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True


def _set_nodelay(event: Event) -> None:
    """Without TCP_NODELAY every DIMSE turn against a delayed-ACK peer stalls ~40 ms."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Rejection:
    permanent: bool  # A-ASSOCIATE-RJ result 1 (permanent) or 2 (transient)
    text: str


_rejections: "weakref.WeakKeyDictionary[Association, Rejection]" = weakref.WeakKeyDictionary()


def _record_refusal(event: Event) -> None:
    pdu = event.pdu
    if isinstance(pdu, A_ASSOCIATE_RJ):
        _rejections[event.assoc] = Rejection(
            pdu.result == 0x01, f"{pdu.result_str}, {pdu.source_str}: {pdu.reason_str}"
        )
    elif isinstance(pdu, A_ABORT_RQ) and pdu.source == 0x00:
        # The peer's application aborted on purpose (Orthanc does this to a C-STORE from an AE
        # it does not accept); a dropped connection is an A-P-ABORT instead.
        _rejections[event.assoc] = Rejection(True, "aborted by the peer (service user)")


def rejection(assoc: Association) -> Rejection | None:
    """Why the peer rejected or deliberately aborted the association, if it did."""
    return _rejections.get(assoc)


def client_ssl_context(
    ca: Path | None, certificate: Path | None = None, private_key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.check_hostname = False  # DICOM peers are identified by AE title and certificate chain
    if certificate and private_key:
        context.load_cert_chain(str(certificate), str(private_key))
    return context


def associate(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    contexts: Iterable[PresentationContext],
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Association:
    """Request an association; the caller checks ``assoc.is_established``."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = list(contexts)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    tls_args = (ssl_context, None) if ssl_context else None
    return ae.associate(
        host, port, ae_title=called_ae, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_PDU_RECV, _record_refusal)],
    )


def storage_contexts(files: Iterable[Path]) -> list[PresentationContext]:
    """One presentation context per SOP class, proposing each transfer syntax the files use."""
    syntaxes: dict[str, set[str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    if len(syntaxes) > MAX_REQUESTED_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes need more than {MAX_REQUESTED_CONTEXTS} contexts")
    return [build_context(sop, sorted(ts)) for sop, ts in sorted(syntaxes.items())]
