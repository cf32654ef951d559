"""The foundations: rolling upgrades, receiver races, drains, secrets, executors and leases.

Each test here plays the adversary of one promise that an earlier release broke: an index one
migration ahead, two associations racing with one SOP Instance UID, a changed copy after
completion, a file deleted behind the node's back, a SIGTERM mid-association, a PACS that
hangs every delivery, a study completing again while its job runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING, STATE_STOPPED
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy.exc import OperationalError

from node.config import NodeConfig
from node.jobs.runner import JobRunner
from node.receive.workers import receiver_settings
from node.jobs.store import JobState, JobStore
from node.route.decision import AppliedRule, RoutingDecision
from node.route.rules import Actions
from node.send.outbox import DELIVERY_EXECUTOR, Outbox
from node.service import stop_scheduler
from node.store.index import Index
from node.store.migrations import HEAD
from tests.peers import HOOKS, VENV_BIN, dataset_bytes, free_port, http_status, make_study, storescu, wait_for
from node.send.pynetdicom_internals import steady


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


# -- rolling upgrade ----------------------------------------------------------------------------


def test_an_index_one_migration_ahead_still_takes_c_stores_from_this_release(start_node, tmp_path):
    """README "Scaling out": migrations only add, so a replica of the previous release keeps
    receiving on an index a newer release migrated. Simulated: every table gains a column (one
    nullable, one NOT NULL with a default, as a real additive migration would) and the schema is
    stamped one revision past this release's HEAD."""
    node = start_node(completion={"quiet_period_s": 1.0})
    node.stop()
    ahead = f"{int(HEAD) + 1:04d}"
    db = sqlite3.connect(node.data_dir / "index.sqlite")
    for table in [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]:
        if table.startswith("sqlite_") or table == "alembic_version":
            continue
        db.execute(f"ALTER TABLE {table} ADD COLUMN added_later TEXT")
        db.execute(f"ALTER TABLE {table} ADD COLUMN added_later_required INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE alembic_version SET version_num=?", (ahead,))
    db.commit()
    db.close()
    node.start()
    files = make_study(tmp_path / "ct", slices=6, size=16)
    result = storescu(node.port, files)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and output.count("Received Store Response (Success)") == 6, output[-2000:]
    uid = _study_uid(files)
    node.wait_complete(uid)
    assert node.instance_count(uid) == 6
    wait_for(lambda: node.query("SELECT state FROM work_items WHERE study_uid=?", (uid,)), timeout=30)
    assert node.events("index_schema_newer")[-1]["schema"] == ahead
    assert node.query("SELECT version_num FROM alembic_version")[0]["version_num"] == ahead  # never downgraded


# -- receiver races -----------------------------------------------------------------------------


def _send_all(port: int, datasets: list[pydicom.Dataset], context: str, statuses: list[int]) -> None:
    ae = AE(ae_title="RACER")
    ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="TESTNODE")
    assert assoc.is_established
    steady(assoc)
    try:
        for ds in datasets:
            statuses.append(int(assoc.send_c_store(ds).Status))
    finally:
        assoc.release()


def test_one_sop_instance_uid_with_two_sop_classes_at_once_never_overwrites_the_held_file(
        start_node, tmp_path, monkeypatch):
    """Two associations send the same SOP Instance UIDs at the same moment, one as CT and one
    as MR (same study and series): for each UID exactly one is stored and acknowledged, the
    other refused 0xC214, and the file on disk is always the one the index holds. A slow index
    look-up (a hook in tests/hooks) makes both associations pass it before either commits: the
    previous release wrote 32 of 40 files over with the refused copy this way."""
    monkeypatch.setenv("PYTHONPATH", str(HOOKS))
    monkeypatch.setenv("DICOM_NODE_TEST_SLOW_LOOKUP_S", "0.3")
    node = start_node()
    files = make_study(tmp_path / "ct", slices=40, size=16)
    ct = [pydicom.dcmread(f) for f in files]
    mr = []
    for ds in ct:
        other = pydicom.dcmread(files[0])
        other.update(ds)
        other.SOPClassUID = MRImageStorage
        other.file_meta.MediaStorageSOPClassUID = MRImageStorage
        other.Modality = "MR"
        mr.append(other)
    statuses: dict[str, list[int]] = {"ct": [], "mr": []}
    senders = [threading.Thread(target=_send_all, args=(node.port, ct, CTImageStorage, statuses["ct"])),
               threading.Thread(target=_send_all, args=(node.port, mr, MRImageStorage, statuses["mr"]))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    for pair in zip(statuses["ct"], statuses["mr"]):
        assert sorted(pair) == [0x0000, 0xC214], pair
    rows = {r["sop_instance_uid"]: r for r in node.query("SELECT sop_instance_uid, sop_class_uid, path FROM instances")}
    assert len(rows) == 40
    for ds in ct:
        row = rows[ds.SOPInstanceUID]
        stored = pydicom.dcmread(node.data_dir / row["path"])
        assert stored.SOPClassUID == row["sop_class_uid"]  # the bytes are the indexed instance's
    assert len(list((node.data_dir / "quarantine").glob("*.dcm"))) == 40
    assert not list((node.data_dir / "tmp").glob("*.part"))


def test_the_same_new_instance_twice_at_once_after_completion_under_ignore_is_not_kept_aside(
        start_node, tmp_path, monkeypatch):
    """after_complete: ignore, two associations send the same late instances at once (both pass
    the look-up before either commits): the second copy is identical, so nothing is quarantined
    as if it were a different one; both are acknowledged."""
    monkeypatch.setenv("PYTHONPATH", str(HOOKS))
    monkeypatch.setenv("DICOM_NODE_TEST_SLOW_LOOKUP_S", "0.3")
    node = start_node(completion={"quiet_period_s": 1.0, "after_complete": "ignore"})
    files = make_study(tmp_path / "ct", slices=6, size=16)
    assert storescu(node.port, files[:2]).returncode == 0
    node.wait_complete(_study_uid(files))
    late = [pydicom.dcmread(f) for f in files[2:]]
    statuses: list[list[int]] = [[], []]
    senders = [threading.Thread(target=_send_all, args=(node.port, late, CTImageStorage, statuses[i]))
               for i in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    assert statuses == [[0] * 4, [0] * 4]
    assert not list((node.data_dir / "quarantine").glob("*.dcm"))
    assert not node.events("instance_after_completion_kept_aside")
    assert node.instance_count(_study_uid(files)) == 6 and not list((node.data_dir / "tmp").iterdir())


def test_a_changed_copy_after_completion_under_ignore_keeps_the_processed_file(start_node, tmp_path):
    """after_complete: ignore: the study's results were made from the instances it held at
    completion; a different copy arriving later is acknowledged and kept aside (quarantine,
    with its reason), never written over the processed one."""
    node = start_node(completion={"quiet_period_s": 1.0, "after_complete": "ignore"})
    files = make_study(tmp_path / "ct", slices=3, size=16)
    uid = _study_uid(files)
    assert storescu(node.port, files).returncode == 0
    node.wait_complete(uid)
    processed = dataset_bytes(files[1])
    changed = pydicom.dcmread(files[1])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    result = storescu(node.port, [tmp_path / "changed.dcm"])
    assert result.returncode == 0 and "Received Store Response (Success)" in result.stdout + result.stderr
    kept = wait_for(lambda: node.events("instance_after_completion_kept_aside"), timeout=10)[0]
    row = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (changed.SOPInstanceUID,))[0]
    assert dataset_bytes(node.data_dir / row["path"]) == processed
    aside = node.data_dir / "quarantine" / kept["file"]
    assert dataset_bytes(aside) == dataset_bytes(tmp_path / "changed.dcm")
    assert "after_complete is 'ignore'" in aside.with_name(aside.stem + ".reason.txt").read_text()
    assert node.study(uid)["completions"] == 1


@pytest.mark.parametrize("fail_at", ["body", "commit"])
def test_an_index_failure_after_the_rename_leaves_the_acknowledged_copy(start_node, tmp_path, monkeypatch, fail_at):
    """The index transaction fails after a replacement was renamed into place (a statement after
    the rename, or the COMMIT itself): the sender gets a failure status, and the copy
    acknowledged before is back at its path (not the refused bytes); a new instance's file goes
    with its rolled-back row."""
    files = make_study(tmp_path / "ct", slices=3, size=16)
    uid = _study_uid(files)
    monkeypatch.setenv("PYTHONPATH", str(HOOKS))  # tests/hooks/sitecustomize.py: the fault hook
    monkeypatch.setenv("DICOM_NODE_TEST_FAIL_AT", fail_at)
    monkeypatch.setenv("DICOM_NODE_TEST_FAIL_AFTER_PLACE", "3")  # the replacement's rename
    node = start_node(scp={"workers": 1}, completion={"quiet_period_s": 60})
    sent = storescu(node.port, files[:2])
    assert (sent.stdout + sent.stderr).count("(Success)") == 2
    changed = pydicom.dcmread(files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    refused = storescu(node.port, [tmp_path / "changed.dcm"])
    assert "(Success)" not in refused.stdout + refused.stderr
    row = node.query("SELECT path, size FROM instances WHERE sop_instance_uid=?", (changed.SOPInstanceUID,))[0]
    assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(files[0])
    assert (node.data_dir / row["path"]).stat().st_size == row["size"]
    assert not list((node.data_dir / "tmp").iterdir())
    node.stop()
    monkeypatch.setenv("DICOM_NODE_TEST_FAIL_AFTER_PLACE", "1")  # the first rename after the restart
    node.start()
    refused = storescu(node.port, [files[2]])
    assert "(Success)" not in refused.stdout + refused.stderr
    third = pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID
    assert not node.query("SELECT 1 FROM instances WHERE sop_instance_uid=?", (third,))
    assert len(list((node.data_dir / "studies").rglob("*.dcm"))) == 2 == node.instance_count(uid)
    assert not list((node.data_dir / "tmp").iterdir())


def test_a_crash_before_a_replacement_commits_puts_the_acknowledged_copy_back(start_node, tmp_path, monkeypatch):
    """The receiver dies between renaming a replacement into place and the commit (never
    acknowledged): at the next start the copy the index row describes is back at its path."""
    files = make_study(tmp_path / "ct", slices=2, size=16)
    monkeypatch.setenv("PYTHONPATH", str(HOOKS))  # tests/hooks/sitecustomize.py: the fault hook
    monkeypatch.setenv("DICOM_NODE_TEST_CRASH_AFTER_PLACE", "3")  # the replacement's rename
    node = start_node(scp={"workers": 1}, completion={"quiet_period_s": 60})
    sent = storescu(node.port, files)
    assert (sent.stdout + sent.stderr).count("(Success)") == 2
    changed = pydicom.dcmread(files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.ImageComments = "a different size"  # reconcile tells the copies apart by their size
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    row = node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (changed.SOPInstanceUID,))[0]
    refused = storescu(node.port, [tmp_path / "changed.dcm"])
    assert "(Success)" not in refused.stdout + refused.stderr
    wait_for(lambda: node.events("receiver_exited"))
    node.kill_all()
    monkeypatch.delenv("DICOM_NODE_TEST_CRASH_AFTER_PLACE")
    assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(tmp_path / "changed.dcm")  # as it died
    node.start()
    event = node.events("reconciled")[-1]
    assert (event["replaced_copies_restored"], event["replaced_copies_removed"]) == (1, 0)
    assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(files[0])
    assert not list((node.data_dir / "tmp").iterdir())


def test_reconcile_marks_indexed_instances_whose_file_is_gone(start_node, tmp_path, model_repository):
    """A file deleted behind the node's back: at the next start the instance is recorded as
    missing (not forgotten), logged and counted; a job on its series fails with that reason
    instead of running on part of the series; the instance sent again clears the mark."""
    routing = {"rules": [{"name": "bright", "match": {"tag": "Modality", "equals": "CT"},
                          "actions": {"run": ["threshold"], "send_to": ["pacs"]}}]}
    node = start_node(completion={"quiet_period_s": 1.0}, routing=routing,
                      inference={"model_repository": str(model_repository)},
                      destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})
    files = make_study(tmp_path / "ct", slices=5, size=16)
    uid = _study_uid(files)
    assert storescu(node.port, files).returncode == 0
    node.wait_complete(uid)
    wait_for(lambda: node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='done'", (uid,)), timeout=60)
    node.stop()
    gone = node.query("SELECT sop_instance_uid, path FROM instances ORDER BY path LIMIT 2")
    for row in gone:
        (node.data_dir / row["path"]).unlink()
    node.start()
    event = wait_for(lambda: node.events("instances_missing"), timeout=10)[0]
    assert (event["study_uid"], event["instances"]) == (uid, 2)
    assert sorted(event["sop_instance_uids"]) == sorted(r["sop_instance_uid"] for r in gone)
    assert node.events("reconciled")[-1]["missing_marked"] == 2
    marked = node.query("SELECT sop_instance_uid, study_uid FROM missing_files")
    assert sorted((r["sop_instance_uid"], r["study_uid"]) for r in marked) == sorted(
        (r["sop_instance_uid"], uid) for r in gone)
    assert node.instance_count(uid) == 5  # kept, marked
    from node.route.study import study_from_index

    view = study_from_index(Index(node.data_dir / "index.sqlite", migrate=False), uid, node.data_dir)
    assert view is not None and view.missing == 2 and sum(len(s.files) for s in view.series) == 3
    # the operator sees it: the study's page and /metrics
    page = urllib.request.urlopen(f"{node.url}/studies/{uid}", timeout=10).read().decode()
    assert '<div class="msg bad" id="missing">2 indexed instances of this study no longer have their files' in page
    metrics = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    assert "dicom_node_instances_missing 2.0" in metrics.splitlines()
    # a job on the series now fails with the reason, never runs on 3 of 5 slices: a changed copy
    # of an instance still on disk reopens the study (after_complete: reprocess)
    by_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    present = next(f for u, f in by_uid.items() if u not in {r["sop_instance_uid"] for r in gone})
    changed = pydicom.dcmread(present)
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    assert storescu(node.port, [tmp_path / "changed.dcm"]).returncode == 0
    failed = wait_for(lambda: node.query("SELECT reason FROM work_items WHERE study_uid=? AND state='failed'",
                                         (uid,)), timeout=60)
    assert "2 of its instances have lost their file (instances_missing)" in failed[0]["reason"]
    # the same instances sent again are stored and no longer missing; the study's next job runs
    assert storescu(node.port, [by_uid[r["sop_instance_uid"]] for r in gone]).returncode == 0
    wait_for(lambda: not node.query("SELECT 1 FROM missing_files"), timeout=10)
    wait_for(lambda: len(node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='done'", (uid,))) == 2,
             timeout=60)


def test_reconcile_clears_a_mark_whose_file_is_back_and_refuses_an_empty_volume(start_node, tmp_path):
    """A file restored by hand is no longer missing at the next start; with a data volume that
    is not mounted (not one indexed file on disk) the node does not start, and nothing is marked."""
    node = start_node(completion={"quiet_period_s": 1.0})
    files = make_study(tmp_path / "ct", slices=3, size=16)
    uid = _study_uid(files)
    assert storescu(node.port, files).returncode == 0
    node.wait_complete(uid)
    node.stop()
    row = node.query("SELECT path FROM instances ORDER BY path LIMIT 1")[0]
    kept = (node.data_dir / row["path"]).read_bytes()
    (node.data_dir / row["path"]).unlink()
    node.start()
    wait_for(lambda: node.events("instances_missing"), timeout=10)
    assert len(node.query("SELECT 1 FROM missing_files")) == 1
    node.stop()
    (node.data_dir / row["path"]).write_bytes(kept)
    node.start()
    wait_for(lambda: len(node.events("reconciled")) == 3, timeout=10)
    assert node.events("reconciled")[-1]["missing_found"] == 1
    assert not node.query("SELECT 1 FROM missing_files")
    node.stop()
    studies = node.data_dir / "studies"
    studies.rename(node.data_dir / "elsewhere")
    refused = subprocess.run([str(VENV_BIN / "dicom-node"), "serve", "--config", str(node.config_path)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert (f"cannot start: the index lists 3 instances and not one of their files is under {node.data_dir}:"
            " is the data volume mounted?") in refused.stderr
    assert '"event": "spool_files_all_gone"' in refused.stdout + refused.stderr
    assert not node.query("SELECT 1 FROM missing_files")
    shutil.rmtree(studies)
    (node.data_dir / "elsewhere").rename(studies)  # mounted again
    node.start()
    assert node.events("reconciled")[-1]["missing_marked"] == 0
    assert not node.query("SELECT 1 FROM missing_files")


def test_migrations_after_the_previous_release_never_change_the_tables_it_inserts_into_unnamed(tmp_path):
    """The previous release (schema 0002) inserted into instances, series and studies without
    naming columns, so a later migration that added a column to one of them would fail its every
    C-STORE during a rolling upgrade: those tables keep their columns (new state goes into new
    tables); a table every release names its columns for (work_items) may gain one."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    import node.store.migrations as migrations

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")

    def upgrade(revision: str) -> dict[str, list[str]]:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(Path(migrations.__file__).parent))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        inspector = sa.inspect(engine)
        return {t: [c["name"] for c in inspector.get_columns(t)] for t in inspector.get_table_names()}

    previous = upgrade("0002")
    current = upgrade("head")
    unnamed = ("instances", "series", "studies")  # `INSERT INTO <table> VALUES` in release 9cb51d9
    assert {table: current[table] for table in unnamed} == {table: previous[table] for table in unnamed}
    assert all(current[table][:len(columns)] == columns for table, columns in previous.items())  # only added
    assert {"missing_files", "completion_signals"} <= set(current) - set(previous)


# -- stopping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signal_to", ["service", "group-sigint", "group-sigterm"])
def test_sigterm_drains_open_associations_and_refuses_new_ones(start_node, tmp_path, signal_to):
    """SIGTERM to the service, Ctrl-C in its terminal (SIGINT to the whole process group) or
    systemd's stop (SIGTERM to every process of the unit): no new connections and
    /health/receiving unready at once; the open association finishes what it sends (within
    scp.timeouts.drain), the receivers ignoring the signal the group got; then the node exits 0."""
    node = start_node(scp={"timeouts": {"drain": 60}})
    files = make_study(tmp_path / "ct", slices=4, size=16)
    datasets = [pydicom.dcmread(f) for f in files]
    assert http_status(f"{node.url}/health/receiving") == 200
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")
    assert assoc.is_established
    steady(assoc)
    assert assoc.send_c_store(datasets[0]).Status == 0
    if signal_to == "service":
        node.process.send_signal(signal.SIGTERM)
    else:
        os.killpg(node.process.pid, signal.SIGINT if signal_to == "group-sigint" else signal.SIGTERM)
    wait_for(lambda: http_status(f"{node.url}/health/receiving") in (503, 0), timeout=10)
    assert wait_for(lambda: node.events("receivers_draining"), timeout=10)
    late = AE(ae_title="MODALITY")
    late.add_requested_context(CTImageStorage)
    refused = late.associate("127.0.0.1", node.port, ae_title="TESTNODE")
    assert not refused.is_established
    for ds in datasets[1:]:  # well after the old 0.5 s grace
        time.sleep(0.4)
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert node.process.wait(30) == 0
    stored = {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances")}
    assert stored == {ds.SOPInstanceUID for ds in datasets}
    # every instance names the association it came on (the audit trail joins on it)
    [association] = node.query("SELECT id, instances FROM associations")
    assert association["instances"] == 4
    assert {r["association_id"] for r in node.query("SELECT association_id FROM instances")} == {association["id"]}
    assert not [line for line in node.log().splitlines() if '"level": "ERROR"' in line]
    node.process = None


class _HeldJobStore(MemoryJobStore):
    """A job store whose look-up of due jobs holds until told to go on: the scheduler's turn is
    then inside the job-store lock while the stop begins, the moment the race needs."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.go_on = threading.Event(), threading.Event()

    def get_due_jobs(self, now):  # type: ignore[no-untyped-def]
        due = super().get_due_jobs(now)
        if due:
            self.inside.set()
            self.go_on.wait(10.0)
        return due


def test_stopping_the_timers_while_a_one_shot_job_falls_due_kills_no_thread(monkeypatch):
    """A fresh clone's SIGTERM test once logged `uncaught_exception` (JobLookupError) from the
    scheduler's thread: `shutdown()` had marked the scheduler stopped while its thread was
    removing a finished one-shot job. Held at exactly that moment here; plain
    `shutdown(wait=False)` fails this test."""
    died: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    store = _HeldJobStore()
    scheduler = BackgroundScheduler(timezone="UTC", jobstores={"default": store})
    scheduler.start()
    scheduler.add_job(lambda: None, "date", run_date=datetime.now(timezone.utc), id="one-shot")
    assert store.inside.wait(10.0)
    stopping = threading.Thread(target=stop_scheduler, args=(scheduler,))
    stopping.start()
    wait_for(lambda: scheduler.state != STATE_RUNNING, timeout=10.0, interval=0.01)
    store.go_on.set()
    stopping.join(10.0)
    assert not stopping.is_alive()
    assert scheduler.state == STATE_STOPPED
    assert died == []


# -- secrets ------------------------------------------------------------------------------------


def test_receiver_processes_get_no_secrets_in_their_environment(start_node, tmp_path, monkeypatch):
    token = "console-token-" + "x" * 24
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", token)
    monkeypatch.setenv("DICOM_NODE_INDEX_URL", f"sqlite:///{tmp_path / 'node0' / 'data' / 'index.sqlite'}")
    monkeypatch.setenv("DICOM_NODE_OIDC_CLIENT_SECRET", "oidc-secret-" + "z" * 24)  # the console's alone
    monkeypatch.setenv("DICOM_NODE_API_TOKEN", "cli-token-" + "w" * 24)  # the command line's
    node = start_node(tmp_path / "node0", http={"token": "yaml-token-" + "y" * 24})
    pids = [e["pid"] for e in node.events("receiver_started")]
    assert pids
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert token.encode() not in environ and b"yaml-token" not in environ
        assert b"DICOM_NODE_INDEX_URL" not in environ and b"DICOM_NODE_RECEIVER_CONFIG" not in environ
        assert b"oidc-secret-" not in environ and b"cli-token-" not in environ
    files = make_study(tmp_path / "ct", slices=2, size=16)
    assert storescu(node.port, files).returncode == 0  # the receivers found the index from the pipe
    assert node.instance_count(_study_uid(files)) == 2


def test_a_receivers_settings_leave_the_consoles_secrets_out(tmp_path, monkeypatch):
    """The settings pipe carries the configuration a receiver needs; the console's token and its
    OIDC client's secret, which no receiver uses, stay with the service (as their environment
    variables do). The index URL goes resolved."""
    monkeypatch.setenv("DICOM_NODE_INDEX_URL", f"sqlite:///{tmp_path / 'index.sqlite'}")
    config = NodeConfig.model_validate({
        "storage": {"data_dir": str(tmp_path)},
        "http": {"token": "yaml-token-" + "y" * 24, "oidc": {
            "issuer": "https://idp.example", "client_id": "node", "client_secret": "oidc-secret-" + "z" * 24}}})
    settings = receiver_settings(config, 11112, 2)
    text = json.dumps(settings)
    assert "yaml-token-" not in text and "oidc-secret-" not in text
    assert settings["config"]["storage"]["index_url"] == f"sqlite:///{tmp_path / 'index.sqlite'}"
    assert NodeConfig.model_validate(settings["config"]).scp == config.scp  # what a receiver reads, whole


# -- executors and jobs -------------------------------------------------------------------------


def test_deliveries_hanging_on_a_pacs_do_not_starve_completion_timers(tmp_path):
    """Every delivery thread blocked on a PACS that never answers: the scheduler's other jobs
    (completion timers, the runner's wake-ups) still run on time."""
    config = NodeConfig.model_validate({"storage": {"data_dir": str(tmp_path)},
                                        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                                  "port": 9}}})
    index = Index(tmp_path / "index.sqlite")
    scheduler = BackgroundScheduler(timezone="UTC")
    outbox = Outbox(config, index, scheduler)
    release = threading.Event()
    blocked = []

    def hang(item_id: int) -> str:
        blocked.append(item_id)
        release.wait(60)
        return "pending"

    outbox.attempt = hang  # type: ignore[method-assign]
    scheduler.start()
    try:
        for n in range(30):
            outbox.enqueue(f"{n}:rule:seg", "1.2.3", "pacs", [])
        wait_for(lambda: len(blocked) >= 8, timeout=10)
        fired = threading.Event()
        scheduler.add_job(fired.set, "date")  # a completion timer, on the default executor
        assert fired.wait(10)
        assert len(blocked) == 8  # the delivery executor's threads, no more
        assert {j.executor for j in scheduler.get_jobs() if j.id.startswith("outbox")} <= {DELIVERY_EXECUTOR}
    finally:
        release.set()
        scheduler.shutdown(wait=False)


def _one_job_study(tmp_path: Path, model_repository: Path, actions: Actions) -> tuple[Index, JobStore, JobRunner, int]:
    """An index with one complete study (one series, one instance) and its queued job."""
    from inference.repository import ModelRepository
    from node.store.spool import Spool

    config = NodeConfig.model_validate({"storage": {"data_dir": str(tmp_path)},
                                        "inference": {"model_repository": str(model_repository)},
                                        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                                  "port": 9}}})
    index = Index(tmp_path / "index.sqlite")
    jobs = JobStore(index)
    scheduler = BackgroundScheduler(timezone="UTC")
    outbox = Outbox(config, index, scheduler)
    decision = RoutingDecision(rules_version="v", mode="first_match", priority=0, explanation="", outcomes=(),
                               applied=(AppliedRule(rule="r", series_uid="1.2.3.1", actions=actions),))
    now = time.time()
    with index.transaction() as db:
        db.execute("INSERT INTO studies (study_uid, state, first_received, last_received, deadline, completions)"
                   " VALUES ('1.2.3', 'complete', ?, ?, ?, 1)", (now, now, now))
        db.execute("INSERT INTO series (series_uid, study_uid) VALUES ('1.2.3.1', '1.2.3')")
        db.execute("INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
                   " path, size, received_at) VALUES ('1.2.3.1.1', '1.2.3.1', '1.2.3', ?, ?, 'x.dcm', 1, ?)",
                   (CTImageStorage, "1.2.840.10008.1.2.1", now))
        first, _ = JobStore.create(db, "1.2.3", decision, now)
    runner = JobRunner(config, index, jobs, outbox, ModelRepository(model_repository), Spool(tmp_path, 1), scheduler,
                       decide=lambda uid: decision)
    return index, jobs, runner, first


def test_a_runner_stopped_before_its_pipeline_loaded_ends_its_workers_and_leaves_the_job_queued(
        tmp_path, model_repository):
    """A stop in the first seconds (torch still importing) does not wait for the import: the
    workers end at once, and the queued job is left to the next start."""
    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, Actions(forward_to=["pacs"]))
    may_load = threading.Event()
    runner.start(load_after=may_load.wait)
    try:
        workers = [t for t in threading.enumerate() if t.name.startswith("pipeline-") and t.name != "pipeline-import"]
        assert len(workers) == runner.config.pipeline.workers >= 1
        runner.stop()
        assert [t.name for t in workers if t.is_alive()] == []
        assert jobs.get(first).state is JobState.QUEUED
    finally:
        may_load.set()


def test_a_runner_with_no_rules_loads_its_pipeline_once_a_job_is_there_and_claims_it_after(
        tmp_path, model_repository, monkeypatch):
    """Started with nothing in sight that needs the pipeline (no routing rules: load_at_start=False),
    a job to claim (one a crash left, a retry, a round trip's results) has it loaded. Nothing is
    claimed while it loads: a job does not wait out torch's import under its lease."""
    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, Actions(forward_to=["pacs"]))
    states_while_loading: list[JobState] = []
    loaded = threading.Event()

    def load() -> None:  # torch's import, stood in for
        states_while_loading.append(jobs.get(first).state)
        loaded.wait(30)
        states_while_loading.append(jobs.get(first).state)
        runner._go.set()

    monkeypatch.setattr(runner, "_load_pipeline", load)
    runner.start(load_at_start=False)
    try:
        wait_for(lambda: states_while_loading)
        loaded.set()
        wait_for(lambda: jobs.get(first).state is not JobState.QUEUED)
        assert states_while_loading == [JobState.QUEUED, JobState.QUEUED] and jobs.get(first).attempts == 1
    finally:
        loaded.set()
        runner.stop()


def test_a_job_claimed_as_the_stop_comes_is_not_started_nor_counted_at_a_kill(tmp_path, model_repository, monkeypatch):
    """A claim that commits as the node is told to stop (after the stop's mark, even after its
    release: a busy index) does not start its job, and queues it again at once, uncounted: a
    replica may take it now, and a SIGKILL before the next start is not counted against it.
    Where that release fails, the job is marked as the running ones were."""
    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, Actions(forward_to=["pacs"]))
    claim = jobs.claim

    def claim_after_the_stop() -> object:
        runner.stop()  # its release finds nothing running yet
        return claim()

    monkeypatch.setattr(jobs, "claim", claim_after_the_stop)
    assert runner._claim() is None and runner._turns.running == 0
    rows = index.query("SELECT state, stopping, interruptions, attempts, lease_owner FROM work_items")
    assert [tuple(r.values()) for r in rows] == [("queued", 0, 0, 0, None)]  # (not an attempt: not started)
    assert JobStore(index, owner="a-replica").claim().id == first
    with index.transaction() as db:  # again, the release failing this time (the index busy)
        db.execute("UPDATE work_items SET state='queued', lease_owner=NULL WHERE id=?", (first,))

    def busy(job_id: object = None) -> list[int]:
        raise OperationalError("UPDATE", (), Exception("database is locked"))

    monkeypatch.setattr(jobs, "release_running", busy)
    runner._stopping.clear()
    assert runner._claim() is None and runner._turns.running == 0
    assert [tuple(r.values()) for r in index.query("SELECT state, stopping FROM work_items")] == [("running", 1)]
    assert JobStore(index, owner="the-next-start").requeue_running() == 1
    assert (jobs.get(first).state, jobs.get(first).interruptions) == (JobState.QUEUED, 0)


def _beside_another(runner: JobRunner) -> object:
    """A job running in the runner's process (node.jobs.turns), stood in for."""
    other = object()
    assert runner._turns.take(lambda: other, alone=lambda job: False, next_alone=lambda: False,
                              waiting=lambda: True) is other
    return other


def test_a_job_waiting_its_turn_to_run_alone_stops_waiting_once_the_node_is_told_to_stop(tmp_path, model_repository):
    """A job its node died under waits, unclaimed, for the other jobs to end (node.jobs.turns);
    a stop's drain (SIGTERM, the receivers still finishing) ends the wait with it unclaimed: it
    is not started beside the others as the node stops."""
    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, Actions(forward_to=["pacs"]))
    with index.transaction() as db:
        db.execute("UPDATE work_items SET interruptions=1 WHERE id=?", (first,))
    other = _beside_another(runner)
    claimed: list[object] = []
    worker = threading.Thread(target=lambda: claimed.append(runner._claim()))
    worker.start()
    try:
        wait_for(lambda: runner._turns._blocked, timeout=10)
        runner.stopping()
        worker.join(10)
        assert claimed == [None] and jobs.get(first).state is JobState.QUEUED
    finally:
        runner.stop()
        worker.join(10)
        runner._turns.ended(other)


def test_a_job_refused_memory_beside_other_jobs_waits_and_alone_fails(tmp_path, model_repository, monkeypatch):
    """A model's output that does not fit beside what the service holds fails its job for good
    (inference.room), but only where no other job runs: beside others, what the service holds
    counts their volumes and inputs too, and the job waits and tries again, saying so."""
    from inference.errors import NotEnoughMemory

    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, Actions(forward_to=["pacs"]))

    def execute(job: object, progress: object) -> None:
        progress.stage = "inference"
        raise NotEnoughMemory("model m's output on this series needs 3.00 GiB")

    monkeypatch.setattr(runner, "_execute", execute)
    other = _beside_another(runner)
    job = runner._claim()
    runner.run(job)
    runner._turns.ended(job)
    assert (jobs.get(first).state, jobs.get(first).reason) == (
        JobState.WAITING, "inference: model m's output on this series needs 3.00 GiB; counted beside other jobs"
                          " running now, whose memory goes as they end: the job waits and tries again")
    runner._turns.ended(other)
    assert jobs.retry(first) == 1
    job = runner._claim()
    runner.run(job)
    runner._turns.ended(job)
    assert (jobs.get(first).state, jobs.get(first).reason) == (
        JobState.FAILED, "inference: model m's output on this series needs 3.00 GiB")


@pytest.mark.parametrize("actions", [Actions(run=["threshold"], send_to=["pacs"]), Actions(forward_to=["pacs"])],
                         ids=["run", "forward"])
def test_a_running_job_stops_when_its_study_completes_again(tmp_path, model_repository, actions):
    """The study completed again while its job ran: the job stops at its next stage, or at the
    latest in the transaction that would queue its results or forward (ignored, naming the newer
    job), and hands nothing to the outbox; the newer job processes the study."""
    index, jobs, runner, first = _one_job_study(tmp_path, model_repository, actions)
    job = jobs.claim()
    assert job is not None and job.id == first
    with index.transaction() as db:  # the study completes again while the job runs
        second, state = JobStore.create(db, "1.2.3", job.decision, time.time())
    assert state is JobState.QUEUED
    runner.run(job)
    stopped = jobs.get(first)
    assert stopped.state is JobState.IGNORED
    assert stopped.reason == f"superseded while running: the study completed again (job {second} processes it)"
    assert not index.query("SELECT id FROM outbox")
    assert jobs.get(second).state is JobState.QUEUED


def test_a_completing_study_is_routed_without_holding_the_lock_every_c_store_needs(tmp_path):
    """Routing (rules, conditions, the study's series) runs before the completing transaction:
    a receiver indexing an instance meanwhile does not wait for it."""
    from node.assemble.completion import CompletionTimers
    from node.jobs.admission import Admission
    from node.store.index import InstanceRecord

    index = Index(tmp_path / "index.sqlite")

    def record(study: str, now: float) -> None:
        index.record_instance(InstanceRecord(f"{study}.1.1", CTImageStorage, f"{study}.1", study, "",
                                             "1.2.840.10008.1.2.1", f"studies/{study}/{study}.1/{study}.1.1.dcm", 10,
                                             "MOD", "TESTNODE", "127.0.0.1", {}), now=now, quiet_period=1.0, reopen=True)

    record("1.2.3", 100.0)
    stored_meanwhile = []

    class RulesThatTakeTheirTime:  # evaluation meets a C-STORE on another study (a receiver thread)
        class current:
            version = "slow"

            @staticmethod
            def quiet_period_for(view):
                return None

            @staticmethod
            def evaluate(view):
                receiver = threading.Thread(target=lambda: stored_meanwhile.append(record("1.2.4", 150.0)))
                receiver.start()
                receiver.join(10)
                assert not receiver.is_alive(), "a C-STORE waited for routing"
                raise RuntimeError("this rule set routes nothing")

    settings = NodeConfig(completion={"quiet_period_s": 1.0})
    admission = Admission(index, RulesThatTakeTheirTime(), tmp_path, config=lambda: settings)  # type: ignore[arg-type]
    timers = CompletionTimers(index, BackgroundScheduler(), prepare=admission.route, admit=admission.admit)
    timers._check("1.2.3")
    assert stored_meanwhile == [None]
    assert index.study_state("1.2.3")["state"] == "complete"
    [job] = JobStore(index).all_jobs("1.2.3")
    assert job.state is JobState.FAILED and job.reason.startswith("route: RuntimeError")
    assert index.study_state("1.2.4")["state"] == "receiving"


def test_a_study_is_read_ahead_once_per_pause_in_its_arrivals_and_not_once_it_has_completed(tmp_path):
    """node.assemble.read_ahead: a reading waits until nothing has arrived for the settle time,
    reads once per pause (asked again with nothing new, it reads nothing), follows the study and
    reads again after more came, and neither once the study has completed nor while reading
    ahead is off."""
    from types import SimpleNamespace

    from node.assemble.read_ahead import EXECUTOR, ReadAhead
    from node.store.index import InstanceRecord

    index = Index(tmp_path / "index.sqlite")

    def record(sop: str, now: float) -> float:
        index.record_instance(InstanceRecord(sop, CTImageStorage, "1.2.3.1", "1.2.3", "", "1.2.840.10008.1.2.1",
                                             f"studies/1.2.3/1.2.3.1/{sop}.dcm", 10, "MOD", "TESTNODE", "127.0.0.1",
                                             {}), now=now, quiet_period=600.0, reopen=True)
        return now

    reads: list[float] = []
    enabled = [True]
    scheduler = BackgroundScheduler()
    scheduler.start()

    def after_what_is_asked_for_by(when: float) -> None:  # its one thread runs what comes due in turn
        marks: list[int] = []
        scheduler.add_job(marks.append, "date", args=[1], executor=EXECUTOR,
                          run_date=datetime.fromtimestamp(when + 0.05, timezone.utc))
        wait_for(lambda: marks, timeout=30)

    try:
        ahead = ReadAhead(index, scheduler, read=lambda study_uid: reads.append(time.time()) or 1,
                          enabled=lambda: enabled[0], settle_s=0.3, follow_s=0.5)
        first = record("1.2.3.1.1", time.time())
        ahead.opened("1.2.3")
        wait_for(lambda: reads, timeout=30)
        assert reads[0] >= first + 0.3
        ahead.opened("1.2.3")
        after_what_is_asked_for_by(time.time() + 0.3)
        ahead.waiting("1.2.3", SimpleNamespace(last_received=first))  # type: ignore[arg-type]
        after_what_is_asked_for_by(time.time())
        assert len(reads) == 1
        second = record("1.2.3.1.2", time.time())  # nothing asks: the study is followed
        wait_for(lambda: len(reads) == 2, timeout=30)
        assert reads[1] >= second + 0.3
        enabled[0] = False
        record("1.2.3.1.3", time.time() - 1)
        ahead.opened("1.2.3")
        after_what_is_asked_for_by(time.time() + 0.5)
        assert len(reads) == 2
        enabled[0] = True
        completed, _ = index.complete_if_due("1.2.3", time.time() + 601, lambda db: None)
        assert completed and "1.2.3" in ahead._read_at
        ahead.opened("1.2.3")
        after_what_is_asked_for_by(time.time() + 0.3)
        assert len(reads) == 2 and "1.2.3" not in ahead._read_at
    finally:
        scheduler.shutdown(wait=False)


# -- one owner per table --------------------------------------------------------------------------

TABLE_OWNERS = {
    "studies": "node/store/index.py", "series": "node/store/index.py", "instances": "node/store/index.py",
    "associations": "node/store/index.py", "missing_files": "node/store/index.py",
    "completion_signals": "node/store/signals.py", "completion_signal_studies": "node/store/signals.py",
    "completion_accessions": "node/store/signals.py", "completion_instance_counts": "node/store/signals.py",
    "signal_forwards": "node/store/signal_forwards.py", "audit_events": "node/store/audit.py",
    "audit_cursor": "node/store/audit.py", "accounts": "node/store/accounts.py", "api_tokens": "node/store/accounts.py",
    "login_failures": "node/store/accounts.py", "console_sessions": "node/console/sessions.py",
    "oidc_logins": "node/console/sessions.py",
    "work_items": "node/jobs/store.py", "outbox": "node/send/outbox.py",
    "installation": "node/store/identity.py", "receive_counts": "node/receive/counts.py",
    "retention_log": "node/retention.py", "retention_runs": "node/retention.py",
}


def test_each_table_is_written_by_its_owner_only_and_inserts_name_their_columns():
    import re

    root = Path(__file__).resolve().parent.parent
    write = re.compile(r"\b(INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", re.IGNORECASE)
    unnamed = re.compile(r"INSERT INTO\s+\w+\s+VALUES", re.IGNORECASE)
    writers: dict[str, set[str]] = {}
    for path in sorted((root / "node").rglob("*.py")):
        if "migrations" in path.parts:
            continue
        text = path.read_text()
        relative = str(path.relative_to(root))
        assert not unnamed.search(text), f"{relative}: an INSERT without its column list"
        for _, table in write.findall(text):
            if table in TABLE_OWNERS:
                writers.setdefault(table, set()).add(relative)
    assert {table: {TABLE_OWNERS[table]} for table in writers} == writers
    assert set(writers) == set(TABLE_OWNERS)  # every table is written somewhere, by its owner
