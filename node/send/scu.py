"""Opening associations as a requestor (echo, send, result delivery), with TCP_NODELAY."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Iterable

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

MAX_REQUESTED_CONTEXTS = 128

# Send part-10 files as stored (streamed in chunks), never decoded and re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True


def _set_nodelay(event: Event) -> None:
    """Without TCP_NODELAY every DIMSE turn against a delayed-ACK peer stalls ~40 ms."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
        host, port, ae_title=called_ae, tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)]
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
