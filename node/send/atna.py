"""The audit trail sent to the site's audit record repository (IHE ATNA, ITI-20 Record Audit Event).

Each record of node.store.audit becomes DICOM audit messages (PS3.15 A.5.1 schema, A.5.3 rules
per event; one per patient, at most 10 studies each) carried in RFC 5424 syslog messages: facility authpriv (10), severity notice (5) or
warning (4) for a failure, MSGID `IHE+RFC-3881`, the XML as the UTF-8 MSG (with its BOM). The
transport is TLS (RFC 5425, octet-counted frames) as ATNA asks, plain TCP framed the same way
(RFC 6587), or UDP (RFC 5426, one message a datagram).

A cursor per repository (`audit_cursor`) says what it took: a sweep sends the records after it
and moves it only once the repository has them; one replica at a time sends to a repository
(it leases the cursor). Over TCP/TLS that is when the repository, after
our end of the stream, closes its own (it read everything before it); a repository that is down
or cuts the connection leaves the cursor where it was, and the records go with the next sweep:
nothing is lost, a record may come twice. UDP has no such confirmation (the cursor moves once
the datagrams are out).

Written by hand: the maintained syslog packages are logging handlers that swallow a failed send
(the cursor must know), and no maintained Python package renders DICOM audit messages.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import ssl
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Callable

from common import logs
from node.config import AuditRepository, NodeConfig
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail

log = logging.getLogger("node.send")

BATCH = 500  # records sent over one connection
SWEEP_BUDGET_S = 30.0  # a sweep sends batches for at most this long (a backlog drains over several)
STUDIES_PER_MESSAGE = 10
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE, SEVERITY_WARNING = 5, 4
MSGID = "IHE+RFC-3881"
APP_NAME = "dicom-node"
CLOSE_TIMEOUT_S = 10.0
MAX_DATAGRAM = 65000

_MEANINGS = {
    AuditEvent.APPLICATION_ACTIVITY: "Application Activity",
    AuditEvent.AUDIT_LOG_USED: "Audit Log Used",
    AuditEvent.INSTANCES_TRANSFERRED: "DICOM Instances Transferred",
    AuditEvent.SECURITY_ALERT: "Security Alert",
    AuditEvent.PATIENT_RECORD: "Patient Record",
    AuditEvent.USER_AUTHENTICATION: "User Authentication",
    AuditEventType.APPLICATION_START: "Application Start",
    AuditEventType.APPLICATION_STOP: "Application Stop",
    AuditEventType.LOGIN: "Login",
    AuditEventType.LOGOUT: "Logout",
    AuditEventType.NODE_AUTHENTICATION: "Node Authentication",
    AuditEventType.SOFTWARE_CONFIGURATION: "Software Configuration",
    AuditEventType.USE_OF_RESTRICTED_FUNCTION: "Use of Restricted Function",
    AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED: "User Security Attributes Changed",
}


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    """A value from a peer (a Patient ID, a reason) as XML 1.0 can carry it."""
    return _NOT_XML.sub("?", value)


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def host_of(address: str) -> str:
    """The host of `AE@host:port` (a destination), or an address as the receiver records it (an
    IPv4 or IPv6 address, no port)."""
    if "@" not in address:
        return address
    host = address.split("@", 1)[1].rpartition(":")[0]
    return host.strip("[]")


def _participant(parent: ET.Element, user_id: str, requestor: bool, role: tuple[str, str] | None = None,
                 host: str = "", ae_title: str | None = None) -> None:
    """An active participant; a DICOM application carries its AE title (A.5.2.2: AETITLES=)."""
    attributes = {"UserID": _text(user_id) or "-", "UserIsRequestor": "true" if requestor else "false"}
    if ae_title:
        attributes["AlternativeUserID"] = f"AETITLES={_text(ae_title)}"
    if host:
        attributes |= {"NetworkAccessPointID": _text(host), "NetworkAccessPointTypeCode": "2" if _is_ip(host) else "1"}
    element = ET.SubElement(parent, "ActiveParticipant", attributes)
    if role:
        _code(element, "RoleIDCode", *role)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def audit_messages(record: AuditRecord, node_ae: str, site_id: str | None = None) -> list[bytes]:
    """The DICOM audit messages (PS3.15 A.5.1) of one record, as UTF-8 XML: one per patient and
    at most STUDIES_PER_MESSAGE studies each (A.5.3.7 names one patient a message)."""
    by_patient: dict[str, list[str]] = {}
    for study_uid in record.studies:
        by_patient.setdefault(record.patients.get(study_uid, ""), []).append(study_uid)
    parts = [(patient, uids[i:i + STUDIES_PER_MESSAGE]) for patient, uids in by_patient.items()
             for i in range(0, len(uids), STUDIES_PER_MESSAGE)] or [("", [])]
    return [_message(record, node_ae, site_id, patient, uids) for patient, uids in parts]


def _message(record: AuditRecord, node_ae: str, site_id: str | None, patient_id: str, study_uids: list[str]) -> bytes:
    root = ET.Element("AuditMessage")
    when = datetime.fromtimestamp(record.recorded_at, tz=timezone.utc).isoformat(timespec="milliseconds")
    event = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": record.action, "EventDateTime": when, "EventOutcomeIndicator": str(int(record.outcome))})
    _code(event, "EventID", record.event.value, _MEANINGS[record.event])
    if record.event_type is not None:
        _code(event, "EventTypeCode", record.event_type.value, _MEANINGS[record.event_type])
    if record.reason and record.event is not AuditEvent.AUDIT_LOG_USED:
        ET.SubElement(event, "EventOutcomeDescription").text = _text(record.reason)
    node = f"{APP_NAME}[{os.getpid()}]"
    if record.event is AuditEvent.APPLICATION_ACTIVITY:  # A.5.3.1
        _participant(root, node, False, ("110150", "Application"), ae_title=node_ae)
    elif record.event is AuditEvent.AUDIT_LOG_USED:  # A.5.3.2: who read the trail, and from where
        _participant(root, record.actor, True, None, host_of(record.peer))
    elif record.event in (AuditEvent.USER_AUTHENTICATION, AuditEvent.PATIENT_RECORD):
        # A.5.3.12 User Authentication, A.5.3.14 Patient Record: the person (the requestor, from
        # their address) and the node they used
        _participant(root, record.actor, True, None, host_of(record.peer))
        _participant(root, node, False, ("110150", "Application"), ae_title=node_ae)
    elif record.event is AuditEvent.SECURITY_ALERT:  # A.5.3.11: who reports it, who caused it
        _participant(root, node, False, ("110150", "Application"), ae_title=node_ae)
        if record.person:  # a console user's action: the performing person
            _participant(root, record.actor, True, None, host_of(record.peer))
        else:
            _participant(root, record.actor, False, None, host_of(record.peer), ae_title=record.actor)
    elif record.destination:  # A.5.3.7, sent by the node
        peer_ae = record.peer.split("@", 1)[0]
        _participant(root, node, True, ("110153", "Source Role ID"), ae_title=node_ae)
        _participant(root, peer_ae, False, ("110152", "Destination Role ID"), host_of(record.peer), ae_title=peer_ae)
    else:  # A.5.3.7, received by the node (over DIMSE from an AE, or STOW-RS from an account)
        _participant(root, record.actor, True, ("110153", "Source Role ID"), host_of(record.peer),
                     ae_title=None if record.person else record.actor)
        _participant(root, node, False, ("110152", "Destination Role ID"), ae_title=node_ae)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": node_ae, **(
        {"AuditEnterpriseSiteID": _text(site_id)} if site_id else {})})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process
    if record.event is AuditEvent.SECURITY_ALERT and record.target:  # the alert's subject: what the user acted on
        subject = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(record.target), "ParticipantObjectTypeCode": "2"})
        _code(subject, "ParticipantObjectIDTypeCode", "12", "URI", "RFC-3881")
        ET.SubElement(subject, "ParticipantObjectName").text = _text(record.target)  # the schema wants a name first
        if record.reason:
            ET.SubElement(subject, "ParticipantObjectDetail", {
                "type": "Alert Description", "value": base64.b64encode(record.reason.encode()).decode()})
    elif record.event is AuditEvent.SECURITY_ALERT and record.peer:  # the alert's subject: the node that called
        subject = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(host_of(record.peer)), "ParticipantObjectTypeCode": "2"})
        _code(subject, "ParticipantObjectIDTypeCode", "110182", "Node ID")
        ET.SubElement(subject, "ParticipantObjectName").text = _text(record.actor) or "-"
        if record.reason:
            ET.SubElement(subject, "ParticipantObjectDetail", {
                "type": "Alert Description", "value": base64.b64encode(record.reason.encode()).decode()})
    if record.event is AuditEvent.AUDIT_LOG_USED:  # the trail itself
        trail = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(record.reason or "audit"), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})
        _code(trail, "ParticipantObjectIDTypeCode", "12", "URI", "RFC-3881")
        ET.SubElement(trail, "ParticipantObjectName").text = "Security Audit Log"
    for study_uid in study_uids:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": study_uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _code(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        ET.SubElement(study, "ParticipantObjectName").text = study_uid
        description = ET.SubElement(study, "ParticipantObjectDescription")
        ET.SubElement(description, "SOPClass", {"NumberOfInstances": str(record.studies[study_uid])})
    if patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(patient_id), "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _code(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
        ET.SubElement(patient, "ParticipantObjectName").text = _text(patient_id)
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
    """Sends the trail to `audit.repository` (a sweep every audit.sweep_s; one replica at a
    time: the sweep leases the repository's cursor)."""

    def __init__(self, trail: AuditTrail, config: Callable[[], NodeConfig]):
        self.trail = trail
        self.config = config

    def sweep(self, timeout: float | None = None) -> None:
        """Send what the repository has not taken yet, batch after batch for at most SWEEP_BUDGET_S
        (`timeout`: per connection; default sending.timeout_s). Nothing here raises: a failure is
        logged and the records wait for the next sweep."""
        config = self.config()
        repository = config.audit.repository
        if repository is None:
            return
        timeout = timeout or config.sending.timeout_s
        try:
            last_id = self.trail.claim(repository.key, lease_s=SWEEP_BUDGET_S + 2 * timeout)
            if last_id is None:
                return  # another replica sends to it now
            try:
                deadline = time.monotonic() + SWEEP_BUDGET_S
                while time.monotonic() < deadline:
                    records, read_up_to = self.trail.after(last_id, BATCH)
                    if read_up_to <= last_id:
                        return
                    self._send(repository, config, records, timeout)
                    self.trail.mark_sent(repository.key, read_up_to)
                    logs.event(log, "audit_sent", repository=repository.key, records=len(records))
                    last_id = read_up_to
            finally:
                self.trail.release(repository.key)
        except Exception as exc:  # noqa: BLE001 - an unreachable repository or index: next sweep
            logs.event(log, "audit_send_failed", logging.WARNING, repository=repository.key,
                       reason=str(exc) or type(exc).__name__)

    @staticmethod
    def _send(repository: AuditRepository, config: NodeConfig, records: list[AuditRecord], timeout: float) -> None:
        messages = [syslog_message(r, xml) for r in records
                    for xml in audit_messages(r, config.scp.ae_title, config.audit.site_id)]
        if not messages:
            return
        if repository.protocol == "udp":
            _send_udp(repository, messages)
        else:
            _send_stream(repository, messages, timeout)


def repository_tls_context(repository: AuditRepository) -> ssl.SSLContext:
    """TLS to the repository (RFC 5425 5.2): its certificate chain against `tls.ca` (else the
    system's CAs) and its name against `host`; ours presented when given (ATNA's mutual TLS)."""
    tls = repository.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    if tls.certificate and tls.private_key:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def _send_udp(repository: AuditRepository, messages: list[bytes]) -> None:
    family = socket.AF_INET6 if ":" in repository.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for message in messages:
            if len(message) > MAX_DATAGRAM:  # never cut: a cut message is no valid XML
                raise RepositoryUnavailable(f"a message of {len(message)} bytes exceeds a UDP datagram")
            sock.sendto(message, (repository.host, repository.port))


def _send_stream(repository: AuditRepository, messages: list[bytes], timeout: float) -> None:
    """Octet-counted frames ("LEN SP MSG", RFC 5425 / 6587); taken once the repository answered
    the end of our stream: its TLS close_notify, or the close of its end (it has read every
    frame before ours)."""
    raw = socket.create_connection((repository.host, repository.port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if repository.protocol == "tls":
            sock = repository_tls_context(repository).wrap_socket(raw, server_hostname=repository.host)
        sock.sendall(b"".join(b"%d %s" % (len(m), m) for m in messages))
        if isinstance(sock, ssl.SSLSocket):
            try:  # our close_notify: the repository reads to the end of the TLS stream
                sock.unwrap()
                return  # its close_notify: it read everything
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
