"""The node's index: SQLite in WAL mode for one node, or PostgreSQL shared by replicas.

Every acknowledged instance has a row here before its C-STORE response is sent, so the index
(not memory) is the truth about what was received, which studies are waiting for their quiet
period, and which completed studies are waiting for the pipeline.

Both engines run through SQLAlchemy; the schema is Alembic's (node/store/migrations), upgraded
when an index is opened. Writes keep SQLite's semantics on both: a write transaction holds the
index's write lock (SQLite `BEGIN IMMEDIATE`; on PostgreSQL a transaction-level advisory lock),
so every read-then-write in this package sees no concurrent writer, across processes and
replicas alike. Claims of jobs and deliveries (`transaction(claim=True)`) lock only the rows
they take on PostgreSQL (`FOR UPDATE SKIP LOCKED`), so replicas never wait for each other there.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, TimeoutError as PoolTimeout

from node.config import StorageConfig
from node.store.writer_turns import TurnTimeout, WriterTurns

# Any failure of the index (busy past its timeout, connection lost, disk full).
IndexFailure = SQLAlchemyError
# How long a writer waits for the write lock, on SQLite (busy_timeout) and in-process alike.
WRITE_LOCK_WAIT_S = 30.0
# pg_advisory_xact_lock key of the index's write lock ("dcmnode" in ASCII).
WRITE_LOCK_KEY = 0x64636D6E6F6465
SQLITE_FILE = "index.sqlite"
# SQLite connections an Index keeps out of the pool between uses (_IdleConnections): one per
# thread that writes or reads at once in a receiver (the associations' and the service's).
IDLE_CONNECTIONS_KEPT = 2
_TAKEN_AFTER_DISPOSALS = "index_idle_generation"  # (a pooled connection's info)


def index_url(storage: StorageConfig) -> str:
    """`storage.index_url` (or DICOM_NODE_INDEX_URL), else the SQLite file in the data folder."""
    return storage.effective_index_url() or f"sqlite:///{(Path(storage.data_dir) / SQLITE_FILE).resolve()}"


class Rows:
    """A statement's result: rows as dicts by column name (`row["state"]`) and the rows it changed."""

    def __init__(self, rows: list[dict[str, Any]], rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> dict[str, Any] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[dict[str, Any]]:
        return self._rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)


class Db:
    """One connection inside a transaction; statements use `?` placeholders on both engines.

    SQLAlchemy pools the connections (and on PostgreSQL begins and ends the transaction); the
    statements go to the driver's cursor directly (SQLAlchemy's per-statement result machinery
    doubled the receiver's per-instance index time on SQLite, and the node's statements are plain
    SQL that needs none of it). Driver errors are raised as SQLAlchemy's (OperationalError,
    IntegrityError, ...), as from SQLAlchemy.
    """

    def __init__(self, driver: Any, dialect: Any):
        """`driver`: the DBAPI connection the transaction is open on."""
        self._statements = _Statements(driver, dialect)
        self._shared = dialect.name != "sqlite"

    def lease_clock(self) -> float:
        """Now, for leases: on a shared index the database server's clock (replicas' wall clocks
        may disagree by more than a lease is long), on SQLite this host's (one host)."""
        if not self._shared:
            return time.time()
        return float(self.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS now").fetchone()["now"])

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self._statements.execute(sql, params)


class _Statements:
    """Statements on a driver connection, as Db runs them."""

    def __init__(self, driver: Any, dialect: Any):
        self._driver = driver
        self._dbapi = dialect.loaded_dbapi
        self._pyformat = dialect.paramstyle in ("format", "pyformat")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        # psycopg's placeholder is %s; no statement in the node has a '?' or '%' inside a literal.
        if self._pyformat:
            sql = sql.replace("%", "%%").replace("?", "%s")
        cursor = self._driver.cursor()
        try:  # as _as_index_failure does, without a generator's context manager (ten statements an instance)
            cursor.execute(sql, tuple(params))
            names = [column[0] for column in cursor.description or ()]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()] if names else []
            return Rows(rows, cursor.rowcount)
        except self._dbapi.Error as exc:
            raise _index_failure(self._dbapi, sql, params, exc) from exc
        finally:
            cursor.close()


@dataclass(frozen=True)
class InstanceRecord:
    """What the receiver learned about one stored instance (routing tags, no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    transfer_syntax: str
    path: str
    size: int
    calling_ae: str
    called_ae: str
    peer: str
    series: dict[str, Any]
    association_id: int | None = None  # the associations row it arrived on (None: reconciled)


class Placement(Enum):
    """What happened to the newcomer's bytes (decided under the index's write lock)."""

    PLACED = "placed"  # written to its path (new, or replacing a different copy while receiving)
    IDENTICAL = "identical"  # a byte-identical copy of the indexed instance: nothing written
    KEPT_ASIDE = "kept_aside"  # different bytes for an instance of a study completed under
    # `after_complete: ignore`: the instance its results were made from stays in place


@dataclass(frozen=True)
class Arrival:
    """Effect of one stored instance on its study."""

    duplicate: bool  # the SOP Instance UID was already indexed (same study, series, SOP class)
    opened: bool  # the study went to 'receiving' (new, or reopened after completion)
    reopened: bool
    ignored_after_complete: bool
    deadline: float
    placement: Placement = Placement.PLACED

    @property
    def identical(self) -> bool:
        """A byte-identical resend: it never reopens a complete study (whatever
        completion.after_complete says); while the study is receiving it moves the deadline."""
        return self.placement is Placement.IDENTICAL


MARK_BATCH = 200  # instances judged missing per write-lock hold

# Statements on the receiving tables name their columns: a release that adds a column (rolling
# upgrade, README "Scaling out") leaves the previous release's statements valid.
_INSERT_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path, size,"
    " received_at, calling_ae, called_ae, peer, association_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(sop_instance_uid) DO UPDATE SET transfer_syntax=excluded.transfer_syntax, path=excluded.path,"
    " size=excluded.size, received_at=excluded.received_at, calling_ae=excluded.calling_ae,"
    " called_ae=excluded.called_ae, peer=excluded.peer, association_id=excluded.association_id"
)
# What the index knows of an arriving instance, in one statement instead of four (each costs the
# receiver ~20 µs of CPU, most of it the driver's): the instance's row if indexed, the study its
# series belongs to, its study's state, whether its file was found missing. Parameters: series,
# study, SOP instance (twice).
_WHAT_IS_KNOWN = (
    "SELECT i.sop_instance_uid, i.study_uid, i.series_uid, i.sop_class_uid, i.path,"
    " (SELECT study_uid FROM series WHERE series_uid=?) AS series_study,"
    " (SELECT state FROM studies WHERE study_uid=?) AS study_state,"
    " CASE WHEN EXISTS (SELECT 1 FROM missing_files WHERE sop_instance_uid=?) THEN 1 ELSE 0 END AS was_missing"
    " FROM (SELECT 1 AS one) AS arriving LEFT JOIN instances i ON i.sop_instance_uid=?"
)
_INSERT_SERIES = (
    "INSERT INTO series (series_uid, study_uid, modality, body_part, description, number, sop_class_uid,"
    " image_type, orientation, rows, columns, slice_thickness) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT DO NOTHING"
)
_INSERT_STUDY = (
    "INSERT INTO studies (study_uid, patient_id, state, calling_ae, first_received, last_received, deadline,"
    " completed_at, completions) VALUES (?,?,'receiving',?,?,?,?,NULL,0)"
)


class _DurableCommitNeeded(Exception):
    """A lazy commit would create a study or replace an indexed copy: the transaction is rolled
    back (before anything is placed) and made again with a durable commit."""


class InstanceConflict(Exception):
    """The SOP Instance UID is already indexed under another study, series or SOP class.

    The indexed instance was acknowledged and stays; the newcomer must be refused.
    """

    def __init__(self, sop_instance_uid: str, study_uid: str, series_uid: str, sop_class_uid: str):
        self.sop_instance_uid = sop_instance_uid
        self.study_uid = study_uid
        self.series_uid = series_uid
        self.sop_class_uid = sop_class_uid
        super().__init__(
            f"SOPInstanceUID {sop_instance_uid} is already held by study {study_uid}, series "
            f"{series_uid}, SOP class {sop_class_uid}"
        )

    @staticmethod
    def check(rec: "InstanceRecord", row: Any) -> None:
        if row is not None and (row["study_uid"], row["series_uid"], row["sop_class_uid"]) != (
            rec.study_uid, rec.series_uid, rec.sop_class_uid
        ):
            raise InstanceConflict(rec.sop_instance_uid, row["study_uid"], row["series_uid"],
                                   row["sop_class_uid"])


class AlreadyIndexed(Exception):
    """`record_instance(new_only=True)` found the SOP Instance UID indexed: nothing was written or
    placed; the caller looks the instance up and files it again (a resend, a replacement, a conflict)."""


class SeriesConflict(InstanceConflict):
    """The Series Instance UID is already indexed under another study: the newcomer would mix its
    images into another study's (another patient's) series, so it is refused like a SOP conflict."""

    def __init__(self, sop_instance_uid: str, study_uid: str, series_uid: str):
        super().__init__(sop_instance_uid, study_uid, series_uid, "")
        self.args = (f"SeriesInstanceUID {series_uid} is already held by study {study_uid}",)


class _IdleConnections:
    """SQLite driver connections kept checked out of SQLAlchemy's pool between this process's
    transactions and reads. The pool's checkout and check-in (its weak reference, events and
    reset) were about 50 µs of CPU per use, two uses per received instance, 7.5% of a receiver's
    samples under the GIL (py-spy, 2,000 small instances over four associations). Only a
    connection whose use ended cleanly (committed, or a read that fetched everything) comes back
    here, with no transaction open on it; any other goes back to the pool, whose reset rolls it
    back. At most `keep`, always fewer than the pool holds, so another user of the pool never
    waits for one kept here. When the engine is disposed the kept ones are closed, and one in use
    meanwhile is closed when it comes back. An Index dropped unclosed lets them go with it, as
    SQLAlchemy cleans up connections collected unreturned (the engine's listener holds this
    weakly: held strongly, the kept connections kept the engine alive, and their files open)."""

    def __init__(self, engine: Engine, keep: int):
        self._engine = engine
        self._keep = keep
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._generation = 0  # engine disposals seen: a connection taken before one is not kept
        weak = weakref.ref(self)
        event.listen(engine, "engine_disposed", lambda _engine: _IdleConnections._on_disposed(weak))

    def take(self) -> Any:
        """A pooled connection (the pool's `PoolProxiedConnection`): an idle one, else the pool's."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            generation = self._generation
        with _as_index_failure(self._engine.dialect.loaded_dbapi, None):  # as through SQLAlchemy
            pooled = self._engine.raw_connection()
        pooled.info[_TAKEN_AFTER_DISPOSALS] = generation
        return pooled

    def give_back(self, pooled: Any, clean: bool) -> None:
        """`clean`: its use ended with no transaction open (else the pool's reset rolls it back)."""
        with self._lock:
            stale = pooled.info.get(_TAKEN_AFTER_DISPOSALS) != self._generation  # its pool was disposed
            if clean and not stale and len(self._idle) < self._keep:
                self._idle.append(pooled)
                return
        if stale:
            pooled.invalidate()  # closed now (checked in, it would go to the disposed pool and stay open)
        else:
            pooled.close()

    @staticmethod
    def _on_disposed(weak: "weakref.ref[_IdleConnections]") -> None:
        idle = weak()
        if idle is None:
            return
        with idle._lock:
            idle._generation += 1
            kept = list(idle._idle)
            idle._idle.clear()
        for pooled in kept:
            pooled.invalidate()  # (SQLAlchemy logs a failing close and goes on)


class Index:
    """Thread-safe access to the index: a connection per transaction from SQLAlchemy's pool (on
    SQLite, one kept between uses when it can be: _IdleConnections)."""

    def __init__(self, location: str | Path, migrate: bool = True, connections: int = 16):
        """`location`: an SQLAlchemy URL, or the path of a SQLite file. `migrate`: bring the schema
        to this release's version (every opener does; the migrations run under the write lock).
        `connections`: the most this process opens (PostgreSQL's max_connections is shared by
        every process of every replica)."""
        url = str(location)
        self.url = url if "://" in url else f"sqlite:///{Path(url).resolve()}"
        self.engine = _engine(self.url, connections)
        self.shared = self.engine.dialect.name != "sqlite"
        self.path = self.url.removeprefix("sqlite:///") if not self.shared else None
        self._local = threading.local()
        # On SQLite, this process's writers take turns on a lock of their own before BEGIN
        # IMMEDIATE: SQLite's busy handler polls (sleeps of up to 100 ms between tries), so
        # writers in one process waiting on each other in SQLite woke late and the lock sat
        # idle (four STOW-RS requests in the console spent half their store time there); a
        # thread lock hands over at once.
        self._sqlite_writers = threading.Lock() if not self.shared else None
        # ... and with the writers of the node's other processes (receivers, the CLI) on a turn
        # the kernel hands over at once (node/store/writer_turns.py)
        database = self.engine.url.database if not self.shared else None  # (None, "" or ":memory:": in memory)
        self._turns = WriterTurns.beside(database) if database and database != ":memory:" and \
            not database.startswith("file:") else None
        self._idle = _IdleConnections(self.engine, min(IDLE_CONNECTIONS_KEPT, _pool_size(connections) - 1))
        if migrate:
            from node.store.migrations import upgrade

            upgrade(self)

    @property
    def display_url(self) -> str:
        """The URL without its password (for logs and messages)."""
        return make_url(self.url).render_as_string(hide_password=True)

    @classmethod
    def open(cls, storage: StorageConfig, migrate: bool = True, connections: int = 16) -> "Index":
        return cls(index_url(storage), migrate, connections)

    def close(self) -> None:
        self.engine.dispose()
        # the pipe's descriptor once no writer of this process uses it (SQLAlchemy lets a disposed
        # engine be used again: without turns); one busy past the wait goes with the Index
        writers = self._sqlite_writers
        if self._turns is not None and writers is not None and writers.acquire(timeout=WRITE_LOCK_WAIT_S):
            try:
                turns, self._turns = self._turns, None
                turns.close()
            finally:
                writers.release()

    @property
    def skip_locked(self) -> str:
        """The clause a claim's SELECT ends with: replicas take different rows, none waits."""
        return " FOR UPDATE SKIP LOCKED" if self.shared else ""

    @contextmanager
    def transaction(self, claim: bool = False, durable: bool = True) -> Iterator[Db]:
        """A write transaction holding the index's write lock; `claim`: on PostgreSQL, row locks
        only (the statements say FOR UPDATE SKIP LOCKED). A `query` in the same thread reads
        through this transaction (the same snapshot, its own uncommitted writes). `durable=False`
        (SQLite only): the commit returns before it is on disk (see `record_instance`)."""
        if getattr(self._local, "db", None) is not None:
            raise RuntimeError("index transactions do not nest")
        with self._writers_turn() as deadline:
            if self.shared:
                with self._connection(write_lock=not claim) as connection:
                    db = Db(connection.connection.dbapi_connection, connection.dialect)
                    with self._current(db):
                        yield db
            else:
                with self._sqlite_transaction(durable, deadline) as db, self._current(db):
                    yield db

    @contextmanager
    def schema_transaction(self) -> Iterator[Connection]:
        """A write transaction on SQLAlchemy's own Connection, for Alembic (the migrations)."""
        with self._writers_turn() as deadline, self._connection(write_lock=True, deadline=deadline) as connection:
            yield connection

    @contextmanager
    def _writers_turn(self) -> Iterator[float | None]:
        """This process's lock, then (SQLite) the turn among processes; yields the monotonic
        deadline of the writer's whole wait, which SQLite's lock is to keep too (None: no turns
        here, PostgreSQL's lock_timeout bounds the wait)."""
        writers = self._sqlite_writers
        if writers is None:
            yield None
            return
        deadline = time.monotonic() + WRITE_LOCK_WAIT_S
        if not writers.acquire(timeout=WRITE_LOCK_WAIT_S):
            raise PoolTimeout(f"the index's write lock was held in this process for over {WRITE_LOCK_WAIT_S:g} s")
        taken: WriterTurns | None = None
        try:
            turns = self._turns
            if turns is not None:
                try:
                    turns.take(deadline)
                except TurnTimeout:
                    raise PoolTimeout(f"the index's write lock was held by another process for over "
                                      f"{WRITE_LOCK_WAIT_S:g} s") from None
                except OSError as exc:
                    raise PoolTimeout(f"the index's writers' turn failed: {exc.strerror or type(exc).__name__}") from None
                taken = turns
            yield deadline
        finally:
            if taken is not None:
                taken.give()
            writers.release()

    @contextmanager
    def _current(self, db: Db) -> Iterator[None]:
        """`db` is the thread's transaction: its `query`s read through it."""
        self._local.db = db
        try:
            yield
        finally:
            self._local.db = None

    @contextmanager
    def _connection(self, write_lock: bool, deadline: float | None = None) -> Iterator[Connection]:
        """A transaction on SQLAlchemy's Connection (the engine's "begin" event takes the lock,
        on SQLite waiting no longer than `deadline`)."""
        with self.engine.connect() as connection:
            connection.execution_options(index_write_lock=write_lock, index_write_deadline=deadline)
            with connection.begin():
                yield connection

    @contextmanager
    def _sqlite_transaction(self, durable: bool, deadline: float | None) -> Iterator[Db]:
        """A SQLite write transaction on a pooled driver connection: BEGIN IMMEDIATE ... COMMIT,
        without SQLAlchemy's Connection and transaction objects and their events (CPU of a
        transaction with one statement 38 -> 21 µs; of a receiver's index row 95 -> 75 µs).
        Errors are raised as SQLAlchemy's, as through it."""
        dbapi = self.engine.dialect.loaded_dbapi
        pooled = self._idle.take()
        committed = False
        try:
            with _as_index_failure(dbapi, "PRAGMA synchronous"):
                _set_synchronous(pooled.info, pooled.dbapi_connection, "FULL" if durable else "NORMAL")
            with _as_index_failure(dbapi, "PRAGMA busy_timeout"):
                _set_busy_timeout(pooled.info, pooled.dbapi_connection, deadline)
            db = Db(pooled.dbapi_connection, self.engine.dialect)
            try:
                db.execute("BEGIN IMMEDIATE")
            finally:
                with _as_index_failure(dbapi, "PRAGMA busy_timeout"):
                    _set_busy_timeout(pooled.info, pooled.dbapi_connection, None)
            yield db
            db.execute("COMMIT")
            committed = True
        finally:
            # a transaction the body or the COMMIT failed is rolled back here: the pool's reset on
            # return (rollback, or the connection is dropped when that fails too)
            self._idle.give_back(pooled, clean=committed)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of one read (in the thread's transaction, if it has one)."""
        current = getattr(self._local, "db", None)
        if current is not None:
            return current.execute(sql, params).fetchall()
        if not self.shared:
            # SQLite runs a statement outside a transaction in one read transaction of its own:
            # no BEGIN and COMMIT around it (a receiver's look-up before each instance: 33 µs of
            # SQLAlchemy's connection and transaction set-up against 8 µs)
            pooled = self._idle.take()
            read = False
            try:
                rows = _Statements(pooled.dbapi_connection, self.engine.dialect).execute(sql, params).fetchall()
                read = not pooled.dbapi_connection.in_transaction  # (a statement that began one)
                return rows
            finally:
                self._idle.give_back(pooled, clean=read)
        with self._connection(write_lock=False) as connection:
            return Db(connection.connection.dbapi_connection, connection.dialect).execute(sql, params).fetchall()

    def lease_clock(self) -> float:
        """Db.lease_clock for a read outside a transaction (a sweep looking for expired leases)."""
        if not self.shared:
            return time.time()
        with self.engine.connect() as connection:
            connection.execution_options(index_write_lock=False)
            return Db(connection.connection.dbapi_connection, connection.dialect).lease_clock()

    def check_writable(self) -> str | None:
        """Take the write lock for a moment (a stuck writer or a read-only file shows here)."""
        try:
            with self.transaction():
                pass
        except SQLAlchemyError as exc:
            return str(exc.orig if getattr(exc, "orig", None) is not None else exc).splitlines()[0]
        return None

    # -- receiving -------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """Where an indexed instance is: study_uid, series_uid, sop_class_uid, path, transfer_syntax,
        size, received_at."""
        rows = self.query(
            "SELECT study_uid, series_uid, sop_class_uid, path, transfer_syntax, size, received_at FROM instances"
            " WHERE sop_instance_uid=?", (sop_instance_uid,))
        return rows[0] if rows else None

    def record_instance(
        self, rec: InstanceRecord, now: float, quiet_period: float, reopen: bool,
        identical: bool = False, place: Callable[[], None] | None = None,
        unplace: Callable[[], None] | None = None, also: Callable[[Db], None] | None = None,
        lazy_commit: bool = False, new_only: bool = False,
    ) -> Arrival:
        """Index one stored instance and move its study's completion deadline.

        The SOP Instance UID rule: an instance already indexed under another study, series or
        SOP class is never moved or replaced (InstanceConflict, nothing written). `place` puts
        the newcomer's bytes at `rec.path` (the spool's rename); it runs here, under the write
        lock, only once the rules allow it, so two receivers with one SOP Instance UID can never
        overwrite each other's file before one of them is refused. If the transaction fails
        after that, `unplace` undoes it, still under the lock (before another receiver can
        place a copy of its own there). In the same series,
        `identical` (the caller compared the bytes) leaves file and row as they are; otherwise
        the newcomer replaces the old copy (latest wins, same path) while the study receives.
        Once the study is complete under `reopen=False` (after_complete: ignore) a different
        copy is not placed (KEPT_ASIDE): the instance its results were made from stays, unless
        its file was found missing: then the copy is placed and the study reopens, since no
        result could be made without it. `also(db)` runs last in the same transaction (what the
        completion signals note of the instance).

        `lazy_commit`: on SQLite, the commit does not wait for the disk (synchronous=NORMAL)
        unless it creates the study or replaces an indexed copy. The caller has fsynced the file
        at `rec.path` and fsyncs its folder before acknowledging, so what a power cut can take is
        this row only (and the ones after it; never part of one, never one before a durable
        commit), and reconcile indexes the file again at start-up, before any association
        (README, "Receiving"), with the origin (calling and called AE, peer) its file meta
        names. A study's first row commits durably all the same: it creates the study, whose
        first arrival a re-index could not date. A replacement commits durably too: its row is
        what tells reconcile which copy was acknowledged.

        `new_only`: the caller took the instance for a new one without looking it up; if the SOP
        Instance UID is indexed, AlreadyIndexed is raised before anything is written or placed.
        """
        try:
            return self._record_in_transaction(rec, now, now + quiet_period, reopen, identical, place, unplace,
                                               also, durable=not lazy_commit or self.shared, new_only=new_only)
        except _DurableCommitNeeded:  # raised before anything was placed: again, durable
            return self._record_in_transaction(rec, now, now + quiet_period, reopen, identical, place, unplace,
                                               also, durable=True, new_only=new_only)

    def _record_in_transaction(self, rec: InstanceRecord, now: float, deadline: float, reopen: bool,
                               identical: bool, place: Callable[[], None] | None,
                               unplace: Callable[[], None] | None, also: Callable[[Db], None] | None,
                               durable: bool, new_only: bool) -> Arrival:
        with self.transaction(durable=durable) as db:
            try:
                arrival = self._record_instance(db, rec, now, deadline, reopen, identical, place, durable, new_only)
                if also is not None:
                    also(db)
                return arrival
            except BaseException:
                if unplace is not None:
                    unplace()
                raise

    def _record_instance(self, db: Db, rec: InstanceRecord, now: float, deadline: float, reopen: bool,
                         identical: bool, place: Callable[[], None] | None, durable: bool,
                         new_only: bool) -> Arrival:
        known = db.execute(_WHAT_IS_KNOWN, (rec.series_uid, rec.study_uid, rec.sop_instance_uid,
                                            rec.sop_instance_uid)).fetchall()[0]  # always one row
        existing = known if known["sop_instance_uid"] is not None else None
        if new_only and existing is not None:
            raise AlreadyIndexed()
        InstanceConflict.check(rec, existing)
        series_study = known["series_study"]
        if series_study is not None and series_study != rec.study_uid:
            raise SeriesConflict(rec.sop_instance_uid, series_study, rec.series_uid)
        study_state = known["study_state"]
        if study_state is None and not durable:  # a study's first row creates it: never lazily
            raise _DurableCommitNeeded()
        duplicate = existing is not None
        complete = study_state == "complete"
        was_missing = duplicate and bool(known["was_missing"])
        reopen = reopen or was_missing
        if duplicate and identical and existing["path"] == rec.path:
            placement = Placement.IDENTICAL  # the file is there: compared by the caller
        elif duplicate and complete and not reopen:
            placement = Placement.KEPT_ASIDE
        else:
            placement = Placement.PLACED
            received_at = now
            if duplicate and not durable:
                raise _DurableCommitNeeded()
            if place is not None:
                place()
                # never before the file's mtime, however long the lock took (retention and
                # reconcile compare them)
                received_at = max(now, time.time())
            db.execute(_INSERT_INSTANCE, (
                rec.sop_instance_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid, rec.transfer_syntax,
                rec.path, rec.size, received_at, rec.calling_ae, rec.called_ae, rec.peer, rec.association_id))
        if was_missing:
            db.execute("DELETE FROM missing_files WHERE sop_instance_uid=?", (rec.sop_instance_uid,))
        if series_study is None:  # (a series' row keeps its first instance's facts)
            s = rec.series
            db.execute(_INSERT_SERIES, (
                rec.series_uid, rec.study_uid, s.get("modality"), s.get("body_part"), s.get("description"),
                s.get("number"), rec.sop_class_uid, s.get("image_type"), s.get("orientation"), s.get("rows"),
                s.get("columns"), s.get("slice_thickness")))
        if study_state is None:
            db.execute(_INSERT_STUDY, (rec.study_uid, rec.patient_id, rec.calling_ae, now, now, deadline))
            return Arrival(duplicate, True, False, False, deadline, placement)
        if complete and (placement is Placement.IDENTICAL or not reopen):
            # an identical resend is simply acknowledged; otherwise after_complete: ignore
            return Arrival(duplicate, False, False, placement is not Placement.IDENTICAL, deadline, placement)
        db.execute(
            "UPDATE studies SET state='receiving', last_received=?, deadline=?, calling_ae=?"
            " WHERE study_uid=?",
            (now, deadline, rec.calling_ae, rec.study_uid),
        )
        reopened = study_state != "receiving"
        return Arrival(duplicate, reopened, reopened, False, deadline, placement)

    def open_association(self, calling_ae: str, called_ae: str, peer: str, now: float) -> int:
        """The association's row, opened before it is accepted. On SQLite the commit does not
        wait for the disk (the A-ASSOCIATE-AC waits on it): the log is written in order, so the
        row is on disk before any of its instances' rows can be, and a power cut takes it only
        with all of them."""
        with self.transaction(durable=False) as db:
            row = db.execute(
                "INSERT INTO associations (calling_ae, called_ae, peer, started_at) VALUES (?,?,?,?) RETURNING id",
                (calling_ae, called_ae, peer, now),
            ).fetchone()
            return int(row["id"]) if row else 0

    def discard_association(self, assoc_id: int) -> None:
        """Forget the row of an association refused after it was opened (nothing happened on it)."""
        with self.transaction(durable=False) as db:
            db.execute("DELETE FROM associations WHERE id=? AND instances=0 AND failures=0", (assoc_id,))

    def close_association(self, assoc_id: int, instances: int, failures: int, now: float) -> None:
        """Its counts and end; on disk with the next durable commit (as `open_association`)."""
        with self.transaction(durable=False) as db:
            db.execute(
                "UPDATE associations SET ended_at=?, instances=?, failures=? WHERE id=?",
                (now, instances, failures, assoc_id),
            )

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's series rows (routing tags), in series-number order."""
        return self.query(
            "SELECT series_uid, study_uid, modality, body_part, description, number, sop_class_uid, image_type,"
            " orientation, rows, columns, slice_thickness FROM series WHERE study_uid=? ORDER BY number, series_uid",
            (study_uid,))

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances (series_uid, path, missing: 1 when reconciliation found its file
        gone) in path order: one read per study."""
        return self.query(
            "SELECT i.series_uid, i.path, CASE WHEN m.sop_instance_uid IS NULL THEN 0 ELSE 1 END AS missing"
            " FROM instances i LEFT JOIN missing_files m ON m.sop_instance_uid = i.sop_instance_uid"
            " WHERE i.study_uid=? ORDER BY i.path", (study_uid,))

    def study_origin(self, study_uid: str) -> dict[str, Any] | None:
        """Who sent the study's latest instance: calling_ae, called_ae, peer (and its received_at)."""
        rows = self.query("SELECT calling_ae, called_ae, peer, received_at FROM instances WHERE study_uid=?"
                          " ORDER BY received_at DESC LIMIT 1", (study_uid,))
        return rows[0] if rows else None

    def indexed_studies(self) -> list[str]:
        return [r["study_uid"] for r in self.query("SELECT DISTINCT study_uid FROM instances ORDER BY study_uid")]

    def instance_paths(self) -> list[dict[str, Any]]:
        """Every indexed instance (sop_instance_uid, study_uid, path, missing): what reconciliation
        checks against the spool."""
        return self.query(
            "SELECT i.sop_instance_uid, i.study_uid, i.path,"
            " CASE WHEN m.sop_instance_uid IS NULL THEN 0 ELSE 1 END AS missing"
            " FROM instances i LEFT JOIN missing_files m ON m.sop_instance_uid = i.sop_instance_uid")

    def mark_missing(self, candidates: list[str], present: Callable[[str], bool], now: float) -> dict[str, list[str]]:
        """Record the candidate instances whose file is gone, by study; returns what was recorded.

        The caller found the candidates without the lock (one stat per file, not under it); each
        is checked again here, under the write lock, where receivers rename a file into place
        before its row exists, so a file just received or re-sent is never taken for missing."""
        gone: dict[str, list[str]] = {}
        for start in range(0, len(candidates), MARK_BATCH):  # the lock held briefly, however many
            with self.transaction() as db:
                for uid in candidates[start:start + MARK_BATCH]:
                    row = db.execute("SELECT study_uid, path FROM instances WHERE sop_instance_uid=?",
                                     (uid,)).fetchone()
                    if row is None or present(row["path"]):
                        continue
                    db.execute("INSERT INTO missing_files (sop_instance_uid, study_uid, marked_at) VALUES (?,?,?)"
                               " ON CONFLICT DO NOTHING", (uid, row["study_uid"], now))
                    gone.setdefault(row["study_uid"], []).append(uid)
        return gone

    def clear_missing(self, found: list[str]) -> None:
        """The instances' files are there again (restored by hand): no longer missing."""
        with self.transaction() as db:
            for uid in found:
                db.execute("DELETE FROM missing_files WHERE sop_instance_uid=?", (uid,))

    def missing_instances(self, study_uid: str | None = None) -> int:
        """Indexed instances whose file reconciliation found gone (of one study, or all)."""
        where = " WHERE study_uid=?" if study_uid else ""
        return int(self.query(f"SELECT COUNT(*) AS n FROM missing_files{where}",
                              (study_uid,) if study_uid else ())[0]["n"])

    def forget_study(self, db: Db, study_uid: str) -> list[dict[str, Any]]:
        """Delete the study's rows (retention, inside its transaction); returns its instances
        (path, size, received_at) so the caller can remove their files."""
        instances = db.execute("SELECT path, size, received_at FROM instances WHERE study_uid=?",
                               (study_uid,)).fetchall()
        db.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM missing_files WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))
        return instances

    # -- completion ------------------------------------------------------------------------

    def receiving_studies(self) -> list[tuple[str, float]]:
        rows = self.query("SELECT study_uid, deadline FROM studies WHERE state='receiving'")
        return [(r["study_uid"], r["deadline"]) for r in rows]

    def study_instance_count(self, study_uid: str) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?", (study_uid,))[0]["n"])

    def study_state(self, study_uid: str) -> dict[str, Any] | None:
        """state, calling_ae, last_received, deadline and completed_at (its last completion) of a
        study (None: not indexed)."""
        rows = self.query("SELECT state, calling_ae, last_received, deadline, completed_at FROM studies"
                          " WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def complete_if_due(
        self, study_uid: str, now: float, on_complete: Callable[[Db], None],
        quiet_override: float | None = None, seen_last_received: float | None = None,
        due_override: float | None = None,
    ) -> tuple[bool, float | None]:
        """Complete the study if its quiet period has passed; else return when to check again.

        `quiet_override` (a routing rule's quiet period) replaces the receiver's deadline;
        `due_override` (a completion signal: its procedure step ended) replaces both while the
        arrival the caller saw (`seen_last_received`) is still the latest.
        `seen_last_received`: the caller prepared the completion (routed the study) when this was
        its latest arrival; if one came since, nothing completes and `now` is returned: the caller
        prepares the study again (a signal may make it due at once).
        `on_complete(db)` runs inside the completing transaction (the pipeline creates the
        study's job there), so a completed study always has its job.

        One transaction, so an instance committed concurrently either moves the deadline
        first (the study stays open) or reopens the study afterwards.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT state, deadline, last_received FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            if row is None or row["state"] != "receiving":
                return False, None
            due = row["last_received"] + quiet_override if quiet_override else row["deadline"]
            latest_seen = seen_last_received is None or row["last_received"] == seen_last_received
            if due_override is not None and latest_seen:
                due = due_override
            if not latest_seen:
                return False, now  # prepared on an older arrival: prepare it again now
            if due > now:
                return False, due
            db.execute(
                "UPDATE studies SET state='complete', completed_at=?, completions=completions+1"
                " WHERE study_uid=?",
                (now, study_uid),
            )
            on_complete(db)
            return True, None

    # -- reporting -------------------------------------------------------------------------

    def study_summaries(self) -> list[dict[str, Any]]:
        rows = self.query(
            """SELECT s.study_uid, s.state, s.calling_ae, s.first_received, s.last_received,
                      s.completed_at, s.completions,
                      (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS instances,
                      (SELECT COUNT(*) FROM series r WHERE r.study_uid=s.study_uid) AS series
               FROM studies s ORDER BY s.first_received"""
        )
        return [dict(r) for r in rows]


# PostgreSQL: waiting for a lock ends after 30 s with an error, as SQLite's busy timeout does (a
# frozen replica holding the write lock must not stall the others); a session idle in a transaction
# is ended after 60 s; keepalives find a replica cut off from the network within ~25 s instead of
# the kernel's two hours (its locks go with its session).
POSTGRES_CONNECT_ARGS = {
    "options": "-c lock_timeout=30s -c idle_in_transaction_session_timeout=60s",
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}
# RETURNING (3.35): Debian 12 and current Python builds have 3.40.
SQLITE_MINIMUM = (3, 35)


@contextmanager
def _as_index_failure(dbapi: Any, statement: str | None, params: Sequence[Any] = ()) -> Iterator[None]:
    """The driver's errors raised as SQLAlchemy's (OperationalError, IntegrityError, ...), as a
    statement run through SQLAlchemy raises them: callers catch IndexFailure alone."""
    try:
        yield
    except dbapi.Error as exc:
        raise _index_failure(dbapi, statement, params, exc) from exc


def _index_failure(dbapi: Any, statement: str | None, params: Sequence[Any], exc: Exception) -> DBAPIError:
    """The driver's error `exc` as the SQLAlchemy error a statement run through SQLAlchemy raises."""
    return DBAPIError.instance(statement, params, exc, dbapi.Error)


def _set_synchronous(info: dict[Any, Any], driver: Any, level: str) -> None:
    """Set a SQLite connection's synchronous level before its write transaction begins.

    It can change only between transactions (SQLite refuses it inside one). NORMAL in WAL mode:
    the commit skips the WAL's fsync; the next FULL commit (or checkpoint) makes it durable with
    everything before it. `info`: the pooled connection's, which remembers the level set."""
    _set_pragma(info, driver, "synchronous", level)


def _busy_timeout_ms(deadline: float | None) -> int:
    """SQLite's busy timeout for a write transaction about to begin: WRITE_LOCK_WAIT_S, or what is
    left of it at `deadline` in whole seconds (rounded up) once the writer's turn took a second or
    more. Behind a writer that takes no turns (a node of an older version, a SQLite shell) the
    busy handler would otherwise start a second full wait after the turn's: a writer's whole wait
    is about WRITE_LOCK_WAIT_S + 1 s at most (SQLite counts the time it sleeps, not the time its
    retries take). Whole seconds, so that the PRAGMA runs only after such a wait, not before
    every transaction."""
    full = max(1, int(WRITE_LOCK_WAIT_S * 1000))
    if deadline is None:
        return full
    return max(1, min(full, math.ceil(deadline - time.monotonic()) * 1000))


def _set_busy_timeout(info: dict[Any, Any], driver: Any, deadline: float | None) -> None:
    """Set a SQLite connection's busy timeout for the BEGIN of its next write transaction
    (`_busy_timeout_ms`; None: the full wait, set again once that BEGIN has the lock or failed, so
    that the connection's later reads wait the full time); `info` remembers it, as in
    `_set_synchronous`."""
    _set_pragma(info, driver, "busy_timeout", _busy_timeout_ms(deadline))


def _set_pragma(info: dict[Any, Any], driver: Any, name: str, value: object) -> None:
    """Set a connection's PRAGMA `name` unless `info` (the pooled connection's) says it is set."""
    if info.get(name) != value:
        info.pop(name, None)  # unknown until it is set: an interrupted PRAGMA is redone
        driver.execute(f"PRAGMA {name}={value}")
        info[name] = value


def _pool_size(connections: int) -> int:
    """Connections the pool keeps open between uses (more are opened up to `connections`)."""
    return min(4, connections)


def _engine(url: str, connections: int) -> Engine:
    """An engine whose transactions begin as `Index.transaction` promises (see the module's docstring)."""
    size = _pool_size(connections)
    pool = {"pool_size": size, "max_overflow": connections - size, "pool_timeout": 30}
    if url.startswith("sqlite"):
        if sqlite3.sqlite_version_info < SQLITE_MINIMUM:
            raise RuntimeError(f"SQLite {sqlite3.sqlite_version} is too old for the index: it needs "
                               f"{'.'.join(map(str, SQLITE_MINIMUM))} or later")
        # rollback on return: what ends a failed Index._sqlite_transaction
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               pool_reset_on_return="rollback", **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" below starts transactions
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns (see `_sqlite_begin` for the exception).
            cursor.execute("PRAGMA synchronous=FULL")
            record.info["synchronous"] = "FULL"
            cursor.execute(f"PRAGMA busy_timeout={_busy_timeout_ms(None)}")
            record.info["busy_timeout"] = _busy_timeout_ms(None)
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            options = connection.get_execution_options()
            locked = options.get("index_write_lock", True)  # a write transaction (reads commit nothing)
            info, driver = connection.connection.info, connection.connection.dbapi_connection
            if locked:  # (only Alembic's schema_transaction: the others run Index._sqlite_transaction)
                _set_synchronous(info, driver, "FULL")
                _set_busy_timeout(info, driver, options.get("index_write_deadline"))
            # SQLAlchemy's documented recipe for pysqlite; IMMEDIATE takes the write lock up front.
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE" if locked else "BEGIN")
            finally:
                _set_busy_timeout(info, driver, None)

        return engine
    engine = create_engine(url, pool_pre_ping=True, connect_args=POSTGRES_CONNECT_ARGS, **pool)

    @event.listens_for(engine, "begin")
    def _postgres_begin(connection: Connection) -> None:
        if connection.get_execution_options().get("index_write_lock", True):
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")

    return engine
