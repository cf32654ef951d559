"""Study completion: a study is complete when nothing has arrived for its quiet period.

The deadline lives in the index (moved by every stored instance); the timer lives in
APScheduler. A timer that fires early because more instances arrived simply re-arms at the
new deadline, so receivers only notify when a study starts (or restarts) receiving, and a
restart re-arms every study still receiving from the index. Replicas sharing an index each arm
timers for every receiving study (the sweep finds those another replica opened); the completing
transaction holds the index's write lock, so exactly one of them completes a study, and a study
whose replica died completes on another at the next sweep. The study is routed before that
transaction, without the lock every C-STORE needs; the transaction admits the decision only if
no instance arrived since it was made.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from apscheduler.schedulers.base import BaseScheduler

from common import logs
from node import metrics
from node.store.index import Db, Index

log = logging.getLogger("node.assemble")


class Prepared(Protocol):
    """What the service prepares for a receiving study before it may complete (the routing
    decision, made outside the index's write lock): the arrival it saw and when it is due."""

    last_received: float
    quiet_period_s: float
    due: float  # last_received + quiet_period_s, or earlier when a completion signal says so
    completed_by: str  # what completes it if due: quiet_period, or a signal (mpps)
    instances: int


CHECKS_PER_RUN = 3
RECHECK_S = 1.0


class CompletionTimers:
    def __init__(
        self,
        index: Index,
        scheduler: BaseScheduler,
        prepare: Callable[[str, float], Prepared | None],
        admit: Callable[[Db, Any, float], None],
        on_admitted: Callable[[str], None] = lambda study_uid: None,
        sweep_s: float = 30.0,
        first_check: Callable[[str, float], float] = lambda study_uid, deadline: deadline,
        on_waiting: Callable[[str, Prepared], None] = lambda study_uid, prepared: None,
    ):
        """`prepare(study_uid, now)` runs first, without the write lock (it routes the study; None:
        not receiving); `admit(db, prepared, now)` in the completing transaction (the job);
        `on_admitted(study_uid)` after it committed (wake the workers); `first_check(study_uid,
        deadline)`: when to check a receiving study first (earlier than its stored deadline when
        a rule's quiet period or a completion signal may make it due sooner); `on_waiting(study_uid,
        prepared)` when a check found it receiving and not yet due (node.assemble.read_ahead)."""
        self.index = index
        self.scheduler = scheduler
        self.prepare = prepare
        self.admit = admit
        self.on_admitted = on_admitted
        self.sweep_s = sweep_s
        self.first_check = first_check
        self.on_waiting = on_waiting
        self._arming = threading.Lock()

    def start(self) -> None:
        """Arm a timer for every study still receiving (after a restart: all of them)."""
        self.rearm_all()
        self.scheduler.add_job(
            self.rearm_all, "interval", seconds=self.sweep_s, id="completion-sweep",
            replace_existing=True, coalesce=True,
        )

    def rearm_all(self) -> None:
        for study_uid, deadline in self.index.receiving_studies():
            if self.scheduler.get_job(_job_id(study_uid)) is None:
                self.arm(study_uid, self.first_check(study_uid, deadline))

    def arm(self, study_uid: str, deadline: float) -> None:
        """Check the study at `deadline`, or earlier if a check is armed for earlier already (a
        completion signal's wake-up is never pushed back by a check re-arming itself)."""
        with self._arming:
            armed = self.scheduler.get_job(_job_id(study_uid))
            if armed is not None and armed.next_run_time is not None and armed.next_run_time.timestamp() <= deadline:
                return
            self.scheduler.add_job(
                self._check,
                "date",
                run_date=datetime.fromtimestamp(deadline, tz=timezone.utc),
                args=[study_uid],
                id=_job_id(study_uid),
                replace_existing=True,
                misfire_grace_time=None,
            )

    def _check(self, study_uid: str) -> None:
        """Route the study, then complete it if nothing arrived meanwhile. A timer re-armed for
        a moment already past would be dropped by the scheduler while this run still holds its
        only instance, so an overtaken check is redone here (a few times) instead."""
        for _ in range(CHECKS_PER_RUN):
            now = time.time()
            prepared = self.prepare(study_uid, now)
            if prepared is None:
                return
            if prepared.due > now:
                self.arm(study_uid, prepared.due)
                self.on_waiting(study_uid, prepared)
                return
            completed, deadline = self.index.complete_if_due(
                study_uid, now, lambda db: self.admit(db, prepared, now), quiet_override=prepared.quiet_period_s,
                seen_last_received=prepared.last_received, due_override=prepared.due)
            if completed:
                logs.event(log, "study_complete", study_uid=study_uid, instances=prepared.instances,
                           completed_by=prepared.completed_by)
                metrics.study_completed(prepared.completed_by)
                self.on_admitted(study_uid)
                return
            if deadline is None:
                return  # no longer receiving
            if deadline > time.time():
                self.arm(study_uid, deadline)
                return
        self.arm(study_uid, time.time() + RECHECK_S)  # still arriving as fast as it is routed


def _job_id(study_uid: str) -> str:
    return f"complete:{study_uid}"
