"""One backend per model, shared by the workers, and dropped when its server went away."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from inference.backends.base import Backend, BackendUnavailable
from inference.repository import ModelRepository
from node.config import TritonConfig


class BackendCache:
    def __init__(self, models: ModelRepository, triton: TritonConfig):
        self.models = models
        self.triton = triton
        self._backends: dict[str, Backend] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @contextmanager
    def use(self, model: str) -> Iterator[Backend]:
        """The model's backend, one caller at a time. After BackendUnavailable the backend is closed
        and made anew on next use: a restarted Triton knows none of the old shared-memory regions."""
        with self._lock:
            lock = self._locks.setdefault(model, threading.Lock())
        with lock:
            backend = self._backends.get(model)
            if backend is None:
                t = self.triton
                backend = self.models.backend(model, t.url, t.protocol, t.shared_memory, t.timeout_s, t.retries)
                self._backends[model] = backend
            try:
                yield backend
            except BackendUnavailable:
                self._backends.pop(model, None)
                _close_quietly(backend)
                raise

    def close(self) -> None:
        for backend in self._backends.values():
            _close_quietly(backend)
        self._backends.clear()


def _close_quietly(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:  # closing a backend whose server is gone must not hide the real failure
        pass
