"""Retention: what the node deletes by itself, so the spool and results/ stop growing.

Only *finished* studies are touched: complete, every job done or ignored, every delivery
delivered. A study still receiving, with a job queued, running, waiting or failed, or with a
delivery pending or dead keeps everything (failures are for the operator to retry first).

- `instances_days`: a finished study's instances go this long after it finished (the later of
  its completion, its jobs' last change and its last delivery).
- `results_days`: a done job's result files go this long after the last of them was delivered.
- `max_store_gb`: while the stored instances exceed the cap, the oldest finished studies go.

Deleting a study removes its files and its rows (instances, series, studies) in one index
transaction that re-checks it is still finished, so an instance arriving meanwhile either
reopens the study first (nothing is deleted) or arrives after (a new study). Folders are kept:
receiver processes cache the folders they created. Every deletion is written to
`retention_log` (also so that the received-bytes and completed-studies metrics stay counters)
and logged.

This module sits above node/jobs and node/send (it reads both), beside the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import logs
from node.config import RetentionConfig
from node.jobs.store import Job, JobState, JobStore
from node.send import outbox
from node.store.index import Index
from node.store.signals import CompletionSignals
from node.store.spool import MTIME_SLACK_S

log = logging.getLogger("node.retention")

DAY = 86400.0
FINISHED_JOB_STATES = {JobState.DONE, JobState.IGNORED}


@dataclass
class StudyState:
    """A study as retention sees it."""

    study_uid: str
    instances: int
    bytes: int
    finished_at: float | None  # None: not finished (pending work, or not complete)
    why_kept: str = ""


@dataclass
class PlannedStudy:
    study_uid: str
    instances: int
    bytes: int
    finished_at: float
    reason: str


@dataclass
class PlannedResults:
    job_id: int
    study_uid: str
    files: list[Path]
    delivered_at: float


@dataclass
class Plan:
    studies: list[PlannedStudy] = field(default_factory=list)
    results: list[PlannedResults] = field(default_factory=list)
    kept: list[StudyState] = field(default_factory=list)
    stored_bytes: int = 0

    def digest(self) -> str:
        """What the plan deletes, as one value: a confirmation names exactly this plan."""
        # with each study's instances and bytes: an instance that arrived since the preview changes it
        names = sorted(f"{s.study_uid} {s.instances} {s.bytes}" for s in self.studies) + \
            sorted(str(f) for r in self.results for f in r.files)
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {
            "studies": [vars(s) for s in self.studies],
            "results": [{"job_id": r.job_id, "study_uid": r.study_uid, "files": [str(f) for f in r.files],
                         "delivered_at": r.delivered_at} for r in self.results],
            "stored_bytes": self.stored_bytes,
            "plan_digest": self.digest(),
        }


class Retention:
    def __init__(self, index: Index, data_dir: Path):
        self.index = index
        self.data_dir = Path(data_dir)
        self.jobs = JobStore(index)

    # -- what would go -----------------------------------------------------------------------

    def study_states(self, now: float | None = None) -> list[StudyState]:
        """Every stored study with its size and, when finished, since when."""
        now = time.time() if now is None else now
        jobs: dict[str, list[Job]] = {}
        for job in self.jobs.all_jobs():
            jobs.setdefault(job.study_uid, []).append(job)
        deliveries: dict[str, list[Any]] = {}
        for row in outbox.deliveries(self.index):
            deliveries.setdefault(row["study_uid"], []).append(row)
        rows = self.index.query(
            """SELECT s.study_uid, s.state, s.completed_at,
                      (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS n,
                      (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM instances i WHERE i.study_uid=s.study_uid) AS bytes
               FROM studies s ORDER BY s.first_received""")
        return [self._state(r, jobs.get(r["study_uid"], []), deliveries.get(r["study_uid"], [])) for r in rows]

    @staticmethod
    def _state(row: Any, jobs: list[Job], deliveries: list[Any]) -> StudyState:
        state = StudyState(row["study_uid"], row["n"], row["bytes"], None)
        if row["state"] != "complete":
            state.why_kept = "still receiving"
        elif not jobs:
            state.why_kept = "no job yet"
        elif any(j.state not in FINISHED_JOB_STATES for j in jobs):
            state.why_kept = "a job is " + ", ".join(sorted({j.state.value for j in jobs
                                                             if j.state not in FINISHED_JOB_STATES}))
        elif any(d["state"] != "delivered" for d in deliveries):
            state.why_kept = "a delivery is " + ", ".join(sorted({d["state"] for d in deliveries
                                                                  if d["state"] != "delivered"}))
        else:
            state.finished_at = max([row["completed_at"] or 0.0] + [j.updated_at for j in jobs]
                                    + [d["updated_at"] for d in deliveries])
        return state

    def plan(self, policy: RetentionConfig, now: float | None = None) -> Plan:
        now = time.time() if now is None else now
        plan = Plan()
        states = self.study_states(now)
        plan.stored_bytes = sum(s.bytes for s in states)
        going: set[str] = set()
        if policy.instances_days is not None:
            for s in states:
                if s.finished_at is not None and s.instances and now - s.finished_at >= policy.instances_days * DAY:
                    plan.studies.append(PlannedStudy(s.study_uid, s.instances, s.bytes, s.finished_at,
                                                     f"finished more than {policy.instances_days:g} days ago"))
                    going.add(s.study_uid)
        if policy.max_store_gb is not None:
            cap = int(policy.max_store_gb * (1 << 30))
            remaining = plan.stored_bytes - sum(s.bytes for s in states if s.study_uid in going)
            for s in sorted((s for s in states if s.finished_at is not None and s.study_uid not in going
                             and s.instances), key=lambda s: s.finished_at or 0.0):
                if remaining <= cap:
                    break
                plan.studies.append(PlannedStudy(s.study_uid, s.instances, s.bytes, s.finished_at or 0.0,
                                                 f"stored instances over the {policy.max_store_gb:g} GB cap"))
                remaining -= s.bytes
        plan.kept = [s for s in states if s.study_uid not in {p.study_uid for p in plan.studies}]
        if policy.results_days is not None:
            plan.results = self._results_due(now - policy.results_days * DAY)
        return plan

    def _results_due(self, before: float) -> list[PlannedResults]:
        deliveries: dict[int, list[Any]] = {}
        for row in outbox.deliveries(self.index):
            job_id = row["job_key"].split(":", 1)[0]
            if job_id.isdigit():
                deliveries.setdefault(int(job_id), []).append(row)
        due = []
        for job in self.jobs.all_jobs():
            rows = deliveries.get(job.id, [])
            if job.state is not JobState.DONE or not rows or any(r["state"] != "delivered" for r in rows):
                continue
            delivered_at = max(r["updated_at"] for r in rows)
            files = [Path(f) for paths in job.outputs.values() for f in paths if Path(f).is_file()]
            if files and delivered_at <= before:
                due.append(PlannedResults(job.id, job.study_uid, files, delivered_at))
        return due

    # -- deleting ----------------------------------------------------------------------------

    def run(self, policy: RetentionConfig, now: float | None = None) -> dict[str, int]:
        """Apply the policy once; returns what went."""
        return self.carry_out(self.plan(policy, now))

    def carry_out(self, plan: Plan) -> dict[str, int]:
        """Delete what `plan` names (each study re-checked under the write lock); what went."""
        totals = {"studies": 0, "instances": 0, "bytes": 0, "result_files": 0}
        for study in plan.studies:
            deleted = self._delete_study(study)
            if deleted:
                totals["studies"] += 1
                totals["instances"] += deleted[0]
                totals["bytes"] += deleted[1]
        for results in plan.results:
            totals["result_files"] += self._delete_results(results)
        with self.index.transaction() as db:
            db.execute("INSERT INTO retention_runs (at, studies, instances, bytes, result_files) VALUES (?,?,?,?,?)",
                       (time.time(), totals["studies"], totals["instances"], totals["bytes"],
                        totals["result_files"]))
        logs.event(log, "retention_run", **totals)
        return totals

    def _delete_study(self, study: PlannedStudy) -> tuple[int, int] | None:
        with self.index.transaction() as db:
            # Re-check inside the write lock: nothing can arrive, reopen or be retried meanwhile.
            row = db.execute("SELECT state, completions FROM studies WHERE study_uid=?", (study.study_uid,)).fetchone()
            jobs = self.jobs.all_jobs(study.study_uid)
            undelivered = outbox.undelivered(db, study.study_uid)
            if (row is None or row["state"] != "complete" or not jobs or undelivered
                    or any(j.state not in FINISHED_JOB_STATES for j in jobs)):
                logs.event(log, "retention_skipped", study_uid=study.study_uid, reason="no longer finished")
                return None
            instances = self.index.forget_study(db, study.study_uid)
            CompletionSignals.forget_study(db, study.study_uid)
            for inst in instances:
                _unlink_unless_newer(self.data_dir / inst["path"], inst["received_at"])
            # its emptied folders too (under the write lock, where receivers make them; one that
            # made a folder before remakes it: Spool.place)
            for folder in sorted({(self.data_dir / i["path"]).parent for i in instances}):
                _remove_empty(folder, self.data_dir / "studies")
            size = sum(int(i["size"]) for i in instances)
            db.execute("INSERT INTO retention_log (at, kind, study_uid, reason, instances, bytes, completions, files)"
                       " VALUES (?, 'instances', ?, ?, ?, ?, ?, ?)",
                       (time.time(), study.study_uid, study.reason, len(instances), size, row["completions"],
                        len(instances)))
        logs.event(log, "retention_deleted_study", study_uid=study.study_uid, instances=len(instances),
                   bytes=size, reason=study.reason)
        return len(instances), size

    def _delete_results(self, results: PlannedResults) -> int:
        removed = 0
        folders = set()
        for path in results.files:
            try:
                path.unlink()
                removed += 1
                folders.add(path.parent)
            except FileNotFoundError:
                pass
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            _remove_empty(folder, self.data_dir / "results")
        with self.index.transaction() as db:
            db.execute("INSERT INTO retention_log (at, kind, study_uid, job_id, reason, files)"
                       " VALUES (?, 'results', ?, ?, 'results delivered long enough ago', ?)",
                       (time.time(), results.study_uid, results.job_id, removed))
        logs.event(log, "retention_deleted_results", job=results.job_id, study_uid=results.study_uid, files=removed)
        return removed

    # -- reporting ---------------------------------------------------------------------------

    def last_run(self) -> dict[str, Any] | None:
        rows = self.index.query("SELECT * FROM retention_runs ORDER BY id DESC LIMIT 1")
        return dict(rows[0]) if rows else None

    def deleted_totals(self) -> dict[str, int]:
        """Instances, bytes and completions removed with their studies (metrics add them back)."""
        row = self.index.query(
            "SELECT CAST(COALESCE(SUM(instances), 0) AS BIGINT) AS instances,"
            " CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS bytes,"
            " CAST(COALESCE(SUM(completions), 0) AS BIGINT) AS completions, COUNT(*) AS studies FROM retention_log"
            " WHERE kind='instances'")[0]
        return dict(row)

    def deleted_study(self, study_uid: str) -> dict[str, Any] | None:
        rows = self.index.query("SELECT * FROM retention_log WHERE kind='instances' AND study_uid=?"
                                " ORDER BY id DESC LIMIT 1", (study_uid,))
        return dict(rows[0]) if rows else None


def _unlink_unless_newer(path: Path, received_at: float) -> None:
    """Delete an instance file unless a newer copy replaced it since its row was written."""
    try:
        if os.stat(path).st_mtime > received_at + MTIME_SLACK_S:
            return
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_empty(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def describe_plan(plan: Plan) -> str:
    """`cleanup --dry-run` output: patient-free (UIDs, counts, sizes)."""
    lines = []
    for s in plan.studies:
        lines.append(f"study {s.study_uid}: {s.instances} instances, {s.bytes / 1e6:.1f} MB ({s.reason})")
    for r in plan.results:
        lines.append(f"results of job {r.job_id} (study {r.study_uid}): {len(r.files)} files")
    if not lines:
        lines.append("nothing to delete")
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)
