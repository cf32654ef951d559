"""pynetdicom as the tests' SCU, with its reactor's pause made honest.

pynetdicom 3.0's requestor pauses its association's reactor around each `send_*`: the sender
clears `_reactor_checkpoint` and spins until `_is_paused` is True; the reactor sets `_is_paused`
True, waits on the checkpoint, sets it False and takes any DIMSE message queued. When the
previous `send_*` has just set the checkpoint, the reactor may be woken but not yet have run: the
sender then sees the stale True, sends, and the reactor takes the response (logged "Received
unexpected C-STORE service message") while the sender waits out the DIMSE timeout. The faster
the node answers the likelier that is (a fresh clone's test failed so on 2026-11-25; the same
race as pydicom/pynetdicom#875). `steady` gives an association a checkpoint whose `clear`
returns only once the reactor's turn in progress has ended, so the pause it answers is real.
"""

from __future__ import annotations

import threading
from typing import Any

TURN_WAIT_S = 5.0  # a reactor that never comes back to its checkpoint (its association ended)


class HonestCheckpoint:
    """What pynetdicom uses of threading.Event (`set`, `clear`, `is_set`, `wait`), knowing
    whether the reactor is between two waits (a turn)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = True
        self._in_turn = True  # unknown until the reactor first waits here: it may be mid-turn
        self._reactor: int | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def clear(self) -> None:
        """Close, then wait until a turn in progress has ended (never on the reactor's own thread)."""
        with self._changed:
            self._open = False
            if threading.get_ident() != self._reactor:
                self._changed.wait_for(lambda: not self._in_turn, timeout=TURN_WAIT_S)

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            self._reactor = threading.get_ident()
            self._in_turn = False
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: self._open, timeout=timeout):
                return False
            self._in_turn = True
            return True


def steady(assoc: Any) -> Any:
    """`assoc` (an established requestor association) with an honest reactor checkpoint."""
    checkpoint = HonestCheckpoint()
    if not assoc._reactor_checkpoint.is_set():  # paused by a send_* in progress: keep it so
        checkpoint._open = False
    assoc._reactor_checkpoint = checkpoint
    return assoc
