"""Exponential backoff, the one rule every retry in the node uses.

Attempt n (1-based) waits ``initial * 2 ** (n - 1)`` seconds, at most ``maximum``; with jitter the
wait is then scaled by a random factor in [0.5, 1.5), so that many clients that failed together
(a PACS restart, a Triton restart) do not retry together. Used by result delivery (the outbox),
job retries (the job runner), Triton calls, and (without jitter) receiver process respawns.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 64  # 2**64 times any sane initial delay is past any maximum: no float overflow


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: bool = True) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry; less counts as 1)."""
    exponent = min(max(int(attempt) - 1, 0), _MAX_EXPONENT)
    delay = min(float(maximum), float(initial) * 2.0 ** exponent)
    return delay * random.uniform(0.5, 1.5) if jitter else delay
