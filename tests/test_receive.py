"""The receiver against real senders: dcmtk storescu/echoscu, and pynetdicom for corrupt data."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.peers import dataset_bytes, make_ca, make_study, storescu, wait_for
from node.send.pynetdicom_internals import steady


def _success_count(output: str) -> int:
    return output.count("Received Store Response (Success)")


def test_300_slice_study_arrives_complete_and_byte_identical(start_node, tmp_path):
    files = make_study(tmp_path / "ct", slices=300, size=32)
    node = start_node()
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    row = node.wait_complete(study_uid)
    assert node.instance_count(study_uid) == 300
    stored = {r["sop_instance_uid"]: node.data_dir / r["path"] for r in node.query("SELECT * FROM instances")}
    for path in files:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[sop]) == dataset_bytes(path)
    assert row["calling_ae"] == "MODALITY"
    work = node.query("SELECT * FROM work_items WHERE study_uid=?", (study_uid,))
    # one job per completion; with no routing rules it is not processed, and says why
    assert [(w["state"], w["reason"]) for w in work] == [("ignored", "no routing rule applies")]
    audit = node.query("SELECT * FROM associations WHERE calling_ae='MODALITY'")
    assert [(a["instances"], a["failures"], a["called_ae"], a["peer"]) for a in audit] == [
        (300, 0, "TESTNODE", "127.0.0.1")
    ]
    assert audit[0]["ended_at"] >= audit[0]["started_at"]
    # the study's path layout comes from UIDs only
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert (node.data_dir / "studies" / study_uid / series_uid).is_dir()
    # logs carry UIDs and AE titles but no patient data
    assert "PHANTOM-001" not in node.log() and "Phantom" not in node.log()


def test_four_concurrent_associations(start_node, tmp_path):
    node = start_node()
    studies = [make_study(tmp_path / f"s{i}", slices=40 + i, size=32) for i in range(4)]
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda f=f, i=i: results.append(storescu(node.port, f, f"MOD{i}")))
        for i, f in enumerate(studies)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.returncode for r in results] == [0, 0, 0, 0]
    for i, files in enumerate(studies):
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        node.wait_complete(uid)
        assert node.instance_count(uid) == 40 + i
    # both receiver processes took part
    assert len(node.query("SELECT * FROM associations")) == 4


def test_echo_answered_and_unknown_caller_rejected(start_node):
    node = start_node(
        scp={"allowed_callers": [{"ae_title": "KNOWN"}, {"ae_title": "FARAWAY", "host": "10.0.0.0/8"}]}
    )
    ok = subprocess.run(["echoscu", "-aet", "KNOWN", "127.0.0.1", str(node.port)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for caller in ("STRANGER", "FARAWAY"):  # unknown AE; known AE from the wrong network
        bad = subprocess.run(["echoscu", "-aet", caller, "127.0.0.1", str(node.port)], capture_output=True, text=True)
        assert bad.returncode != 0
        assert "Rejected Permanent" in bad.stderr and "Calling AE Title Not Recognized" in bad.stderr
    cli = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "dicom-node"), "echo", "127.0.0.1", str(node.port),
         "--aet", "KNOWN", "--called-aet", "TESTNODE"],
        capture_output=True, text=True,
    )
    assert cli.returncode == 0 and "C-ECHO status 0x0000" in cli.stdout


def test_garbage_in_association_fails_alone(start_node, tmp_path, monkeypatch):
    node = start_node()
    good = make_study(tmp_path / "ct", slices=3, size=16)
    garbage = tmp_path / "garbage.dcm"
    # valid file meta (so the sender can send it) followed by a corrupt data set
    meta = pydicom.dcmread(good[0]).file_meta
    fake = pydicom.Dataset()
    fake.file_meta = meta
    fake.preamble = b"\0" * 128
    fake.save_as(garbage, enforce_file_format=False)
    noise = __import__("random").Random(7).randbytes(4000)
    garbage.write_bytes(garbage.read_bytes() + noise)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are (this test only)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")
    assert assoc.is_established
    steady(assoc)
    statuses = [assoc.send_c_store(p).Status for p in (good[0], garbage, good[1], good[2])]
    assoc.release()
    assert statuses[0] == statuses[2] == statuses[3] == 0x0000
    assert 0xC000 <= statuses[1] <= 0xCFFF
    uid = pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID
    node.wait_complete(uid)
    assert node.instance_count(uid) == 3
    quarantined = list((node.data_dir / "quarantine").glob("*.dcm"))
    assert len(quarantined) == 1
    reason = quarantined[0].with_suffix("").with_suffix(".reason.txt").read_text()
    assert "cannot be parsed" in reason or "not a valid UID" in reason, reason
    audit = node.query("SELECT instances, failures FROM associations WHERE calling_ae='PYSCU'")
    assert [tuple(a) for a in audit] == [(3, 1)]


def test_duplicates_counted_once_latest_wins(start_node, tmp_path):
    node = start_node()
    files = make_study(tmp_path / "ct", slices=10, size=16)
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files[:5]).returncode == 0
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    node.wait_complete(uid)
    assert node.instance_count(uid) == 10
    assert len(list((node.data_dir / "studies").rglob("*.dcm"))) == 10


def test_sigkill_mid_study_then_restart_completes_with_every_acknowledged(start_node, tmp_path):
    files = make_study(tmp_path / "ct", slices=300, size=64)
    node = start_node(completion={"quiet_period_s": 1.0})
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "MODALITY", "127.0.0.1", str(node.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: node.study(uid) and node.instance_count(uid) >= 50, timeout=60, interval=0.02)
        node.kill_all()
        output, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    acknowledged = _success_count(output)
    # the kill came after 50 instances were indexed; the last response may not have reached the sender
    assert 49 <= acknowledged < 300, output[-2000:]
    node.start()
    row = node.wait_complete(uid, timeout=60)
    assert row["completions"] == 1
    stored = {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances")}
    for path in files[:acknowledged]:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert sop in stored
    assert len(stored) - acknowledged in (0, 1)  # at most the one in flight when killed
    for row in node.query("SELECT path FROM instances"):
        pydicom.dcmread(node.data_dir / row["path"])  # complete, readable files only
    assert not list((node.data_dir / "tmp").glob("*.part"))  # cleared at start-up


def test_quiet_period_gap_under_and_over(start_node, tmp_path):
    quiet = 4.0
    node = start_node(completion={"quiet_period_s": 30, "quiet_period_by_calling_ae": {"MODALITY": quiet}})
    files = make_study(tmp_path / "ct", slices=6, size=16)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert storescu(node.port, files[:2]).returncode == 0
    # gap under the quiet period: same completion (3 s left for the next storescu to start and
    # store its first instance on a busy machine)
    time.sleep(quiet * 0.25)
    assert storescu(node.port, files[2:4]).returncode == 0
    row = node.wait_complete(uid)
    assert row["completions"] == 1 and node.instance_count(uid) == 4
    time.sleep(quiet * 0.75)  # gap over the quiet period (counted from the last arrival): reopened
    assert storescu(node.port, files[4:]).returncode == 0
    row = node.wait_complete(uid, completions=2)
    assert row["completions"] == 2 and node.instance_count(uid) == 6
    assert len(node.query("SELECT * FROM work_items WHERE study_uid=?", (uid,))) == 2
    assert [e["study_uid"] for e in node.events("study_reopened")] == [uid]


def test_after_complete_ignore_stores_but_does_not_requeue(start_node, tmp_path):
    node = start_node(completion={"quiet_period_s": 1.0, "after_complete": "ignore"})
    files = make_study(tmp_path / "ct", slices=4, size=16)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert storescu(node.port, files[:2]).returncode == 0
    node.wait_complete(uid)
    assert storescu(node.port, files[2:]).returncode == 0
    assert node.instance_count(uid) == 4  # acknowledged means stored
    wait_for(lambda: node.events("instance_after_completion_ignored"), timeout=10)
    time.sleep(1.5)
    assert node.study(uid)["completions"] == 1
    assert len(node.query("SELECT * FROM work_items WHERE study_uid=?", (uid,))) == 1


def test_disk_watermark_answers_out_of_resources(start_node, tmp_path):
    node = start_node(storage={"min_free_mb": 1e12})
    files = make_study(tmp_path / "ct", slices=2, size=16)
    result = storescu(node.port, files)
    # dcmtk names status 0xA700 "Refused: OutOfResources"
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    assert not list((node.data_dir / "studies").rglob("*.dcm"))
    assert not list((node.data_dir / "tmp").iterdir())
    assert node.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0


def test_tls_with_test_ca(start_node, tmp_path):
    pki = make_ca(tmp_path / "pki")
    node = start_node(scp={"tls": {"enabled": True, "certificate": str(pki["server"]),
                                   "private_key": str(pki["server-key"]), "client_ca": str(pki["ca"])}})
    files = make_study(tmp_path / "ct", slices=5, size=16)
    tls = ["+tls", str(pki["client-key"]), str(pki["client"]), "+cf", str(pki["ca"])]
    result = storescu(node.port, files, "MODALITY", *tls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _success_count(result.stdout + result.stderr) == 5
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    node.wait_complete(uid)
    assert node.instance_count(uid) == 5
    plain = storescu(node.port, files[:1])  # no TLS: the handshake fails, nothing stored twice
    assert plain.returncode != 0


@pytest.mark.parametrize(
    "content, expected",
    [
        ("scp:\n  port: 99999\n", "node.yaml:2: scp.port: Input should be less than or equal to 65535"),
        ("scp:\n  ae_tittle: X\n", "node.yaml:2: scp.ae_tittle: unknown key (did you mean 'ae_title'?)"),
        ("completion:\n  after_complete: sometimes\n", "completion.after_complete: Input should be 'reprocess' or 'ignore'"),
        ("scp: [\n", "node.yaml:2: invalid YAML"),
        ("scp:\n  tls: {enabled: true}\n", "scp.tls.certificate: required when scp.tls.enabled is true"),
    ],
)
def test_bad_config_is_reported_with_key_path(tmp_path, content, expected):
    config = tmp_path / "node.yaml"
    config.write_text(content)
    exe = Path(__import__("sys").executable).parent / "dicom-node"
    result = subprocess.run([str(exe), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_send_and_studies_json(start_node, tmp_path):
    import json
    import sys

    node = start_node(completion={"quiet_period_s": 0.5})
    files = make_study(tmp_path / "ct", slices=7, size=16)
    exe = str(Path(sys.executable).parent / "dicom-node")
    sent = subprocess.run([exe, "send", "127.0.0.1", str(node.port), str(tmp_path / "ct"), "--called-aet", "TESTNODE"],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0 and "sent 7/7 instances" in sent.stdout, sent.stderr
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    node.wait_complete(uid)
    listed = subprocess.run([exe, "studies", "--json", "--config", str(node.config_path)],
                            capture_output=True, text=True, timeout=60)
    rows = json.loads(listed.stdout)
    assert [(r["study_uid"], r["state"], r["instances"], r["series"]) for r in rows] == [(uid, "complete", 7, 1)]
