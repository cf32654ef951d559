"""Durable result delivery: a persisted outbox, one association per result set and destination.

Each (result set, destination) is a row in the index. An attempt sends every file (over one
association, or in STOW-RS requests: node/send/delivery.py) and checks every status. Transient failures (no connection, reset, timeout,
association rejected-transient, 0xA7xx) are retried with exponential backoff and jitter
until a deadline; permanent ones (association rejected-permanent, 0xA9xx, 0xCxxx) go to the
dead-letter state with the reason at once. Result objects keep their SOP Instance UIDs on
every attempt, so a resend after a crash leaves one copy in the PACS.

An attempt holds a lease on its row (`lease_owner`, `lease_until`), renewed while it sends. A
single node resumes its interrupted attempts at start; replicas sharing the index take over an
attempt whose lease expired (its node died), and only the lease holder records the outcome.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler

from common import logs
from common.backoff import backoff_delay
from node import metrics
from node.config import NodeConfig
from node.send.cstore import send_cstore
from node.send.delivery import Delivery, Permanent, Sender, Transient
from node.send.stow import StowSender
from node.store.audit import AuditEvent, AuditRecord, AuditTrail, Outcome
from node.store.index import Db, Index
from node.store.lease import process_owner

log = logging.getLogger("node.send")

SENDING_EXPIRED = "state='sending' AND lease_until<?"


# Deliveries run on an executor of their own: a PACS that hangs each association until its
# timeout must not take the threads the completion timers and the job runner's wake-ups run on.
DELIVERY_EXECUTOR = "deliveries"
DELIVERY_THREADS = 8


def delivery_state(index: Index, item_id: int) -> str | None:
    """The state of one outbox item (None: no such item)."""
    rows = index.query("SELECT state FROM outbox WHERE id=?", (item_id,))
    return rows[0]["state"] if rows else None


def deliveries(index: Index) -> list[dict[str, Any]]:
    """Every outbox item's job key, study, state and last change (for retention's plan)."""
    return index.query("SELECT job_key, study_uid, state, updated_at FROM outbox")


def undelivered(db: Db, study_uid: str) -> int:
    """How many of the study's result sets are not delivered yet (inside the caller's transaction)."""
    return int(db.execute("SELECT COUNT(*) AS n FROM outbox WHERE study_uid=? AND state<>'delivered'",
                          (study_uid,)).fetchone()["n"])


class Outbox:
    def __init__(self, config: NodeConfig, index: Index, scheduler: BaseScheduler, owner: str | None = None):
        self.config = config
        self.index = index
        self.scheduler = scheduler
        try:
            scheduler.add_executor(ThreadPoolExecutor(DELIVERY_THREADS), alias=DELIVERY_EXECUTOR)
        except ValueError:  # another Outbox on this scheduler added it (tests run two "replicas" on one)
            pass
        self.owner = owner or process_owner()
        self.stow = StowSender()
        self._lock = threading.Lock()
        self._running: set[int] = set()

    # -- producing ---------------------------------------------------------------------------

    def enqueue(self, job_key: str, study_uid: str, destination: str, files: list[Path],
                guard: Callable[[Db], None] | None = None) -> int:
        """Add a result set for a destination; the same job and destination is queued once.
        `guard(db)` runs first in the same transaction: it raises to queue nothing (the job that
        made the results was superseded meanwhile)."""
        now = time.time()
        with self.index.transaction() as db:
            if guard is not None:
                guard(db)
            db.execute(
                """INSERT INTO outbox (job_key, study_uid, destination, files, state, created_at,
                   updated_at, next_attempt, deadline) VALUES (?,?,?,?, 'pending', ?,?,?,?) ON CONFLICT DO NOTHING""",
                (job_key, study_uid, destination, json.dumps([str(f) for f in files]), now, now, now,
                 now + self.config.sending.deadline_s),
            )
            row = db.execute("SELECT id FROM outbox WHERE job_key=? AND destination=?", (job_key, destination)).fetchone()
        self._schedule(int(row["id"]), now)
        return int(row["id"])

    # -- scheduling --------------------------------------------------------------------------

    def start(self) -> None:
        """Resume: anything pending, or caught mid-send by a crash, is due now (on a shared index,
        a send is another replica's until its lease expires)."""
        if not self.index.shared:
            with self.index.transaction() as db:
                db.execute("UPDATE outbox SET state='pending' WHERE state='sending'")
        self.scheduler.add_job(self.sweep, "interval", seconds=self.config.sending.sweep_s, id="outbox-sweep",
                               replace_existing=True, coalesce=True, max_instances=1)
        self.sweep()

    def _due(self, now: float) -> tuple[str, tuple[float, ...]]:
        """Which rows an attempt may take: pending ones, and on a shared index sends whose replica died."""
        if self.index.shared:
            return f"(state='pending' OR ({SENDING_EXPIRED}))", (now,)
        return "state='pending'", ()

    def sweep(self) -> None:
        due, params = self._due(self.index.lease_clock())
        rows = self.index.query(f"SELECT id, next_attempt FROM outbox WHERE {due}", params)
        for row in rows:
            if self.scheduler.get_job(_job_id(row["id"])) is None:
                self._schedule(int(row["id"]), float(row["next_attempt"]))

    def _schedule(self, item_id: int, when: float) -> None:
        self.scheduler.add_job(
            self.attempt, "date", run_date=datetime.fromtimestamp(when, tz=timezone.utc), args=[item_id],
            id=_job_id(item_id), replace_existing=True, misfire_grace_time=None, executor=DELIVERY_EXECUTOR,
        )

    # -- sending -----------------------------------------------------------------------------

    def attempt(self, item_id: int) -> str:
        """One delivery attempt; returns the item's new state."""
        with self._lock:
            if item_id in self._running:
                return "sending"
            self._running.add(item_id)
        try:
            return self._attempt(item_id)
        finally:
            with self._lock:
                self._running.discard(item_id)

    def renew_leases(self) -> int:
        """Keep this process's sends (called well within `storage.lease_s`)."""
        with self.index.transaction(claim=True) as db:
            return db.execute("UPDATE outbox SET lease_until=? WHERE state='sending' AND lease_owner=?",
                              (db.lease_clock() + self.config.storage.lease_s, self.owner)).rowcount

    def _attempt(self, item_id: int) -> str:
        now = time.time()
        with self.index.transaction(claim=True) as db:
            lease_now = db.lease_clock()
            due, params = self._due(lease_now)
            row = db.execute(f"SELECT * FROM outbox WHERE id=? AND {due}" + self.index.skip_locked,
                             (item_id, *params)).fetchone()
            if row is None:  # delivered, dead, or being sent (here or by another replica)
                return "not due"
            if row["state"] == "sending":
                logs.event(log, "results_send_taken_over", logging.WARNING, outbox_id=item_id,
                           lease_owner=row["lease_owner"])
            db.execute("UPDATE outbox SET state='sending', attempts=attempts+1, lease_owner=?, lease_until=?,"
                       " updated_at=? WHERE id=?", (self.owner, lease_now + self.config.storage.lease_s, now, item_id))
        started = time.monotonic()
        try:
            delivery = self._send(row["destination"], [Path(f) for f in json.loads(row["files"])])
        except Permanent as exc:
            return self._finish(row, "dead", str(exc))
        except Transient as exc:
            return self._retry_later(row, str(exc))
        except Exception as exc:  # a bug or an unreadable file: keep it visible, do not spin
            return self._finish(row, "dead", f"{type(exc).__name__}: {exc}")
        state = self._finish(row, "delivered", None, delivery.warnings)
        if state != "delivered":
            return state
        logs.event(log, "results_delivered", outbox_id=item_id, destination=row["destination"],
                   study_uid=row["study_uid"], files=len(json.loads(row["files"])),
                   seconds=round(time.monotonic() - started, 3), warnings=len(delivery.warnings))
        return state

    def _send(self, destination: str, files: list[Path]) -> Delivery:
        peer = self.config.destinations.get(destination)
        if peer is None:
            raise Permanent(f"destination {destination!r} is not configured")
        sender: Sender = self.stow if peer.dicomweb is not None else send_cstore
        return sender(self.config.scp.ae_title, peer, files, self.config.sending.timeout_s)

    def _retry_later(self, row: Any, reason: str) -> str:
        sending = self.config.sending
        attempts = int(row["attempts"]) + 1
        # the backoff restarts when an operator queued the item again; the count goes on (history)
        delay = backoff_delay(attempts - int(row["attempts_base"] or 0), sending.retry_initial_s, sending.retry_max_s)
        when = time.time() + delay
        if when > float(row["deadline"]):
            return self._finish(row, "dead", f"deadline passed after {attempts} attempts; last error: {reason}")
        with self.index.transaction() as db:
            if db.execute("UPDATE outbox SET state='pending', next_attempt=?, last_error=?, updated_at=?,"
                          " lease_until=NULL WHERE id=? AND state='sending' AND lease_owner=?",
                          (when, reason, time.time(), row["id"], self.owner)).rowcount != 1:
                return self._lost(row)
        logs.event(log, "results_retry_scheduled", logging.WARNING, outbox_id=row["id"], destination=row["destination"],
                   attempt=attempts, retry_in_s=round(delay, 1), reason=reason)
        metrics.delivery_retried(row["destination"])
        self._schedule(int(row["id"]), when)
        return "pending"

    def _finish(self, row: Any, state: str, reason: str | None, warnings: list[str] | None = None) -> str:
        with self.index.transaction() as db:
            now = time.time()
            if db.execute("UPDATE outbox SET state=?, last_error=?, warnings=?, updated_at=?, lease_until=NULL"
                          " WHERE id=? AND state='sending' AND lease_owner=?",
                          (state, reason, json.dumps(warnings) if warnings else None, now, row["id"],
                           self.owner)).rowcount != 1:
                return self._lost(row)
            self._audit(db, row, state, reason, now)
        if state == "dead":
            logs.event(log, "results_dead_letter", logging.ERROR, outbox_id=row["id"], destination=row["destination"],
                       study_uid=row["study_uid"], reason=reason)
            metrics.dead_letter(row["destination"])
        return state


    def _audit(self, db: Db, row: Any, state: str, reason: str | None, now: float) -> None:
        """A result set delivered or given up, in the audit trail (in the transaction that says so)."""
        peer = self.config.destinations.get(row["destination"])
        patient = db.execute("SELECT patient_id FROM studies WHERE study_uid=?", (row["study_uid"],)).fetchone()
        AuditTrail.append(db, AuditRecord(  # R: the node sends what it holds (PS3.15 A.5.3.7)
            AuditEvent.INSTANCES_TRANSFERRED, "R", Outcome.SUCCESS if state == "delivered" else Outcome.MAJOR_FAILURE,
            actor=self.config.scp.ae_title, peer=peer.where if peer else "",
            studies={row["study_uid"]: len(json.loads(row["files"]))},
            patients={row["study_uid"]: patient["patient_id"]} if patient and patient["patient_id"] else {},
            destination=row["destination"], reason=reason), now)

    def _lost(self, row: Any) -> str:
        """Our lease expired during the attempt and another replica took the send over: its
        outcome is the one recorded (same files, same UIDs: the PACS keeps one copy)."""
        logs.event(log, "results_send_lease_lost", logging.WARNING, outbox_id=row["id"], destination=row["destination"])
        return "taken over"


def _job_id(item_id: int) -> str:
    return f"outbox:{item_id}"


def list_items(index: Index) -> list[dict[str, Any]]:
    return [dict(r) for r in index.query(
        "SELECT id, job_key, study_uid, destination, state, attempts, created_at, updated_at, next_attempt,"
        " last_error, warnings FROM outbox ORDER BY id")]


def retry(index: Index, item_id: int | None, deadline_s: float) -> int:
    """Put a dead (or pending) item, or all dead items, back in the queue now with a fresh deadline
    (its attempts so far stay counted; the backoff starts again)."""
    return _requeue(index, ("id=?", (item_id,)) if item_id is not None else ("state='dead'", ()),
                    ("dead", "pending"), deadline_s)


def resend(index: Index, item_id: int, deadline_s: float,
           newer_job: Callable[[int, str], int | None] = lambda job, study: None) -> str | None:
    """Send a delivered item again (the PACS lost what it got): the same files, so the same UIDs,
    stored once by a PACS that still has them. None when queued, else why not. `newer_job(job,
    study)`: a later job of the study (it was sent again): then these results are superseded and
    are not sent again."""
    rows = index.query("SELECT state, files, job_key, study_uid FROM outbox WHERE id=?", (item_id,))
    if not rows:
        return f"no outbox item {item_id}"
    if rows[0]["state"] != "delivered":
        return f"outbox item {item_id} is {rows[0]['state']}: only a delivered item is re-sent (retry a dead one)"
    job = rows[0]["job_key"].partition(":")[0]
    newer = newer_job(int(job), rows[0]["study_uid"]) if job.isdigit() else None
    if newer is not None:
        return (f"outbox item {item_id} holds job {job}'s results, and the study was processed again since (job"
                f" {newer}): re-send that job's results instead")
    gone = [f for f in json.loads(rows[0]["files"]) if not Path(f).is_file()]
    if gone:
        return (f"outbox item {item_id}: {len(gone)} of its files are gone (retention's results_days); to make"
                " results again, send the study to the node again (a done job is not run twice)")
    if not _requeue(index, ("id=?", (item_id,)), ("delivered",), deadline_s):
        return f"outbox item {item_id} changed meanwhile; look again"
    return None


def _requeue(index: Index, where: tuple[str, tuple[Any, ...]], states: tuple[str, ...], deadline_s: float) -> int:
    now = time.time()
    clause, params = where
    with index.transaction() as db:
        return db.execute(
            f"UPDATE outbox SET state='pending', attempts_base=attempts, next_attempt=?, deadline=?+?, updated_at=?"
            f" WHERE {clause} AND state IN ({','.join('?' * len(states))})",
            (now, now, deadline_s, now, *params, *states)).rowcount
