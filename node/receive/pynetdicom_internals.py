"""Everything the receiver needs from pynetdicom beyond its public API, in one place (the DUL's
wait on its connection, which the node's requests share, is node/transport.py's).

tests/test_receive_hardening.py::test_pynetdicom_internals_pinned checks the behaviour relied
on here, so that a pynetdicom upgrade that changes it fails that test instead of the node.

Relied on (pynetdicom 3.0):
- `RequestHandler._create_association` builds the acceptor's Association and its
  `AssociationSocket` (`assoc.dul.socket`); we swap that socket's class for `PduSocket`.
- The DUL reads a PDU as `recv(6)` (type, reserved, 4-byte big-endian length) and then
  `recv(length)`, the first only once the socket is readable; an OSError/TimeoutError from
  either makes it close the connection (Evt17).
- `assoc.network_timeout`, `assoc.acse_timeout` and `assoc.dimse_timeout` hold the AE's
  timeouts; `assoc.is_established` turns true once the A-ASSOCIATE-AC is sent.
- `assoc.requestor.primitive` is the received A-ASSOCIATE-RQ (`called_ae_title`) when
  EVT_REQUESTED fires; `assoc.acceptor.ae_title` is what the A-ASSOCIATE-AC echoes.
- Rejecting in an EVT_REQUESTED handler: `assoc.acse.send_reject(...)` then `assoc.kill()`
  (what pynetdicom does itself for its own checks); the association then never negotiates.
- `AssociationServer.process_request(conn, peer)` runs a handed-over connection.
- `RequestHandler._create_association` gives each association `deepcopy(server.contexts)` as
  its supported contexts, and negotiation (`negotiate_as_acceptor`) only reads them: the
  associations share the server's list (_SharedContexts).
- pynetdicom's UID setter (`utils.set_uid`), which every UID of an A-ASSOCIATE-RQ goes
  through, asks `_config.VALIDATORS["UI"]` (configure_receiver_process remembers its answers),
  after pydicom's `UID()`, whose own check only warns (configure_receiver_process turns it off).
- `DULServiceProvider._decode_pdu` triggers EVT_DATA_RECV, decodes the PDU by its type
  (b"\x01": A_ASSOCIATE_RQ, Evt6) and triggers EVT_PDU_RECV; AE-6 only reads the decoded
  A-ASSOCIATE-RQ (`to_primitive` makes new objects), so one decoding serves every association
  that sends the same bytes (_decoded_request).
- The DUL's loop and how node/transport.py makes it wait on the connection instead of sleeping
  (PduSocket is its PromptSocket, the DUL its PromptDul).
- A P-DATA-TF PDU with no PDV items decodes (Evt10) into a P-DATA primitive that the DIMSE
  provider takes without effect (`decode_msg` of no fragments); `assoc.accepted_contexts` and
  `assoc.requestor.maximum_length` hold the negotiated contexts (fixed once in Sta6: read once)
  and the peer's maximum PDU length;
  `dul.to_provider_queue` holds what the association wants sent, `dul._kill_thread` says it is
  being stopped, `dul.state_machine.current_state` is "Sta6" while the association is
  established, and the DUL restarts `dul._idle_timer` only when `_is_transport_event` returns
  (see PduSocket, Direct).
- The acceptor's loop (`Association._run_reactor`) sleeps 1 ms and then waits on
  `assoc._reactor_checkpoint` once a turn, before it looks for a DIMSE message; `kill` sets
  that event. What the DUL has for the association arrives by `put` on `dul.to_user_queue`
  (release and abort requests) and `dimse.msg_queue` (decoded DIMSE messages), both created
  with the association and never replaced: the gate (_ReactorGate) is rung from there.
- EVT_REQUESTED fires on the association's thread before the A-ASSOCIATE-AC is sent (no
  DIMSE message is handled before it returns; the DUL thread may still see the peer go away
  meanwhile); EVT_CONN_CLOSE fires on the DUL thread. On an A-ABORT PDU
  the DUL queues the A-ABORT primitive (`to_user_queue`, seen by `assoc.acse.is_aborted()`)
  before it triggers EVT_CONN_CLOSE; `assoc.is_aborted` is set only later, by the association's
  own thread, which then triggers EVT_ABORTED. A dropped connection queues its A-P-ABORT only
  after EVT_CONN_CLOSE: EVT_ABORTED is the event that sees it.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, cast

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_items import UserIdentitySubItemAC, UserIdentitySubItemRQ, UserInformationItem
from pynetdicom.transport import AssociationServer, RequestHandler

from common import logs
from node.transport import IDLE_WAIT_MS, PromptDul, PromptSocket

log = logging.getLogger("node.receive")

P_DATA_TF = 0x04
# A-ASSOCIATE-RQ, A-RELEASE and A-ABORT PDUs are not bound by the negotiated maximum length.
# The largest real A-ASSOCIATE-RQ (128 presentation contexts with many transfer syntaxes, a
# user identity token) is well under 1 MiB.
NEGOTIATION_PDU_LIMIT = 1 << 20
# PDUs up to this size get their whole buffer at once (the fast path for ordinary PDUs); a
# larger one grows its buffer as bytes arrive, so a peer that lies about a PDU's length costs
# memory only for what it really sends.
EAGER_BUFFER = 4 << 20
NEGOTIATION_EAGER_BUFFER = 64 << 10  # before the A-ASSOCIATE-RQ is in, much less
REQUESTS_REMEMBERED = 16  # distinct A-ASSOCIATE-RQs decoded once (a sender's is the same every time)
REMEMBERED_REQUEST_MAX = 64 << 10  # larger ones (many contexts, a long identity token) are decoded each time
_ASSOCIATE_RQ = b"\x01"
UIDS_REMEMBERED = 2048  # UID validations remembered (a few hundred UIDs in a usual negotiation)
UID_REMEMBERED_MAX = 64  # characters: the longest valid UID
# A-ABORT: source 2 (service provider), reason 6 (invalid PDU parameter value).
A_ABORT_INVALID_PARAMETER = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x06])
# A-ABORT: source 2 (service provider), reason 0 (reason not specified).
A_ABORT_NOT_SPECIFIED = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x00])
# The PDU and DIMSE message deadlines move on by one second for every this many bytes received
# (as Apache's mod_reqtimeout MinRate does): a large transfer over a slow but honest link goes on,
# a peer that trickles bytes to keep its slot does not.
MIN_RATE = 64 << 10  # bytes per second, about 0.5 Mbit/s
DEFAULT_PDU_TIMEOUT = 60.0  # when the AE carries no `pdu_timeout` (see node.config.Timeouts.pdu)
# The longest an association's reactor waits between its own checks (the network idle timer)
# when nothing rings it (see _ReactorGate).
REACTOR_WAIT_S = 0.1
COMMAND_LIMIT = 64 << 10  # command fragments kept to read CommandDataSetType (a command is ~100 bytes)
_COMMAND_DATA_SET_TYPE = 0x0800  # (0000,0800); 0x0101: no data set follows (PS3.7 E.1)
# What the direct C-STORE path answers when the store callback itself fails, as pynetdicom does
# for an exception in an EVT_C_STORE handler (PS3.4 B.2.3: Error, Cannot understand).
HANDLER_FAILED = 0xC211
# The peer's maximum PDU length below which the direct path stays out (its C-STORE-RSP, about
# 200 bytes, goes in one PDU); 0 is "no limit" (PS3.8 D.1).
_DIRECT_MIN_PEER_PDU = 1024

# (association, transfer syntax UID, SOP class UID, SOP instance UID, the data set) -> DIMSE status
DirectStore = Callable[[Association, str, str, str, memoryview], int]


class PduTooLarge(ConnectionAbortedError):
    pass


class TransferTooSlow(ConnectionAbortedError):
    pass


def command_has_data_set(command: bytes | bytearray) -> bool:
    """Whether a DIMSE command set (implicit VR little endian, PS3.7 E.1) announces a data set.
    Unreadable, or without CommandDataSetType: False, so that the data set (if one comes anyway)
    gets its own deadline from its first fragment instead of an idle gap counting against it."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, pos)
        if group != 0 or pos + 8 + length > len(command):
            return False
        if element == _COMMAND_DATA_SET_TYPE:
            return length == 2 and struct.unpack_from("<H", command, pos + 8)[0] != 0x0101
        pos += 8 + length
    return False


class _MessageBounds:
    """Whether a DIMSE message is under way, followed fragment by fragment (PS3.8 E.2): from its
    first fragment to the last fragment of its data set, or of its command set when that
    announces no data set."""

    def __init__(self) -> None:
        self.under_way = False
        self._command_set = bytearray()

    def follow(self, control: int, fragment: bytes | bytearray | memoryview) -> bool:
        """One PDV (its message control header and fragment); True if it began a message."""
        began = not self.under_way
        if began:
            self.under_way = True
            self._command_set.clear()
        if control & 0x01:  # a command fragment
            if len(self._command_set) < COMMAND_LIMIT:
                self._command_set += fragment
            if control & 0x02 and not command_has_data_set(self._command_set):
                self.under_way = False
        elif control & 0x02:  # the last data-set fragment
            self.under_way = False
        return began


def _command_elements(command: bytes | bytearray | memoryview) -> dict[int, bytes] | None:
    """A DIMSE command set's elements (implicit VR little endian, group 0000, PS3.7 E.1) by
    element number; None unless it is exactly such elements, end to end."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos < len(command):
        if pos + 8 > len(command):
            return None
        group, element, length = struct.unpack_from("<HHL", command, pos)
        if group != 0 or pos + 8 + length > len(command) or element in elements:
            return None
        elements[element] = bytes(command[pos + 8:pos + 8 + length])
        pos += 8 + length
    return elements


def _uid_value(value: bytes | None) -> str | None:
    """A UI value as text (its NUL or space padding removed); None unless plain ASCII."""
    if not value:
        return None
    try:
        text = value.decode("ascii").rstrip("\0 ")
    except UnicodeDecodeError:
        return None
    return text if text and len(text) <= 64 and text.isprintable() else None


def _us_value(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, number, len(value)) + value


def _ui(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int, context_id: int) -> bytes:
    """A C-STORE-RSP (PS3.7 9.3.1.2) as one P-DATA-TF PDU: the elements pynetdicom writes for an
    EVT_C_STORE handler's status, in the same order."""
    elements = b"".join((
        _element(0x0002, _ui(sop_class_uid)),
        _element(0x0100, struct.pack("<H", 0x8001)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", 0x0101)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _ui(sop_instance_uid)),
    ))
    command = _element(0x0000, struct.pack("<L", len(elements))) + elements
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv


def _whole_pdvs(body: bytes | bytearray) -> bool:
    """Whether a P-DATA-TF body is PDV items end to end, each with its two header bytes."""
    pos = 0
    while pos < len(body):
        if pos + 6 > len(body):
            return False
        length = int.from_bytes(body[pos:pos + 4], "big")
        if length < 2 or pos + 4 + length > len(body):
            return False
        pos += 4 + length
    return True


@dataclass
class _DirectMessage:
    """A C-STORE-RQ taken by the direct path, its data set being received."""

    context_id: int
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    message_id: int
    data_set: bytearray = field(default_factory=bytearray)


class PduSocket(PromptSocket):
    """pynetdicom's association socket with bounded, timed reads, each PDU read in one piece.

    - **Bounded**: a P-DATA-TF PDU longer than our maximum length (what we announced), or any
      other PDU over NEGOTIATION_PDU_LIMIT, is answered with A-ABORT and the connection closed
      before anything is allocated for it.
    - **Timed**: until the A-ASSOCIATE-RQ has arrived every read must finish by the ACSE
      deadline (connection time + ACSE timeout, however slowly bytes trickle in); afterwards a
      read that makes no progress for the network timeout ends the connection, and so do two
      deadlines that a peer trickling bytes cannot push back: a PDU must be whole within
      `pdu_timeout` of its first byte, and a DIMSE message (command and data set) within the
      DIMSE timeout of its first fragment, each plus one second per MIN_RATE bytes received
      (A-ABORT, event `transfer_too_slow`). The message deadline is checked as its PDUs arrive
      (a peer that goes silent between them meets the network idle timer instead). pynetdicom
      itself handles the idle (no PDU at all) cases: ARTIM before the A-ASSOCIATE-RQ, the
      network idle timer after.
    - **Fast**: pynetdicom reads in 4 KiB pieces (128 recv calls per 0.5 MB image); this reads
      a PDU with ``recv_into`` straight into one buffer. It also re-arms TCP_QUICKACK before
      each read: most modalities and PACS send with Nagle's algorithm on (dcmtk does unless
      TCP_NODELAY=1 is in its environment), so their data-set PDU waits for our ACK of the
      command PDU, which Linux otherwise delays by up to 40 ms.
    - **Prompt**: the DUL does not sleep; `ready` waits instead, until the socket is readable
      or the association has queued a primitive (node/transport.py).
    - **Direct**: with a `direct_store`, a C-STORE-RQ whose command set arrives whole in one PDV
      on an accepted context of its SOP class is taken here, on the DUL's thread: its data-set
      fragments are gathered as they are read, the store is called with the data set, and the
      C-STORE-RSP is written back (`store_response`). pynetdicom's DIMSE path costs about 2 ms
      of Python per instance (a C-STORE handler that does nothing reaches 0.13x dcmtk's storescp
      on small instances, 0.33x on CT); this one, tens of microseconds. Every other message
      (C-ECHO, MPPS, a C-STORE whose command is split, on another context or unreadable) goes to
      pynetdicom untouched: the PDVs left in a PDU are handed on under a rewritten header, and
      a PDU taken whole becomes a P-DATA-TF without PDVs (which the DUL takes without effect)
      unless the next PDU is already on its way and the DUL has nothing to do (a primitive to
      send, a stop): then it is read at once, the DUL's idle timer restarted as the DUL would.
      Messages are taken only in state Sta6 and answered only if it still holds (a message
      under way when the state changes is dropped). A PDU whose PDV items do not tile it
      exactly, and a command fragment or another context's fragment inside a taken message,
      are protocol errors: A-ABORT.
    """

    pdu_limit: int
    message_limit: int
    pdu_timeout: float | None
    _message_bytes: int
    opened_at: float
    peer: str
    _body: int | None
    _body_type: int
    _established: bool
    _timeout: float | None
    _pdu_started: float
    _pdu_bytes: int
    _message_started: float | None
    _message_wire: int
    _message: _MessageBounds
    _bound: tuple[str, float | None] | None
    direct_store: DirectStore | None
    _handed: bytearray | None
    _direct: _DirectMessage | None
    _contexts: dict[int, tuple[str, str]] | None
    _pynetdicoms: _MessageBounds

    def prepare(self, pdu_limit: int, peer: str, message_limit: int,
                pdu_timeout: float | None = DEFAULT_PDU_TIMEOUT, direct_store: DirectStore | None = None) -> None:
        self.direct_store = direct_store
        self._handed = None  # a PDU body the direct path rewrote, for the DUL's next recv
        self._direct = None  # the C-STORE being received directly
        self._contexts = None  # accepted: {context ID: (abstract syntax, transfer syntax)}, once in Sta6
        self._pynetdicoms = _MessageBounds()  # the messages pynetdicom receives: the direct path starts between them
        self.pdu_limit = pdu_limit
        self.message_limit = message_limit
        self.pdu_timeout = pdu_timeout
        self._message_bytes = 0
        self.opened_at = time.monotonic()
        self.peer = peer
        self._body = None
        self._body_type = 0
        self._established = False  # the A-ASSOCIATE-RQ is in: the ACSE deadline no longer applies
        self._timeout = None
        self._pdu_started = self.opened_at  # the PDU being read: its first read, bytes so far
        self._pdu_bytes = 0
        self._message_started = None  # the DIMSE message being received: its first fragment's PDU
        self._message_wire = 0  # bytes of its PDUs before the current one
        self._message = _MessageBounds()
        self._bound = None  # the deadline that set the current read's timeout, if one did
        self.prepare_bell()

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        if self._handed is not None:  # the body under the header the direct path rewrote
            body, self._handed = self._handed, None
            return body
        if self._body is not None and nr_bytes == self._body:  # the body of the last header
            self._body = None
            body = self._read(sock, nr_bytes)
            if self._body_type == 0x01 and len(body) == nr_bytes:
                self._established = True
            elif self._body_type == P_DATA_TF:
                self._count_message(sock, body)
                self._follow_message(body)
            return body
        # a new PDU: pynetdicom reads its header once the socket is readable, so its clock starts here
        data = self._read_header(sock, nr_bytes)
        if self._body_type == P_DATA_TF and self._body is not None and self._established and self.direct_store:
            return self._p_data(sock, data)
        return data

    def _read_header(self, sock: socket.socket, nr_bytes: int = 6) -> bytearray:
        self._pdu_started, self._pdu_bytes = time.monotonic(), 0
        data = self._read(sock, nr_bytes)
        self._body = None
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
            # P-DATA before the association is negotiated gets the negotiation limit too
            limit = self.pdu_limit if pdu_type == P_DATA_TF and self._established else NEGOTIATION_PDU_LIMIT
            if length > limit:
                self._refuse(sock, pdu_type, length, limit)
            self._body = length if 0x01 <= pdu_type <= 0x07 else None
            self._body_type = pdu_type
        return data

    def _p_data(self, sock: socket.socket, header: bytearray) -> bytearray:
        """P-DATA-TF PDUs, read on while the direct path takes them whole (Direct); returns the
        header the DUL gets, its body handed over by the next `recv`. Anything but an OSError
        raised here is a bug: it ends the connection through the DUL's state machine (Evt17, so
        the association's slot and row close as for any dropped connection), logged with where."""
        try:
            return self._read_p_data(sock, header)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the bug guard above
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            logs.event(log, "direct_store_failed", logging.ERROR, peer=self.peer, error=type(exc).__name__,
                       where=f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
            raise ConnectionAbortedError("the direct C-STORE path failed") from exc

    def _read_p_data(self, sock: socket.socket, header: bytearray) -> bytearray:
        while True:
            length = cast(int, self._body)
            self._body = None
            body = self._read(sock, length)
            if len(body) != length:  # the peer went away: the DUL sees the short PDU (Evt17)
                self._handed = body
                return header
            self._count_message(sock, body)
            self._follow_message(body)
            handed = self._take(sock, body)
            if handed or not self._next_is_here():
                self._handed = handed
                return bytearray(struct.pack(">BBL", P_DATA_TF, 0, len(handed)))
            self.assoc.dul._idle_timer.restart()  # as the DUL does after each PDU it reads
            header = self._read_header(sock)
            if self._body_type != P_DATA_TF or self._body is None:  # A-RELEASE-RQ, A-ABORT...: the DUL's
                return header

    def _next_is_here(self) -> bool:
        """Whether another PDU is arriving (within pynetdicom's polling period) while the DUL has
        nothing to send and is not being stopped: the direct path reads it at once."""
        dul = self.assoc.dul
        if not dul.to_provider_queue.empty() or dul._kill_thread:
            return False
        sock = self.socket
        if sock is None or isinstance(sock, ssl.SSLSocket) and sock.pending():
            return sock is not None
        try:
            waiting = select.poll()
            waiting.register(sock, select.POLLIN)
            return bool(waiting.poll(IDLE_WAIT_MS))
        except (OSError, ValueError):
            return False

    def _take(self, sock: socket.socket, body: bytearray) -> bytearray:
        """The PDVs of `body` the direct path takes (a C-STORE's command and data set, which it
        stores and answers); returns the others, for pynetdicom."""
        if not _whole_pdvs(body):  # pynetdicom 3.0 takes a PDV item of length 1 and its DUL thread
            # dies on it (IndexError in DT-2: no A-ABORT, the connection's slot never freed)
            self._abort(sock, "dimse_message_malformed", "a PDV item that is not whole", reason="PDV item length")
        if self._direct is not None and not self._in_sta6():  # released or aborted meanwhile: the
            self._direct = None  # message is not answered; what follows is pynetdicom's, as before
        handed = bytearray()
        view = memoryview(body)
        pos = 0
        while pos < len(body):
            end = pos + 4 + int.from_bytes(body[pos:pos + 4], "big")
            context_id, control = body[pos + 4], body[pos + 5]
            fragment = view[pos + 6:end]
            if self._direct is not None:
                self._receive_data_set(sock, context_id, control, fragment)
            elif not self._pynetdicoms.under_way and control & 0x03 == 0x03 and self._start(context_id, fragment):
                pass
            else:
                self._pynetdicoms.follow(control, fragment)
                handed += view[pos:end]
            pos = end
        return handed

    def _start(self, context_id: int, command: memoryview) -> bool:
        """Take this whole command set if it is a C-STORE-RQ the direct path can answer."""
        elements = _command_elements(command)
        if elements is None or _us_value(elements.get(0x0100)) != 0x0001:  # C-STORE-RQ
            return False
        message_id = _us_value(elements.get(0x0110))
        sop_class, sop_instance = _uid_value(elements.get(0x0002)), _uid_value(elements.get(0x1000))
        data_set_type = _us_value(elements.get(_COMMAND_DATA_SET_TYPE))
        peer_pdu = self.assoc.requestor.maximum_length or 0
        if not self._in_sta6() or 0 < peer_pdu < _DIRECT_MIN_PEER_PDU:
            return False
        priority = _us_value(elements.get(0x0700))
        if None in (message_id, sop_class, sop_instance, priority) or data_set_type in (None, 0x0101):
            return False
        if self._contexts is None:  # fixed once the association is established (pynetdicom sorts
            # them anew on every access: 11 µs per C-STORE with the ~120 contexts dcmtk proposes)
            self._contexts = {c.context_id: (str(c.abstract_syntax), str(c.transfer_syntax[0]))
                              for c in self.assoc.accepted_contexts if c.context_id and c.transfer_syntax}
        context = self._contexts.get(context_id)
        if context is None or context[0] != sop_class:
            return False
        self._direct = _DirectMessage(context_id, context[1], sop_class, sop_instance, message_id)
        return True

    def _receive_data_set(self, sock: socket.socket, context_id: int, control: int, fragment: memoryview) -> None:
        message = cast(_DirectMessage, self._direct)
        if control & 0x01 or context_id != message.context_id:
            self._abort(sock, "dimse_message_malformed", "a command or another context's fragment inside a data set",
                        reason="fragment out of place", context_id=context_id)
        message.data_set += fragment
        if control & 0x02:
            self._direct = None
            if self._in_sta6():  # not after a release or an abort began: pynetdicom would not answer
                self._answer(sock, message)

    def _in_sta6(self) -> bool:
        """Whether the association is established (PS3.8 9.2, Sta6: ready for data transfer)."""
        return bool(self.assoc.is_established) and self.assoc.dul.state_machine.current_state == "Sta6"

    def _answer(self, sock: socket.socket, message: _DirectMessage) -> None:
        """Store the data set and send the C-STORE-RSP (after the store: the acknowledgement).
        A response that cannot be sent ends the connection as a failed read does (Evt17)."""
        store = cast(DirectStore, self.direct_store)
        try:
            status = store(self.assoc, message.transfer_syntax, message.sop_class_uid, message.sop_instance_uid,
                           memoryview(message.data_set))
        except Exception as exc:  # as pynetdicom answers for a failing EVT_C_STORE handler
            logs.event(log, "store_handler_failed", logging.ERROR, error=type(exc).__name__,
                       sop_instance_uid=message.sop_instance_uid)
            status = HANDLER_FAILED
        try:  # within the network timeout, not what is left of the next read's deadline
            sock.settimeout(self.assoc.network_timeout)
            self._timeout = self.assoc.network_timeout
            sock.sendall(store_response(message.sop_class_uid, message.sop_instance_uid, message.message_id,
                                        status, message.context_id))
        except OSError as exc:
            logs.event(log, "store_response_not_sent", logging.WARNING, peer=self.peer, status=f"0x{status:04X}",
                       sop_instance_uid=message.sop_instance_uid, error=type(exc).__name__)
            raise ConnectionResetError("the C-STORE-RSP could not be sent") from exc

    def _arm_timeout(self, sock: socket.socket, expected: int) -> None:
        """Before each read: the network timeout, cut to what is left to the nearest deadline."""
        assoc = self.assoc
        if not self._established and assoc.is_established:
            self._established = True
        self._bound = None
        if self._established:
            timeout = assoc.network_timeout
            deadline, what, limit = self._deadline()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._too_slow(sock, what, limit, expected)
                if timeout is None or left < timeout:
                    timeout, self._bound = left, (what, limit)
        else:
            acse = assoc.acse_timeout
            timeout = None if acse is None else max(0.001, self.opened_at + acse - time.monotonic())
        if timeout != self._timeout:
            sock.settimeout(timeout)
            self._timeout = timeout

    def _deadline(self) -> tuple[float | None, str, float | None]:
        """(the nearest deadline, "pdu" or "message", its timeout) for the read about to be made."""
        deadline, what, limit = None, "", None
        if self.pdu_timeout is not None:
            deadline = self._pdu_started + self.pdu_timeout + self._pdu_bytes / MIN_RATE
            what, limit = "pdu", self.pdu_timeout
        dimse = self.assoc.dimse_timeout
        if self._message_started is not None and dimse is not None:
            message = self._message_started + dimse + (self._message_wire + self._pdu_bytes) / MIN_RATE
            if deadline is None or message < deadline:
                deadline, what, limit = message, "message", dimse
        return deadline, what, limit

    def _too_slow(self, sock: socket.socket, what: str, limit: float | None, expected: int) -> None:
        """A-ABORT: the PDU or DIMSE message being received missed its deadline. `received`: its
        bytes so far (PDU headers included); `expected`: the size of the read that was under way."""
        started = self._pdu_started if what == "pdu" else cast(float, self._message_started)
        received = self._pdu_bytes + (self._message_wire if what == "message" else 0)
        self._abort(sock, "transfer_too_slow", f"{'PDU' if what == 'pdu' else 'DIMSE message'} not whole "
                    "within its deadline", A_ABORT_NOT_SPECIFIED, TransferTooSlow,
                    deadline=what, timeout_s=limit, seconds=round(time.monotonic() - started, 3),
                    received=received, expected=expected)

    def _follow_message(self, body: bytearray) -> None:
        """Where the DIMSE message being received begins and ends (for its deadline): from its
        first fragment to the last fragment of its data set, or of its command when that
        announces no data set."""
        pos = 0
        view = memoryview(body)
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos:pos + 4], "big")
            if self._message.follow(body[pos + 5], view[pos + 6:pos + 4 + length]):
                self._message_started, self._message_wire = self._pdu_started, 0
            if not self._message.under_way:
                self._message_started = None
            pos += 4 + length
        if self._message_started is not None:
            self._message_wire += self._pdu_bytes

    def _count_message(self, sock: socket.socket, body: bytearray) -> None:
        """Add up the data-set fragments (PDV items) of the DIMSE message being received; abort it
        past `message_limit`. pynetdicom collects a whole message in memory before any handler
        sees it, so this is the only place a never-ending message can be stopped."""
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos:pos + 4], "big")
            control = body[pos + 5]
            if not control & 0x01:  # bit 0 clear: a data-set fragment (set: a command fragment)
                self._message_bytes += max(length - 2, 0)
                if self._message_bytes > self.message_limit:
                    self._abort(sock, "instance_too_large", f"a data set over {self.message_limit >> 20} MiB",
                                received=self._message_bytes, limit=self.message_limit)
                if control & 0x02:  # bit 1: the last fragment
                    self._message_bytes = 0
            pos += 4 + length

    def _read(self, sock: socket.socket, nr_bytes: int) -> bytearray:
        try:  # before every read: a sender with Nagle on waits for our ACK of its last segment
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        buffer = bytearray(min(nr_bytes, EAGER_BUFFER if self._established else NEGOTIATION_EAGER_BUFFER))
        received = 0
        try:
            while received < nr_bytes:
                self._arm_timeout(sock, nr_bytes)
                if received == len(buffer):  # only for PDUs over EAGER_BUFFER: grow as data arrives
                    buffer += bytearray(min(len(buffer), nr_bytes - len(buffer)))
                with memoryview(buffer) as view:
                    count = sock.recv_into(view[received:])
                if not count:  # connection closed: return what arrived, as pynetdicom does
                    return buffer[:received]
                received += count
                self._pdu_bytes += count
        except TimeoutError:
            if self._bound is not None:  # the read timed out at a deadline, not the network timeout
                self._too_slow(sock, *self._bound, nr_bytes)
            logs.event(log, "connection_timed_out", logging.WARNING, peer=self.peer,
                       phase="association" if self._established else "negotiation",
                       received=received, expected=nr_bytes)
            raise
        return buffer

    def _refuse(self, sock: socket.socket, pdu_type: int, length: int, limit: int) -> None:
        self._abort(sock, "pdu_too_large", f"PDU of {length} bytes over the limit of {limit}",
                    pdu_type=pdu_type, length=length, limit=limit)

    def _abort(self, sock: socket.socket, event: str, why: str, abort: bytes = A_ABORT_INVALID_PARAMETER,
               error: type[ConnectionAbortedError] = PduTooLarge, **fields: object) -> None:
        logs.event(log, event, logging.WARNING, peer=self.peer, **fields)
        try:
            sock.settimeout(1.0)
            self._timeout = 1.0
            sock.sendall(abort)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise error(why)


class _WakingDul(PromptDul):
    """The prompt DUL (node/transport.py) whose end also rings the association's gate, and
    which decodes an A-ASSOCIATE-RQ it has seen before only once (_decoded_request)."""

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] != _ASSOCIATE_RQ or len(bytestream) > REMEMBERED_REQUEST_MAX:
            return super()._decode_pdu(bytestream)
        # pynetdicom's _decode_pdu, with the decoding remembered (the events as it triggers them)
        data = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
        pdu = _decoded_request(data)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"

    def ended(self) -> None:
        gate = getattr(self.assoc, "_reactor_checkpoint", None)
        if isinstance(gate, _ReactorGate):  # the association's loop sees the DUL gone
            gate.ring()


def _decoded_request(data: bytes) -> A_ASSOCIATE_RQ:
    """A decoded A-ASSOCIATE-RQ PDU, shared by the associations that sent these very bytes.

    A sender proposes the same contexts on every association, and decoding storescu's 128 took
    5 ms of CPU per association (each UID built and validated). The PDU is only read after its
    decoding: AE-6 builds the association's own A-ASSOCIATE primitive from it (to_primitive
    makes new objects; pinned by a test) and drops it. One that fails to decode is not kept,
    nor one that carries a user identity (its password or token is kept no longer than its
    association keeps it).
    """
    with _REQUESTS_LOCK:
        pdu = _REQUESTS.get(data)
        if pdu is not None:
            _REQUESTS.move_to_end(data)
            return pdu
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    if not _carries_identity(pdu):
        with _REQUESTS_LOCK:
            _REQUESTS[data] = pdu
            while len(_REQUESTS) > REQUESTS_REMEMBERED:
                _REQUESTS.popitem(last=False)
    return pdu


def _carries_identity(pdu: A_ASSOCIATE_RQ) -> bool:
    """Whether any item of the request, or of any of its user information items, is a user
    identity (`pdu.user_information` names the first user information item only)."""
    items = list(pdu.variable_items)
    items += [sub for item in items if isinstance(item, UserInformationItem) for sub in item.user_data]
    return any(isinstance(item, (UserIdentitySubItemRQ, UserIdentitySubItemAC)) for item in items)


_REQUESTS: OrderedDict[bytes, A_ASSOCIATE_RQ] = OrderedDict()
_REQUESTS_LOCK = threading.Lock()


class _ReactorGate(threading.Event):
    """The association's reactor checkpoint (`assoc._reactor_checkpoint`), which pynetdicom's
    acceptor loop waits on once a turn, after sleeping 1 ms: here the wait also lasts until
    something for the association arrives (`ring`: a DIMSE message the direct path left to
    pynetdicom, a release or abort request, the DUL's end) or REACTOR_WAIT_S passes (the
    network idle timer), unless something is still queued (the loop takes one message a turn).
    pynetdicom's own uses are unchanged: `clear` pauses the loop (a wait that began before
    holds on until it is resumed), `set` resumes it (and rings: `kill` sets it to let the loop
    end). Without it every association's thread turns 1,000 times a second for nothing while
    the direct path stores its instances (measured: 1.55 -> 1.31 ms of node CPU per small
    instance over four associations)."""

    def __init__(self, pending: Callable[[], bool] = lambda: False) -> None:
        self._bell = threading.Event()
        self._pending = pending
        super().__init__()
        super().set()

    def ring(self) -> None:
        self._bell.set()

    def set(self) -> None:
        super().set()
        self._bell.set()

    def wait(self, timeout: float | None = None) -> bool:
        while True:
            if not super().wait(timeout):  # paused by pynetdicom (and `timeout` passed)
                return False
            if not self._pending():
                self._bell.wait(REACTOR_WAIT_S)
            # What rings has queued its news first: cleared before the loop looks, nothing is missed.
            self._bell.clear()
            if super().is_set() or timeout is not None:
                return super().is_set()


class _RingingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue of the DUL's for the association (`to_user_queue`, the DIMSE provider's
    `msg_queue`) that rings the association's gate with each item put on it."""

    def __init__(self, gate: _ReactorGate):
        super().__init__()
        self.gate = gate

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.gate.ring()


def _gate_reactor(assoc: Association) -> None:
    """Give a new acceptor association (threads not yet started) the gate and ringing queues."""
    gate = _ReactorGate(lambda: not (assoc.dul.to_user_queue.empty() and assoc.dimse.msg_queue.empty()))
    assoc._reactor_checkpoint = gate
    assoc.dul.to_user_queue = _RingingQueue(gate)
    assoc.dimse.msg_queue = _RingingQueue(gate)


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        _gate_reactor(assoc)
        sock = assoc.dul.socket
        # Same objects, same state: only the read and wait methods change (see PduSocket).
        sock.__class__ = PduSocket
        _WakingDul.adopt(assoc.dul)
        cast(PduSocket, sock).prepare(int(self.ae.maximum_pdu_size or 0) or (1 << 30),
                                      str(self.client_address[0]),
                                      int(getattr(self.ae, "max_message_bytes", 0)) or (1 << 62),
                                      getattr(self.ae, "pdu_timeout", DEFAULT_PDU_TIMEOUT),
                                      getattr(self.ae, "direct_store", None))
        return assoc


def configure_receiver_process() -> None:
    """pynetdicom's configuration in a receiver process, set once before it takes a connection.

    Its default event handlers decode every command set for debug logs: off. Its UID validator
    (`_config.VALIDATORS["UI"]`, the documented hook) runs on every UID of every A-ASSOCIATE-RQ
    as it is decoded, turned into a primitive, negotiated and answered: over 1,000 times for
    storescu's 128 proposed contexts, for the same few hundred UIDs each time. It is remembered
    by value (and by the conformance setting it reads): 6-7 ms less per association.

    pydicom's reading validation is off (`reading_validation_mode`, IGNORE): `UID()` checks
    every UID it builds by regex again, and pynetdicom builds each proposed context's UIDs
    three times per association (the primitive, the negotiation, the answer). All it would do
    is warn (the mode is WARN by default), and a library's warnings are DEBUG chatter in the
    node's log: pynetdicom's validator above still decides on the request's UIDs, and the
    receiver checks the UIDs it files itself (node.store.spool.checked_uid). A receiver's
    CPU per association 22.0 -> 18.7 ms (medians of three runs of 60 associations each).
    """
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    validate = pynetdicom_config.VALIDATORS["UI"]
    if not isinstance(validate, _RememberedUidValidator):
        pynetdicom_config.VALIDATORS["UI"] = _RememberedUidValidator(validate)


class _RememberedUidValidator:
    """A UID validator that remembers its answers (bounded in number and size: a peer may send
    any UIDs)."""

    def __init__(self, validate: Callable[[Any], tuple[bool, str]]):
        self.validate = validate
        self._remembered = lru_cache(maxsize=UIDS_REMEMBERED)(self._answer)

    def __call__(self, value: Any) -> tuple[bool, str]:
        # a longer one is invalid anyway, and a peer may send UIDs of up to 64 KB: not kept
        if not isinstance(value, str) or len(value) > UID_REMEMBERED_MAX:
            return self.validate(value)
        return self._remembered(str(value), bool(pynetdicom_config.ENFORCE_UID_CONFORMANCE))

    def _answer(self, value: str, conformance: bool) -> tuple[bool, str]:
        return self.validate(value)


class _SharedContexts(list):
    """The server's supported presentation contexts, handed to every association as they are.

    pynetdicom deep-copies them for each association: for the 170 storage SOP classes with 16
    transfer syntaxes each that is 35 ms of CPU (every UID is built and validated again), more
    than a small series' instances take to store. The association only reads them (negotiation
    builds new contexts for its answer), so a copy of the list, not of its contexts, does.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SharedContexts":
        return _SharedContexts(self)


class HandedServer(AssociationServer):
    """A pynetdicom server that does not listen: connections are handed to it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, request_handler=_RequestHandler, **kwargs)
        self.contexts = _SharedContexts(self.contexts)

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass


def requested_titles(assoc: Association) -> tuple[str, str]:
    """(calling, called) AE titles as the peer put them in its A-ASSOCIATE-RQ."""
    primitive = assoc.requestor.primitive

    def text(value: Any) -> str:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return str(value or "").strip()

    return text(getattr(primitive, "calling_ae_title", "")), text(getattr(primitive, "called_ae_title", ""))


def answer_as(assoc: Association, ae_title: str) -> None:
    """Make the A-ASSOCIATE-AC carry `ae_title` as the called AE (PS3.8: as requested)."""
    try:
        assoc.acceptor.ae_title = ae_title
    except ValueError:  # not a valid AE title: answer with our own
        pass


def reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Send A-ASSOCIATE-RJ from an EVT_REQUESTED handler and end the association."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def ended_in_abort(assoc: Association) -> bool:
    """Whether the association ended in an A-ABORT (or the node's own abort), asked at
    EVT_CONN_CLOSE: `is_aborted` alone is set only once the association's thread has taken the
    abort from the DUL's queue. A dropped connection is not seen here yet (EVT_ABORTED is)."""
    return bool(assoc.is_aborted or assoc.acse.is_aborted())
