"""The audit trail (issue 23, first part): what a hospital's security review asks of a node that
holds patient data, recorded in the index as DICOM audit events (PS3.15 A.5): every association
that stored instances (who, from where, which studies, how many), every association refused for
who the caller is, every result set sent or given up (to whom, which study), and the node's
starts and stops. Peers: dcmtk storescu and echoscu, Orthanc as the PACS; `dicom-node audit`
reads the trail."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom

from tests.orthanc import Orthanc
from tests.peers import VENV_BIN, free_port, make_study, storescu, wait_for
from tests.syslog import Rsyslog, make_pki


def _trail(node, *args: str) -> list[dict]:  # type: ignore[no-untyped-def]
    done = subprocess.run([str(VENV_BIN / "dicom-node"), "audit", "--json", "--config", str(node.config_path), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_transfers_refusals_starts_and_stops_are_in_the_audit_trail(start_node, tmp_path):
    node = start_node(scp={"allowed_callers": [{"ae_title": "MODALITY"}]})
    first = make_study(tmp_path / "first", slices=2, size=16)
    second = make_study(tmp_path / "second", slices=1, size=16)
    assert storescu(node.port, first + second).returncode == 0
    refused = subprocess.run(["echoscu", "-aet", "INTRUDER", "127.0.0.1", str(node.port)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0
    studies = {str(pydicom.dcmread(files[0]).StudyInstanceUID): len(files) for files in (first, second)}

    def recorded() -> list[dict]:
        records = _trail(node)
        return records if {r["event_id"] for r in records} >= {"110100", "110104", "110113"} else []

    records = wait_for(recorded, timeout=30)
    [start] = [r for r in records if r["event_id"] == "110100"]
    assert (start["event_type"], start["action"], start["outcome"], start["actor"]) == ("110120", "E", 0, "TESTNODE")
    [transfer] = [r for r in records if r["event_id"] == "110104"]
    assert (transfer["action"], transfer["outcome"], transfer["actor"], transfer["peer"]) == (
        "C", 0, "MODALITY", "127.0.0.1")
    assert transfer["studies"] == studies
    [alert] = [r for r in records if r["event_id"] == "110113"]
    assert (alert["event_type"], alert["outcome"], alert["actor"], alert["reason"]) == (
        "110126", 4, "INTRUDER", "calling AE not allowed")
    assert _trail(node, "--since", "2099-01-01") == []
    node.stop()
    stops = [r for r in _trail(node, "--since", "1h") if r["event_type"] == "110121"]
    assert [(r["event_id"], r["actor"]) for r in stops] == [("110100", "TESTNODE")]
    bad = subprocess.run([str(VENV_BIN / "dicom-node"), "audit", "--since", "yesterday-ish", "--config",
                          str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a date or an age" in bad.stderr


def test_each_result_set_sent_or_given_up_is_in_the_audit_trail(start_node, tmp_path):
    pacs = Orthanc(tmp_path / "pacs").start()
    try:
        node = start_node(
            routing={"rules": [{"name": "copy", "match": {"tag": "Modality", "equals": "CT"},
                                "actions": {"forward_to": ["pacs", "nowhere"]}}]},
            destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
                          "nowhere": {"ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port()}},
            sending={"retry_initial_s": 0.2, "retry_max_s": 0.5, "deadline_s": 1.0, "sweep_s": 0.5})
        files = make_study(tmp_path / "ct", slices=3, size=16)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(node.port, files).returncode == 0

        def sent() -> list[dict]:
            records = [r for r in _trail(node) if r["event_id"] == "110104" and r["destination"]]
            return records if len(records) == 2 else []

        records = {r["destination"]: r for r in wait_for(sent, timeout=90)}
        delivered, given_up = records["pacs"], records["nowhere"]
        assert (delivered["outcome"], delivered["actor"], delivered["studies"]) == (0, "TESTNODE", {study_uid: 3})
        assert delivered["peer"] == f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"
        assert len(pacs.instances_by_modality(study_uid)["CT"]) == 3
        assert (given_up["outcome"], given_up["studies"]) == (12, {study_uid: 3}) and given_up["reason"]
    finally:
        pacs.discard()


SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rnc"
HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) dicom-node (\d+) IHE\+RFC-3881 - \xef\xbb\xbf(<\?xml.*)$")


def _audit_messages(repository: Rsyslog, tmp_path: Path) -> list[ET.Element]:
    """Each message the repository got: its RFC 5424 header checked, its XML valid against the
    DICOM audit message schema (PS3.15 A.5.1, with jing)."""
    out = []
    for n, raw in enumerate(repository.messages()):
        header = HEADER.match(raw)
        assert header, raw[:200]
        assert int(header.group(1)) in (84, 85)  # authpriv, notice or warning
        xml = tmp_path / f"message{n}.xml"
        xml.write_bytes(header.group(5))
        valid = subprocess.run(["jing", "-c", str(SCHEMA), str(xml)], capture_output=True, text=True, timeout=120)
        assert valid.returncode == 0, valid.stdout + valid.stderr
        out.append(ET.fromstring(header.group(5)))
    return out


def _event(message: ET.Element) -> tuple[str, str | None]:
    event = message.find("EventIdentification")
    assert event is not None
    kind = event.find("EventTypeCode")
    return event.find("EventID").get("csd-code"), kind.get("csd-code") if kind is not None else None  # type: ignore[union-attr]


def test_the_trail_goes_to_an_atna_repository_over_udp_as_valid_dicom_audit_messages(start_node, tmp_path):
    repository = Rsyslog(tmp_path / "rsyslog").start()
    try:
        node = start_node(audit={"repository": {"host": "127.0.0.1", "port": repository.port, "protocol": "udp"},
                                 "sweep_s": 0.5, "site_id": "HOSPITAL-1"})
        files = make_study(tmp_path / "ct", slices=2, size=16, patient_id="PAT-42")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: len(repository.messages()) >= 2, timeout=30)
        messages = _audit_messages(repository, tmp_path)
        assert [_event(m) for m in messages] == [("110100", "110120"), ("110104", None)]
        transfer = messages[1]
        roles = {p.find("RoleIDCode").get("csd-code"): p.attrib for p in transfer.findall("ActiveParticipant")}  # type: ignore[union-attr]
        assert (roles["110153"]["UserID"], roles["110153"]["NetworkAccessPointID"]) == ("MODALITY", "127.0.0.1")
        assert roles["110153"]["AlternativeUserID"] == "AETITLES=MODALITY"
        assert roles["110152"]["AlternativeUserID"] == "AETITLES=TESTNODE"
        objects = {o.get("ParticipantObjectTypeCodeRole"): o for o in transfer.findall("ParticipantObjectIdentification")}
        assert objects["3"].get("ParticipantObjectID") == study_uid
        assert objects["3"].find("ParticipantObjectDescription/SOPClass").get("NumberOfInstances") == "2"  # type: ignore[union-attr]
        assert objects["1"].get("ParticipantObjectID") == "PAT-42"
        assert transfer.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "HOSPITAL-1"  # type: ignore[union-attr]
        assert b"PAT-42" not in node.log_path.read_bytes()  # in the audit trail, never in the log
    finally:
        repository.stop()


def test_records_wait_while_the_tls_repository_is_down_and_none_is_lost(start_node, tmp_path):
    """Syslog over TLS (RFC 5425) to rsyslog's gtls driver: while rsyslog is stopped the node
    goes on (a refused association and a transfer are recorded); once it is back every record
    arrives, once."""
    pki = make_pki(tmp_path / "pki")
    repository = Rsyslog(tmp_path / "rsyslog", "tls", pki).start()
    try:
        node = start_node(scp={"allowed_callers": [{"ae_title": "MODALITY"}]}, audit={
            "repository": {"host": "127.0.0.1", "port": repository.port, "protocol": "tls",
                           "tls": {"enabled": True, "ca": str(pki["ca"])}}, "sweep_s": 0.5})
        wait_for(lambda: repository.messages(), timeout=30)  # the start
        repository.stop()
        assert storescu(node.port, make_study(tmp_path / "ct", slices=2, size=16)).returncode == 0
        assert subprocess.run(["echoscu", "-aet", "INTRUDER", "127.0.0.1", str(node.port)], capture_output=True,
                              timeout=60).returncode != 0
        wait_for(lambda: len(node.events("audit_send_failed")) >= 2, timeout=30)
        repository.start()
        wait_for(lambda: len(repository.messages()) >= 3, timeout=60)
        messages = _audit_messages(repository, tmp_path)
        assert sorted(_event(m) for m in messages) == [("110100", "110120"), ("110104", None), ("110113", "110126")]
        assert len(repository.messages()) == 3  # no record twice
        [alert] = [m for m in messages if _event(m)[0] == "110113"]
        subject = alert.find("ParticipantObjectIdentification")
        assert (subject.get("ParticipantObjectID"), subject.find("ParticipantObjectName").text) == (  # type: ignore[union-attr]
            "127.0.0.1", "INTRUDER")
    finally:
        repository.stop()


def test_a_repository_whose_certificate_names_another_host_gets_nothing(start_node, tmp_path):
    """RFC 5425 5.2: the repository is who its certificate says (here the certificate is for
    127.0.0.2): the node refuses it and keeps the records."""
    pki = make_pki(tmp_path / "pki", host="127.0.0.2")
    repository = Rsyslog(tmp_path / "rsyslog", "tls", pki).start()
    try:
        node = start_node(audit={"repository": {"host": "127.0.0.1", "port": repository.port, "protocol": "tls",
                                                "tls": {"enabled": True, "ca": str(pki["ca"])}}, "sweep_s": 0.5})
        failed = wait_for(lambda: node.events("audit_send_failed"), timeout=30)[0]
        assert "CERTIFICATE_VERIFY_FAILED" in failed["reason"] or "match" in failed["reason"], failed["reason"]
        assert repository.messages() == []
        assert node.query("SELECT last_id FROM audit_cursor")[0]["last_id"] == 0
    finally:
        repository.stop()


def test_messages_split_by_patient_carry_ipv6_addresses_and_odd_ids_as_valid_xml(tmp_path):
    """An association that stored 12 studies of two patients, from an IPv6 peer, one Patient ID
    with control characters: one message per patient, at most 10 studies each, all valid."""
    from node.send.atna import audit_messages
    from node.store.audit import AuditEvent, AuditRecord, Outcome

    studies = {f"1.2.3.{n}": n + 1 for n in range(12)}
    patients = {uid: ("PAT\x1b\x0c-1" if n < 11 else "PAT-2") for n, uid in enumerate(studies)}
    record = AuditRecord(AuditEvent.INSTANCES_TRANSFERRED, "C", Outcome.SUCCESS, "MODALITY", "2001:db8::17",
                         studies=studies, patients=patients, recorded_at=1.7e9)
    messages = audit_messages(record, "TESTNODE")
    parsed = []
    for n, xml in enumerate(messages):
        path = tmp_path / f"m{n}.xml"
        path.write_bytes(xml)
        valid = subprocess.run(["jing", "-c", str(SCHEMA), str(path)], capture_output=True, text=True, timeout=120)
        assert valid.returncode == 0, valid.stdout + valid.stderr
        parsed.append(ET.fromstring(xml))
    objects = [[o.get("ParticipantObjectID") for o in m.findall("ParticipantObjectIdentification")] for m in parsed]
    assert [len(ids) for ids in objects] == [11, 2, 2]  # 10 studies + patient, 1 + patient, 1 + patient
    assert [ids[-1] for ids in objects] == ["PAT??-1", "PAT??-1", "PAT-2"]
    source = parsed[0].find("ActiveParticipant")
    assert (source.get("NetworkAccessPointID"), source.get("NetworkAccessPointTypeCode")) == ("2001:db8::17", "2")  # type: ignore[union-attr]


TOKEN = "audit-test-token-0123456789"


def _get(url: str, token: str | None = None) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), ""


def test_admins_export_the_trail_as_json_or_csv_and_each_export_is_itself_audited(start_node, tmp_path):
    """The trail holds Patient IDs: even on loopback it needs the token; every read is recorded
    as Audit Log Used (PS3.15 A.5.3.2), whose message is valid too."""
    from node.send.atna import audit_messages
    from node.store.audit import AuditEvent, AuditRecord, Outcome

    node = start_node(http={"token": TOKEN})
    files = make_study(tmp_path / "ct", slices=2, size=16, patient_id="PAT-7")
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: _trail(node) and any(r["event_id"] == "110104" for r in _trail(node)), timeout=30)
    assert _get(f"{node.url}/api/audit")[0] == 401
    assert _get(f"{node.url}/api/audit?since=tomorrow", TOKEN)[0] == 400
    status, body, _ = _get(f"{node.url}/api/audit?since=1h", TOKEN)
    assert status == 200
    [transfer] = [r for r in json.loads(body) if r["event_id"] == "110104"]
    assert list(transfer["patients"].values()) == ["PAT-7"]
    status, body, kind = _get(f"{node.url}/api/audit?since=1h&format=csv", TOKEN)
    assert (status, kind.split(";")[0]) == (200, "text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert {r["event_id"] for r in rows} >= {"110100", "110104", "110101"}  # the JSON export was recorded first
    used = [r for r in _trail(node) if r["event_id"] == "110101"]
    assert [(r["action"], r["actor"], r["peer"], r["reason"]) for r in used] == [
        ("R", "http.token", "127.0.0.1", "/api/audit")] * 2
    xml = tmp_path / "used.xml"
    xml.write_bytes(audit_messages(AuditRecord(AuditEvent.AUDIT_LOG_USED, "R", Outcome.SUCCESS, "http.token",
                                               "127.0.0.1", reason="/api/audit", recorded_at=1.7e9), "TESTNODE")[0])
    valid = subprocess.run(["jing", "-c", str(SCHEMA), str(xml)], capture_output=True, text=True, timeout=120)
    assert valid.returncode == 0, valid.stdout + valid.stderr
