"""One interface for every way of running a model."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """A model could not be run; the message says why in operator terms."""


class BackendUnavailable(BackendError):
    """The server is down, not ready or timing out: trying again later may succeed."""


class Backend(Protocol):
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on one batch (N, 1, D, H, W) float32; return its output array."""
        ...

    def close(self) -> None:
        ...
