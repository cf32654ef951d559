"""Reading a study's headers ahead while it waits out its quiet period.

The quiet period is time the study waits anyway (60 s by default); parsing the headers of the
series its job will load (300 CT headers: 0.2-0.5 s on this project's machine kind) is done
then instead of in the job. A reading starts once nothing has arrived for `settle_s` (parsing
while the receivers work would take their CPU), from the moment the study opens or a completion
check finds it not yet due (after a restart, or a study another replica opened); each new pause
after more arrivals reads what came since. It runs on a thread of its own, so that a slow disk
never holds up completion checks or deliveries, and stops once the study completes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler

from common import logs
from node.assemble.completion import Prepared
from node.store.index import Index

log = logging.getLogger("node.assemble")

SETTLE_S = 1.0  # read ahead once nothing has arrived for this long
EXECUTOR = "read-ahead"
STUDIES_KEPT = 10_000  # studies whose last reading is remembered (so that a pause is read once)


class ReadAhead:
    def __init__(self, index: Index, scheduler: BaseScheduler, read: Callable[[str], int],
                 enabled: Callable[[], bool], settle_s: float = SETTLE_S):
        """`read(study_uid)`: parse the headers its job will load, and say how many; `enabled()`:
        whether that reads anything now (the pipeline loaded, `pipeline.read_ahead_headers` set)."""
        self.index = index
        self.scheduler = scheduler
        self.read = read
        self.enabled = enabled
        self.settle_s = settle_s
        self._read_at: OrderedDict[str, float] = OrderedDict()  # study -> the last arrival read up to
        try:
            scheduler.add_executor(ThreadPoolExecutor(1), alias=EXECUTOR)
        except ValueError:  # another ReadAhead on this scheduler added it (tests run two "replicas" on one)
            pass

    def opened(self, study_uid: str) -> None:
        """The study started receiving here."""
        self._schedule(study_uid, time.time() + self.settle_s)

    def waiting(self, study_uid: str, prepared: Prepared) -> None:
        """A completion check found the study receiving and not yet due."""
        self._schedule(study_uid, prepared.last_received + self.settle_s)

    def _schedule(self, study_uid: str, when: float) -> None:
        if not self.enabled():
            return
        try:  # a second while one waits on the thread runs after it and finds nothing new
            self.scheduler.add_job(self._run, "date", run_date=datetime.fromtimestamp(max(when, time.time()),
                                                                                      timezone.utc),
                                   args=[study_uid], id=f"read-ahead:{study_uid}", replace_existing=True,
                                   executor=EXECUTOR, misfire_grace_time=None, max_instances=2)
        except Exception as exc:  # noqa: BLE001 - the scheduler stopped: only time is lost
            log.debug("read-ahead not scheduled: %s", type(exc).__name__)

    def _run(self, study_uid: str) -> None:
        try:
            state = self.index.study_state(study_uid)
            if state is None or state["state"] != "receiving":
                self._read_at.pop(study_uid, None)
                return  # completed meanwhile: its job reads the headers itself
            last = float(state["last_received"])
            if last + self.settle_s > time.time():  # still arriving: once they pause
                self._schedule(study_uid, last + self.settle_s)
                return
            if self._read_at.get(study_uid) == last:
                return  # read up to this arrival already
            self._read_at[study_uid] = last
            self._read_at.move_to_end(study_uid)
            while len(self._read_at) > STUDIES_KEPT:
                self._read_at.popitem(last=False)
            started = time.monotonic()
            parsed = self.read(study_uid)
        except Exception as exc:  # noqa: BLE001 - only time is lost: the job parses what is not read ahead
            logs.event(log, "read_ahead_failed", logging.WARNING, study_uid=study_uid, error=type(exc).__name__)
            return
        if parsed:
            logs.event(log, "headers_read_ahead", study_uid=study_uid, headers=parsed,
                       seconds=round(time.monotonic() - started, 3))
