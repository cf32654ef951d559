"""HL7 v2 over MLLP: the RIS tells the node that an exam is complete.

An order whose status became complete (ORM^O01 or OMI^O23 with ORC-5 "CM") or a final result
(ORU^R01 with OBR-25 "F") names the exam by its accession number: IPC-1 (OMI, IHE RAD-4 in
v2.5.1), else OBR-18 (ORM, IHE SWF in v2.3.1), else the filler order number OBR-3. The node
stores it as a completion signal (node.store.signals) before it acknowledges (a SIGKILL after
the ACK loses nothing) and the study with that accession completes once no instance arrived for
`completion.hl7_settle_s`. A message may come before the images: it waits for them.

Acknowledgements are HL7 original mode (HL7 v2.5 chapter 2.9.2; codes from tables 0008 and 0357):
AA accepted (a completion signal, or a supported message that signals nothing), AE for a
message the node cannot use (no accession number: 101; the index cannot be written: 207, resend
later), AR for a message type the node does not take (200) or a message that cannot be parsed
(a minimal ACK, since its MSH cannot be echoed). A resend of a message the node holds (same
sender and control id) is acknowledged again and changes nothing.

The `hl7` package parses and frames (MLLP); the connection handling is asyncio in one thread of
the service process, bounded in message size, connections and idle time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import hl7
import hl7.mllp
from sqlalchemy.exc import SQLAlchemyError

from common import logs
from node.config import Hl7Config
from node.store.signals import CompletionSignals

log = logging.getLogger("node.receive.hl7")

COMPLETE_ORDER_TYPES = ("ORM^O01", "OMI^O23")
RESULT_TYPES = ("ORU^R01",)
START_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Reading:
    """What a message says: the accession numbers of its complete orders or final results (none:
    it signals nothing), or an error to NAK."""

    message_type: str
    control_id: str
    accessions: tuple[str, ...] = ()
    ack: str = "AA"
    error: tuple[int, str] | None = None  # HL7 table 0357 code and text


def _value(segment: hl7.Segment, field: int, component: int = 1) -> str:
    try:
        # NUL is no text, and PostgreSQL refuses it in any text value (as node.routing_tags)
        return str(segment.extract_field(field_num=field, component_num=component)).replace("\x00", "").strip()
    except (IndexError, KeyError):
        return ""


def _field(message: hl7.Message, segment: str, field: int, component: int = 1) -> str:
    """A component of a field in the first segment of that name, or ""."""
    try:
        return _value(message.segment(segment), field, component)
    except KeyError:
        return ""


def _orders(message: hl7.Message) -> list[dict[str, str]]:
    """The message's orders in segment order: an ORC starts one (ORM, OMI); in a result (ORU),
    where the ORC is optional, each OBR is one. Per order: its status and its accession number
    (IPC-1, else OBR-18, else OBR-3)."""
    result = _field(message, "MSH", 9) == "ORU"
    orders: list[dict[str, str]] = []
    for segment in message:
        name = str(segment[0][0]) if len(segment) and len(segment[0]) else ""
        if name == "ORC" and not result or name == "OBR" and (result or not orders):
            orders.append({"status": _value(segment, 5) if name == "ORC" else ""})
        elif name == "OBR" and "obr3" in orders[-1]:  # a second OBR under one ORC: an order of its own
            orders.append({"status": orders[-1]["status"]})
        if not orders:
            continue
        order = orders[-1]
        if name == "OBR":
            order.setdefault("obr18", _value(segment, 18))
            order.setdefault("obr3", _value(segment, 3))
            if result:
                order["status"] = _value(segment, 25)
        elif name == "IPC":
            order.setdefault("ipc1", _value(segment, 1))
    return [{"status": o["status"], "accession": (o.get("ipc1") or o.get("obr18") or o.get("obr3") or "")[:64]}
            for o in orders]


def read_message(message: hl7.Message) -> Reading:
    """Interpret one parsed message (no side effect): every order whose status says complete
    (ORC-5 CM) or result that is final (OBR-25 F) names its accession number."""
    message_type = f"{_field(message, 'MSH', 9, 1)}^{_field(message, 'MSH', 9, 2)}"
    control_id = _field(message, "MSH", 10)
    if message_type not in COMPLETE_ORDER_TYPES + RESULT_TYPES:
        return Reading(message_type, control_id, ack="AR", error=(200, "unsupported message type"))
    orders = _orders(message)
    if not orders:
        return Reading(message_type, control_id, ack="AE", error=(100, "no ORC or OBR segment"))
    done = "F" if message_type in RESULT_TYPES else "CM"
    complete = [o["accession"] for o in orders if o["status"] == done]
    accessions = tuple(dict.fromkeys(a for a in complete if a))
    if len(accessions) < len(set(complete)):  # the orders that name one still count
        return Reading(message_type, control_id, accessions, ack="AE",
                       error=(101, "no accession number (IPC-1, OBR-18 or OBR-3)"))
    return Reading(message_type, control_id, accessions)


def acknowledgement(message: hl7.Message, reading: Reading) -> str:
    """The original-mode ACK, in the message's own delimiters (the hl7 package builds it)."""
    ack = message.create_ack(reading.ack)
    if reading.error is not None:
        code, why = reading.error
        ack.segment("MSA").assign_field(why, 3)
        err = ack.create_segment([ack.create_field(["ERR"])])
        err.assign_field(str(code), 3, 1, 1)
        err.assign_field(why, 3, 1, 2)
        err.assign_field("HL70357", 3, 1, 3)
        err.assign_field("E", 4)
        ack.append(err)
    return str(ack).rstrip("\r") + "\r"


def _minimal_nak(why: str) -> str:
    """For a message whose MSH cannot be read or answered: there is nothing to echo, so the
    fields are ours (the hl7 package builds ACKs only from a parsed message)."""
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return (f"MSH|^~\\&|DICOM-NODE||||{now}||ACK|{uuid.uuid4().hex[:20]}|P|2.5\r"
            f"MSA|AR||{why}\rERR|||102^{why}^HL70357|E\r")


def _text(block: bytes) -> tuple[str, str]:
    """The message as text with its segments separated by CR, and the codec that read it: UTF-8,
    else Latin-1 (HL7's default character set when MSH-18 is empty). A message without a CR is
    taken as LF-separated (seen from interface engines); in one with CRs an LF is text (a report's
    line break in OBX-5). Empty segments (a blank line) are dropped."""
    try:
        text, codec = block.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, codec = block.decode("latin-1"), "latin-1"
    separator = "\r" if "\r" in text.replace("\r\n", "") else "\n"
    segments = text.replace("\r\n", separator).split(separator)
    return "\r".join(s for s in segments if s.strip()) + "\r", codec


def _delimiters_valid(message: hl7.Message) -> bool:
    """HL7 v2.5.1 2.5.4: the field, repetition, component and sub-component separators are
    distinct symbols. A letter or digit among them (or as the escape character) takes segment
    names and values apart, and an acknowledgement in the message's own delimiters would not
    parse (found by fuzzing: MSH|^AA&). The escape character may equal a separator: the hl7
    package makes it so when a sender leaves it out (`^~&`) or doubles it (`^~\\&`), and those
    messages read and are answered fine."""
    separators = message.separators[1:]
    return (len(set(separators)) == len(separators)
            and not any(c.isalnum() or c.isspace() for c in separators + message.esc))


def _signal_key(message: hl7.Message, accession: str) -> str:
    """The same message (sender, facility, control id) about the same accession: one signal.
    A hash, so that long or odd values cannot collide by truncation or a separator."""
    sender = "\x1f".join(_field(message, "MSH", n) for n in (3, 4, 10))
    digest = hashlib.sha256(f"{sender}\x1f{accession}".encode()).hexdigest()[:40]
    return f"hl7:{digest}" if _field(message, "MSH", 10) else f"hl7:{uuid.uuid4().hex}"


class Hl7Listener:
    """The MLLP server: one asyncio loop in a daemon thread of the service process."""

    def __init__(self, config: Hl7Config, signals: CompletionSignals, on_signal: Callable[[str], None]):
        self.config = config
        self.signals = signals
        self.on_signal = on_signal
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._connections = 0

    def start(self) -> int:
        """Listen (raises OSError when the port cannot be bound); returns the port."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(hl7.mllp.start_hl7_server(
                    self._serve, self.config.bind, self.config.port, limit=self.config.max_message_kb * 1024))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="hl7-listener", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise OSError("the HL7 listener did not start")
        if failure:
            raise failure[0]
        assert self.port is not None
        return self.port

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def close() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("", 0))[0]
        if not self.config.admits(peer) or self._connections >= self.config.max_connections:
            logs.event(log, "hl7_connection_refused", logging.WARNING, peer=peer,
                       reason="not an allowed host" if not self.config.admits(peer) else "too many connections")
            writer.transport.abort()
            return
        self._connections += 1
        try:
            while await self._next(reader, writer):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one connection's failure never stops the listener
            logs.event(log, "hl7_connection_failed", logging.WARNING, peer=peer, error=type(exc).__name__)
        finally:
            self._connections -= 1
            await self._close(writer)

    @staticmethod
    async def _close(writer: hl7.mllp.HL7StreamWriter) -> None:
        """Close after what was written (a NAK) went out; a peer that does not take it is cut off."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()

    async def _next(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> bool:
        """Read, store and acknowledge one message; False: the connection ends."""
        try:
            block = await asyncio.wait_for(reader.readblock(), self.config.timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return False  # idle past the timeout, or the peer closed
        except hl7.mllp.InvalidBlockError:
            logs.event(log, "hl7_refused", logging.WARNING, reason="not an MLLP block")
            await self._reply(writer, _minimal_nak("not an MLLP block"))
            return False  # the framing is lost: the rest of the stream cannot be trusted
        except ValueError:  # longer than max_message_kb
            logs.event(log, "hl7_refused", logging.WARNING, reason="message too large")
            await self._reply(writer, _minimal_nak("message too large"))
            return False
        return await self._reply(writer, *await asyncio.to_thread(self._handle, block))

    async def _reply(self, writer: hl7.mllp.HL7StreamWriter, ack: str, codec: str = "utf-8") -> bool:
        """Send the ACK (in the message's own encoding); a peer that does not read it within the
        timeout loses its connection."""
        writer.writeblock(ack.encode(codec, errors="replace"))
        try:
            await asyncio.wait_for(writer.drain(), self.config.timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()
            return False
        return True

    def _handle(self, block: bytes) -> tuple[str, str]:
        """The acknowledgement of one message and its encoding; its signals are stored before
        it is acknowledged."""
        text, codec = _text(block)
        try:
            message = hl7.parse(text)
            message.segment("MSH")
        except Exception:  # noqa: BLE001 - the parser raises many types on malformed input
            logs.event(log, "hl7_refused", logging.WARNING, reason="cannot be parsed")
            return _minimal_nak("the message cannot be parsed"), codec
        if not _delimiters_valid(message):
            logs.event(log, "hl7_refused", logging.WARNING, reason="invalid delimiters")
            return _minimal_nak("the separators are not distinct symbols"), codec
        try:
            reading = read_message(message)
        except Exception:  # noqa: BLE001 - a field the parser accepted but cannot give back
            reading = Reading("", "", ack="AE", error=(102, "a field cannot be read"))
        studies: list[str] = []
        resends = 0
        source = _field(message, "MSH", 3)[:64]
        try:
            for accession in reading.accessions:
                found = self.signals.create_hl7(_signal_key(message, accession), accession, f"HL7:{source}",
                                                time.time())
                resends += found is None
                studies += found or []
        except SQLAlchemyError as exc:
            reading = Reading(reading.message_type, reading.control_id, ack="AE",
                              error=(207, f"index: {type(exc).__name__}; send it again"))
        logs.event(log, "hl7_received" if reading.ack == "AA" else "hl7_refused",
                   logging.INFO if reading.ack == "AA" else logging.WARNING, message_type=reading.message_type,
                   control_id=reading.control_id[:64], ack=reading.ack, signals=len(reading.accessions),
                   resend=bool(reading.accessions) and resends == len(reading.accessions), studies=len(studies),
                   reason=reading.error[1] if reading.error else None)
        for study_uid in dict.fromkeys(studies):
            self.on_signal(study_uid)
        try:
            return acknowledgement(message, reading), codec
        except Exception:  # noqa: BLE001 - an MSH the parser took but an ACK cannot echo
            logs.event(log, "hl7_refused", logging.WARNING, reason="the header cannot be answered")
            return _minimal_nak("the message header cannot be answered"), codec
