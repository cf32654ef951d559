"""Study completion by the other signals: HL7 v2 over MLLP (the RIS says the exam is complete),
the counts the images carry, the sending PACS's count (C-FIND to a real Orthanc), MPPS forwarded
to a RIS (a pynetdicom MPPS SCP), DISCONTINUED steps and signal settings per calling AE. The
quiet period is 600 s wherever a signal must complete the study."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import hl7
import hl7.client
import pydicom
import pytest
from pydicom.data import get_testdata_file
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from node.config import Hl7Config
from node.receive.hl7 import Hl7Listener
from tests.fuzz.targets import NoSignals
from tests.peers import NodeProcess, free_port, make_study, storescu, wait_for
from tests.test_completion_signals import _associate, _ended, _in_progress, _perform, _store

QUIET = {"quiet_period_s": 600.0}


def _hl7_node(start_node, **completion):  # type: ignore[no-untyped-def]
    node = start_node(completion={**QUIET, **completion}, hl7={"port": 0, "bind": "127.0.0.1"})
    node.hl7_port = wait_for(lambda: node.events("node_started"))[-1]["hl7_port"]
    return node


def _segment(name: str, **fields: str) -> str:
    """A segment with the given fields by number (f18="..." is field 18)."""
    values = [""] * max(int(k[1:]) for k in fields)
    for key, value in fields.items():
        values[int(key[1:]) - 1] = value
    return "|".join([name, *values])


def _message(kind: str, accession: str, control_id: str, order_status: str = "CM") -> str:
    msh = f"MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123101500||{kind}|{control_id}|P|2.5.1"
    pid = _segment("PID", f1="1", f3="PAT1")
    if kind == "ORU^R01":  # OBR-25 F: the final result; the accession number in OBR-18
        segments = [pid, _segment("OBR", f1="1", f2="PL1", f3="FI1", f4="CT^CT CHEST", f18=accession, f25="F")]
    elif kind == "OMI^O23":  # ORC-5 CM; the accession number in IPC-1
        segments = [pid, _segment("ORC", f1="SC", f2="PL1", f3="FI1", f5=order_status), _segment("TQ1", f1="1"),
                    _segment("OBR", f1="1", f2="PL1", f3="FI1", f4="CT"),
                    _segment("IPC", f1=accession, f2="RP1", f3="1.2.3", f4="SPS1")]
    else:  # ORM^O01: ORC-5 CM; the accession number in OBR-18
        segments = [pid, _segment("ORC", f1="SC", f2="PL1", f3="FI1", f5=order_status),
                    _segment("OBR", f1="1", f2="PL1", f3="FI1", f4="CT^CT CHEST", f18=accession)]
    return "\r".join([msh, *segments]) + "\r"


@pytest.mark.parametrize("encoding, ack", [
    ("^~\\&", "AA"), ("^~\\&#", "AA"),  # HL7's own, and v2.7's truncation character
    ("^~&", "AA"), ("^~\\\\&", "AA"),  # the escape left out, or doubled: seen from senders, read fine
    ("^AA&", "AR"), ("^^\\\\&", "AR"),  # a letter, a separator twice: the ACK would not parse (fuzzing)
])
def test_hl7_delimiters_as_senders_write_them(encoding: str, ack: str) -> None:
    message = _message("ORM^O01", "ACC-D", "MSG-D").replace("MSH|^~\\&|", f"MSH|{encoding}|", 1)
    reply, _ = Hl7Listener(Hl7Config(), NoSignals(), lambda study_uid: None)._handle(message.encode())
    assert reply.split("\r")[1].startswith(f"MSA|{ack}|"), reply


def _send(node: NodeProcess, text: str) -> hl7.Message:
    with hl7.client.MLLPClient("127.0.0.1", node.hl7_port) as client:
        return hl7.parse(client.send_message(text))


def _ack(reply: hl7.Message) -> tuple[str, str]:
    """(MSA-1, MSA-2): the acknowledgement code and the control id it acknowledges."""
    return str(reply.segment("MSA")(1)), str(reply.segment("MSA")(2))


def _study(folder: Path, slices: int, **identity) -> tuple[list[pydicom.Dataset], str]:  # type: ignore[no-untyped-def]
    datasets = [pydicom.dcmread(f) for f in make_study(folder, slices=slices, size=16, **identity)]
    return datasets, str(datasets[0].StudyInstanceUID)


def _completion(node: NodeProcess, study_uid: str, nth: int = 1) -> dict:
    return wait_for(lambda: [e for e in node.events("study_complete") if e["study_uid"] == study_uid][nth - 1:],
                    timeout=60)[0]


def test_an_hl7_final_result_after_the_images_completes_the_study(start_node, tmp_path):
    node = _hl7_node(start_node)
    datasets, study_uid = _study(tmp_path / "ct", 3, accession_number="A-100")
    _store(node, datasets)
    reply = _send(node, _message("ORU^R01", "A-100", "MSG-1"))
    assert _ack(reply) == ("AA", "MSG-1")
    event = _completion(node, study_uid)  # inside the 600 s quiet period
    assert (event["completed_by"], event["instances"]) == ("hl7", 3)
    job = wait_for(lambda: node.query("SELECT completed_by FROM work_items WHERE study_uid=?", (study_uid,)))[0]
    assert job["completed_by"] == "hl7"
    metrics = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    assert 'dicom_node_studies_completed_total{completed_by="hl7"} 1.0' in metrics.splitlines()
    assert "A-100" not in node.log()  # an accession number identifies the patient's exam: never logged


def test_an_order_complete_before_the_images_waits_for_them_and_survives_a_sigkill(start_node, tmp_path):
    """ORM^O01 with ORC-5 CM for an accession the node has not seen: kept, acknowledged, and
    after a SIGKILL and restart it completes the study when its images come (settled 2 s)."""
    node = _hl7_node(start_node)
    assert _ack(_send(node, _message("ORM^O01", "A-200", "MSG-2"))) == ("AA", "MSG-2")
    started = len(node.events("node_started"))
    node.kill_all()
    node.start()
    node.hl7_port = wait_for(lambda: node.events("node_started")[started:])[-1]["hl7_port"]
    datasets, study_uid = _study(tmp_path / "ct", 4, accession_number="A-200")
    other, other_uid = _study(tmp_path / "other", 2, accession_number="A-201")
    _store(node, datasets)
    _store(node, other)
    event = _completion(node, study_uid)
    assert (event["completed_by"], event["instances"]) == ("hl7", 4)
    last = node.study(study_uid)["last_received"]
    assert node.study(study_uid)["completed_at"] >= last + 2.0  # the settle time passed first
    assert node.study(other_uid)["state"] == "receiving"  # another accession: its quiet period decides


def test_an_omi_names_its_accession_in_ipc_and_a_resend_changes_nothing(start_node, tmp_path):
    node = _hl7_node(start_node)
    datasets, study_uid = _study(tmp_path / "ct", 2, accession_number="A-300")
    _store(node, datasets)
    assert _ack(_send(node, _message("OMI^O23", "A-300", "MSG-3"))) == ("AA", "MSG-3")
    assert _completion(node, study_uid)["completed_by"] == "hl7"
    assert _ack(_send(node, _message("OMI^O23", "A-300", "MSG-3"))) == ("AA", "MSG-3")  # the interface engine resends
    assert len(node.query("SELECT 1 FROM completion_signals WHERE kind='hl7'")) == 1
    resend = [e for e in node.events("hl7_received") if e["control_id"] == "MSG-3"]
    assert [e["resend"] for e in resend] == [False, True]


def test_each_complete_order_of_a_message_completes_its_own_exam(start_node, tmp_path):
    """One ORM with two orders, the first still in progress (A-310), the second complete (A-311),
    segments separated by LF as some interface engines send them: only A-311's study completes."""
    node = _hl7_node(start_node)
    pending, pending_uid = _study(tmp_path / "pending", 2, accession_number="A-310")
    done, done_uid = _study(tmp_path / "done", 2, accession_number="A-311")
    _store(node, pending + done)
    orders = [_segment("ORC", f1="SC", f5="IP"), _segment("OBR", f1="1", f4="CT", f18="A-310"),
              _segment("ORC", f1="SC", f5="CM"), _segment("OBR", f1="2", f4="CT", f18="A-311")]
    text = "\n".join(["MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123||ORM^O01|MSG-31|P|2.3.1", *orders]) + "\n"
    assert _ack(_send(node, text)) == ("AA", "MSG-31")
    assert _completion(node, done_uid)["completed_by"] == "hl7"
    wait_for(lambda: time.time() > node.study(pending_uid)["last_received"] + 4.0, timeout=10)
    assert node.study(pending_uid)["state"] == "receiving"


def test_bad_hl7_messages_get_their_naks_and_the_listener_goes_on(start_node, tmp_path):
    node = _hl7_node(start_node, signals={"hl7": True})
    not_done = _message("ORM^O01", "A-400", "MSG-4", order_status="IP")
    assert _ack(_send(node, not_done)) == ("AA", "MSG-4")  # an order in progress: accepted, signals nothing
    no_accession = _message("ORM^O01", "", "MSG-5").replace("|FI1|", "||")  # nor a filler order number
    reply = _send(node, no_accession)
    assert _ack(reply) == ("AE", "MSG-5")
    assert str(reply.segment("ERR")(3)(1)(1)) == "101"
    reply = _send(node, "MSH|^~\\&|ADT|HOSP|NODE|HOSP|20261123||ADT^A01|MSG-6|P|2.5\rPID|1||PAT1\r")
    assert (_ack(reply), str(reply.segment("ERR")(3)(1)(1))) == (("AR", "MSG-6"), "200")
    assert _ack(_send(node, "this is no HL7 message"))[0] == "AR"
    with socket.create_connection(("127.0.0.1", node.hl7_port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n\x1c\r")  # no MLLP start block: refused and closed
        answer = raw.recv(65536)
        assert b"MSA|AR" in answer
        assert raw.recv(65536) == b""
    with socket.create_connection(("127.0.0.1", node.hl7_port), timeout=30) as raw:  # over max_message_kb (1 MiB)
        raw.sendall(b"\x0bMSH|^~\\&|" + b"X" * (1100 * 1024) + b"\x1c\r")
        assert b"MSA|AR" in raw.recv(65536)
    assert not node.query("SELECT 1 FROM completion_signals")
    datasets, study_uid = _study(tmp_path / "ct", 2, accession_number="A-401")
    _store(node, datasets)
    assert _ack(_send(node, _message("ORU^R01", "A-401", "MSG-7"))) == ("AA", "MSG-7")  # it goes on
    assert _completion(node, study_uid)["completed_by"] == "hl7"
    assert _ack(_send(node, "MSH|^~\\&\r"))[0] == "AR"  # a header with nothing to echo still gets an answer
    refused = node.events("hl7_refused")
    assert [e["reason"] for e in refused] == [
        "no accession number (IPC-1, OBR-18 or OBR-3)", "unsupported message type", "cannot be parsed",
        "not an MLLP block", "message too large", "unsupported message type", "the header cannot be answered"]


def _counted(datasets: list[pydicom.Dataset], **tags) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    for ds in datasets:
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
    return datasets


def test_counts_the_images_carry_complete_the_study_when_reached(start_node, tmp_path):
    """ImagesInAcquisition (a CT series of 3, with AcquisitionNumber), an Enhanced object split
    over two instances (InConcatenationTotalNumber 2) and a whole Enhanced MR (10 frames in one
    instance): each study completes by its count, not before its last instance; a study with an
    instance that carries no count, and another caller's study, keep their quiet period."""
    node = start_node(completion={**QUIET, "signals_by_calling_ae": {"MODALITY": {"image_counts": True}}})
    ct, ct_uid = _study(tmp_path / "ct", 3)
    _counted(ct, AcquisitionNumber=1, ImagesInAcquisition=3)
    concatenation = generate_uid()
    parts, parts_uid = _study(tmp_path / "parts", 2)
    for number, ds in enumerate(parts, start=1):
        _counted([ds], ConcatenationUID=concatenation, InConcatenationNumber=number, InConcatenationTotalNumber=2)
    _store(node, ct[:2] + parts[:1])
    wait_for(lambda: time.time() > node.study(ct_uid)["last_received"] + 4.0, timeout=10)  # settle + polls
    assert node.study(ct_uid)["state"] == node.study(parts_uid)["state"] == "receiving"
    _store(node, ct[2:] + parts[1:])
    enhanced = get_testdata_file("emri_small.dcm")  # a real Enhanced MR, 10 frames in one instance
    assert storescu(node.port, [Path(enhanced)]).returncode == 0
    enhanced_uid = str(pydicom.dcmread(enhanced, stop_before_pixels=True).StudyInstanceUID)
    for study_uid, instances in ((ct_uid, 3), (parts_uid, 2), (enhanced_uid, 1)):
        event = _completion(node, study_uid)
        assert (event["completed_by"], event["instances"]) == ("count", instances)
    uncounted, uncounted_uid = _study(tmp_path / "uncounted", 2)
    assert storescu(node.port, make_study(tmp_path / "other", slices=2, size=16), "OTHER").returncode == 0
    _store(node, uncounted)  # carries no count: its quiet period decides
    wait_for(lambda: time.time() > node.study(uncounted_uid)["last_received"] + 4.0, timeout=10)
    assert node.study(uncounted_uid)["state"] == "receiving"


def test_the_sending_pacs_count_completes_a_forwarded_study(start_node, tmp_path):
    """Orthanc holds a study of 5 and forwards it; the node asks Orthanc (C-FIND, STUDY level)
    for NumberOfStudyRelatedInstances and completes the study when all 5 are here."""
    from tests.orthanc import Orthanc

    pacs = Orthanc(tmp_path / "pacs", aet="PACS")
    node = start_node(
        completion={**QUIET, "signals_by_calling_ae": {"PACS": {"source_count": "pacs"}}},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}})
    pacs.modalities = {"node": ("TESTNODE", "127.0.0.1", node.port)}
    pacs.start()
    try:
        files = make_study(tmp_path / "ct", slices=5, size=16)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        pacs.upload(files)
        pacs.forward_study("node", study_uid)
        event = _completion(node, study_uid)
        assert (event["completed_by"], event["instances"]) == ("count", 5)
        assert [e["count"] for e in node.events("source_count") if e["study_uid"] == study_uid][-1] == 5
    finally:
        pacs.discard()


class _Ris:
    """A pynetdicom MPPS SCP (a RIS): records each N-CREATE and N-SET it gets, in order."""

    def __init__(self, port: int):
        self.port = port
        self.received: list[tuple[str, str, Dataset]] = []
        self.lock = threading.Lock()
        self.server = None

    def _create(self, event: evt.Event) -> tuple[int, Dataset]:
        with self.lock:
            self.received.append(("n_create", str(event.request.AffectedSOPInstanceUID), event.attribute_list))
        return 0x0000, event.attribute_list

    def _set(self, event: evt.Event) -> tuple[int, Dataset]:
        with self.lock:
            self.received.append(("n_set", str(event.request.RequestedSOPInstanceUID), event.modification_list))
        return 0x0000, event.modification_list

    def start(self) -> "_Ris":
        ae = AE(ae_title="RIS")
        ae.add_supported_context(ModalityPerformedProcedureStep)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_N_CREATE, self._create), (evt.EVT_N_SET, self._set)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def test_mpps_is_forwarded_to_the_ris_in_order_once_it_is_reachable(start_node, tmp_path):
    """The RIS is down when the modality performs its step: the node accepts the MPPS, retries,
    and once the RIS is up delivers the N-CREATE, then the N-SET, with their attributes."""
    ris_port = free_port()
    node = start_node(
        completion={**QUIET, "mpps_forward": ["ris"]},
        sending={"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5},
        destinations={"ris": {"ae_title": "RIS", "host": "127.0.0.1", "port": ris_port}})
    datasets, study_uid = _study(tmp_path / "ct", 2)
    listed = [ds.SOPInstanceUID for ds in datasets]
    step = _perform(node, datasets, listed, stored_first=2)
    assert _completion(node, study_uid)["completed_by"] == "mpps"
    wait_for(lambda: node.events("mpps_forward_retry"), timeout=30)
    ris = _Ris(ris_port).start()
    try:
        wait_for(lambda: len(ris.received) == 2, timeout=60)
        assert [(op, uid) for op, uid, _ in ris.received] == [("n_create", step), ("n_set", step)]
        assert ris.received[0][2].ScheduledStepAttributesSequence[0].StudyInstanceUID == study_uid
        assert ris.received[1][2].PerformedProcedureStepStatus == "COMPLETED"
        forwarded = ris.received[1][2].PerformedSeriesSequence[0].ReferencedImageSequence
        assert [item.ReferencedSOPInstanceUID for item in forwarded] == listed
        delivered = [("n_create", "delivered"), ("n_set", "delivered")]  # recorded after the RIS answered
        wait_for(lambda: [(r["operation"], r["state"]) for r in node.query(
            "SELECT operation, state FROM signal_forwards ORDER BY id")] == delivered, timeout=30)
        metrics = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
        assert 'dicom_node_mpps_forwards{destination="ris",state="delivered"} 2.0' in metrics.splitlines()
    finally:
        ris.stop()


def test_signal_settings_per_caller_reload_live(start_node, tmp_path):
    """Live reload: MPPS from CT_A no longer completes its studies (the quiet period does), and a
    step CT_B DISCONTINUED completes its study without running anything (the job says why)."""
    node = start_node(completion={"quiet_period_s": 3.0},
                      destinations={"archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port()}},
                      routing={"rules": [{"name": "all", "match": {"tag": "Modality", "equals": "CT"},
                                          "actions": {"forward_to": ["archive"]}}]})
    config = yaml.safe_load(node.config_path.read_text())
    config["completion"]["signals_by_calling_ae"] = {"CT_A": {"mpps": False}, "CT_B": {"discontinued": "cancel"}}
    node.config_path.write_text(yaml.safe_dump(config))
    wait_for(lambda: node.events("config_reloaded"), timeout=30)
    for caller, state in (("CT_A", "COMPLETED"), ("CT_B", "DISCONTINUED")):
        datasets, study_uid = _study(tmp_path / caller, 2)
        _perform(node, datasets, [ds.SOPInstanceUID for ds in datasets], 2, state=state, ae_title=caller)
        event = _completion(node, study_uid)
        job = wait_for(lambda: node.query("SELECT state, reason, completed_by FROM work_items WHERE study_uid=?",
                                          (study_uid,)))[0]
        if caller == "CT_A":
            assert event["completed_by"] == "quiet_period"
        else:
            assert event["completed_by"] == "mpps"
            assert (job["state"], job["completed_by"]) == ("ignored", "mpps")
            assert "discontinued" in job["reason"]


@pytest.mark.parametrize("bad", [{"mpps_forward": ["nowhere"]}, {"signals": {"source_count": "nowhere"}}])
def test_a_signal_setting_naming_no_destination_is_refused(tmp_path, bad):
    from node.config import ConfigError, load_config

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"completion": bad}))
    with pytest.raises(ConfigError, match="no destination named 'nowhere'"):
        load_config(path)


def test_replicas_on_postgresql_complete_a_signalled_study_once(start_node, postgres, tmp_path):
    """Two replicas share a PostgreSQL index: the step is created on one, the images and the
    N-SET arrive on the other, and an HL7 result for a second study comes to the first while
    that study's images went to the second. Each study completes once, by its signal."""
    from node.store.index import Index

    url = postgres.new_database()
    shared = {"data_dir": str(tmp_path / "shared"), "index_url": url, "lease_s": 3.0}
    a, b = (start_node(tmp_path / name, storage=shared, completion={**QUIET, "sweep_s": 1.0},
                       hl7={"port": 0, "bind": "127.0.0.1"}) for name in ("a", "b"))
    a.hl7_port = wait_for(lambda: a.events("node_started"))[-1]["hl7_port"]
    index = Index(url)
    try:
        stepped, stepped_uid = _study(tmp_path / "mpps", 3)
        step = generate_uid()
        on_a = _associate(a)
        assert on_a.send_n_create(_in_progress(stepped_uid), ModalityPerformedProcedureStep, step)[0].Status == 0
        on_a.release()
        on_b = _associate(b)
        for ds in stepped:
            assert on_b.send_c_store(ds).Status == 0
        listed = [ds.SOPInstanceUID for ds in stepped]
        assert on_b.send_n_set(_ended(str(stepped[0].SeriesInstanceUID), listed), ModalityPerformedProcedureStep,
                               step)[0].Status == 0
        on_b.release()
        reported, reported_uid = _study(tmp_path / "hl7", 2, accession_number="A-900")
        _store(b, reported)
        assert _ack(_send(a, _message("ORU^R01", "A-900", "MSG-9"))) == ("AA", "MSG-9")
        for study_uid, by in ((stepped_uid, "mpps"), (reported_uid, "hl7")):
            row = wait_for(lambda: index.query("SELECT completions FROM studies WHERE study_uid=? AND"
                                               " state='complete'", (study_uid,)), timeout=60)[0]
            assert row["completions"] == 1
            jobs = wait_for(lambda: index.query("SELECT completed_by FROM work_items WHERE study_uid=?",
                                                (study_uid,)), timeout=30)
            assert [j["completed_by"] for j in jobs] == [by]
        # logged after the completion commits
        wait_for(lambda: sorted(e["completed_by"] for node in (a, b) for e in node.events("study_complete"))
                 == ["hl7", "mpps"], timeout=30)
    finally:
        index.close()


def test_signals_that_never_found_a_study_and_steps_left_in_progress_are_pruned(start_node, tmp_path):
    node = _hl7_node(start_node, signal_keep_s=1.0)
    assert _ack(_send(node, _message("ORU^R01", "A-500", "MSG-8"))) == ("AA", "MSG-8")  # an accession never sent
    study_uid = generate_uid()  # a step created, never ended, its images never sent
    assoc = _associate(node)
    assert assoc.send_n_create(_in_progress(study_uid), ModalityPerformedProcedureStep, generate_uid())[0].Status == 0
    assoc.release()
    wait_for(lambda: not node.query("SELECT 1 FROM completion_signals"), timeout=30)
    assert not node.query("SELECT 1 FROM completion_signal_studies")
    wait_for(lambda: sum(e["signals"] for e in node.events("signals_pruned")) == 2, timeout=30)  # logged after the commit


def test_a_source_that_never_answers_delays_no_other_study(start_node, tmp_path):
    """The PACS named by source_count accepts connections and says nothing: the C-FINDs wait on
    their own threads; a study of another caller completes by its MPPS step at once."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        node = start_node(completion={**QUIET, "signals_by_calling_ae": {"PACS": {"source_count": "pacs"}}},
                          destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                 "port": silent.getsockname()[1]}})
        # more studies waiting on the silent PACS than the scheduler has threads (10)
        files = [f for n in range(12) for f in make_study(tmp_path / f"pacs{n}", slices=1, size=16)]
        assert storescu(node.port, files, "PACS").returncode == 0
        datasets, study_uid = _study(tmp_path / "ct", 2)
        _perform(node, datasets, [ds.SOPInstanceUID for ds in datasets], stored_first=2)
        assert _completion(node, study_uid)["completed_by"] == "mpps"
        # before the first C-FIND to the silent PACS gave up (10 s): no check waited on one
        assert not node.events("source_count_failed")
        wait_for(lambda: node.events("source_count_failed"), timeout=60)
    finally:
        silent.close()


@pytest.mark.parametrize("operation,status,attempts,delivered", [
    ("n_create", 0x0000, 0, True), ("n_create", 0x0111, 0, False), ("n_create", 0x0111, 1, True),
    ("n_set", 0x0110, 0, False), ("n_set", 0x0110, 1, True), ("n_set", 0x0112, 1, False)])
def test_a_repeated_forward_the_peer_has_already_counts_as_delivered(operation, status, attempts, delivered):
    """After a crash between sending and recording, the forward is claimed again (attempts > 0):
    the RIS's "duplicate" or "may no longer be updated" means the first one arrived."""
    from node.send.signal_forward import _delivered
    from node.store.signal_forwards import Forward

    assert _delivered(Forward(1, "1.2.3", operation, "ris", b"", 0.0, attempts), status) is delivered


_ORU_MSH = "MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123||ORU^R01|C1|P|2.5"
_ORM_MSH = "MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123||ORM^O01|C2|P|2.3.1"


@pytest.mark.parametrize("raw,accessions,ack", [
    # CR between segments, a report's blank line (LF) inside OBX-5: text, not a segment break
    ("\r".join([_ORU_MSH, _segment("OBR", f1="1", f18="A-1", f25="F"), _segment("OBX", f5="Findings\n\nNone")])
     .encode(), ("A-1",), "AA"),
    # CRLF between segments, Latin-1 text
    ("\r\n".join([_ORU_MSH, _segment("OBR", f1="1", f18="A-2", f25="F"), _segment("NTE", f3="Befund: unauffällig")])
     .encode("latin-1"), ("A-2",), "AA"),
    # LF only, with a blank line at the end
    (("\n".join([_ORU_MSH, _segment("OBR", f1="1", f18="A-3", f25="F")]) + "\n\n").encode(), ("A-3",), "AA"),
    # one ORC, three OBRs: each an order; the one without an accession number: AE, the others kept
    ("\r".join([_ORM_MSH, _segment("ORC", f1="SC", f5="CM"), _segment("OBR", f1="1", f18="A-4"),
                _segment("OBR", f1="2", f18="A-5"), _segment("OBR", f1="3")]).encode(), ("A-4", "A-5"), "AE"),
    # a preliminary result and a final one: only the final one's exam
    ("\r".join([_ORU_MSH, _segment("OBR", f1="1", f18="A-6", f25="P"), _segment("OBR", f1="2", f18="A-7", f25="F")])
     .encode(), ("A-7",), "AA"),
])
def test_orders_are_read_from_what_interface_engines_send(raw, accessions, ack):
    from node.receive.hl7 import _text, read_message

    text, _ = _text(raw)
    reading = read_message(hl7.parse(text))
    assert (reading.accessions, reading.ack) == (accessions, ack)
