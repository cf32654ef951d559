"""One attempt to deliver a result set to one destination: the plug-in point per kind of
destination. A sender takes the files and returns a Delivery or raises Transient or Permanent;
the outbox owns leases, retries and the dead letter, the same for every kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from node.config import DestinationConfig


class Transient(Exception):
    """Sending again later may work (no connection, a busy peer, 0xA7xx, HTTP 503)."""


class Permanent(Exception):
    """Sending the same objects again will not help (refused, 0xA9xx/0xCxxx, HTTP 400)."""


@dataclass(frozen=True)
class Delivery:
    warnings: list[str]


class Sender(Protocol):
    def __call__(self, calling_ae: str, peer: DestinationConfig, files: list[Path], timeout: float) -> Delivery: ...
