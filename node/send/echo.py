"""C-ECHO with a plain answer: success, or one line saying why not (unknown host, refused...).

Used by `dicom-node echo` and by the console's "test" button, so both say the same thing.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import DestinationConfig
from node.send.scu import associate, destination_ssl_context, rejection
from node.send.stow import StowSender


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    message: str
    seconds: float


def echo(host: str, port: int, calling_ae: str, called_ae: str, ssl_context: ssl.SSLContext | None = None,
         timeout: float = 10.0) -> EchoResult:
    started = time.monotonic()

    def result(ok: bool, message: str) -> EchoResult:
        return EchoResult(ok, message, round(time.monotonic() - started, 3))

    where = f"{called_ae}@{host}:{port}"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return result(False, f"unknown host {host!r}")
    assoc = associate(host, port, calling_ae, called_ae, [build_context(Verification)], ssl_context, timeout=timeout)
    if not assoc.is_established:
        refused = rejection(assoc)
        if refused is not None:
            return result(False, f"association rejected by {where} ({refused.text})")
        return result(False, f"no association with {where}: {why_no_connection(host, port, timeout)}")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return result(False, f"{where} sent no C-ECHO response (connection lost or timed out)")
    if code != 0:
        return result(False, f"{where} answered C-ECHO with status 0x{int(code):04X}")
    return result(True, f"C-ECHO status 0x0000 (success) from {where}")


def why_no_connection(host: str, port: int, timeout: float) -> str:
    """Asked only after a failed association: tell a refused port from a silent one."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            return "the peer accepted the connection but ended it without answering (not DICOM, or TLS expected)"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return "connection timed out"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def echo_destination(calling_ae: str, peer: DestinationConfig, timeout: float) -> EchoResult:
    """A configured destination checked as the outbox reaches it: C-ECHO for a DICOM AE, a
    QIDO-RS search with its credentials for a DICOMweb service."""
    if peer.dicomweb is None:
        assert peer.host and peer.port and peer.ae_title
        return echo(peer.host, peer.port, calling_ae, peer.ae_title, destination_ssl_context(peer.tls), timeout=timeout)
    started = time.monotonic()
    ok, message = StowSender().probe(peer, timeout)
    return EchoResult(ok, message, round(time.monotonic() - started, 3))
