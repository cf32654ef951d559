"""The node's index: SQLite in WAL mode, shared by the receiver processes and the service.

Every acknowledged instance has a row here before its C-STORE response is sent, so the index
(not memory) is the truth about what was received, which studies are waiting for their quiet
period, and which completed studies are waiting for the pipeline.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT,
    state TEXT NOT NULL,               -- receiving | complete
    calling_ae TEXT,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    deadline REAL NOT NULL,            -- last_received + quiet period
    completed_at REAL,
    completions INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state, deadline);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT,
    body_part TEXT,
    description TEXT,
    number INTEGER,
    sop_class_uid TEXT,
    image_type TEXT,
    orientation TEXT,
    rows INTEGER,
    columns INTEGER,
    slice_thickness REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT,
    called_ae TEXT,
    peer TEXT,
    association_id INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS associations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    calling_ae TEXT,
    called_ae TEXT,
    peer TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    instances INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
"""


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


@dataclass(frozen=True)
class Arrival:
    """Effect of one stored instance on its study."""

    duplicate: bool  # the SOP Instance UID was already indexed (same study, series, SOP class)
    opened: bool  # the study went to 'receiving' (new, or reopened after completion)
    reopened: bool
    ignored_after_complete: bool
    deadline: float
    # A byte-identical copy of the indexed instance: nothing changes on disk or in the row. It
    # never reopens a complete study (whatever completion.after_complete says); while the study
    # is receiving it moves the deadline like any arrival.
    identical: bool = False


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


class SeriesConflict(InstanceConflict):
    """The Series Instance UID is already indexed under another study: the newcomer would mix its
    images into another study's (another patient's) series, so it is refused like a SOP conflict."""

    def __init__(self, sop_instance_uid: str, study_uid: str, series_uid: str):
        super().__init__(sop_instance_uid, study_uid, series_uid, "")
        self.args = (f"SeriesInstanceUID {series_uid} is already held by study {study_uid}",)


class Index:
    """Thread-safe access to the index; one SQLite connection per thread."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        self.executescript(SCHEMA)

    def executescript(self, script: str) -> None:
        """Idempotent DDL (CREATE ... IF NOT EXISTS) for this index and its extensions."""
        self._connection().executescript(script)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before we acknowledge the instance it records.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> "Index._Tx":
        return Index._Tx(self._connection())

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, params).fetchall()

    # -- receiving -------------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        """Where an indexed instance is: study_uid, series_uid, sop_class_uid, path, transfer_syntax."""
        rows = self.query(
            "SELECT study_uid, series_uid, sop_class_uid, path, transfer_syntax FROM instances"
            " WHERE sop_instance_uid=?", (sop_instance_uid,))
        return rows[0] if rows else None

    def record_instance(
        self, rec: InstanceRecord, now: float, quiet_period: float, reopen: bool,
        identical: bool = False,
    ) -> Arrival:
        """Index one stored instance and move its study's completion deadline.

        The SOP Instance UID rule: an instance already indexed under another study, series or
        SOP class is never moved or replaced (InstanceConflict, nothing written). In the same
        series, `identical` (the caller compared the bytes) leaves the row as it is; otherwise
        the newcomer's row replaces the old one (latest wins, same path).
        """
        deadline = now + quiet_period
        with self.transaction() as db:
            existing = db.execute(
                "SELECT study_uid, series_uid, sop_class_uid FROM instances WHERE sop_instance_uid=?",
                (rec.sop_instance_uid,),
            ).fetchone()
            InstanceConflict.check(rec, existing)
            series_of = db.execute("SELECT study_uid FROM series WHERE series_uid=?", (rec.series_uid,)).fetchone()
            if series_of is not None and series_of["study_uid"] != rec.study_uid:
                raise SeriesConflict(rec.sop_instance_uid, series_of["study_uid"], rec.series_uid)
            duplicate = existing is not None
            identical = identical and duplicate
            if not identical:
                db.execute(
                    """INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,NULL)
                       ON CONFLICT(sop_instance_uid) DO UPDATE SET
                       transfer_syntax=excluded.transfer_syntax,
                       path=excluded.path, size=excluded.size, received_at=excluded.received_at,
                       calling_ae=excluded.calling_ae, called_ae=excluded.called_ae, peer=excluded.peer""",
                    (
                        rec.sop_instance_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid,
                        rec.transfer_syntax, rec.path, rec.size, now, rec.calling_ae,
                        rec.called_ae, rec.peer,
                    ),
                )
            s = rec.series
            db.execute(
                """INSERT OR IGNORE INTO series VALUES (?,?,?,?,?,?,?,?,?,?,?,?)""",
                (
                    rec.series_uid, rec.study_uid, s.get("modality"), s.get("body_part"),
                    s.get("description"), s.get("number"), rec.sop_class_uid,
                    s.get("image_type"), s.get("orientation"), s.get("rows"), s.get("columns"),
                    s.get("slice_thickness"),
                ),
            )
            row = db.execute(
                "SELECT state FROM studies WHERE study_uid=?", (rec.study_uid,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO studies VALUES (?,?,'receiving',?,?,?,?,NULL,0)",
                    (rec.study_uid, rec.patient_id, rec.calling_ae, now, now, deadline),
                )
                return Arrival(duplicate, True, False, False, deadline, identical)
            if row["state"] == "complete" and identical:  # simply acknowledged: nothing new
                return Arrival(duplicate, False, False, False, deadline, identical)
            if row["state"] == "complete" and not reopen:
                return Arrival(duplicate, False, False, True, deadline, identical)
            db.execute(
                "UPDATE studies SET state='receiving', last_received=?, deadline=?, calling_ae=?"
                " WHERE study_uid=?",
                (now, deadline, rec.calling_ae, rec.study_uid),
            )
            reopened = row["state"] != "receiving"
            return Arrival(duplicate, reopened, reopened, False, deadline, identical)

    def open_association(self, calling_ae: str, called_ae: str, peer: str, now: float) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO associations (calling_ae, called_ae, peer, started_at)"
                " VALUES (?,?,?,?)",
                (calling_ae, called_ae, peer, now),
            )
            return int(cur.lastrowid or 0)

    def close_association(self, assoc_id: int, instances: int, failures: int, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE associations SET ended_at=?, instances=?, failures=? WHERE id=?",
                (now, instances, failures, assoc_id),
            )

    # -- completion ------------------------------------------------------------------------

    def receiving_studies(self) -> list[tuple[str, float]]:
        rows = self.query("SELECT study_uid, deadline FROM studies WHERE state='receiving'")
        return [(r["study_uid"], r["deadline"]) for r in rows]

    def complete_if_due(
        self, study_uid: str, now: float, on_complete: Callable[[sqlite3.Connection], None],
        quiet_override: float | None = None,
    ) -> tuple[bool, float | None]:
        """Complete the study if its quiet period has passed; else return when to check again.

        `quiet_override` (a routing rule's quiet period) replaces the receiver's deadline.
        `on_complete(db)` runs inside the completing transaction (the pipeline routes the study
        and creates its job there), so a completed study always has its job.

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

    def study_instance_count(self, study_uid: str) -> int:
        return int(
            self.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?", (study_uid,))[0]["n"]
        )
