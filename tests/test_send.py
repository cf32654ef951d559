"""Result delivery to a real PACS (Orthanc): once, in the source study, durable across faults."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from inference.findings import measure
from inference.pipeline import SegmentationResult
from inference.volume import load_series, read_series
from node.config import NodeConfig
from node.config import OutputOptions
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from tests.identity import uids_for
from tests.processes import stop_process_group
from node.send.outbox import Outbox
from node.send.status import classify_status
from node.send.scu import storage_contexts
from node.store.index import Index
from tests.models import threshold_spec
from tests.orthanc import Orthanc
from tests.peers import free_port, make_study, port_open, wait_for

SENDING = {"retry_initial_s": 0.3, "retry_max_s": 1.0, "sweep_s": 0.5, "timeout_s": 5}


def _results(tmp_path: Path) -> tuple[list[Path], list[Path], SegmentationResult]:
    """A CT series and the SEG + SR for a bright block in it (written like the pipeline does)."""
    ct = make_study(tmp_path / "ct", slices=12, size=32)
    volume = load_series(read_series(ct))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[3:7, 8:16, 10:20] = 1
    spec = threshold_spec()
    result = SegmentationResult(spec, volume, labels, measure(labels, volume, spec))
    uids = uids_for("job-7", spec.name)
    seg = build_seg(result, OutputOptions(), uids)
    sr = build_sr(result, OutputOptions(), uids, seg)
    out = tmp_path / "results"
    out.mkdir()
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    return ct, [out / "seg.dcm", out / "sr.dcm"], result


def _outbox(tmp_path: Path, pacs: Orthanc) -> tuple[Outbox, BackgroundScheduler, Index]:
    config = NodeConfig.model_validate({
        "scp": {"ae_title": "TESTNODE"},
        "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        "sending": SENDING,
    })
    index = Index(tmp_path / "index.sqlite")
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start()
    outbox = Outbox(config, index, scheduler)
    outbox.start()
    return outbox, scheduler, index


def _item(index: Index, item_id: int) -> dict:
    return dict(index.query("SELECT * FROM outbox WHERE id=?", (item_id,))[0])


def test_status_classes():
    assert classify_status(0x0000) == "success"
    assert classify_status(0xB000) == classify_status(0xB007) == "warning"
    assert classify_status(0x0111) == "warning"  # duplicate: the PACS holds this very result (same UIDs every attempt)
    assert classify_status(0xA700) == classify_status(0xA7FF) == "transient"
    assert classify_status(0xA900) == classify_status(0xC000) == classify_status(0xC211) == "permanent"


# PS3.4 B.2.3 (C-STORE) and PS3.7 C (general statuses): what each status means for the sender.
STATUS_TABLE = {
    0x0000: "success",
    0xB000: "warning",    # coercion of data elements
    0xB007: "warning",    # data set does not match SOP class
    0xB006: "warning",    # elements discarded
    0xBFFF: "warning",    # any 0xBxxx is a warning (PS3.7 C.1)
    0x0001: "warning",    # requested optional attributes not supported
    0x0107: "warning",    # attribute list error
    0x0116: "warning",    # attribute value out of range
    0x0111: "warning",    # duplicate SOP instance: our results keep their UIDs, the peer holds this one
    0xA700: "transient",  # out of resources
    0xA7FF: "transient",
    0xA900: "permanent",  # data set does not match SOP class (error)
    0xA9FF: "permanent",
    0xC000: "permanent",  # cannot understand
    0xCFFF: "permanent",
    0x0122: "permanent",  # SOP class not supported
    0x0124: "permanent",  # not authorized
    0x0110: "permanent",  # processing failure
    0x0211: "permanent",  # unrecognized operation
    0xA800: "permanent",  # not a status C-STORE knows: resending will not help
}


def test_one_status_rule_for_the_outbox_the_cli_and_the_demo():
    from node import demo
    from node.send import cstore, stow
    from node.send.status import classify_status as rule, delivered

    # C-STORE and STOW-RS delivery, the CLI and the demo: no copies of their own
    assert cstore.classify_status is rule and stow.classify_status is rule and demo.delivered is delivered
    assert {status: rule(status) for status in STATUS_TABLE} == STATUS_TABLE
    assert [s for s in STATUS_TABLE if delivered(s)] == [s for s, kind in STATUS_TABLE.items()
                                                         if kind in ("success", "warning")]
    assert not delivered(None)  # no response


def test_one_tls_context_for_destinations():
    """The outbox, `dicom-node echo <destination>` and the console's echo reach a destination the same way."""
    import ssl

    from node.config import ClientTls
    from node.send.scu import destination_ssl_context

    assert destination_ssl_context(ClientTls()) is None
    context = destination_ssl_context(ClientTls(enabled=True))
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert not context.check_hostname  # DICOM peers are identified by AE title and certificate chain


@pytest.fixture
def status_peer():
    """A storage SCP that answers each C-STORE, in turn, with the next of the statuses given."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    servers = []

    def start(statuses: list[int]) -> int:
        answers = iter(statuses)
        ae = AE(ae_title="STATUS-SCP")
        ae.supported_contexts = AllStoragePresentationContexts
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, lambda event: next(answers))]))
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_cli_send_counts_what_the_outbox_counts_as_delivered(status_peer, tmp_path):
    """`dicom-node send` used to count only 0x0000/0xB000/0xB006/0xB007: a duplicate (0x0111) or a
    0xBxxx/0x0107 warning the outbox counts as delivered was a failure there."""
    from typer.testing import CliRunner

    from node.cli import app

    statuses = [0x0000, 0xB000, 0x0111, 0x0107, 0xA700, 0xC000]
    files = make_study(tmp_path / "ct", slices=len(statuses), size=8)
    port = status_peer(statuses)
    result = CliRunner().invoke(app, ["send", "127.0.0.1", str(port), *map(str, files), "--called-aet", "STATUS-SCP"])
    assert result.exit_code == 1, result.output
    assert "sent 4/6 instances" in result.stdout
    assert "status 0xA700 (transient failure)" in result.output and "status 0xC000 (permanent failure)" in result.output


def test_seg_and_sr_arrive_once_in_the_source_study(tmp_path, orthanc):
    pacs = orthanc()
    ct, files, result = _results(tmp_path)
    pacs.upload(ct)
    outbox, scheduler, index = _outbox(tmp_path, pacs)
    try:
        study_uid = str(result.volume.datasets[0].StudyInstanceUID)
        first = outbox.enqueue("job-7", study_uid, "pacs", files)
        assert outbox.enqueue("job-7", study_uid, "pacs", files) == first  # queued once
        wait_for(lambda: _item(index, first)["state"] == "delivered", timeout=30)
        outbox.attempt(first)  # a stray second attempt changes nothing
    finally:
        scheduler.shutdown(wait=False)
    found = pacs.instances_by_modality(study_uid)
    assert {m: len(v) for m, v in found.items()} == {"CT": 12, "SEG": 1, "SR": 1}
    seg = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["SEG"][0]["ID"])))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Bright region"]
    assert seg.SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(pacs.instance_file(found["SR"][0]["ID"]))))
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    assert group.get_measurements(name=codes.SCT.Volume)[0].value == pytest.approx(result.findings[0].volume_mm3)
    assert _item(index, first)["attempts"] == 1


def test_results_wait_while_the_pacs_is_down(tmp_path, orthanc):
    pacs = orthanc()
    ct, files, result = _results(tmp_path)
    pacs.upload(ct)
    pacs.stop()
    outbox, scheduler, index = _outbox(tmp_path, pacs)
    try:
        item = outbox.enqueue("job-7", str(result.volume.datasets[0].StudyInstanceUID), "pacs", files)
        row = wait_for(lambda: (r := _item(index, item))["attempts"] >= 2 and r["state"] == "pending" and r,
                       timeout=30)
        assert row["state"] == "pending" and "no association with ORTHANC" in row["last_error"]
        pacs.start()
        wait_for(lambda: _item(index, item)["state"] == "delivered", timeout=30)
    finally:
        scheduler.shutdown(wait=False)
    found = pacs.instances_by_modality(str(result.volume.datasets[0].StudyInstanceUID))
    assert len(found["SEG"]) == len(found["SR"]) == 1


def test_refusing_pacs_gives_dead_letter_without_retries(tmp_path, orthanc):
    pacs = orthanc(always_allow_store=False, modalities={"other": ("OTHER", "127.0.0.1", 104)})
    _, files, result = _results(tmp_path)
    outbox, scheduler, index = _outbox(tmp_path, pacs)
    try:
        item = outbox.enqueue("job-7", str(result.volume.datasets[0].StudyInstanceUID), "pacs", files)
        wait_for(lambda: _item(index, item)["state"] == "dead", timeout=30)
        time.sleep(3 * SENDING["sweep_s"] + SENDING["retry_max_s"])  # time for a retry storm, if there were one
        row = _item(index, item)
    finally:
        scheduler.shutdown(wait=False)
    assert row["state"] == "dead" and row["attempts"] == 1
    assert "refused C-STORE: aborted by the peer" in row["last_error"], row["last_error"]

    exe = str(Path(sys.executable).parent / "dicom-node")
    config = tmp_path / "node.yaml"
    config.write_text(f"storage: {{data_dir: {tmp_path}}}\n")
    listed = subprocess.run([exe, "outbox", "--json", "--config", str(config)], capture_output=True, text=True)
    assert [(r["id"], r["state"]) for r in json.loads(listed.stdout)] == [(item, "dead")]
    retried = subprocess.run([exe, "outbox", "retry", "--all", "--config", str(config)], capture_output=True, text=True)
    assert retried.returncode == 0 and "1 item(s) queued" in retried.stdout
    requeued = _item(index, item)  # its attempt so far stays counted; the backoff starts again from it
    assert (requeued["state"], requeued["attempts"], requeued["attempts_base"]) == ("pending", 1, 1)


def test_sigkill_while_sending_then_restart_leaves_exactly_one_copy(tmp_path, orthanc, start_node):
    pacs = orthanc()
    node = start_node(destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                      sending=SENDING)
    files = make_study(tmp_path / "results", slices=400, size=32)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    index = Index(node.data_dir / "index.sqlite")
    now = time.time()
    with index.transaction() as db:  # what the pipeline does when a job's results are written
        db.execute("INSERT INTO outbox (job_key, study_uid, destination, files, state, created_at, updated_at,"
                   " next_attempt, deadline) VALUES ('job-k', ?, 'pacs', ?, 'pending', ?, ?, ?, ?)",
                   (study_uid, json.dumps([str(f) for f in files]), now, now, now, now + 3600))

    def stored() -> int:
        study = pacs.study_id(study_uid)
        return len(pacs.get(f"/studies/{study}/instances")) if study else 0

    wait_for(lambda: stored() >= 20, timeout=60, interval=0.02)
    node.kill_all()
    at_kill = stored()
    assert at_kill < 400, "sending finished before the kill; the test needs a larger load"
    node.start()
    wait_for(lambda: index.query("SELECT state FROM outbox")[0]["state"] == "delivered", timeout=120)
    assert stored() == 400
    sop_uids = [pacs.get(f"/instances/{i['ID']}")["MainDicomTags"]["SOPInstanceUID"]
                for i in pacs.get(f"/studies/{pacs.study_id(study_uid)}/instances")]
    assert len(set(sop_uids)) == len(sop_uids) == 400
    # one attempt before the kill, one after; any other is a transient failure the node logged and
    # retried (a PACS still busy with the killed association may refuse the next one)
    retried = [e["reason"] for e in node.events("results_retry_scheduled")]
    assert index.query("SELECT attempts FROM outbox")[0]["attempts"] == 2 + len(retried), retried


def _dcmtk(tool: str) -> str:
    """dcmtk's own tool: pynetdicom installs console scripts of the same names into the venv."""
    venv = Path(sys.executable).parent.resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        candidate = Path(folder) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK) and candidate.resolve().parent != venv:
            return str(candidate)
    raise FileNotFoundError(tool)


@pytest.fixture(params=[([], ExplicitVRLittleEndian), (["+xi"], ImplicitVRLittleEndian)],
                ids=["uncompressed", "implicit-only"])
def uncompressed_only_pacs(request: pytest.FixtureRequest, tmp_path: Path):
    """dcmtk storescp in promiscuous mode: accepts unknown SOP classes (the Label Map SEG is
    newer than dcmtk 3.6.7) but, like most PACS, only uncompressed transfer syntaxes (with
    `+xi` only Implicit VR Little Endian). Yields its port, folder and the syntax it takes."""
    options, syntax = request.param
    received = tmp_path / "storescp"
    received.mkdir()
    port = free_port()
    process = subprocess.Popen([_dcmtk("storescp"), "-pm", *options, "-aet", "PACS", "-od", str(received), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_for(lambda: port_open(port) or process.poll() is not None, timeout=30)
        assert process.poll() is None, "storescp did not start"
        yield port, received, syntax
    finally:
        stop_process_group(process, 10)


def test_labelmap_seg_reaches_a_pacs_that_takes_only_uncompressed_data(tmp_path, uncompressed_only_pacs):
    port, received, syntax = uncompressed_only_pacs
    ct = make_study(tmp_path / "ct", slices=12, size=32)
    volume = load_series(read_series(ct))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[3:7, 8:16, 10:20] = 1
    spec = threshold_spec()
    result = SegmentationResult(spec, volume, labels, measure(labels, volume, spec))
    seg = build_seg(result, OutputOptions(segmentation_type="LABELMAP"), uids_for("job-8", spec.name))
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless

    config = NodeConfig.model_validate({
        "scp": {"ae_title": "TESTNODE"},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}},
        "sending": SENDING,
    })
    index = Index(tmp_path / "index.sqlite")
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.start()
    try:
        outbox = Outbox(config, index, scheduler)
        outbox.start()
        item = outbox.enqueue("job-8", str(seg.StudyInstanceUID), "pacs", [path])
        row = wait_for(lambda: (r := _item(index, item))["state"] in ("delivered", "dead") and r, timeout=30)
    finally:
        scheduler.shutdown(wait=False)
    assert row["state"] == "delivered", row["last_error"]

    [stored] = [p for p in received.iterdir() if p.is_file()]
    back = pydicom.dcmread(stored)
    assert back.SOPInstanceUID == seg.SOPInstanceUID and back.SeriesInstanceUID == seg.SeriesInstanceUID
    assert back.file_meta.TransferSyntaxUID == syntax
    decoded = hd.seg.Segmentation.from_dataset(back).get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in volume.datasets], combine_segments=True)
    np.testing.assert_array_equal(decoded, labels)


def test_contexts_offer_each_files_own_syntax_and_uncompressed(tmp_path):
    ct = make_study(tmp_path / "ct", slices=2, size=8)
    contexts = storage_contexts(ct)
    offered = [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax]) for cx in contexts]
    sop = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SOPClassUID)
    assert offered == [(sop, [ExplicitVRLittleEndian]), (sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]


def test_a_superseded_result_set_is_not_sent_again(tmp_path):
    """Re-send is for results the PACS lost: a delivered set of a job whose study was processed
    again since (a later job) is refused, naming the job to re-send instead."""
    from node.jobs.store import JobStore
    from node.send.outbox import resend

    index = Index(tmp_path / "index.sqlite")
    result = tmp_path / "seg.dcm"
    result.write_bytes(b"result")
    now = time.time()
    with index.transaction() as db:
        for job_id in (3, 4):
            db.execute("INSERT INTO work_items (id, study_uid, state, created_at, updated_at, next_attempt)"
                       " VALUES (?, '1.2.3', 'done', ?, ?, ?)", (job_id, now, now, now))
        db.execute("INSERT INTO outbox (job_key, study_uid, destination, files, state, created_at, updated_at,"
                   " next_attempt, deadline) VALUES ('3:rule:model:default', '1.2.3', 'pacs', ?, 'delivered', ?,?,?,?)",
                   (json.dumps([str(result)]), now, now, now, now))
    refused = resend(index, 1, 60.0, JobStore(index).newer_job)
    assert refused == ("outbox item 1 holds job 3's results, and the study was processed again since (job 4):"
                       " re-send that job's results instead")
    assert _item(index, 1)["state"] == "delivered"
    with index.transaction() as db:
        db.execute("DELETE FROM work_items WHERE id=4")
    assert resend(index, 1, 60.0, JobStore(index).newer_job) is None
    assert _item(index, 1)["state"] == "pending"
