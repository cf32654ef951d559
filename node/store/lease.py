"""Leases on shared work: who holds them, and the heartbeat that keeps them."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from functools import cache
from typing import Callable

from common import logs

log = logging.getLogger("node.store")


@cache
def process_owner() -> str:
    """host:pid:random (the random part: a pid reused by a later process is another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Renews this process's leases every `lease_s / 3` on a thread of its own: a heartbeat queued
    behind busy scheduler threads (sends waiting on a slow PACS) would let the leases expire while
    the work goes on, and another replica would take it over."""

    def __init__(self, lease_s: float, renewals: list[Callable[[], int]]):
        self.interval = lease_s / 3
        self.renewals = renewals
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # not when the node's start failed before it
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for renew in self.renewals:
                try:
                    renew()
                except Exception as exc:  # the index unreachable for a moment: try again next beat
                    logs.event(log, "lease_renewal_failed", logging.WARNING, error=type(exc).__name__)
