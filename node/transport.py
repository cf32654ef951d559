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
    answering at once. `prepare_bell` when the socket is made; the DUL's thread makes the bell
    when it starts and closes it when it ends (PromptDul), so a request that fails before its
    DUL runs leaves no descriptor behind."""

    _bell_lock: threading.Lock
    _bell: socket.socket | None
    _ringer: socket.socket | None

    def prepare_bell(self) -> None:
        self._bell_lock = threading.Lock()
        self._bell = self._ringer = None

    def arm_bell(self) -> None:
        """Make the bell (on the DUL's thread, as it starts). Closed when that thread ends, under
        a lock so that a late ring never writes to a descriptor number reused meanwhile."""
        if self._bell is not None:  # made already
            return
        try:
            bell, ringer = socket.socketpair()
            bell.setblocking(False)
            ringer.setblocking(False)
        except OSError:  # out of descriptors: `ready` then waits on the connection alone, as long as pynetdicom slept
            return
        with self._bell_lock:
            self._bell, self._ringer = bell, ringer

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
        """pynetdicom's answer (Evt17 on a connection that fails), from poll() rather than its
        select(), which fails on a descriptor numbered 1024 or more; each association now holds
        three."""
        sock, bell = self.socket, self._bell  # the bell changes only on the DUL's own thread
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted already: poll cannot see it
            return True
        try:
            waiting = select.poll()
            waiting.register(sock, select.POLLIN)
            if bell is not None:
                waiting.register(bell, select.POLLIN)
            woken = dict(waiting.poll(IDLE_WAIT_MS))
            if bell is not None and bell.fileno() in woken:
                bell.recv(4096)
            events = woken.get(sock.fileno(), 0)
        except (OSError, ValueError):  # closed meanwhile (a descriptor of -1: ValueError)
            events = select.POLLNVAL
        if events & select.POLLNVAL:
            self.event_queue.put("Evt17")  # Evt17: transport connection closed
            return False
        # readable, or hung up or failed: the read that follows finds out, as after select()
        return bool(events & (select.POLLIN | select.POLLHUP | select.POLLERR))


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
        sock = self.socket
        if isinstance(sock, PromptSocket):
            sock.arm_bell()
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
