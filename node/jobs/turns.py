"""Turns between a node process's pipeline workers: a job its node died under runs alone.

The node cannot tell which of the jobs running at its death killed it (the kernel's OOM killer
takes the service, not a thread), so each is counted once (JobStore.requeue_running). Run again
side by side, the same jobs would be counted together at every death, and a bystander failed
with the job that kills the node. A job with a death against it (`interruptions` > 0) therefore
waits, unclaimed, for the others in its process to end, and no other starts beside it: the node's
next death is its own, and a bystander finishes alone. A job past `pipeline.interrupted_runs`
does not wait: it fails at once. With `pipeline.workers: 1` there is nothing to wait for.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

J = TypeVar("J")


class Turns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._blocked = False  # nothing is claimed: a job runs alone, or waits unclaimed to
        self._alone: object | None = None  # the job that runs alone

    def take(self, claim: Callable[[], J | None], alone: Callable[[J], bool], next_alone: Callable[[], bool],
             waiting: Callable[[], bool]) -> J | None:
        """`claim()`'s job, counted as running; None while a job runs alone, or while the next
        job to claim (`next_alone()`) waits, unclaimed, for the others to end: claimed, it would
        be counted against at a death it had no part in. A job `alone` claimed beside others
        all the same (a retry, a replica moved it meanwhile) waits for them claimed. Waiting
        ends once `waiting()` is False (the node stops: a job claimed then is the stop's to
        queue again)."""
        with self._changed:
            if self._blocked:
                return None
            if self._running and next_alone():
                self._blocked = True
                while self._running and waiting():
                    self._changed.wait(1.0)
                self._blocked = False
                if self._running:
                    return None
            job = claim()
            if job is None:
                return None
            if alone(job):
                self._blocked, self._alone = True, job
                while self._running and waiting():
                    self._changed.wait(1.0)
            self._running += 1
            return job

    @property
    def running(self) -> int:
        """How many jobs run now in this process (claimed and not ended)."""
        with self._changed:
            return self._running

    def ended(self, job: object) -> None:
        with self._changed:
            self._running -= 1
            if job is self._alone:
                self._blocked, self._alone = False, None
            self._changed.notify_all()
