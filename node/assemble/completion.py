"""Study completion: a study is complete when nothing has arrived for its quiet period.

The deadline lives in the index (moved by every stored instance); the timer lives in
APScheduler. A timer that fires early because more instances arrived simply re-arms at the
new deadline, so receivers only notify when a study starts (or restarts) receiving, and a
restart re-arms every study still receiving from the index. Replicas sharing an index each arm
timers for every receiving study (the sweep finds those another replica opened); the completing
transaction holds the index's write lock, so exactly one of them completes a study, and a study
whose replica died completes on another at the next sweep.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable

from apscheduler.schedulers.base import BaseScheduler

from common import logs
from node.store.index import Db, Index

log = logging.getLogger("node.assemble")

class CompletionTimers:
    def __init__(
        self,
        index: Index,
        scheduler: BaseScheduler,
        admit: Callable[[Db, str, float], None],
        quiet_override: Callable[[str], float | None] = lambda study_uid: None,
        on_admitted: Callable[[str], None] = lambda study_uid: None,
        sweep_s: float = 30.0,
    ):
        """`admit(db, study_uid, now)` runs in the completing transaction (routing, the job);
        `on_admitted(study_uid)` after it committed (wake the workers)."""
        self.index = index
        self.scheduler = scheduler
        self.admit = admit
        self.quiet_override = quiet_override
        self.on_admitted = on_admitted
        self.sweep_s = sweep_s

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
                self.arm(study_uid, deadline)

    def arm(self, study_uid: str, deadline: float) -> None:
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
        now = time.time()
        completed, deadline = self.index.complete_if_due(
            study_uid, now, lambda db: self.admit(db, study_uid, now), self.quiet_override(study_uid))
        if deadline is not None:
            self.arm(study_uid, deadline)
            return
        if completed:
            logs.event(
                log,
                "study_complete",
                study_uid=study_uid,
                instances=self.index.study_instance_count(study_uid),
            )
            self.on_admitted(study_uid)


def _job_id(study_uid: str) -> str:
    return f"complete:{study_uid}"
