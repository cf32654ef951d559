"""pynetdicom's DUL made prompt, for the receiver's associations and the node's requests alike.

pynetdicom's DUL loop sleeps 1 ms after every turn that found nothing, then polls: up to a
millisecond for each PDU not yet in and for each primitive the association queued, several
times per DIMSE message (a fifth of the intake on one association; half of a small C-STORE the
node sends to a quick peer). Here the DUL does not sleep: `PromptSocket.ready` waits instead,
for at most the same millisecond, until the connection is readable or the association has
queued a primitive (`PromptDul` rings the socket's bell).

Relied on (pynetdicom 3.0; pinned by tests/test_receive_hardening.py::test_pynetdicom_internals_pinned):
the DUL's loop (`run_reactor`) sleeps `_run_loop_delay` after an idle turn and learns of data
only through `socket.ready` (`_is_transport_event`); the association hands it every primitive
to send through `send_pdu`, which puts it on `to_provider_queue`.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

# pynetdicom's own polling period: the longest the DUL waits for data or a primitive to send
# before it looks at its timers again.
IDLE_WAIT_MS = 1


class PromptSocket(AssociationSocket):
    """An association socket whose `ready` waits for data or the bell (`wake`) instead of
    answering at once. `arm_bell` before the DUL starts; the DUL's thread closes it
    (`release_bell`, PromptDul) when it ends."""

    _bell_lock: threading.Lock
    _bell: socket.socket | None
    _ringer: socket.socket | None

    def arm_bell(self) -> None:
        # Closed when the DUL's thread ends, under a lock so that a late ring never writes to a
        # descriptor number reused meanwhile.
        self._bell_lock = threading.Lock()
        self._bell = self._ringer = None
        try:
            self._bell, self._ringer = socket.socketpair()
            self._bell.setblocking(False)
            self._ringer.setblocking(False)
        except OSError:  # out of descriptors: `ready` then waits on the connection alone, as long as pynetdicom slept
            self.release_bell()

    def wake(self) -> None:
        """The association queued a primitive for the DUL: end its wait in `ready`."""
        with self._bell_lock:
            if self._ringer is not None:
                try:
                    self._ringer.send(b"\0")
                except OSError:  # already ringing (its buffer is full)
                    pass

    def release_bell(self) -> None:
        """Close the bell: the DUL's thread has ended, nothing waits in `ready` any more."""
        with self._bell_lock:
            for end in (self._bell, self._ringer):
                if end is not None:
                    end.close()
            self._bell = self._ringer = None

    @property
    def ready(self) -> bool:
        sock, bell = self.socket, self._bell  # the bell changes only on the DUL's own thread
        if sock is not None and self._is_connected and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            try:  # poll, not select: the bell's descriptors may lie above select's 1024
                waiting = select.poll()
                waiting.register(sock, select.POLLIN)
                if bell is not None:
                    waiting.register(bell, select.POLLIN)
                woken = {fd for fd, _ in waiting.poll(IDLE_WAIT_MS)}
                if bell is not None and bell.fileno() in woken:
                    bell.recv(4096)
            except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check below says so
                pass
        return bool(super().ready)


class PromptDul(DULServiceProvider):
    """pynetdicom's DUL, told at once of each primitive queued for it. Its loop does not sleep:
    it waits in `PromptSocket.ready`."""

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        sock = self.socket
        if isinstance(sock, PromptSocket):
            sock.wake()

    def run(self) -> None:
        # pynetdicom closes the connection on some endings only (AA-2, AA-3) and just shuts it
        # down on others (release, a dropped peer, our own abort): the bell goes with the thread.
        try:
            super().run()
        finally:
            sock = self.socket
            if isinstance(sock, PromptSocket):
                sock.release_bell()
            self.ended()

    def ended(self) -> None:
        """The DUL's thread is ending (for a subclass that tells others)."""

    @classmethod
    def adopt(cls, dul: DULServiceProvider) -> None:
        """Make a new association's DUL (not yet started) this class."""
        dul.__class__ = cls
        dul._run_loop_delay = 0
