"""Everything the node's requestor associations need from pynetdicom beyond its public API.

tests/test_requestor.py::test_pynetdicom_requestor_internals_pinned checks the behaviour relied
on here, so that a pynetdicom upgrade that changes it fails that test instead of a delivery.

Relied on (pynetdicom 3.0):
- `AE.associate` makes the requestor's Association (its DUL not yet started), then its socket
  with `AE._create_socket(assoc, address, tls_args)`, then starts the DUL in `assoc.request()`:
  `PromptAE` makes them a RequestorSocket and node/transport.py's prompt DUL there (half of a
  small C-STORE to a quick peer was the DUL's 1 ms sleeps). The DUL sends each PDU with
  `socket.send(pdu.encode())` and reads with `socket.recv`.
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
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.transport import AssociationSocket

from node.transport import PromptDul, PromptSocket

TURN_WAIT_S = 5.0  # at most, for a reactor that never comes back to its checkpoint
_TURN_POLL_S = 0.05  # how often a pause looks whether the reactor's thread has ended


class HonestCheckpoint:
    """What pynetdicom uses of threading.Event (`set`, `clear`, `is_set`, `wait`), knowing
    whether the reactor (`reactor`: the Association, whose thread runs it) may still take a
    DIMSE message before its next wait."""

    def __init__(self, reactor: Any) -> None:
        self._changed = threading.Condition()
        self._open = True
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
    """`assoc` (an established requestor association, a pynetdicom Association, its reactor not
    paused) with an honest reactor checkpoint."""
    if not assoc._reactor_checkpoint.is_set():
        # the reactor may be parked in that Event's wait, which only a set() of it ends
        raise RuntimeError("steady: the association's reactor is paused")
    # The checkpoint first: a reactor that looks through the new get_msg meanwhile then tells a
    # checkpoint that sees it; one that looked through the old get_msg leaves the new one at its
    # safe start (it may take a message).
    checkpoint = HonestCheckpoint(assoc)
    assoc._reactor_checkpoint = checkpoint
    get_msg = assoc.dimse.get_msg

    def looking(block: bool = False) -> Any:
        taken = get_msg(block)
        checkpoint.looked(taken[1] is not None)
        return taken

    assoc.dimse.get_msg = looking
    return assoc


def tcp_socket(assoc: Any) -> socket.socket | None:
    """The association's connected socket (TLS-wrapped where it is), None once it is closed."""
    transport = getattr(assoc.dul, "socket", None)
    return getattr(transport, "socket", None)


class RequestorSocket(PromptSocket):
    """The prompt socket (node/transport.py) that ACKs the peer at once: TCP_QUICKACK re-armed
    after each PDU sent and before each read. A peer with Nagle on (dcmtk, and Orthanc, unless
    TCP_NODELAY=1 is in their environment) writes a response in pieces and holds the second
    until the first is ACKed, and Linux delays that ACK ~40 ms while we only wait: every C-STORE
    took 44 ms against such a storescp. The receiver does the same before each read
    (node/receive/pynetdicom_internals.py). In the socket, not in EVT_PDU_SENT/RECV handlers:
    while a handler runs pynetdicom swaps `assoc.abort` for a version that does not stop the
    association, whatever thread calls it."""

    def connect(self, primitive: Any) -> None:
        """pynetdicom leaves a connected requestor's socket without a timeout: a peer that stops
        in the middle of a PDU, or stops reading, held the DUL's read or send, and the
        association's stop waits on the DUL, for ever. With the network timeout the read or send
        fails and pynetdicom closes the connection (Evt17)."""
        super().connect(primitive)
        sock = self.socket
        if sock is not None and self._is_connected:
            sock.settimeout(self.assoc.network_timeout)

    def send(self, bytestream: bytes) -> None:
        super().send(bytestream)
        self._quick_ack()

    def recv(self, nr_bytes: int) -> bytearray:
        self._quick_ack()
        return super().recv(nr_bytes)

    def _quick_ack(self) -> None:
        sock = self.socket
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:  # the connection is going: nothing left to acknowledge
                pass


class PromptAE(AE):
    """pynetdicom's AE whose requested associations use RequestorSocket and the prompt DUL."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        sock.__class__ = RequestorSocket
        cast(RequestorSocket, sock).prepare_bell()
        PromptDul.adopt(assoc.dul)
        return sock
