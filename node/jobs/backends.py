"""One backend per model, shared by the workers: ONNX Runtime in-process, or a pool of Triton servers."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from inference.backends.base import Backend
from inference.backends.pool import ServerStats, TritonPool
from inference.repository import ModelRepository
from node.config import TritonConfig

# How long a Triton server that failed is left alone while others serve (with one server, none).
PROBE_AFTER_S = 15.0


class BackendCache:
    def __init__(self, models: ModelRepository, triton: TritonConfig):
        self.models = models
        self.triton = triton
        self.servers = [ServerStats(url) for url in triton.servers]  # for /metrics
        self._backends: dict[str, Backend] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @contextmanager
    def use(self, model: str) -> Iterator[Backend]:
        """The model's backend. A Triton pool takes concurrent requests (each server one at a time,
        so concurrent jobs spread over the servers); the in-process backend one caller at a time."""
        with self._lock:
            lock = self._locks.setdefault(model, threading.Lock())
            backend = self._backends.get(model)
            if backend is None and self.servers:
                backend = self._backends[model] = self._pool(model)
        if isinstance(backend, TritonPool):
            yield backend
            return
        with lock:
            if model not in self._backends:
                self._backends[model] = self.models.backend(model)
            yield self._backends[model]

    def _pool(self, model: str) -> TritonPool:
        t = self.triton
        alone = len(self.servers) == 1
        # With other servers to fail over to, one failed attempt moves the request; alone, the
        # server gets its retries (a restart takes seconds) before the job waits.
        retries = t.retries if alone else 1
        return TritonPool(model, self.servers,
                          lambda url: self.models.backend(model, url, t.protocol, t.shared_memory, t.timeout_s, retries),
                          probe_after_s=0.0 if alone else PROBE_AFTER_S)

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
