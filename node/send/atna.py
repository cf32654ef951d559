"""The audit trail sent to the site's audit record repository (IHE ATNA, ITI-20 Record Audit Event).

Each record of node.store.audit becomes a DICOM audit message (PS3.15 A.5.1 schema, A.5.3 rules
per event) carried in an RFC 5424 syslog message: facility authpriv (10), severity notice (5) or
warning (4) for a failure, MSGID `IHE+RFC-3881`, the XML as the UTF-8 MSG (with its BOM). The
transport is TLS (RFC 5425, octet-counted frames) as ATNA asks, plain TCP framed the same way
(RFC 6587), or UDP (RFC 5426, one message a datagram).

A cursor per repository (`audit_cursor`) says what it took: a sweep sends the records after it
and moves it only once the repository has them. Over TCP/TLS that is when the repository, after
our end of the stream, closes its own (it read everything before it); a repository that is down
or cuts the connection leaves the cursor where it was, and the records go with the next sweep:
nothing is lost, a record may come twice. UDP has no such confirmation (the cursor moves once
the datagrams are out).

Written by hand: the maintained syslog packages are logging handlers that swallow a failed send
(the cursor must know), and no maintained Python package renders DICOM audit messages.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Callable

from common import logs
from node.config import AuditRepository, NodeConfig
from node.send.scu import client_ssl_context
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail

log = logging.getLogger("node.send")

BATCH = 500  # records a sweep sends at most
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
MSGID = "IHE+RFC-3881"
APP_NAME = "dicom-node"
CLOSE_TIMEOUT_S = 10.0
MAX_DATAGRAM = 65000

_MEANINGS = {
    AuditEvent.APPLICATION_ACTIVITY: "Application Activity",
    AuditEvent.INSTANCES_TRANSFERRED: "DICOM Instances Transferred",
    AuditEvent.SECURITY_ALERT: "Security Alert",
    AuditEventType.APPLICATION_START: "Application Start",
    AuditEventType.APPLICATION_STOP: "Application Stop",
    AuditEventType.NODE_AUTHENTICATION: "Node Authentication",
}


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def _participant(parent: ET.Element, user_id: str, requestor: bool, role: tuple[str, str] | None = None,
                 address: str = "") -> None:
    attributes = {"UserID": user_id or "-", "UserIsRequestor": "true" if requestor else "false"}
    host = address.rsplit("@", 1)[-1].rsplit(":", 1)[0] if address else ""
    if host:
        attributes |= {"NetworkAccessPointID": host,
                       "NetworkAccessPointTypeCode": "2" if _is_ip(host) else "1"}
    element = ET.SubElement(parent, "ActiveParticipant", attributes)
    if role:
        _code(element, "RoleIDCode", *role)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def audit_message(record: AuditRecord, node_ae: str, site_id: str | None = None) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of one record, as UTF-8 XML."""
    root = ET.Element("AuditMessage")
    when = datetime.fromtimestamp(record.recorded_at, tz=timezone.utc).isoformat(timespec="milliseconds")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": record.action, "EventDateTime": when, "EventOutcomeIndicator": str(int(record.outcome))})
    _code(event, "EventID", record.event.value, _MEANINGS[record.event])
    if record.event_type is not None:
        _code(event, "EventTypeCode", record.event_type.value, _MEANINGS[record.event_type])
    if record.reason:
        ET.SubElement(event, "EventOutcomeDescription").text = record.reason
    if record.event is AuditEvent.APPLICATION_ACTIVITY:  # A.5.3.1
        _participant(root, node_ae, False, ("110150", "Application"))
    elif record.event is AuditEvent.SECURITY_ALERT:  # A.5.3.11: who reports it, who caused it
        _participant(root, node_ae, False, ("110150", "Application"))
        _participant(root, record.actor, True, None, record.peer)
    elif record.destination:  # A.5.3.3, sent by the node
        _participant(root, node_ae, True, ("110153", "Source Role ID"))
        _participant(root, record.peer.split("@", 1)[0], False, ("110152", "Destination Role ID"), record.peer)
    else:  # A.5.3.3, received by the node
        _participant(root, record.actor, True, ("110153", "Source Role ID"), record.peer)
        _participant(root, node_ae, False, ("110152", "Destination Role ID"))
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": node_ae, **(
        {"AuditEnterpriseSiteID": site_id} if site_id else {})})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    for study_uid, instances in record.studies.items():
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": study_uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        ET.SubElement(study, "ParticipantObjectName").text = study_uid
        description = ET.SubElement(study, "ParticipantObjectDescription")
        ET.SubElement(description, "SOPClass", {"NumberOfInstances": str(instances)})
    for patient_id in dict.fromkeys(p for p in record.patients.values() if p):
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
        ET.SubElement(patient, "ParticipantObjectName").text = patient_id
    # one line: a syslog server may escape or split at line ends
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="unicode").encode("utf-8")


def syslog_message(record: AuditRecord, xml: bytes, hostname: str | None = None) -> bytes:
    """RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG."""
    severity = SEVERITY_NOTICE if int(record.outcome) == 0 else SEVERITY_WARNING
    when = datetime.fromtimestamp(record.recorded_at, tz=timezone.utc).isoformat(timespec="milliseconds")
    host = "".join(c for c in (hostname or socket.gethostname()) if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {when.replace('+00:00', 'Z')} {host} {APP_NAME} {os.getpid()} {MSGID} - "
    return header.encode("ascii") + b"\xef\xbb\xbf" + xml


class RepositoryUnavailable(Exception):
    """The repository did not take the records (one line, why)."""


class AtnaSender:
    """Sends the trail to `audit.repository` (a sweep every audit.sweep_s)."""

    def __init__(self, trail: AuditTrail, config: Callable[[], NodeConfig]):
        self.trail = trail
        self.config = config

    def sweep(self, timeout: float | None = None) -> None:
        """Send what the repository has not taken yet (`timeout`: per connection; default
        sending.timeout_s)."""
        config = self.config()
        repository = config.audit.repository
        if repository is None:
            return
        records = self.trail.after(self.trail.sent_up_to(repository.key), BATCH)
        if not records:
            return
        messages = [syslog_message(r, audit_message(r, config.scp.ae_title, config.audit.site_id)) for r in records]
        try:
            if repository.protocol == "udp":
                _send_udp(repository, messages)
            else:
                _send_stream(repository, messages, timeout or config.sending.timeout_s)
        except (OSError, RepositoryUnavailable) as exc:
            logs.event(log, "audit_send_failed", logging.WARNING, repository=repository.key, records=len(records),
                       reason=str(exc) or type(exc).__name__)
            return
        self.trail.mark_sent(repository.key, int(records[-1].id or 0))
        logs.event(log, "audit_sent", repository=repository.key, records=len(records))


def _send_udp(repository: AuditRepository, messages: list[bytes]) -> None:
    family = socket.AF_INET6 if ":" in repository.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for message in messages:
            sock.sendto(message[:MAX_DATAGRAM], (repository.host, repository.port))


def _send_stream(repository: AuditRepository, messages: list[bytes], timeout: float) -> None:
    """Octet-counted frames ("LEN SP MSG", RFC 5425 / 6587); taken once the repository closes its
    end after ours (it has read every frame before our end of the stream)."""
    raw = socket.create_connection((repository.host, repository.port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if repository.protocol == "tls":
            tls = repository.tls
            context = client_ssl_context(tls.ca, tls.certificate, tls.private_key)
            sock = context.wrap_socket(raw, server_hostname=repository.host)
        sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
        if isinstance(sock, ssl.SSLSocket):
            try:  # our close_notify: the repository reads to the end of the TLS stream, then closes
                sock = sock.unwrap()
            except ssl.SSLEOFError:
                return  # it closed without a close_notify of its own (rsyslog does): it read everything
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(CLOSE_TIMEOUT_S)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return  # the repository closed its end: it has read everything
        raise RepositoryUnavailable("the repository did not close the connection after the records")
    except (ssl.SSLError, TimeoutError) as exc:
        raise RepositoryUnavailable(f"{type(exc).__name__}: {exc}") from None
    finally:
        sock.close()
        raw.close()
