"""Reading a study's headers ahead while it waits out its quiet period.

The quiet period is time the study waits anyway (60 s by default); parsing the headers of the
series its job will load (300 CT headers: 0.2-0.5 s on this project's machine kind) is done
then instead of in the job. It starts once no instance has arrived for a moment (parsing while
the receivers work would take their CPU), at the first completion check that finds the study
not yet due; instances that arrive after it are parsed by the job itself.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from apscheduler.schedulers.base import BaseScheduler

from common import logs
from node.assemble.completion import Prepared
from node.store.index import Index

log = logging.getLogger("node.assemble")

# Read ahead once nothing has arrived for this long (at most half the study's quiet period).
SETTLE_S = 1.0


class ReadAhead:
    def __init__(self, index: Index, scheduler: BaseScheduler, read: Callable[[str], int]):
        """`read(study_uid)`: parse the headers its job will load, and say how many."""
        self.index = index
        self.scheduler = scheduler
        self.read = read
        self._reading: set[str] = set()  # studies whose headers are being read now
        self._lock = threading.Lock()

    def waiting(self, study_uid: str, prepared: Prepared) -> None:
        """A completion check found the study receiving and not yet due: read ahead once it settles."""
        settle = min(SETTLE_S, prepared.quiet_period_s / 2)
        self._schedule(study_uid, prepared.last_received + settle, settle)

    def _schedule(self, study_uid: str, when: float, settle: float) -> None:
        # Two at once: one asked for while another still reads returns at once (`_reading`)
        # instead of the scheduler's warning that it skipped it.
        self.scheduler.add_job(self._run, "date", run_date=datetime.fromtimestamp(max(when, time.time()), timezone.utc),
                               args=[study_uid, settle], id=f"read-ahead:{study_uid}", replace_existing=True,
                               misfire_grace_time=None, max_instances=2)

    def _run(self, study_uid: str, settle: float) -> None:
        with self._lock:
            if study_uid in self._reading:
                return  # the reading under way lists what is stored now; later arrivals, the job
            self._reading.add(study_uid)
        try:
            self._read(study_uid, settle)
        finally:
            with self._lock:
                self._reading.discard(study_uid)

    def _read(self, study_uid: str, settle: float) -> None:
        try:
            state = self.index.study_state(study_uid)
            if state is None or state["state"] != "receiving":
                return  # completed meanwhile: its job reads the headers itself
            settled = state["last_received"] + settle
            if settled > time.time():  # more arrived since: once they pause
                self._schedule(study_uid, settled, settle)
                return
            started = time.monotonic()
            parsed = self.read(study_uid)
        except Exception as exc:  # noqa: BLE001 - only time is lost: the job parses what is not read ahead
            logs.event(log, "read_ahead_failed", logging.WARNING, study_uid=study_uid, error=type(exc).__name__)
            return
        if parsed:
            logs.event(log, "headers_read_ahead", study_uid=study_uid, headers=parsed,
                       seconds=round(time.monotonic() - started, 3))
