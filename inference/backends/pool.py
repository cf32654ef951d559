"""One model on a pool of Triton servers: the ready server with the fewest outstanding requests
takes each request, and a request whose server goes away mid-study is sent to another.

tritonclient talks to one server per client and has no pool; Triton's own answer (a load
balancer in front of several servers) cannot fail a request over, and breaks shared memory,
which needs the client and the server on one host. So the pool is here: each server has its own
`TritonBackend` (its own shared-memory regions, used by one request at a time), created when
first needed. A server that fails (unreachable, not ready, restarted) is marked down and its
backend closed; it is tried again after `probe_after_s`. Only when no server is left does the
pool raise `BackendUnavailable`, and the job waits and retries as with one server.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from inference.backends.base import Backend, BackendError, BackendUnavailable
from common import logs

log = logging.getLogger("inference.triton")
CLOSE_WAIT_S = 15.0  # how long `close` waits for the backends of failed servers still closing


@dataclass
class ServerStats:
    """What /metrics shows per server (shared by the pools of every model)."""

    url: str
    up: bool = True  # until a request says otherwise
    outstanding: int = 0
    requests: dict[str, int] = field(default_factory=lambda: {"ok": 0, "unavailable": 0, "error": 0})
    seconds: float = 0.0  # total time of the requests answered
    failovers: int = 0  # requests this server lost that went to another


class _Server:
    def __init__(self, stats: ServerStats):
        self.stats = stats
        self.lock = threading.Lock()  # a TritonBackend's shared-memory regions serve one request at a time
        self.backend: Backend | None = None
        self.retry_at = 0.0


class TritonPool:
    """A `Backend` over several servers that serve the same model."""

    def __init__(self, model: str, stats: list[ServerStats], connect: Callable[[str], Backend],
                 probe_after_s: float = 15.0):
        """`connect(url)`: a backend for the model on that server (it checks readiness and the spec)."""
        self.model = model
        self.connect = connect
        self.probe_after_s = probe_after_s
        self._servers = [_Server(s) for s in stats]
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._closing: list[threading.Thread] = []  # backends of failed servers, closing on threads of their own

    def infer(self, batch: np.ndarray) -> np.ndarray:
        tried: list[str] = []
        reasons: list[BackendError] = []
        while (server := self._take(tried)) is not None:
            started = time.monotonic()
            connecting = False
            try:
                with server.lock:
                    if server.backend is None:
                        connecting = True  # a BackendError now: this server cannot run the model
                        server.backend = self.connect(server.stats.url)
                        connecting = False
                    result = server.backend.infer(batch)
            except BackendError as exc:
                if not (connecting or isinstance(exc, BackendUnavailable)):
                    self._count(server, "error")
                    raise  # the request itself is wrong (shape, type): no server would take it
                self._down(server, exc)  # gone, not ready, restarted, or without the model: another one
                tried.append(server.stats.url)
                reasons.append(exc)
                continue
            finally:
                with self._lock:
                    server.stats.outstanding -= 1
            self._answered(server, time.monotonic() - started)
            return result
        if len(self._servers) == 1 and reasons:
            raise reasons[0]  # one server: its own words, as without a pool
        if not reasons:
            reasons.append(BackendUnavailable("every server is marked down and waits for its next probe"))
        # Unavailable if any server may come back; a model no server can run fails the job for good.
        kind = BackendUnavailable if any(isinstance(r, BackendUnavailable) for r in reasons) else BackendError
        raise kind(f"no Triton server could run {self.model} ({', '.join(s.stats.url for s in self._servers)}): "
                   f"{reasons[-1]}")

    def _take(self, tried: list[str]) -> _Server | None:
        """The server for the next request: up (or due for a probe), fewest outstanding, then in turn."""
        now = time.monotonic()
        with self._lock:
            candidates = [s for s in self._servers if s.stats.url not in tried and (s.stats.up or now >= s.retry_at)]
            if not candidates:
                return None
            turn = next(self._turn)
            rotated = candidates[turn % len(candidates):] + candidates[:turn % len(candidates)]
            chosen = min(rotated, key=lambda s: s.stats.outstanding)
            chosen.stats.outstanding += 1
            if tried:
                self._servers[[s.stats.url for s in self._servers].index(tried[-1])].stats.failovers += 1
                logs.event(log, "triton_failover", logging.WARNING, model=self.model, failed=tried[-1],
                           to=chosen.stats.url)
            return chosen

    def _down(self, server: _Server, exc: BackendError) -> None:
        with server.lock:
            backend, server.backend = server.backend, None
        if backend is not None:  # frees our shared-memory regions; a restarted server knows none of them
            # (on a thread of its own: a server that answers nothing would hold the request that long)
            closing = threading.Thread(target=_close_quietly, args=(backend,), name="triton-backend-close", daemon=True)
            closing.start()
            with self._lock:
                self._closing = [t for t in self._closing if t.is_alive()] + [closing]
        self._count(server, "unavailable" if isinstance(exc, BackendUnavailable) else "error")
        with self._lock:
            server.retry_at = time.monotonic() + self.probe_after_s
            was_up, server.stats.up = server.stats.up, False
        if was_up:
            logs.event(log, "triton_server_down", logging.WARNING, server=server.stats.url, model=self.model,
                       reason=str(exc)[:300])

    def _count(self, server: _Server, outcome: str) -> None:
        with self._lock:
            server.stats.requests[outcome] += 1

    def _answered(self, server: _Server, seconds: float) -> None:
        with self._lock:
            server.stats.requests["ok"] += 1
            server.stats.seconds += seconds
            was_up, server.stats.up = server.stats.up, True
        if not was_up:
            logs.event(log, "triton_server_up", server=server.stats.url, model=self.model)

    def close(self) -> None:
        """Close every server's backend, and wait (a while) for those closing since their server
        failed: a node that stops meanwhile would leave their regions registered on the server."""
        for server in self._servers:
            with server.lock:
                backend, server.backend = server.backend, None
            if backend is not None:
                _close_quietly(backend)
        deadline = time.monotonic() + CLOSE_WAIT_S
        with self._lock:
            closing, self._closing = self._closing, []
        for thread in closing:
            thread.join(max(deadline - time.monotonic(), 0.0))


def _close_quietly(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:  # closing a backend whose server is gone must not hide the real failure
        pass
