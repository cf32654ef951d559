"""The one exponential backoff (common.backoff) and the four retries that use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from common.backoff import backoff_delay

REPO = Path(__file__).resolve().parent.parent
USERS = ("node/send/outbox.py", "node/jobs/runner.py", "node/receive/workers.py", "inference/backends/triton.py")


def test_doubles_from_initial_up_to_maximum_without_jitter():
    assert [backoff_delay(n, 10.0, 600.0, jitter=False) for n in range(1, 9)] == [10, 20, 40, 80, 160, 320, 600, 600]
    # a receiver's respawn after 1, 2, 3 ... quick exits: 1, 2, 4 ... at most 30 s
    assert [backoff_delay(n, 1.0, 30.0, jitter=False) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_attempt_below_one_counts_as_the_first_and_a_huge_attempt_does_not_overflow():
    assert backoff_delay(0, 5.0, 100.0, jitter=False) == backoff_delay(-3, 5.0, 100.0, jitter=False) == 5.0
    assert backoff_delay(10**6, 5.0, 100.0, jitter=False) == 100.0
    assert backoff_delay(2000, 0.05, float("inf"), jitter=False) < float("inf")  # Triton's retries have no cap


def test_jitter_scales_by_half_to_one_and_a_half_and_spreads():
    delays = [backoff_delay(3, 10.0, 600.0) for _ in range(2000)]
    assert all(20.0 <= d < 60.0 for d in delays)
    assert min(delays) < 25.0 and max(delays) > 55.0  # not a constant factor
    capped = [backoff_delay(20, 10.0, 600.0) for _ in range(200)]
    assert all(300.0 <= d < 900.0 for d in capped)  # the jitter applies to the capped delay


def test_jitter_factor(monkeypatch):
    import common.backoff

    monkeypatch.setattr(common.backoff.random, "uniform", lambda low, high: high)
    assert backoff_delay(2, 3.0, 100.0) == pytest.approx(6.0 * 1.5)


@pytest.mark.parametrize("path", USERS)
def test_every_retry_uses_the_one_backoff(path):
    """No hand-written `x * 2 ** n` backoff is left: each caller calls backoff_delay."""
    tree = ast.parse((REPO / path).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "backoff_delay"]
    powers_of_two = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow)
                     and isinstance(n.left, ast.Constant) and n.left.value == 2]
    assert calls and not powers_of_two, path
