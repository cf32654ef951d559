"""The audit trail (tables `audit_events` and `audit_cursor`): who did what with which studies, one record per event.

Records follow the DICOM audit message model (PS3.15 A.5, the content of IHE ATNA): an event
(EventID and its type, a DCM code), an action, an outcome, the active participants (here the
calling AE title and its address) and the participant objects (the studies, with how many
instances each). They are written in the transaction of the event where there is one (a result
set delivered), so the trail and the data agree; nothing here is logged (patient data belongs in
the trail, never in the log). Append-only: records are only added, and removed only by the
trail's own retention (`audit.keep_days`).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from node.store.index import Db, Index
from node.store.lease import process_owner

QUERY_LIMIT = 100_000  # records one read returns at most


class AuditEvent(StrEnum):
    """EventID codes (DCM, PS3.15 A.5.3)."""

    APPLICATION_ACTIVITY = "110100"
    AUDIT_LOG_USED = "110101"
    INSTANCES_TRANSFERRED = "110104"
    PATIENT_RECORD = "110110"
    SECURITY_ALERT = "110113"
    USER_AUTHENTICATION = "110114"


class AuditEventType(StrEnum):
    """EventTypeCode codes (DCM) that qualify an event."""

    APPLICATION_START = "110120"
    APPLICATION_STOP = "110121"
    LOGIN = "110122"
    LOGOUT = "110123"
    NODE_AUTHENTICATION = "110126"
    SOFTWARE_CONFIGURATION = "110131"
    USE_OF_RESTRICTED_FUNCTION = "110132"
    USER_SECURITY_ATTRIBUTES_CHANGED = "110137"


class Outcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class AuditRecord:
    event: AuditEvent
    action: str  # C create, R read, U update, D delete, E execute
    outcome: Outcome
    actor: str = ""  # a calling AE title, or a console user (`person`)
    peer: str = ""  # the actor's address
    event_type: AuditEventType | None = None
    studies: dict[str, int] = field(default_factory=dict)  # Study Instance UID -> instances
    patients: dict[str, str] = field(default_factory=dict)  # Study Instance UID -> Patient ID
    destination: str | None = None  # where instances went (a destinations: name)
    reason: str | None = None
    recorded_at: float = 0.0
    id: int | None = None
    person: bool = False  # the actor is a console user, not an AE title
    target: str | None = None  # what a console action acted on: its request path, an account

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "recorded_at": self.recorded_at, "event_id": self.event.value,
                "event_type": self.event_type.value if self.event_type else None, "action": self.action,
                "outcome": int(self.outcome), "actor": self.actor, "person": self.person, "peer": self.peer,
                "studies": self.studies, "patients": self.patients, "destination": self.destination,
                "target": self.target, "reason": self.reason}


def since_time(text: str, now: float | None = None) -> float:
    """When `--since`/`?since=` means: an age (30m, 12h, 7d) before now, or an ISO date or
    date-time (local time). Raises ValueError."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return (time.time() if now is None else now) - float(text[:-1]) * units[text[-1]]
    return datetime.fromisoformat(text).timestamp()


class AuditTrail:
    """The one module that writes `audit_events`."""

    def __init__(self, index: Index):
        self.index = index

    @staticmethod
    def append(db: Db, record: AuditRecord, now: float) -> None:
        """In the transaction of the event it records: a write transaction (the index's write
        lock), so records commit in id order and a repository's cursor never passes one that
        commits later (never under `transaction(claim=True)`)."""
        detail = {k: v for k, v in (("studies", record.studies), ("patients", record.patients),
                                    ("destination", record.destination), ("reason", record.reason),
                                    ("person", record.person), ("target", record.target)) if v}
        db.execute(
            "INSERT INTO audit_events (recorded_at, event_id, event_type, action, outcome, actor, peer, detail)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (now, record.event.value, record.event_type.value if record.event_type else None, record.action,
             int(record.outcome), record.actor or None, record.peer or None, json.dumps(detail, sort_keys=True)))

    def record(self, record: AuditRecord, now: float) -> None:
        """An event with no transaction of its own (an association ended, one refused)."""
        with self.index.transaction() as db:
            self.append(db, record, now)

    def since(self, since: float, limit: int = QUERY_LIMIT) -> list[AuditRecord]:
        """Records at or after `since`, oldest first."""
        return self._read("recorded_at >= ?", since, limit)[0]

    def after(self, last_id: int, limit: int) -> tuple[list[AuditRecord], int]:
        """Records after the one with `last_id` (what a repository has not been sent yet), and
        the last id read (records this release cannot render are passed over)."""
        return self._read("id > ?", last_id, limit)

    def _read(self, where: str, value: float, limit: int) -> tuple[list[AuditRecord], int]:
        rows = self.index.query(
            "SELECT id, recorded_at, event_id, event_type, action, outcome, actor, peer, detail FROM audit_events"
            f" WHERE {where} ORDER BY id LIMIT ?", (value, min(limit, QUERY_LIMIT)))
        records = []
        for r in rows:
            try:
                detail = json.loads(r["detail"])
                records.append(AuditRecord(
                    AuditEvent(r["event_id"]), r["action"], Outcome(r["outcome"]), r["actor"] or "", r["peer"] or "",
                    AuditEventType(r["event_type"]) if r["event_type"] else None, detail.get("studies", {}),
                    detail.get("patients", {}), detail.get("destination"), detail.get("reason"),
                    float(r["recorded_at"]), int(r["id"]), bool(detail.get("person")), detail.get("target")))
            except ValueError:  # a code a newer release writes (rolling upgrade): not for this one to render
                continue
        return records, max((int(r["id"]) for r in rows), default=0)

    def claim(self, repository: str, lease_s: float) -> int | None:
        """Take the right to send to `repository` (one replica at a time, leased on the index's
        clock) and return the last record it took (0: none yet; a new repository is sent the
        whole trail); None: another process sends to it now."""
        owner = process_owner()
        with self.index.transaction() as db:
            now = db.lease_clock()
            db.execute("INSERT INTO audit_cursor (repository, last_id, updated_at) VALUES (?,0,?)"
                       " ON CONFLICT DO NOTHING", (repository, now))
            taken = db.execute(
                "UPDATE audit_cursor SET lease_owner=?, lease_until=? WHERE repository=? AND"
                " (lease_owner IS NULL OR lease_owner=? OR lease_until < ?)",
                (owner, now + lease_s, repository, owner, now)).rowcount
            if not taken:
                return None
            return int(db.execute("SELECT last_id FROM audit_cursor WHERE repository=?",
                                  (repository,)).fetchone()["last_id"])

    def mark_sent(self, repository: str, last_id: int) -> None:
        """`repository` took every record up to `last_id` (never moves back)."""
        with self.index.transaction() as db:
            db.execute("UPDATE audit_cursor SET last_id=?, updated_at=? WHERE repository=? AND last_id < ?",
                       (last_id, time.time(), repository, last_id))

    def release(self, repository: str) -> None:
        with self.index.transaction() as db:
            db.execute("UPDATE audit_cursor SET lease_owner=NULL, lease_until=NULL WHERE repository=?"
                       " AND lease_owner=?", (repository, process_owner()))

    def prune(self, before: float) -> int:
        """The trail's retention: records older than `before` go."""
        with self.index.transaction() as db:
            return db.execute("DELETE FROM audit_events WHERE recorded_at < ?", (before,)).rowcount
