"""Reading a study's headers ahead while it waits out its quiet period (inference.headers).

The quiet period is time the study waits anyway (60 s by default); the headers of the series
its job will load are parsed then instead of in the job. A reading starts once nothing has
arrived for the study for `settle_s` (parsing while its instances still come would take the
receivers' CPU), from the moment it opens here, and follows it while it receives: a pause after
more arrivals reads what came since. A completion check that finds a study not yet due starts
one too (after a restart: the studies still receiving), except on an index shared by replicas,
where each reads ahead the studies it receives. It runs on a thread of its own, so that a slow
disk never holds up completion checks or deliveries, and stops once the study completes. Other
work on the node (another study's receivers, a job) shares the CPU with it.
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
FOLLOW_S = 5.0  # how often a study read ahead is looked at again while it receives
EXECUTOR = "read-ahead"
STUDIES_KEPT = 10_000  # studies whose last reading is remembered (so that a pause is read once)


class ReadAhead:
    """When to read a receiving study's headers ahead; `read` does it."""

    def __init__(self, index: Index, scheduler: BaseScheduler, read: Callable[[str], int],
                 enabled: Callable[[], bool], settle_s: float = SETTLE_S, follow_s: float = FOLLOW_S):
        """`read(study_uid)`: parse the headers its job will load, and say how many; `enabled()`:
        whether that reads anything now (the pipeline loaded, `pipeline.read_ahead_headers` set)."""
        self.index = index
        self.scheduler = scheduler
        self.read = read
        self.enabled = enabled
        self.settle_s = settle_s
        self.follow_s = follow_s
        # study -> the last arrival read up to; only the executor's one thread writes it
        self._read_at: OrderedDict[str, float] = OrderedDict()
        scheduler.add_executor(ThreadPoolExecutor(1, pool_kwargs={"thread_name_prefix": EXECUTOR}), alias=EXECUTOR)

    def opened(self, study_uid: str) -> None:
        """The study started receiving here."""
        self._schedule(study_uid, time.time() + self.settle_s)

    def waiting(self, study_uid: str, prepared: Prepared) -> None:
        """A completion check found the study receiving and not yet due."""
        if not self.index.shared and self._read_at.get(study_uid) != prepared.last_received:
            self._schedule(study_uid, prepared.last_received + self.settle_s)

    def _schedule(self, study_uid: str, when: float) -> None:
        if self.enabled():  # a second while one waits on the thread runs after it and finds nothing new
            self.scheduler.add_job(self._run, "date", run_date=datetime.fromtimestamp(max(when, time.time()),
                                                                                      timezone.utc),
                                   args=[study_uid], id=f"read-ahead:{study_uid}", replace_existing=True,
                                   executor=EXECUTOR, misfire_grace_time=None, max_instances=2)

    def _run(self, study_uid: str) -> None:
        if not self.enabled():
            return  # stopping, or switched off
        try:
            state = self.index.study_state(study_uid)
            if state is None or state["state"] != "receiving":
                self._read_at.pop(study_uid, None)
                return  # completed meanwhile: its job reads the headers itself
            last = float(state["last_received"])
            if last + self.settle_s > time.time():  # still arriving: once they pause
                self._schedule(study_uid, last + self.settle_s)
                return
            self._schedule(study_uid, time.time() + self.follow_s)  # what arrives after this pause
            if self._read_at.get(study_uid) == last:
                return  # read up to this arrival already
            self._read_at[study_uid] = last  # before reading: a failing reading is not repeated each time
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
