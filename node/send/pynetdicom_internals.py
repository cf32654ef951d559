"""Everything the node's requestor associations need from pynetdicom beyond its public API.

tests/test_requestor.py::test_pynetdicom_requestor_internals_pinned checks the behaviour relied
on here, so that a pynetdicom upgrade that changes it fails that test instead of a delivery.

Relied on (pynetdicom 3.0):
- `AE.associate` makes the requestor's Association (its DUL not yet started), then its socket
  with `AE._create_socket(assoc, address, tls_args)`, then starts the DUL in `assoc.request()`:
  `PromptAE` makes them node/transport.py's prompt socket and DUL there (half of a small
  C-STORE to a quick peer was the DUL's 1 ms sleeps).
- `assoc.dul.socket.socket` is the association's connected TCP (or TLS) socket once
  EVT_CONN_OPEN has fired, and until the connection closes.
- The requestor's loop (`Association._run_reactor`, on the association's own thread) looks up
  `assoc._reactor_checkpoint` on every turn and waits on it with `_is_paused` set; once through,
  it takes a DIMSE message if one is queued (`assoc.dimse.get_msg(block=False)`, which returns
  `(None, None)` when none is) and serves it, then only looks at ACSE primitives and its timers
  before the next wait. Each `send_*` and `release` clears the checkpoint, spins until
  `_is_paused` is True, exchanges its messages (`get_msg(block=True)` on the caller's thread)
  and sets it again. `kill` sets it (the loop must run to end).

Why the checkpoint is replaced: when a `send_*` has just set the checkpoint, the reactor may be
woken but not yet have run; the next `send_*` then sees the stale `_is_paused`, sends, and the
reactor takes its response ("Received unexpected C-STORE service message") while the sender
waits out the DIMSE timeout (the same race as pydicom/pynetdicom#875). The faster the peer
answers, the likelier: a delivery of several results would fail after `sending.timeout_s` and
be sent again. `steady` gives an association a checkpoint whose `clear` returns only once the
reactor can no longer take a message before its next wait: it is at its wait, or it has looked
for a message this turn and found none.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import AssociationSocket

from node.transport import PromptDul, PromptSocket

TURN_WAIT_S = 5.0  # at most, for a reactor that never comes back to its checkpoint
_TURN_POLL_S = 0.05  # how often a pause looks whether the reactor's thread has ended


class HonestCheckpoint:
    """What pynetdicom uses of threading.Event (`set`, `clear`, `is_set`, `wait`), knowing
    whether the reactor (`reactor`: the Association, whose thread runs it) may still take a
    DIMSE message before its next wait."""

    def __init__(self, reactor: Any, open_: bool = True) -> None:
        self._changed = threading.Condition()
        self._open = open_
        self._may_take = True  # unknown until the reactor first waits or looks: it may be mid-turn
        self._reactor = reactor

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def clear(self) -> None:
        """Close, then wait until the reactor can take no message before its next wait (never
        on the reactor's own thread, and not for a reactor whose thread has ended)."""
        with self._changed:
            self._open = False
            if threading.current_thread() is self._reactor:
                return
            deadline = time.monotonic() + TURN_WAIT_S
            while self._may_take and self._reactor.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # pynetdicom's own spin on `_is_paused` decides
                self._changed.wait(min(left, _TURN_POLL_S))
            # what the sender spins on next: true now, not only once the reactor's turn has
            # slept its 1 ms to the next wait
            self._reactor._is_paused = True

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            self._may_take = False
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: self._open, timeout=timeout):
                return False
            self._may_take = True
            return True

    def looked(self, took: bool) -> None:
        """The reactor looked for a DIMSE message this turn and `took` one or not. Having taken
        none, it takes none before its next wait, so a pause need not wait for the rest of its
        turn (a 1 ms sleep: a third of a small C-STORE to a quick peer). Having taken one, it
        serves it first, and may answer: the pause waits for the turn's end."""
        if took or threading.current_thread() is not self._reactor:
            return
        with self._changed:
            self._may_take = False
            self._changed.notify_all()


def steady(assoc: Any) -> Any:
    """`assoc` (an established requestor association, a pynetdicom Association) with an honest
    reactor checkpoint; a pause a `send_*` holds now is kept."""
    checkpoint = HonestCheckpoint(assoc, open_=assoc._reactor_checkpoint.is_set())
    get_msg = assoc.dimse.get_msg

    def looking(block: bool = False) -> Any:
        taken = get_msg(block)
        checkpoint.looked(taken[1] is not None)
        return taken

    assoc.dimse.get_msg = looking
    assoc._reactor_checkpoint = checkpoint
    return assoc


def tcp_socket(assoc: Any) -> socket.socket | None:
    """The association's connected socket (TLS-wrapped where it is), None once it is closed."""
    transport = getattr(assoc.dul, "socket", None)
    return getattr(transport, "socket", None)


class PromptAE(AE):
    """pynetdicom's AE whose requested associations wait on their connection instead of
    polling it every millisecond (node/transport.py)."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        sock.__class__ = PromptSocket
        sock.arm_bell()
        PromptDul.adopt(assoc.dul)
        return sock
