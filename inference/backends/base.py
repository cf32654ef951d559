"""One interface for every way of running a model."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """A model could not be run; the message says why in operator terms."""


class BackendUnavailable(BackendError):
    """The server is down, not ready or timing out: trying again later may succeed."""


class Backend(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on one batch (N, 1, D, H, W) float32; return its output array, the
        caller's own (the sliding window weights it in place)."""
        ...

    def close(self) -> None:
        ...


class TimedCalls:
    """A backend whose calls are timed: `seconds` sums them (the model's compute, and on Triton
    the transfer), so that a result tells them apart from the node's own work around them (the
    sliding window's gathering and blending of windows: benchmarks.end_to_end counts it)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.seconds = 0.0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.backend.infer(batch)
        finally:
            self.seconds += time.perf_counter() - start

    def close(self) -> None:
        self.backend.close()
