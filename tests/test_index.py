"""The index on both engines: schema versions and the upgrade of an index written before them,
the same answers from SQLite and a real PostgreSQL, and claims that replicas cannot share."""

from __future__ import annotations

import gc
import os
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from apscheduler.schedulers.background import BackgroundScheduler

from node.config import NodeConfig
from node.jobs.store import IllegalTransition, JobState, JobStore
from node.route.decision import AppliedRule, RoutingDecision
from node.route.rules import Actions
from node.send.outbox import Outbox
from node.store.identity import installation_uid
from node.store import index as index_module, writer_turns
from node.store.index import Index, IndexFailure, InstanceConflict, InstanceRecord
from node.store.migrations import HEAD, schema_version
from tests.peers import REPO_ROOT, VENV_BIN, make_study

BEFORE_MIGRATIONS = Path(__file__).parent / "data" / "index-before-migrations.sql"
STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Index:
    if request.param == "sqlite":
        return Index(tmp_path / "index.sqlite")
    return Index(request.getfixturevalue("postgres").new_database())


def _record(sop: str, study: str = "1.2.3", series: str = "1.2.3.1", sop_class: str = "1.2.840.10008.5.1.4.1.1.2"
            ) -> InstanceRecord:
    return InstanceRecord(sop, sop_class, series, study, "", "1.2.840.10008.1.2.1", f"studies/{study}/{sop}.dcm",
                          2**33, "MODALITY", "NODE", "127.0.0.1", {"modality": "CT", "rows": 512, "slice_thickness": 0.625})


def _decision() -> RoutingDecision:
    return RoutingDecision(rules_version="v1", mode="first_match", priority=0, explanation="", outcomes=(),
                           applied=(AppliedRule(rule="r", series_uid="1.2.3.1", actions=Actions(run=["m"], send_to=["pacs"])),))


def _completed_jobs(index: Index, count: int) -> list[int]:
    ids = []
    for n in range(count):
        study = f"1.2.9.{n}"
        index.record_instance(_record(f"{study}.1.1", study, f"{study}.1"), time.time() - 100, 1.0, True)
        done, _ = index.complete_if_due(study, time.time(),
                                        lambda db, s=study: ids.append(JobStore.create(db, s, _decision(), time.time())[0]))
        assert done
    return ids


def test_an_index_written_before_migrations_is_upgraded_with_its_rows(tmp_path):
    path = tmp_path / "index.sqlite"
    old = sqlite3.connect(path)
    old.executescript(BEFORE_MIGRATIONS.read_text())
    old.close()

    index = Index(path)

    assert index.query("SELECT version_num FROM alembic_version")[0]["version_num"] == HEAD
    assert [r["study_uid"] for r in index.query("SELECT study_uid FROM studies")] == [STUDY]
    assert index.study_instance_count(STUDY) == 3
    assert installation_uid(index) == "2.25.253578325615076737861759670114498984582"  # results keep their UIDs
    job = JobStore(index).get(1)
    assert (job.state, job.stage, job.attempts) == (JobState.RUNNING, "inference", 1)
    columns = {r["name"] for r in index.query("PRAGMA table_info(work_items)")}
    assert {"lease_owner", "lease_until", "outputs", "retry_deadline"} <= columns
    assert index.query("SELECT state, attempts, lease_owner FROM outbox")[0] == {
        "state": "pending", "attempts": 0, "lease_owner": None}
    # ids keep counting after the old ones (results are named after job ids)
    assert _completed_jobs(index, 1) == [2]
    # a second opener finds the schema current and changes nothing
    assert Index(path).query("SELECT COUNT(*) AS n FROM work_items")[0]["n"] == 2


# Another process's writer: takes its turn and SQLite's write lock, says so, and keeps them until
# its standard input closes (then commits: the turn goes with a wake-up) or it is killed.
_HOLDER = """
import sys
from node.store.index import Index
with Index(sys.argv[1], migrate=False).transaction() as db:
    db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES ('holder', '', 1)")
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen([str(VENV_BIN / "python"), "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


class _NotedWait:
    """A writer's polls for its turn's wake-up, counted and noted as they begin (the real poll
    does the waiting)."""

    def __init__(self, poll: Any):
        self.poll_object, self.waiting, self.polls = poll, threading.Event(), 0

    def poll(self, timeout: int) -> Any:
        self.polls += 1
        self.waiting.set()
        return self.poll_object.poll(timeout)


def _waiting_writer(index: Index, kind: str) -> tuple[_NotedWait, threading.Event]:
    """A thread that writes a row of `kind` once it has its turn; (its polls, written)."""
    noted = index._turns._wake = _NotedWait(index._turns._wake)
    written = threading.Event()

    def write() -> None:
        with index.transaction() as db:
            db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES (?, '', 1)", (kind,))
        written.set()

    threading.Thread(target=write, daemon=True).start()
    return noted, written


def test_sqlite_writers_of_other_processes_wait_for_their_turn_woken_when_it_is_let_go_and_no_longer_than_the_wait(
        tmp_path, monkeypatch):
    """Writers of different processes take turns on the index's writers pipe before SQLite's
    lock (whose busy handler sleeps between tries): one kept waiting past the wait gets an
    IndexFailure naming another process, not SQLite's "database is locked" 30 s later; one that
    waits is woken by the holder letting its turn go, not by a recheck of its own, and sleeps
    meanwhile (the wake-ups nobody waited for are drained, not polled again and again)."""
    path = tmp_path / "index.sqlite"
    index = Index(path)
    holder = _holder(path)
    try:
        monkeypatch.setattr(index_module, "WRITE_LOCK_WAIT_S", 0.3)
        with pytest.raises(IndexFailure, match="write lock was held by another process for over 0.3 s"):
            with index.transaction():
                pass
        monkeypatch.setattr(index_module, "WRITE_LOCK_WAIT_S", 600.0)
        monkeypatch.setattr(writer_turns, "RECHECK_S", 600.0)
        noted, written = _waiting_writer(index, "writer")
        assert noted.waiting.wait(30)  # its turn taken by the holder: waiting for the wake-up
        assert not written.is_set()
        holder.communicate("", timeout=30)  # the holder commits and lets its turn go
        assert holder.returncode == 0
        assert written.wait(30)
        assert noted.polls <= 3  # the stale wake-ups of this Index's own migrations, then the holder's
    finally:
        holder.kill()
        holder.wait(30)
    assert index.query("SELECT kind FROM receive_counts WHERE kind IN ('holder', 'writer') ORDER BY kind") == [
        {"kind": "holder"}, {"kind": "writer"}]


@pytest.mark.parametrize("kind", ["transaction", "schema_transaction"])
def test_a_writer_kept_waiting_for_its_turn_gives_sqlites_busy_handler_only_what_is_left_of_its_wait(
        tmp_path, monkeypatch, kind):
    """After its turn, a writer may still find SQLite's lock taken by one that takes no turns (a
    node of an older version, a SQLite shell): SQLite's busy handler gets what is left of the
    writer's wait, in whole seconds, not a second full wait, and the connection the full wait
    again once it has the lock (for its later reads and writes); on both ways into a write
    transaction (the receivers' and Alembic's)."""
    path = tmp_path / "index.sqlite"
    index = Index(path)
    monkeypatch.setattr(index_module, "WRITE_LOCK_WAIT_S", 600.0)
    statements: list[str] = []
    index.engine.dispose()  # the connections from here on are new: each traces its statements
    event.listen(index.engine, "connect", lambda driver, _record: driver.set_trace_callback(statements.append))
    holder = _holder(path)
    noted = index._turns._wake = _NotedWait(index._turns._wake)

    def write() -> None:
        for n in range(2):
            if kind == "transaction":
                with index.transaction() as db:
                    db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES ('writer', ?, 1)", (str(n),))
            else:
                with index.schema_transaction() as connection:
                    connection.exec_driver_sql(f"INSERT INTO receive_counts (kind, detail, n) VALUES ('writer', '{n}', 1)")

    writer = threading.Thread(target=write, daemon=True)
    try:
        writer.start()
        assert noted.waiting.wait(30)
        time.sleep(1.5)  # not a wait for something: the writer's turn is to take over a second
        holder.communicate("", timeout=30)
        writer.join(30)
    finally:
        holder.kill()
        holder.wait(30)
    assert not writer.is_alive()
    assert index.query("SELECT detail FROM receive_counts WHERE kind='writer' ORDER BY detail") == [
        {"detail": "0"}, {"detail": "1"}]
    steps = [s.split(" (")[0] for s in statements if s.startswith(("PRAGMA busy_timeout", "BEGIN IMMEDIATE", "INSERT"))]
    assert len(steps) == 6, steps
    shortened = int(steps[0].removeprefix("PRAGMA busy_timeout="))
    assert 590_000 <= shortened <= 599_000
    assert steps[1:] == ["BEGIN IMMEDIATE", "PRAGMA busy_timeout=600000", "INSERT INTO receive_counts",
                         "BEGIN IMMEDIATE", "INSERT INTO receive_counts"]


def test_the_schema_version_is_read_while_a_writer_holds_the_write_lock(tmp_path, monkeypatch):
    """`dicom-node index version` on a node that is receiving: a read, which neither waits for
    the write lock nor takes it (it took SQLite's, without a turn, and PostgreSQL's)."""
    monkeypatch.setattr(index_module, "WRITE_LOCK_WAIT_S", 0.3)
    path = tmp_path / "index.sqlite"
    index = Index(path)
    holder = _holder(path)
    try:
        assert schema_version(index) == HEAD
    finally:
        holder.kill()
        holder.wait(30)


def test_a_writer_killed_during_its_turn_leaves_the_turn_and_sqlites_lock_to_the_writer_waiting(
        tmp_path, monkeypatch):
    """The kernel lets a killed holder's turn go (and SQLite its transaction): a writer waiting for
    it finds it free at its next recheck, though no wake-up came."""
    path = tmp_path / "index.sqlite"
    index = Index(path)
    holder = _holder(path)
    try:
        monkeypatch.setattr(writer_turns, "RECHECK_S", 0.05)
        noted, written = _waiting_writer(index, "next")
        assert noted.waiting.wait(30)
        holder.kill()
        holder.wait(30)
        assert written.wait(30)
    finally:
        holder.kill()
        holder.wait(30)
    assert index.query("SELECT kind FROM receive_counts") == [{"kind": "next"}]  # the killed one's rolled back


@pytest.mark.parametrize("left", ["plain file", "folder"])
def test_without_a_writers_pipe_the_index_writes_as_before_and_says_why(tmp_path, monkeypatch, left):
    """Something else where the pipe belongs: no turns, logged; SQLite's own lock still decides."""
    path = tmp_path / "index.sqlite"
    if left == "plain file":
        Path(f"{tmp_path}/.index.sqlite-writers").write_bytes(b"")
    else:
        Path(f"{tmp_path}/.index.sqlite-writers").mkdir()
    said: list[str] = []
    monkeypatch.setattr(writer_turns.logs, "event", lambda _log, event, *args, **fields: said.append(event))
    index = Index(path)
    assert index._turns is None
    assert "index_writer_turns_unavailable" in said
    with index.transaction() as db:
        db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES ('plain', '', 1)")
    assert index.query("SELECT kind FROM receive_counts") == [{"kind": "plain"}]


def test_the_writers_pipe_has_the_index_files_permissions_and_goes_with_close(tmp_path):
    """Made with the index file's mode, as SQLite's -wal and -shm, so that whichever process comes
    first the others can open it; its descriptor closed by Index.close, after which the index
    writes without turns."""
    path = tmp_path / "index.sqlite"
    Index(path).close()
    os.chmod(path, 0o664)
    os.unlink(f"{tmp_path}/.index.sqlite-writers")
    index = Index(path)
    assert stat.S_ISFIFO(os.stat(f"{tmp_path}/.index.sqlite-writers").st_mode)
    assert stat.S_IMODE(os.stat(f"{tmp_path}/.index.sqlite-writers").st_mode) == 0o664
    fd = index._turns._fd
    index.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with index.transaction() as db:
        db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES ('after', '', 1)")


def test_sqlite_writers_in_one_process_take_turns_and_one_kept_waiting_too_long_gets_an_index_failure(
        tmp_path, monkeypatch):
    """Writers in one process queue on the index's own lock (handed over at once, not at SQLite's
    next busy-handler poll); past the wait they get an IndexFailure that says so, not a hang."""
    index = Index(tmp_path / "index.sqlite")
    monkeypatch.setattr(index_module, "WRITE_LOCK_WAIT_S", 0.3)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with index.transaction() as db:
            db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES ('test', '', 1)")
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    with pytest.raises(IndexFailure, match="write lock was held in this process for over 0.3 s"):
        with index.transaction():
            pass
    release.set()
    holder.join(30)
    assert index.check_writable() is None
    assert index.query("SELECT n FROM receive_counts WHERE kind='test'") == [{"n": 1}]


def test_a_read_and_a_write_that_cannot_reach_the_index_fail_as_index_failures(tmp_path):
    """A read outside a transaction runs on a pooled driver connection (no SQLAlchemy BEGIN on
    SQLite): a connection it cannot open fails as an IndexFailure all the same, as a write's
    does, so every caller that handles a failing index handles it."""
    folder = tmp_path / "data"
    folder.mkdir()
    index = Index(folder / "index.sqlite")
    assert index.query("SELECT COUNT(*) AS n FROM instances") == [{"n": 0}]
    index.engine.dispose()  # no pooled connection left: the next one is opened anew
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()
    with pytest.raises(IndexFailure, match="unable to open database file"):
        index.find_instance("1.2.3.4")
    with pytest.raises(IndexFailure, match="unable to open database file"):
        with index.transaction():
            pass
    folder.mkdir()  # back: the same Index reads again
    index.engine.dispose()
    with pytest.raises(IndexFailure, match="no such table"):  # (a new, empty file)
        index.find_instance("1.2.3.4")


def test_a_write_whose_body_or_commit_fails_leaves_nothing_and_its_connection_fit(tmp_path):
    """SQLite's write transactions run on a pooled driver connection, not SQLAlchemy's
    Connection: a body that raises and a COMMIT that fails (a deferred foreign key, the one
    failure SQLite reports at COMMIT) leave no row and no open transaction on the connection the
    next writer gets (one connection here: it is the same one), and fail as IndexFailure."""
    index = Index(tmp_path / "index.sqlite", connections=1)
    with index.transaction() as db:
        db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE child (parent INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    pooled = index.engine.raw_connection()
    pooled.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # (only outside a transaction)
    pooled.close()
    with pytest.raises(ZeroDivisionError):
        with index.transaction() as db:
            db.execute("INSERT INTO parent VALUES (1)")
            raise ZeroDivisionError
    with pytest.raises(IndexFailure, match="FOREIGN KEY constraint failed"):
        with index.transaction() as db:
            db.execute("INSERT INTO parent VALUES (2)")
            db.execute("INSERT INTO child VALUES (3)")  # accepted until the COMMIT
    pooled = index.engine.raw_connection()
    assert not pooled.dbapi_connection.in_transaction
    pooled.close()
    with index.transaction() as db:  # the next writer: a transaction of its own, committed
        db.execute("INSERT INTO child VALUES (NULL)")
    assert index.query("SELECT (SELECT COUNT(*) FROM parent) AS parents, (SELECT COUNT(*) FROM child) AS children") \
        == [{"parents": 0, "children": 1}]


def test_sqlite_connections_kept_between_uses_only_when_clean_bounded_and_closed_on_dispose(tmp_path):
    """An Index keeps a few SQLite connections out of the pool between its transactions and
    reads (the pool's checkout and check-in were a twentieth of a receiver's CPU): one is reused
    only after a use that ended with no transaction open; a failed write's and a read's that left
    one open go back to the pool, which rolls them back; at most IDLE_CONNECTIONS_KEPT, and fewer
    than the pool holds (an Index of one connection keeps none, so the pool's one stays free);
    closed when the engine is disposed."""
    index = Index(tmp_path / "index.sqlite")
    with index.transaction() as db:
        db.execute("CREATE TABLE t (n INTEGER)")
        first = db  # (the Db; its driver connection below)
    driver = first._statements._driver
    with index.transaction() as db:
        assert db._statements._driver is driver  # committed: kept, and taken again
        db.execute("INSERT INTO t VALUES (1)")
    assert index.query("SELECT COUNT(*) AS n FROM t") == [{"n": 1}]
    with index.transaction() as db:
        assert db._statements._driver is driver  # the read gave it back too
    with pytest.raises(ZeroDivisionError):
        with index.transaction() as db:
            db.execute("INSERT INTO t VALUES (2)")
            raise ZeroDivisionError
    assert index.query("SELECT COUNT(*) AS n FROM t") == [{"n": 1}]  # rolled back by the pool's reset
    assert not driver.in_transaction
    index.query("BEGIN")  # a read that leaves a transaction open is not kept: the pool rolls it back
    with index.transaction() as db:  # (else BEGIN IMMEDIATE would fail inside a transaction)
        db.execute("INSERT INTO t VALUES (3)")
    assert index.query("SELECT n FROM t ORDER BY n") == [{"n": 1}, {"n": 3}]

    taken = [index._idle.take() for _ in range(4)]  # four in use at once (four threads' worth)
    for pooled in taken:
        index._idle.give_back(pooled, clean=True)
    assert len(index._idle._idle) == index_module.IDLE_CONNECTIONS_KEPT == 2  # the others went to the pool
    assert index.engine.pool.checkedout() == 2
    kept_drivers = [pooled.dbapi_connection for pooled in index._idle._idle]
    index.engine.dispose()
    assert index._idle._idle == []
    for kept_driver in kept_drivers:
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            kept_driver.execute("SELECT 1")
    assert index.query("SELECT COUNT(*) AS n FROM t") == [{"n": 2}]  # a new connection reads on

    in_use = index._idle.take()  # a connection in use while the engine is disposed is not kept
    in_use_driver = in_use.dbapi_connection
    index.engine.dispose()
    index._idle.give_back(in_use, clean=True)
    assert index._idle._idle == []
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        in_use_driver.execute("SELECT 1")

    with index.transaction() as db:  # a COMMIT that fails: not kept, rolled back
        db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE child (parent INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    kept_driver = index._idle._idle[-1].dbapi_connection
    kept_driver.execute("PRAGMA foreign_keys=ON")  # (only outside a transaction)
    with pytest.raises(IndexFailure, match="FOREIGN KEY constraint failed"):
        with index.transaction() as db:
            assert db._statements._driver is kept_driver
            db.execute("INSERT INTO child VALUES (3)")  # accepted until the COMMIT
    assert all(pooled.dbapi_connection is not kept_driver for pooled in index._idle._idle)
    assert not kept_driver.in_transaction
    assert index.query("SELECT COUNT(*) AS n FROM child") == [{"n": 0}]

    alone = Index(tmp_path / "alone.sqlite", connections=1)
    with alone.transaction():
        pass
    alone.query("SELECT 1 AS one")
    assert alone.engine.pool.checkedout() == 0  # nothing kept: the pool's only connection is free
    pooled = alone.engine.raw_connection()
    pooled.close()

    def open_on(path: Path) -> int:
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(path))

    dropped = Index(tmp_path / "dropped.sqlite")  # an Index dropped unclosed lets its connections go
    with dropped.transaction():
        pass
    dropped.query("SELECT 1 AS one")
    assert open_on(tmp_path / "dropped.sqlite") >= 1
    del dropped
    gc.collect()
    assert open_on(tmp_path / "dropped.sqlite") == 0


def test_a_job_id_is_never_reused_after_the_newest_job_is_deleted(index):
    first = _completed_jobs(index, 2)
    with index.transaction() as db:
        db.execute("DELETE FROM work_items WHERE id=?", (first[-1],))
    assert _completed_jobs(index, 1)[0] > first[-1]


def test_both_engines_keep_the_instance_rules(index):
    arrival = index.record_instance(_record("1.2.3.1.1"), 1000.0, 60.0, True)
    assert (arrival.opened, arrival.duplicate, arrival.deadline) == (True, False, 1060.0)
    again = index.record_instance(_record("1.2.3.1.1"), 1001.0, 60.0, True, identical=True)
    assert (again.duplicate, again.identical, again.opened) == (True, True, False)
    with pytest.raises(InstanceConflict, match="already held by study 1.2.3"):
        index.record_instance(_record("1.2.3.1.1", study="9.9.9", series="9.9.9.1"), 1002.0, 60.0, True)
    row = index.query("SELECT size, received_at FROM instances WHERE sop_instance_uid=?", ("1.2.3.1.1",))[0]
    assert (row["size"], row["received_at"]) == (2**33, 1000.0)  # 64-bit sizes, double-precision times
    series = index.query("SELECT slice_thickness, rows FROM series")[0]
    assert (series["slice_thickness"], series["rows"]) == (0.625, 512)
    assert index.complete_if_due("1.2.3", 1030.0, lambda db: None) == (False, 1061.0)
    assert index.complete_if_due("1.2.3", 1062.0, lambda db: None) == (True, None)
    assert index.complete_if_due("1.2.3", 1063.0, lambda db: None) == (False, None)  # once
    assert [a["id"] for a in (index.open_association("A", "B", "127.0.0.1", 1.0),
                              index.open_association("A", "B", "127.0.0.1", 2.0)) and
            index.query("SELECT id FROM associations ORDER BY id")] == [1, 2]


def test_a_new_instance_commits_lazily_on_sqlite_and_a_replacement_durably(index):
    """What a power cut may take (README, "Receiving"): on SQLite a new instance's row, never a
    study's first (its origin) nor a replacement's (which copy was acknowledged), never another
    transaction's. PostgreSQL commits durably whatever the caller allows."""
    levels: list[int] = []

    def seen(db) -> None:
        levels.append(db.execute("PRAGMA synchronous").fetchone()["synchronous"] if not index.shared else 2)

    placed: list[str] = []
    # the study's first (it carries the study's origin); a different copy of it (placed); a new one
    for sop in ("1.2.3.1.1", "1.2.3.1.1", "1.2.3.1.2"):
        index.record_instance(_record(sop), time.time(), 60.0, True, place=lambda sop=sop: placed.append(sop),
                              also=seen, lazy_commit=True)
    index.record_instance(_record("1.2.3.1.3"), time.time(), 60.0, True, also=seen)
    with index.transaction() as db:  # every other transaction: durable
        seen(db)
    index.record_instance(_record("1.2.3.1.4"), time.time(), 60.0, True, also=seen, lazy_commit=True)
    normal, full = 1, 2
    assert levels == ([full] * 6 if index.shared else [full, full, normal, full, full, normal])
    assert placed == ["1.2.3.1.1", "1.2.3.1.1", "1.2.3.1.2"]  # each placed once, after its retry
    assert [r["n"] for r in index.query("SELECT COUNT(*) AS n FROM instances")] == [4]


def test_replicas_claiming_at_once_each_get_different_jobs(index):
    ids = _completed_jobs(index, 12)
    stores = [JobStore(index, owner=f"replica-{n}") for n in range(4)]
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def drain(store: JobStore) -> None:
        while (job := store.claim()) is not None:
            with lock:
                claimed.append((store.owner, job.id))

    assert stores[0].claimable()  # what a runner asks before its pipeline has loaded
    threads = [threading.Thread(target=drain, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(j for _, j in claimed) == ids  # every job once
    assert not stores[0].claimable()
    owners = {r["id"]: r["lease_owner"] for r in index.query("SELECT id, lease_owner FROM work_items")}
    assert all(owners[job] == owner for owner, job in claimed)


def test_an_expired_lease_is_taken_over_by_a_replica_and_the_old_holder_can_no_longer_finish(index):
    (job_id,) = _completed_jobs(index, 1)
    dead = JobStore(index, owner="replica-dead", lease_s=2.0)
    alive = JobStore(index, owner="replica-alive", lease_s=2.0)
    assert dead.claim().id == job_id
    assert alive.claim() is None and not alive.claimable()  # the lease holds
    assert dead.renew_leases() == 1
    later = time.time() + 3.0
    if not index.shared:  # one node: its running jobs are its own however long they take (a restart resumes them)
        assert alive.claim(now=later) is None
        return
    # Leases run on the database's clock: a replica whose own clock is an hour ahead takes nothing.
    assert alive.claim(now=time.time() + 3600) is None
    with index.transaction() as db:  # the dead replica renewed no more: its lease runs out
        db.execute("UPDATE work_items SET lease_until=lease_until-10 WHERE id=?", (job_id,))
    assert alive.claimable()
    assert alive.next_interruptions() == 1  # what the claim will count: the job runs alone (node.jobs.turns)
    taken = alive.claim(now=later)
    assert (taken.id, taken.state, taken.attempts, taken.interruptions) == (job_id, JobState.RUNNING, 2, 1)
    with pytest.raises(IllegalTransition, match="another node process's lease"):
        dead.finish(job_id)
    assert dead.renew_leases() == 0
    alive.finish(job_id)
    assert alive.get(job_id).state is JobState.DONE


def test_a_node_dying_under_a_job_counts_against_it_and_a_stop_or_a_retry_does_not(index):
    """A job its node died running is counted (a start's requeue, a replica's take-over): the
    runner fails it at `pipeline.interrupted_runs` (tests/test_jobs.py). A stop queues this
    process's running jobs again without counting, and a death after the stop began (a SIGKILL
    during the drain) is not counted either; an operator's retry clears the count."""
    first, second = _completed_jobs(index, 2)
    node, other = JobStore(index, owner="node-a"), JobStore(index, owner="node-b")
    assert node.claim().id == first
    assert other.release_running() == [] and other.mark_stopping() == 0  # another process's
    assert node.get(first).state is JobState.RUNNING
    assert node.release_running() == [first]
    released = node.get(first)
    assert (released.state, released.interruptions, released.attempts) == (JobState.QUEUED, 0, 1)
    assert [node.claim().id, node.claim().id] == [first, second]
    for dead in (1, 2):  # the node dies with both running; its next start requeues them
        assert JobStore(index, owner=f"node-a-{dead}").requeue_running() == 2
        assert [(j.state, j.interruptions) for j in map(node.get, (first, second))] == [(JobState.QUEUED, dead)] * 2
        assert {node.claim().id, node.claim().id} == {first, second}
    assert node.mark_stopping() == 2  # told to stop, then killed before its stop ended: not counted
    assert JobStore(index, owner="node-a-3").requeue_running() == 2
    assert [node.get(j).interruptions for j in (first, second)] == [2, 2]
    assert {node.claim().id, node.claim().id} == {first, second}  # (the mark goes with the claim)
    assert JobStore(index, owner="node-a-4").requeue_running() == 2
    assert [node.get(j).interruptions for j in (first, second)] == [3, 3]
    assert node.next_interruptions() == 3
    node.claim()
    node.fail(first, "the node stopped 3 times while this job ran")
    with pytest.raises(ValueError, match=r"no state queued may be reached from \['failed'\] by its owner"):
        with index.transaction() as db:  # (a caller's mistake, said so, on both databases alike)
            JobStore._move(db, first, JobState.QUEUED, time.time(), only_from=(JobState.FAILED,), owner="node-a")
    assert node.retry(first) == 1
    assert (node.get(first).state, node.get(first).interruptions, node.get(second).interruptions) == (
        JobState.QUEUED, 0, 3)


def test_a_job_released_or_taken_over_can_no_longer_be_written_by_its_old_runner(index):
    """Released at a stop, a job's thread goes on until its process ends (a replica may claim the
    job at once): its stage, times, outputs and results are no longer its own to write."""
    (job_id,) = _completed_jobs(index, 1)
    stopping, successor = JobStore(index, owner="stopping"), JobStore(index, owner="successor")
    assert stopping.claim().id == job_id
    stopping.enter_stage(job_id, "load")
    assert stopping.release_running() == [job_id]
    assert successor.claim().id == job_id
    successor.enter_stage(job_id, "inference")
    for write in (lambda: stopping.enter_stage(job_id, "encode"),
                  lambda: stopping.record_stage(job_id, "encode", 1.0, 2.0),
                  lambda: stopping.record_outputs(job_id, "1:r:m:SEG", [Path("/elsewhere/seg.dcm")])):
        with pytest.raises(IllegalTransition, match="no longer run by this node process"):
            write()
    with pytest.raises(IllegalTransition, match="no longer run by this node process"):
        with index.transaction() as db:  # the guard of the transaction that queues its results
            stopping.check_held(db, job_id)
    with index.transaction() as db:
        successor.check_held(db, job_id)
    job = successor.get(job_id)
    assert (job.stage, "encode" in job.stages, job.outputs) == ("inference", False, {})


def test_a_delivery_is_sent_by_one_replica_and_taken_over_when_its_lease_expires(index, tmp_path):
    config = NodeConfig.model_validate({"scp": {"ae_title": "NODE"}, "storage": {"lease_s": 2.0},
                                        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 9}},
                                        "sending": {"timeout_s": 1}})
    scheduler = BackgroundScheduler()
    first = Outbox(config, index, scheduler, owner="replica-a")
    second = Outbox(config, index, scheduler, owner="replica-b")
    files = make_study(tmp_path / "results", slices=1, size=8)
    item = first.enqueue("job-1:seg", "1.2.3", "pacs", files)
    assert first.enqueue("job-1:seg", "1.2.3", "pacs", files) == item  # queued once
    with index.transaction() as db:  # replica-a took it, then died mid-send
        db.execute("UPDATE outbox SET state='sending', attempts=1, lease_owner='replica-a', lease_until=? WHERE id=?",
                   (time.time() + 60, item))
    assert second.attempt(item) == "not due"
    with index.transaction() as db:
        db.execute("UPDATE outbox SET lease_until=? WHERE id=?", (time.time() - 1, item))
    if not index.shared:  # one node resumes its sends at start, never by lease
        assert second.attempt(item) == "not due"
        return
    assert second.attempt(item) == "pending"  # taken over; port 9 refuses: a transient failure
    row = index.query("SELECT state, attempts, lease_owner, last_error FROM outbox WHERE id=?", (item,))[0]
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("pending", 2, "replica-b")
    assert "no association with PACS@127.0.0.1:9" in row["last_error"]


def test_the_operator_sees_and_upgrades_the_schema_version_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "index.sqlite")
    old.executescript(BEFORE_MIGRATIONS.read_text())
    old.close()
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  data_dir: {data}\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "dicom-node"), "index", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=120)

    before = cli("version")
    assert (before.returncode, before.stdout.strip().endswith(
        f"schema without a version (written before 0001); this release: {HEAD}")) == (1, True), before.stdout
    assert cli("upgrade").stdout.strip().endswith(f"schema {HEAD}")
    after = cli("version")
    assert (after.returncode, after.stdout.strip().endswith(f"schema {HEAD}; this release: {HEAD}")) == (0, True)


def test_head_names_the_newest_migration():
    """Opening an index skips Alembic when the stored version is HEAD: a new revision must move it."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import node.store.migrations as migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD


def test_the_index_url_can_come_from_the_environment(tmp_path, monkeypatch):
    """DICOM_NODE_INDEX_URL keeps a database password out of node.yaml (a secret in Kubernetes)."""
    from node.config import StorageConfig

    storage = StorageConfig(data_dir=tmp_path / "data")
    storage.data_dir.mkdir()
    assert Index.open(storage).url == f"sqlite:///{(tmp_path / 'data' / 'index.sqlite').resolve()}"
    monkeypatch.setenv("DICOM_NODE_INDEX_URL", f"sqlite:///{tmp_path / 'elsewhere.sqlite'}")
    assert Index.open(storage).path == str(tmp_path / "elsewhere.sqlite")
    assert Index("postgresql+psycopg://node:s3cret@db.example/index", migrate=False).display_url == \
        "postgresql+psycopg://node:***@db.example/index"


def test_values_postgresql_refuses_are_cleaned_where_the_receiver_reads_them(index):
    """NUL padding and out-of-range integers (seen in vendor files) were stored by SQLite and make
    PostgreSQL refuse the whole instance; the receiver drops them when it reads the routing tags."""
    from node.routing_tags import _number, _text

    series = {"modality": _text("CT\x00"), "number": _number(2**40, int), "description": _text("\x00\x00")}
    assert series == {"modality": "CT", "number": None, "description": None}
    index.record_instance(InstanceRecord("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "1.2.3", "",
                                         "1.2.840.10008.1.2.1", "studies/1.2.3/1.dcm", 10, "A", "B", "127.0.0.1",
                                         series), 1.0, 60.0, True)
    assert index.query("SELECT modality, number FROM series")[0] == {"modality": "CT", "number": None}


def test_receive_counters_count_on_both_engines(index):
    from node.receive.counts import Counted, ReceiveCounts

    counts = ReceiveCounts(index)
    for _ in range(3):
        counts.add(Counted.CSTORE_FAILURE, "0xA700")
    counts.add(Counted.CSTORE_FAILURE, "0xC000")
    assert counts.totals(Counted.CSTORE_FAILURE) == {"0xA700": 3, "0xC000": 1}


def test_a_release_older_than_the_schema_still_opens_the_index(tmp_path):
    """A rolling upgrade: the new release migrated the index; a replica of the previous one restarts."""
    Index(tmp_path / "index.sqlite")
    newer = str(int(HEAD) + 1).zfill(len(HEAD))
    with Index(tmp_path / "index.sqlite").transaction() as db:
        db.execute("UPDATE alembic_version SET version_num=?", (newer,))
    assert Index(tmp_path / "index.sqlite").study_instance_count("1.2.3") == 0
