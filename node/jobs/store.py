"""The job state machine: one job per completed study, and every SQL statement on its table.

States and the only transitions between them (TRANSITIONS below):

- a study completes: a job is created `queued` (or `ignored`: no rule applies, or it discards),
  in the same transaction, with its routing decision in it; the study's jobs still `queued` or
  `waiting` become `ignored` (superseded: they would process an outdated study);
- `queued` -> `running` (a worker claims it) -> `done` | `failed` | `waiting` (transient failure),
  or `ignored` when the study completed again while it ran (a newer job processes it: this one
  stops at its next stage instead of delivering an outdated result set);
- `waiting` -> `running` when due, `failed` past its retry deadline;
- `running` -> `queued` when the node stops with the job unfinished (it runs again at the next
  start, or on another replica); at start-up (the node died while it ran: it runs again), or when
  the lease of the node process running it expired (a replica died: another takes the job over).
  Those two count as interruptions, unless the process had been told to stop (`stopping`, set at
  its SIGTERM: a SIGKILL during its drain is no sign against the job): a job its node died running
  `pipeline.interrupted_runs` times is failed when next claimed (node.jobs.runner), not run
  again: killed for memory, it would kill its node at every start and no other study would be
  processed;
- `failed`, `ignored`, `waiting` -> `queued` (`dicom-node jobs retry`).

A transition is one UPDATE guarded by the states it may leave from: a second worker, a CLI retry
racing a worker, or a stale caller changes nothing and gets an `IllegalTransition`.

Finished stages record their outputs (the result files of each model run), so a job re-run
after a crash continues from the last finished stage and hands the same files to the outbox.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common import logs
from node.route.decision import RoutingDecision
from node.store.index import Db, Index
from node.store.lease import process_owner

log = logging.getLogger("node.jobs")

class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"      # a transient failure (e.g. Triton unavailable): retried with backoff
    DONE = "done"            # every result handed to the outbox
    FAILED = "failed"
    IGNORED = "ignored"      # no routing rule applies, or the rule discards the study


# state -> the states it may move to
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.IGNORED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.WAITING, JobState.FAILED, JobState.QUEUED,
                                 JobState.IGNORED}),
    JobState.WAITING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.QUEUED, JobState.IGNORED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.IGNORED: frozenset({JobState.QUEUED}),
    JobState.DONE: frozenset(),
}

# What a job's node dying while it ran adds to its interruptions: one, unless the process had been
# told to stop (a SIGKILL past a stop's grace period). One expression for the count and its look-ahead.
_A_DEATH = "(1 - stopping)"


class IllegalTransition(RuntimeError):
    """The job was not in a state that may make this transition (someone else moved it)."""


class UnknownJob(LookupError):
    pass


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    state: JobState
    decision: RoutingDecision | None  # None: written by a release before decisions were typed
    priority: int
    attempts: int
    created_at: float
    updated_at: float
    stage: str | None = None
    reason: str | None = None
    next_attempt: float | None = None
    retry_deadline: float | None = None
    stages: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    completed_by: str | None = None  # what completed the study: quiet_period, mpps, ian (None: an older release's job)
    interruptions: int = 0  # times the node died while it ran (JobStore.requeue_running, a take-over)

    def stage_seconds(self) -> dict[str, float]:
        return {name: round(end - start, 3) for name, (start, end) in self.stages.items()}


class JobStore:
    """The only code that reads or writes the jobs table.

    A running job is leased to the node process that claimed it (`owner`) until `lease_until`;
    that process renews its leases (`renew_leases`) and its transitions out of `running` only
    apply while it still holds the lease."""

    def __init__(self, index: Index, owner: str | None = None, lease_s: float = 30.0):
        self.index = index
        self.owner = owner or process_owner()
        self.lease_s = lease_s

    # -- creation (inside the transaction that completes the study) ---------------------------

    @staticmethod
    def create(db: Db, study_uid: str, decision: RoutingDecision, now: float,
               route_started: float | None = None, completed_by: str | None = None,
               cancelled: str | None = None) -> tuple[int, JobState]:
        """`cancelled`: why nothing runs although the rules would (an MPPS step DISCONTINUED
        under completion.signals.discontinued: cancel); the job is ignored with that reason."""
        state = JobState.QUEUED if decision.processes and cancelled is None else JobState.IGNORED
        reason = cancelled or (None if state is JobState.QUEUED else (
            "the routing rule discards the study" if decision.applied else "no routing rule applies"))
        JobStore._supersede(db, study_uid, now)
        row = db.execute(
            "INSERT INTO work_items (study_uid, state, created_at, updated_at, reason, priority, rules_version,"
            " decision, explanation, stages, outputs, completed_by) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (study_uid, state.value, now, now, reason, decision.priority, decision.rules_version,
             decision.model_dump_json(), decision.explanation,
             json.dumps({"route": [route_started or now, time.time()]}), "{}", completed_by),
        ).fetchone()
        return int(row["id"]), state

    @staticmethod
    def _supersede(db: Db, study_uid: str, now: float) -> None:
        """The study completed again (new or changed instances): its jobs that have not started
        would process an outdated study and deliver a second, outdated result set."""
        # One guarded UPDATE, not a row at a time: a job a replica claims meanwhile is running, not
        # superseded, and that is no error (on PostgreSQL the claim's row lock is waited for here).
        db.execute("UPDATE work_items SET state=?, updated_at=?, reason=?, next_attempt=NULL"
                   " WHERE study_uid=? AND state IN (?, ?)",
                   (JobState.IGNORED.value, now, "superseded: the study completed again", study_uid,
                    JobState.QUEUED.value, JobState.WAITING.value))

    @staticmethod
    def create_unrouted(db: Db, study_uid: str, reason: str, now: float, completed_by: str | None = None) -> int:
        """A completed study whose routing failed: a failed job without a decision (a retry routes
        it again with the rules then in force)."""
        JobStore._supersede(db, study_uid, now)
        row = db.execute(
            "INSERT INTO work_items (study_uid, state, created_at, updated_at, reason, stages, outputs, completed_by)"
            " VALUES (?,?,?,?,?,?,?,?) RETURNING id",
            (study_uid, JobState.FAILED.value, now, now, reason[:2000], "{}", "{}", completed_by)).fetchone()
        return int(row["id"])

    def set_decision(self, job_id: int, decision: RoutingDecision) -> None:
        """The decision of a job that had none (see create_unrouted), made when it runs."""
        with self.index.transaction() as db:
            db.execute("UPDATE work_items SET decision=?, explanation=?, rules_version=?, priority=? WHERE id=?",
                       (decision.model_dump_json(), decision.explanation, decision.rules_version,
                        decision.priority, job_id))

    # -- the worker's side -------------------------------------------------------------------

    def claim(self, now: float | None = None) -> Job | None:
        """The next job to run (queued, waiting and due, or running under an expired lease; highest
        priority, then oldest), now running under this process's lease. Replicas claiming at once
        skip each other's rows (FOR UPDATE SKIP LOCKED on PostgreSQL)."""
        now = time.time() if now is None else now
        with self.index.transaction(claim=True) as db:
            lease_now = db.lease_clock()
            where, params = self._claimable(now, lease_now)
            row = db.execute(f"SELECT id, state, lease_owner FROM work_items WHERE {where}"
                             " ORDER BY priority DESC, id LIMIT 1" + self.index.skip_locked, params).fetchone()
            if row is None:
                return None
            if row["state"] == JobState.RUNNING.value:  # its node process died (or stalls): take it over
                self._move(db, row["id"], JobState.QUEUED, now, only_from=(JobState.RUNNING,), interrupted=True)
                logs.event(log, "job_taken_over", logging.WARNING, job=row["id"], lease_owner=row["lease_owner"])
            self._move(db, row["id"], JobState.RUNNING, now, attempts_plus=1, lease_owner=self.owner,
                       lease_until=lease_now + self.lease_s, stopping=0)
            return self.get(row["id"], db)  # as claimed, not as a stop or a replica may have left it since

    def claimable(self) -> bool:
        """Whether `claim` would find a job now; a read, nothing is claimed (the job runner asks
        before its pipeline has loaded, so that no job waits out the import under its lease)."""
        where, params = self._claimable(time.time(), self.index.lease_clock())
        return bool(self.index.query(f"SELECT 1 AS found FROM work_items WHERE {where} LIMIT 1", params))

    def next_interruptions(self) -> int | None:
        """The interruptions of the job `claim` would take now (None: none); a read, nothing is
        claimed (node.jobs.turns: a job its node died under waits for its turn unclaimed)."""
        where, params = self._claimable(time.time(), self.index.lease_clock())
        # (a job taken over, running under an expired lease, counts its death at its claim: _move)
        rows = self.index.query(f"SELECT interruptions + CASE WHEN state=? THEN {_A_DEATH} ELSE 0 END AS n"
                                f" FROM work_items WHERE {where} ORDER BY priority DESC, id LIMIT 1",
                                (JobState.RUNNING.value, *params))
        return int(rows[0]["n"]) if rows else None

    def _claimable(self, now: float, lease_now: float) -> tuple[str, tuple[Any, ...]]:
        """The condition on a job `claim` may take, and its parameters. Expired leases only
        between replicas: a single node's running jobs are its own (a restart resumes them),
        however long a job takes."""
        expired = " OR (state=? AND lease_until<?)" if self.index.shared else ""
        return ("state=? OR (state=? AND next_attempt<=?)" + expired,
                (JobState.QUEUED.value, JobState.WAITING.value, now,
                 *((JobState.RUNNING.value, lease_now) if self.index.shared else ())))

    def renew_leases(self) -> int:
        """Keep this process's running jobs (called well within `lease_s`)."""
        with self.index.transaction(claim=True) as db:
            return db.execute("UPDATE work_items SET lease_until=? WHERE state=? AND lease_owner=?",
                              (db.lease_clock() + self.lease_s, JobState.RUNNING.value, self.owner)).rowcount

    def enter_stage(self, job_id: int, stage: str) -> None:
        """The stage a job this process runs is in; IllegalTransition where it no longer runs it
        (released at a stop, taken over): its thread stops there."""
        with self.index.transaction() as db:
            self._held(db, job_id, db.execute(
                "UPDATE work_items SET stage=?, updated_at=? WHERE id=? AND state=? AND lease_owner=?",
                (stage, time.time(), job_id, JobState.RUNNING.value, self.owner)).rowcount)

    def record_stage(self, job_id: int, stage: str, started: float, ended: float) -> None:
        """A stage's time; a stage that runs more than once spans its first start to its last end."""
        with self.index.transaction() as db:
            stages = json.loads(db.execute("SELECT stages FROM work_items WHERE id=?", (job_id,)).fetchone()["stages"] or "{}")
            first = stages.get(stage, [started])[0]
            stages[stage] = [first, ended]
            self._held(db, job_id, db.execute("UPDATE work_items SET stages=? WHERE id=? AND state=? AND lease_owner=?",
                                              (json.dumps(stages), job_id, JobState.RUNNING.value, self.owner)).rowcount)

    def record_outputs(self, job_id: int, task: str, files: list[Path]) -> None:
        """The result files of a finished encode stage: a re-run hands these to the outbox again."""
        with self.index.transaction() as db:
            outputs = json.loads(db.execute("SELECT outputs FROM work_items WHERE id=?", (job_id,)).fetchone()["outputs"] or "{}")
            outputs[task] = [str(f) for f in files]
            self._held(db, job_id, db.execute("UPDATE work_items SET outputs=? WHERE id=? AND state=? AND lease_owner=?",
                                              (json.dumps(outputs), job_id, JobState.RUNNING.value, self.owner)).rowcount)

    def check_held(self, db: Db, job_id: int) -> None:
        """In `db`'s transaction (results queued for delivery): IllegalTransition unless this
        process still runs the job."""
        # (PostgreSQL: the row kept as it is until the results are queued; a release waits for it)
        row = db.execute("SELECT 1 AS held FROM work_items WHERE id=? AND state=? AND lease_owner=?"
                         + (" FOR SHARE" if self.index.shared else ""),
                         (job_id, JobState.RUNNING.value, self.owner)).fetchone()
        self._held(db, job_id, 1 if row else 0)

    @staticmethod
    def _held(db: Db, job_id: int, rowcount: int) -> None:
        if rowcount != 1:  # (the transaction rolls back with the exception)
            row = db.execute("SELECT state FROM work_items WHERE id=?", (job_id,)).fetchone()
            raise IllegalTransition(f"job {job_id} is no longer run by this node process (it is"
                                    f" {row['state'] if row else 'gone'}): released at a stop, or taken over")

    def newer_job(self, job_id: int, study_uid: str, db: Db | None = None) -> int | None:
        """The id of a job created for the study after this one (the study completed again);
        read in `db`'s transaction when given (the caller acts on the answer there)."""
        sql, params = "SELECT MAX(id) AS id FROM work_items WHERE study_uid=? AND id>?", (study_uid, job_id)
        row = db.execute(sql, params).fetchall() if db is not None else self.index.query(sql, params)
        return row[0]["id"] if row and row[0]["id"] is not None else None

    def abandon(self, job_id: int, newer: int) -> None:
        """A running job whose study completed again stops: job `newer` processes the study."""
        with self.index.transaction() as db:
            self._move(db, job_id, JobState.IGNORED, time.time(), owner=self.owner, next_attempt=None,
                       lease_until=None, reason=f"superseded while running: the study completed again (job {newer}"
                                                " processes it)")

    def finish(self, job_id: int) -> None:
        with self.index.transaction() as db:
            self._move(db, job_id, JobState.DONE, time.time(), owner=self.owner, reason=None, next_attempt=None,
                       lease_until=None)

    def fail(self, job_id: int, reason: str) -> None:
        with self.index.transaction() as db:
            self._move(db, job_id, JobState.FAILED, time.time(), owner=self.owner, reason=reason[:2000],
                       next_attempt=None, lease_until=None)

    def wait(self, job_id: int, reason: str, delay_s: float, deadline_s: float) -> JobState:
        """A transient failure: due again after `delay_s`, unless that passes the job's retry deadline
        (`deadline_s` after its first transient failure), in which case it fails. Returns the new state."""
        now = time.time()
        with self.index.transaction() as db:
            row = db.execute("SELECT retry_deadline FROM work_items WHERE id=?", (job_id,)).fetchone()
            deadline = row["retry_deadline"] if row and row["retry_deadline"] else now + deadline_s
            if now + delay_s > deadline:
                self._move(db, job_id, JobState.FAILED, now, owner=self.owner, next_attempt=None, lease_until=None,
                           reason=f"gave up after the retry deadline: {reason}"[:2000])
                return JobState.FAILED
            self._move(db, job_id, JobState.WAITING, now, owner=self.owner, reason=reason[:2000],
                       next_attempt=now + delay_s, retry_deadline=deadline, lease_until=None)
            return JobState.WAITING

    def requeue_running(self) -> int:
        """At start-up of a single node: jobs that were running when it died run again (from their
        last stage), each with one interruption more. Replicas sharing an index wait for the
        leases to expire instead."""
        with self.index.transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM work_items WHERE state=?", (JobState.RUNNING.value,))]
            for job_id in ids:
                self._move(db, job_id, JobState.QUEUED, time.time(), only_from=(JobState.RUNNING,), interrupted=True)
            return len(ids)

    def mark_stopping(self) -> int:
        """At a stop's first moment: this process's running jobs are marked, so that a SIGKILL
        before the stop ends (a container's grace period shorter than the receivers' drain) is
        not counted as the node dying under them. How many."""
        with self.index.transaction(claim=True) as db:
            return db.execute("UPDATE work_items SET stopping=1 WHERE state=? AND lease_owner=?",
                              (JobState.RUNNING.value, self.owner)).rowcount

    def release_running(self, job_id: int | None = None) -> list[int]:
        """At a stop's end: this process's jobs still running are queued again, not interrupted
        (a stop, an upgrade, is no sign that a job kills its node); another replica may take them
        at once. Their threads, left to end with the process, can no longer move them, nor record
        a stage or an output, nor queue a result (check_held). One guarded UPDATE (TRANSITIONS:
        running -> queued): a job taken over meanwhile is not this process's and is left alone.
        `job_id`: only that job, claimed as the stop came and not started (its claim's attempt
        taken back)."""
        taken_back, one, ids = ((", attempts=attempts-1", " AND id=?", (job_id,)) if job_id is not None
                                else ("", "", ()))
        with self.index.transaction(claim=True) as db:
            return [r["id"] for r in db.execute(
                "UPDATE work_items SET state=?, updated_at=?, lease_owner=NULL, lease_until=NULL,"
                f" stopping=0{taken_back} WHERE state=? AND lease_owner=?{one} RETURNING id",
                (JobState.QUEUED.value, time.time(), JobState.RUNNING.value, self.owner, *ids))]

    def next_due(self) -> float | None:
        """When the earliest waiting job is due (for the scheduler)."""
        row = self.index.query("SELECT MIN(next_attempt) AS t FROM work_items WHERE state=?",
                               (JobState.WAITING.value,))
        return row[0]["t"] if row else None

    # -- the operator's side ---------------------------------------------------------------

    def retry(self, job_id: int | None = None) -> int:
        """Queue a failed, ignored or waiting job (or, with None, every failed and waiting one) now."""
        retryable = (JobState.FAILED, JobState.IGNORED, JobState.WAITING) if job_id is not None else (
            JobState.FAILED, JobState.WAITING)
        now = time.time()
        with self.index.transaction() as db:
            ids = [job_id] if job_id is not None else [
                r["id"] for r in db.execute(
                    f"SELECT id FROM work_items WHERE state IN ({','.join('?' * len(retryable))})",
                    tuple(s.value for s in retryable))]
            moved = 0
            for one in ids:
                try:
                    self._move(db, one, JobState.QUEUED, now, only_from=retryable, reason=None, next_attempt=None,
                               retry_deadline=None, interruptions=0)
                    moved += 1
                except IllegalTransition:
                    if job_id is not None:
                        raise
            return moved

    def get(self, job_id: int, db: Db | None = None) -> Job:
        """The job (read in `db`'s transaction when given)."""
        sql = "SELECT * FROM work_items WHERE id=?"
        rows = db.execute(sql, (job_id,)).fetchall() if db is not None else self.index.query(sql, (job_id,))
        if not rows:
            raise UnknownJob(f"no job {job_id}")
        return _job(rows[0])

    def counts(self) -> dict[JobState, int]:
        """Jobs per state, every state present (dashboards and metrics, without loading decisions)."""
        found = {r["state"]: r["n"] for r in self.index.query("SELECT state, COUNT(*) AS n FROM work_items GROUP BY state")}
        return {state: int(found.get(state.value, 0)) for state in JobState}

    def all_jobs(self, study_uid: str | None = None) -> list[Job]:
        rows = self.index.query("SELECT * FROM work_items WHERE study_uid=? ORDER BY id", (study_uid,)) \
            if study_uid is not None else self.index.query("SELECT * FROM work_items ORDER BY id")
        return [_job(r) for r in rows]

    # -- the one place a state changes ------------------------------------------------------

    @staticmethod
    def _move(db: Db, job_id: int, target: JobState, now: float, attempts_plus: int = 0,
              only_from: tuple[JobState, ...] | None = None, owner: str | None = None, interrupted: bool = False,
              **columns: object) -> None:
        """Move a job to `target` from any state allowed to go there (or only from `only_from`);
        with `owner`, only a job that process runs (running under its lease: a job released at
        its stop, or taken over and moved on by another replica, is not its own to move);
        `interrupted`: its node died while it ran (not counted where that process had been told
        to stop)."""
        sources = [s.value for s, targets in TRANSITIONS.items()
                   if target in targets and (only_from is None or s in only_from)
                   and (owner is None or s is JobState.RUNNING)]
        if not sources:  # (a caller's mistake; SQL's `IN ()` would be a syntax error on one database, none on another)
            raise ValueError(f"no state {target.value} may be reached from"
                             f" {[s.value for s in only_from or ()]}{' by its owner' if owner else ''}")
        sets = "".join(f", {name}=?" for name in columns) + (
            f", interruptions=interruptions+{_A_DEATH}, stopping=0" if interrupted else "")
        held = " AND lease_owner=?" if owner else ""
        cur = db.execute(
            f"UPDATE work_items SET state=?, updated_at=?, attempts=attempts+?{sets}"
            f" WHERE id=? AND state IN ({','.join('?' * len(sources))}){held}",
            (target.value, now, attempts_plus, *columns.values(), job_id, *sources, *((owner,) if owner else ())),
        )
        if cur.rowcount != 1:
            row = db.execute("SELECT state, lease_owner FROM work_items WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            if owner and row["state"] == JobState.RUNNING.value:
                raise IllegalTransition(f"job {job_id} runs under another node process's lease now: it was taken"
                                        " over after this process's lease expired")
            raise IllegalTransition(f"job {job_id} is {row['state']}: it cannot become {target.value}")


def _decision(text: str | None) -> RoutingDecision | None:
    try:
        return RoutingDecision.model_validate_json(text) if text else None
    except ValidationError:
        return None


def _job(row: Any) -> Job:
    return Job(
        id=row["id"], study_uid=row["study_uid"], state=JobState(row["state"]),
        decision=_decision(row["decision"]), priority=row["priority"],
        attempts=row["attempts"], created_at=row["created_at"], updated_at=row["updated_at"], stage=row["stage"],
        reason=row["reason"], next_attempt=row["next_attempt"], retry_deadline=row["retry_deadline"],
        stages={k: tuple(v) for k, v in json.loads(row["stages"] or "{}").items()},
        outputs=json.loads(row["outputs"] or "{}"), completed_by=row.get("completed_by"),
        interruptions=row.get("interruptions", 0),
    )
