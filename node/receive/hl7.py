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


@dataclass(frozen=True)
class Reading:
    """What a message says: `accession` complete (None: it signals nothing), or an error to NAK."""

    message_type: str
    control_id: str
    accession: str | None = None
    ack: str = "AA"
    error: tuple[int, str] | None = None  # HL7 table 0357 code and text


def _values(message: hl7.Message, segment: str, field: int, component: int = 1) -> list[str]:
    """A component of a field's first repetition in each segment of that name ([] when absent)."""
    try:
        segments = message.segments(segment)
    except KeyError:
        return []
    values = []
    for each in segments:
        try:
            values.append(str(each.extract_field(field_num=field, component_num=component)).strip())
        except IndexError:
            values.append("")
    return values


def _field(message: hl7.Message, segment: str, field: int, component: int = 1) -> str:
    """The component in the first segment of that name, or ""."""
    return next(iter(_values(message, segment, field, component)), "")


def read_message(message: hl7.Message) -> Reading:
    """Interpret one parsed message (no side effect)."""
    message_type = f"{_field(message, 'MSH', 9, 1)}^{_field(message, 'MSH', 9, 2)}"
    control_id = _field(message, "MSH", 10)[:64]
    if message_type in COMPLETE_ORDER_TYPES:
        complete = "CM" in _values(message, "ORC", 5)
    elif message_type in RESULT_TYPES:
        complete = "F" in _values(message, "OBR", 25)
    else:
        return Reading(message_type, control_id, ack="AR", error=(200, "unsupported message type"))
    if not complete:
        return Reading(message_type, control_id)  # an order or result that does not say "done"
    accession = next((a for a in (_field(message, "IPC", 1), _field(message, "OBR", 18),
                                  _field(message, "OBR", 3)) if a), "")
    if not accession:
        return Reading(message_type, control_id, ack="AE",
                       error=(101, "no accession number (IPC-1, OBR-18 or OBR-3)"))
    return Reading(message_type, control_id, accession=accession[:64])


def acknowledgement(message: hl7.Message, reading: Reading) -> str:
    ack = message.create_ack(reading.ack)
    text = str(ack)
    if reading.error is not None:
        code, why = reading.error
        text = text.rstrip("\r") + f"|{why}\rERR|||{code}^{why}^HL70357|E"
    return text.rstrip("\r") + "\r"


def _minimal_nak(why: str) -> str:
    """For a message whose MSH cannot be read: there is nothing to echo, so the fields are ours
    (the hl7 package builds ACKs only from a parsed message)."""
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    return (f"MSH|^~\\&|DICOM-NODE||||{now}||ACK|{uuid.uuid4().hex[:20]}|P|2.5\r"
            f"MSA|AR||{why}\rERR|||102^{why}^HL70357|E\r")


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
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("", 0))[0]
        if not self.config.admits(peer) or self._connections >= self.config.max_connections:
            logs.event(log, "hl7_connection_refused", logging.WARNING, peer=peer,
                       reason="not an allowed host" if not self.config.admits(peer) else "too many connections")
            writer.close()
            return
        self._connections += 1
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.config.timeout_s)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return  # idle past the timeout, or the peer closed
                except hl7.mllp.InvalidBlockError:
                    await self._reply(writer, _minimal_nak("not an MLLP block"), "invalid_block")
                    return  # the framing is lost: the rest of the stream cannot be trusted
                except ValueError:  # longer than max_message_kb
                    await self._reply(writer, _minimal_nak("message too large"), "too_large")
                    return
                await self._reply(writer, *await asyncio.to_thread(self._handle, block))
        finally:
            self._connections -= 1
            writer.close()

    @staticmethod
    async def _reply(writer: hl7.mllp.HL7StreamWriter, ack: str, outcome: str) -> None:
        writer.writeblock(ack.encode("utf-8"))
        await writer.drain()
        if outcome in ("invalid_block", "too_large"):
            logs.event(log, "hl7_refused", logging.WARNING, reason=outcome)

    def _handle(self, block: bytes) -> tuple[str, str]:
        """(the acknowledgement, the outcome) for one message; stored before it is acknowledged."""
        try:
            message = hl7.parse(block.decode("utf-8", errors="replace"))
            message.segment("MSH")
        except Exception:  # noqa: BLE001 - the parser raises many types on malformed input
            logs.event(log, "hl7_refused", logging.WARNING, reason="cannot be parsed")
            return _minimal_nak("the message cannot be parsed"), "unparsed"
        try:
            reading = read_message(message)
        except Exception:  # noqa: BLE001 - a field the parser accepted but cannot give back
            reading = Reading("", "", ack="AE", error=(102, "a field cannot be read"))
        studies: list[str] | None = []
        if reading.accession is not None:
            source = _field(message, "MSH", 3)[:64]
            key = f"hl7:{source}:{_field(message, 'MSH', 4)[:64]}:{reading.control_id or uuid.uuid4().hex}"
            try:
                studies = self.signals.create_hl7(key, reading.accession, f"HL7:{source}", time.time())
            except SQLAlchemyError as exc:
                reading = Reading(reading.message_type, reading.control_id, ack="AE",
                                  error=(207, f"index: {type(exc).__name__}; send it again"))
        logs.event(log, "hl7_received" if reading.ack == "AA" else "hl7_refused",
                   logging.INFO if reading.ack == "AA" else logging.WARNING, message_type=reading.message_type,
                   control_id=reading.control_id, ack=reading.ack, signal=reading.accession is not None,
                   resend=studies is None, studies=len(studies or []),
                   reason=reading.error[1] if reading.error else None)
        for study_uid in studies or []:
            self.on_signal(study_uid)
        return acknowledgement(message, reading), reading.ack
