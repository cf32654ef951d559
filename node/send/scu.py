"""Opening associations as a requestor (echo, send, result delivery), with TCP_NODELAY and
quick ACKs, and a reactor pause that holds (node/send/pynetdicom_internals.py).

Files are sent as stored when the peer accepts their own transfer syntax. Every SOP class is
also offered in Explicit and Implicit VR Little Endian, because many PACS accept a class only
uncompressed: a file in a syntax the peer refused is then decoded and sent uncompressed, the
same object with the same UIDs (the node's results are lossless, so every voxel is kept).
"""

from __future__ import annotations

import socket
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.presentation import PresentationContext, build_context

from node.config import ClientTls
from node.send.pynetdicom_internals import PromptAE, steady, tcp_socket

MAX_REQUESTED_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Send part-10 files as stored (streamed in chunks), never decoded and re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True


def _set_nodelay(event: Event) -> None:
    """Without TCP_NODELAY every DIMSE turn against a delayed-ACK peer stalls ~40 ms."""
    sock = tcp_socket(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Rejection:
    permanent: bool  # A-ASSOCIATE-RJ result 1 (permanent) or 2 (transient)
    text: str
    aborted: bool = False  # an A-ABORT from the peer's application, not an A-ASSOCIATE-RJ


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
        _rejections[event.assoc] = Rejection(True, "aborted by the peer (service user)", aborted=True)


def rejection(assoc: Association) -> Rejection | None:
    """Why the peer rejected or deliberately aborted the association, if it did."""
    return _rejections.get(assoc)


def client_ssl_context(
    ca: Path | None, certificate: Path | None = None, private_key: Path | None = None
) -> ssl.SSLContext:
    """The one client TLS context for DICOM peers: the peer's chain is verified against `ca` (the
    system's CAs when None), its host name is not (peers are identified by AE title and chain);
    our certificate is presented when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.check_hostname = False  # DICOM peers are identified by AE title and certificate chain
    if certificate and private_key:
        context.load_cert_chain(str(certificate), str(private_key))
    return context


def destination_ssl_context(tls: ClientTls) -> ssl.SSLContext | None:
    """How a configured destination is reached (outbox, `dicom-node echo`, the console's echo):
    None for plain TCP."""
    return client_ssl_context(tls.ca, tls.certificate, tls.private_key) if tls.enabled else None


def associate(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    contexts: Iterable[PresentationContext],
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Association:
    """Request an association; the caller checks ``assoc.is_established``. Its `send_*` calls
    may follow one another at once (`steady`)."""
    ae = PromptAE(ae_title=calling_ae)
    ae.requested_contexts = list(contexts)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0
    tls_args = (ssl_context, None) if ssl_context else None
    assoc = ae.associate(
        host, port, ae_title=called_ae, tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), (evt.EVT_PDU_RECV, _record_refusal)],
    )
    return steady(assoc) if assoc.is_established else assoc


def storage_contexts(files: Iterable[Path]) -> list[PresentationContext]:
    """Per SOP class: one context for each transfer syntax its files are in (one syntax per
    context, so the peer cannot pick a syntax other than the file's), plus one offering Explicit
    and Implicit VR Little Endian as the fallback for a peer that takes only uncompressed data."""
    syntaxes: dict[str, set[str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    contexts = [build_context(sop, ts) for sop, own in sorted(syntaxes.items()) for ts in sorted(own)]
    contexts += [build_context(sop, list(UNCOMPRESSED)) for sop in sorted(syntaxes)]
    if len(contexts) > MAX_REQUESTED_CONTEXTS:
        raise ValueError(f"{len(syntaxes)} SOP classes need {len(contexts)} presentation contexts,"
                         f" more than {MAX_REQUESTED_CONTEXTS}")
    return contexts


class NotAccepted(ValueError):
    """The peer accepted no presentation context that can carry this file."""


def send_file(assoc: Association, path: Path, allow_transcoding: bool = True) -> Dataset:
    """C-STORE one part-10 file: as stored if the peer accepted its transfer syntax, otherwise
    (if allowed) decoded to the uncompressed syntax the peer accepted. Returns the response."""
    meta = read_file_meta_info(path)
    sop_class, syntax = UID(str(meta.MediaStorageSOPClassUID)), UID(str(meta.TransferSyntaxUID))
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    if syntax in accepted:
        return assoc.send_c_store(path)
    takes_uncompressed = any(ts in UNCOMPRESSED for ts in accepted)
    if not (takes_uncompressed and allow_transcoding and syntax.is_little_endian):
        if not accepted:
            raise NotAccepted(f"{path.name}: the peer accepted no presentation context for {sop_class.name} ({sop_class})")
        offered = ", ".join(ts.name for ts in accepted)
        raise NotAccepted(f"{path.name}: the peer accepted {sop_class.name} only in {offered}, not in {syntax.name}")
    return assoc.send_c_store(uncompressed(path))


def uncompressed(path: Path) -> Dataset:
    """The file's object in Explicit VR Little Endian, same UIDs; pynetdicom re-encodes it to
    Implicit VR when that is what the peer accepted."""
    dataset = dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        # Lossless decoding re-encodes the same instance: keep the SOP Instance UID.
        dataset.decompress(generate_instance_uid=False)
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset
