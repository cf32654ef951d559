"""The audit trail (issue 23, first part): what a hospital's security review asks of a node that
holds patient data, recorded in the index as DICOM audit events (PS3.15 A.5): every association
that stored instances (who, from where, which studies, how many), every association refused for
who the caller is, every result set sent or given up (to whom, which study), and the node's
starts and stops. Peers: dcmtk storescu and echoscu, Orthanc as the PACS; `dicom-node audit`
reads the trail."""

from __future__ import annotations

import json
import subprocess

import pydicom

from tests.orthanc import Orthanc
from tests.peers import VENV_BIN, free_port, make_study, storescu, wait_for


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
        pacs.stop()
