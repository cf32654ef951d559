"""Turns between a node process's pipeline workers: a job its node died under runs alone.

The node cannot tell which of the jobs running at its death killed it (the kernel's OOM killer
takes the service, not a thread), so each is counted once (JobStore.requeue_running). Run again
side by side, the same jobs would be counted together at every death, and a bystander failed
with the job that kills the node. A job with a death against it (`interruptions` > 0) therefore
waits for the others in its process to end, and no other starts beside it: the node's next death
is its own, and a bystander finishes alone. With `pipeline.workers: 1` there is nothing to wait for.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol, TypeVar


class Counted(Protocol):
    interruptions: int


J = TypeVar("J", bound=Counted)


class Turns:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._alone = False

    def take(self, claim: Callable[[], J | None], waiting: Callable[[], bool]) -> J | None:
        """`claim()`'s job, counted as running; None while a job runs alone (nothing is claimed
        then). A job to run alone returns once the others have ended, or once `waiting()` is
        False (the node stops: the stop queues it again, JobStore.release_running)."""
        with self._changed:
            if self._alone:
                return None
            job = claim()
            if job is None:
                return None
            if job.interruptions:
                self._alone = True
                while self._running and waiting():
                    self._changed.wait(1.0)
            self._running += 1
            return job

    def ended(self, job: Counted) -> None:
        with self._changed:
            self._running -= 1
            if job.interruptions:
                self._alone = False
            self._changed.notify_all()
