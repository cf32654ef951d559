"""The fuzz targets: every parser the node owns or calls on bytes from a peer before it answers,
each wrapped in a harness that checks what the node promises of it (README, "Fuzzing").

A harness takes one input (bytes from the fuzzer, or a corpus file) and returns quietly when
every invariant held; a broken invariant raises `InvariantBroken`, and any other exception is a
finding as well (a parser must answer with its own refusal, never an unexpected exception).
Allocation is bounded per input (`allocation_ceiling`, with tracemalloc); time is bounded by
the fuzzer (libFuzzer's -timeout) and by the replay test's per-test timeout.

The same harnesses run under atheris (tests/fuzz/run.py, coverage-guided) and in-process over
the committed corpora (tests/test_fuzz.py: every seed and every minimised finding is a
regression test).
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import struct
import tracemalloc
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from unittest import mock

import hl7
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from node.config import Hl7Config
from node.console.limits import FORM_LIMITS, BodyLimit, BodyTooLarge
from node.receive.hl7 import Hl7Listener
from node.receive.pynetdicom_internals import (
    A_ABORT_INVALID_PARAMETER,
    A_ABORT_NOT_SPECIFIED,
    NEGOTIATION_PDU_LIMIT,
    P_DATA_TF,
    PduSocket,
)
from node.receive.store import Incoming
from node.receive.stow import MAX_PARTS, Part, StowError, StowRequest, boundary_of, incoming
from node.receive import tags as tags_module
from node.receive.tags import RoutingTags, UnreadableDataset, read_routing_tags
from node.receive.validate import MalformedDataset, check_dataset, inflate
from node.store.filemeta import encode_file_meta
from node.store.spool import checked_uid


class InvariantBroken(AssertionError):
    """A harness's invariant did not hold for an input: a finding."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise InvariantBroken(what)


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """The block's peak allocation, in bytes over what was allocated as it began (the Python heap,
    numpy included, as tracemalloc sees it), put in the list given once the block ends. Tracing
    starts here unless it runs already (the fuzzer keeps it on: starting it per input would cost
    more than the input)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak: list[int] = []
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        if started:
            tracemalloc.stop()


@contextmanager
def allocation_ceiling(limit: int, what: str) -> Iterator[None]:
    """Raise InvariantBroken when the block allocates more than `limit` bytes at its peak."""
    with traced_peak() as peak:
        yield
    _require(peak[0] <= limit, f"{what}: allocated {peak[0]} bytes at its peak, over the ceiling of {limit}")


# The transfer syntax of a data-set input: its first byte chooses (one of each kind the walker
# tells apart: explicit/implicit, little/big endian, deflated, encapsulated).
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
            JPEG2000Lossless)
MAX_DEFLATE_RATIO = 1032  # deflate's largest expansion: 258 bytes from a 2-bit code, per byte
KiB = 1024
# Every ceiling's constant part: what a parser allocates once, on the first input that takes a
# new path through it (pydicom's dictionaries and value caches, codecs, compiled patterns; found
# when a campaign's first input through such a path came to 570 KiB). An allocation that grows
# with a length the peer announced, the class being looked for, is far larger.
FIRST_USE = 2048 * KiB


def _syntax_and_data(data: bytes) -> tuple[UID, bytes]:
    return (SYNTAXES[data[0] % len(SYNTAXES)], data[1:]) if data else (ExplicitVRLittleEndian, b"")


# pydicom builds a Dataset (and its reader's frames) per sequence level: a 14 KiB seed nested
# 400 deep made 3.8 MB under instrumentation. Proportional and bounded (the reader's recursion
# limit refuses deeper nesting), and still far from an allocation a lying length would make.
PYDICOM_RATIO = 400


def _data_set_ceiling(ts: UID, data: bytes, ratio: int = 4) -> int:
    inflated = len(data) * MAX_DEFLATE_RATIO if ts == DeflatedExplicitVRLittleEndian else len(data)
    return ratio * inflated + FIRST_USE


def data_set_check(data: bytes) -> None:
    """node/receive/validate.py on a received data set: whole (None) or refused (MalformedDataset)
    with a reason, in bounded memory. What the node acknowledges (this check and the routing-tag
    reader both take it), pydicom walks to the last element: its later stages can read it."""
    ts, raw = _syntax_and_data(data)
    accepted = True
    with allocation_ceiling(_data_set_ceiling(ts, raw), "the data-set check"):
        try:
            check_dataset(raw, ts)
        except MalformedDataset as exc:
            accepted = False
            _require("cannot be walked" not in str(exc), f"the walker's bug guard fired: {exc}")
    if accepted and _routing_tags_read(raw, ts):
        _read_all_elements(inflate(raw) if ts == DeflatedExplicitVRLittleEndian else raw, ts)


def _routing_tags_read(raw: bytes, ts: UID) -> bool:
    try:
        read_routing_tags(raw, ts)
    except (UnreadableDataset, MalformedDataset):
        return False
    return True


def _read_all_elements(raw: bytes, ts: UID) -> None:
    try:
        _walk(read_dataset(io.BytesIO(raw), is_implicit_VR=ts.is_implicit_VR, is_little_endian=ts.is_little_endian))
    except Exception as exc:
        raise InvariantBroken(f"the data-set check took a data set pydicom cannot walk ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc


def _walk(ds: pydicom.Dataset) -> None:
    """Every element's raw bytes, and every sequence's items recursively: the structure, not the
    values (a value that does not fit its VR, such as a 2-byte UL, is a value problem that the
    pre-acknowledgement check does not judge, as the README says)."""
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        sequence = element.VR == "SQ" or (element.VR is None and _dictionary_vr(tag) == "SQ") or (
            getattr(element, "length", None) == 0xFFFFFFFF and tag != 0x7FE00010)  # a raw element's
        if sequence:
            for item in ds[tag].value:
                _walk(item)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def routing_tags(data: bytes) -> None:
    """node/receive/tags.py: the routing tags with valid UIDs and typed values, or a refusal
    (UnreadableDataset, MalformedDataset for a deflate stream that does not inflate whole)."""
    ts, raw = _syntax_and_data(data)
    with allocation_ceiling(_data_set_ceiling(ts, raw, PYDICOM_RATIO), "the routing-tag reader"):
        try:
            tags = read_routing_tags(raw, ts)
        except (UnreadableDataset, MalformedDataset) as exc:
            _require("cannot be walked" not in str(exc), f"the walker's bug guard fired: {exc}")
            tags = None
    # what the whole-data-set check found, converted, is what pydicom's reader gives
    with mock.patch.object(tags_module, "check_dataset", side_effect=MalformedDataset("read with pydicom")):
        try:
            read = read_routing_tags(raw, ts)
        except (UnreadableDataset, MalformedDataset):
            read = None
    _require(tags == read, f"the routing tags differ from pydicom's reading: {tags} != {read}")
    if tags is not None:
        _check_tags(tags)


def _check_tags(tags: RoutingTags) -> None:
    for name in ("study_uid", "series_uid", "sop_instance_uid", "sop_class_uid"):
        value = getattr(tags, name)
        try:
            _require(checked_uid(value, name) == value, f"{name} is not as checked")
        except ValueError as exc:
            raise InvariantBroken(f"{name} is no valid UID: {exc}") from exc
    _require("\0" not in tags.patient_id, "a NUL in the patient ID (PostgreSQL refuses it)")
    for key, value in tags.series.items():
        if isinstance(value, int):
            _require(-2**31 <= value < 2**31, f"series {key} beyond a 32-bit column")
        elif isinstance(value, str):
            _require("\0" not in value, f"a NUL in series {key}")
        elif isinstance(value, float):
            pass
        else:
            _require(value is None, f"series {key} is a {type(value).__name__}")
    if tags.accession_number is not None:
        _require(0 < len(tags.accession_number) <= 64 and "\0" not in tags.accession_number,
                 "an accession number that is empty, longer than 64 or with a NUL")
    if tags.count is not None:
        _require(0 < tags.count.expected < 2**31, "an expected count out of range")


INFLATE_LIMIT = 1 << 20  # small, so that the fuzzer reaches it


def deflate(data: bytes) -> None:
    """node/receive/validate.inflate (node/deflate.py), the deflate bomb guard. First byte even: the input is a
    deflate stream: it inflates to at most the limit, or is refused. Odd: the rest is a payload,
    deflated here and followed by a fuzzed tail; it must come back exactly when the tail is none
    or the one pad byte PS3.5 A.5 allows, and be refused otherwise."""
    if not data:
        return
    if data[0] % 2 == 0:
        with allocation_ceiling(2 * INFLATE_LIMIT + 4 * len(data) + FIRST_USE, "inflate"):
            try:
                out: bytes | None = inflate(data[1:], INFLATE_LIMIT)
            except MalformedDataset:
                out = None
        _require(out is None or len(out) <= INFLATE_LIMIT, f"inflated {len(out or b'')} bytes past the limit")
        # the reference: zlib without a bound (a 16 KiB input inflates to at most 16 MiB)
        reference = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            whole = reference.decompress(data[1:])
        except zlib.error:
            whole = None
        taken = whole is not None and reference.eof and len(whole) <= INFLATE_LIMIT and reference.unused_data in (b"", b"\0")
        _require((out is not None) == taken, "inflate " + ("took" if out is not None else "refused")
                 + " a stream zlib " + ("does not inflate whole within the limit" if out is not None else "inflates whole"))
        _require(out is None or out == whole, "inflated bytes differ from zlib's")
        return
    tail_length = data[1] % 4 if len(data) > 1 else 0
    payload, tail = data[2 + tail_length:], data[2:2 + tail_length]
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = packer.compress(payload) + packer.flush()
    try:
        out = inflate(stream + tail, INFLATE_LIMIT)
    except MalformedDataset:
        _require(tail not in (b"", b"\0"), "a whole deflate stream refused")
        return
    _require(tail in (b"", b"\0"), f"{len(tail)} stray bytes after the deflate stream taken")
    _require(out == payload, "inflated bytes differ from what was deflated")


def file_meta(data: bytes) -> None:
    """node/store/filemeta.py: the file meta header the node writes before each stored data set
    (the UIDs as the C-STORE request announced them, before anything checks them). Values that
    are not ASCII, or a UID over 64 characters: ValueError (the store answers 0xC210). Any other: a group pydicom reads
    back element by element, each value as given and padded to even length (PS3.5 6.2: UI with
    NUL, AE and SH with a space), its group length exact; and for values valid in their VR, the
    very bytes pydicom's own writer makes."""
    values = data.decode("utf-8", "replace").split("\x1e")[:7] + [""] * 7
    sop_class, sop_instance, syntax, ae, calling, called, address = values[:7]
    source, sending_ae, receiving, sending = ae or None, calling or None, called or None, address or None

    def encoded() -> bytes:
        return encode_file_meta(sop_class, sop_instance, syntax, source, sending_ae, receiving, sending)

    if not all(v.isascii() for v in (sop_class, sop_instance, syntax, ae, calling, called, address)):
        try:
            encoded()
        except ValueError:  # UnicodeEncodeError, or the length check that comes first
            return
        raise InvariantBroken("a value that is not ASCII was written into the file meta")
    if max(map(len, (sop_class, sop_instance, syntax))) > 64 or max(len(ae), len(calling), len(called)) > 16:
        try:
            encoded()
        except ValueError:
            return
        raise InvariantBroken("a UID over 64 characters or an AE title over 16 was written into the file meta")
    ours = encoded()
    _require(ours[:132] == b"\x00" * 128 + b"DICM", "no preamble and DICM prefix")
    group = read_dataset(io.BytesIO(ours[132:]), is_implicit_VR=False, is_little_endian=True)

    def padded(value: str, pad: bytes) -> bytes:
        raw = value.encode("ascii")
        return raw + pad if len(raw) % 2 else raw

    expected = {0x00020001: b"\x00\x01", 0x00020002: padded(sop_class, b"\0"), 0x00020003: padded(sop_instance, b"\0"),
                0x00020010: padded(syntax, b"\0"), 0x00020012: padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0"),
                0x00020013: padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")}
    for tag, value in ((0x00020016, source), (0x00020017, sending_ae), (0x00020018, receiving), (0x00020027, sending)):
        if value:
            expected[tag] = padded(value, b" ")
    found = {int(tag): group.get_item(tag).value for tag in group.keys() if tag != 0x00020000}
    _require(found == expected, "the file meta elements read back differ from the values written")
    (length,) = struct.unpack("<I", group.get_item(0x00020000).value)
    _require(len(ours) == 132 + 12 + length, "the group length does not say where the group ends")
    if (all(_valid_uid(v) for v in (sop_class, sop_instance, syntax)) and all(
            v is None or _valid_ae(v) for v in (source, sending_ae, receiving))
            and (sending is None or (sending.isprintable() and "\\" not in sending and not sending.startswith(" ")))):
        _require(ours == pydicom_file_meta(sop_class, sop_instance, syntax, source, sending_ae, receiving, sending),
                 "file meta bytes differ from pydicom's")


def pydicom_file_meta(sop_class: str, sop_instance: str, syntax: str, source: str | None,
                      sending: str | None = None, receiving: str | None = None,
                      sending_address: str | None = None) -> bytes:
    """Preamble, DICM and the file meta group as pydicom writes them (the reference)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if source:
        meta.SourceApplicationEntityTitle = source
    if sending:
        meta.SendingApplicationEntityTitle = sending
    if receiving:
        meta.ReceivingApplicationEntityTitle = receiving
    if sending_address:
        meta.SendingPresentationAddress = sending_address
    reference = io.BytesIO()
    reference.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(reference, meta, enforce_standard=True)  # type: ignore[arg-type]
    return reference.getvalue()


def _valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c in "0123456789." for c in value)


def _valid_ae(value: str) -> bool:
    return 0 < len(value) <= 16 and value.isprintable() and "\\" not in value and value.strip() != ""


class _QuietAssociation:
    """What pynetdicom's DUL and our PduSocket ask of their association while reading PDUs: its
    timeouts, whether it is established, and its (no) event handlers."""

    acse_timeout = network_timeout = dimse_timeout = 5.0

    def __init__(self) -> None:
        self.is_established = False
        self.dul = DULServiceProvider(self)  # type: ignore[arg-type]

    def get_handlers(self, event: Any) -> list:
        return []


PDU_LIMIT = 4096  # the maximum PDU length the acceptor announced (small: the fuzzer reaches it)
MESSAGE_LIMIT = 8 * KiB  # scp.max_instance_mb (a seed carries a message past it)
_PDU_EVENTS = {0x01: "Evt6", 0x02: "Evt3", 0x03: "Evt4", 0x04: "Evt10", 0x05: "Evt12", 0x06: "Evt13", 0x07: "Evt16"}


def pdu_stream(data: bytes) -> list[int]:
    """The receiver's PDU reader (PduSocket under pynetdicom's DUL, as a receiver runs them) on a
    byte stream from a peer, read PDU by PDU until the DUL ends the connection:
    - a PDU over its limit (P-DATA over the announced maximum once associated, any other over
      NEGOTIATION_PDU_LIMIT), or a data set over the message limit, is answered with an A-ABORT
      PDU and nothing more; nothing else is ever sent back by the reader;
    - no decoded PDU is over its limit, and no message's data-set fragments add up past its limit;
    - the reading allocates in proportion to what the peer sent, plus one eager buffer.
    Returns the types of the PDUs read, in order."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        assoc = _QuietAssociation()
        dul = assoc.dul
        sock = AssociationSocket(assoc, client_socket=ours)  # type: ignore[arg-type]
        sock.__class__ = PduSocket
        pdu_socket: PduSocket = sock  # type: ignore[assignment]
        pdu_socket.prepare(PDU_LIMIT, "127.0.0.1", MESSAGE_LIMIT, pdu_timeout=5.0)
        dul.socket = sock
        dul.event_queue.get_nowait()  # Evt5: the connection is open
        message_bytes = 0
        position = 0  # where the next PDU begins in the stream
        event = ""
        read: list[int] = []
        with allocation_ceiling(3 * len(data) + NEGOTIATION_PDU_LIMIT + FIRST_USE, "the PDU reader"):
            for _ in range(len(data) // 6 + 1):
                dul._read_pdu_data()
                event = dul.event_queue.get_nowait()
                if event in ("Evt17", "Evt19"):
                    break
                pdu = dul._recv_pdu.get_nowait()
                read.append(pdu.pdu_type)
                length = int.from_bytes(data[position + 2:position + 6], "big")  # as announced
                position += 6 + length
                _require(_PDU_EVENTS.get(pdu.pdu_type) == event, f"PDU type {pdu.pdu_type} as {event}")
                limit = PDU_LIMIT if pdu.pdu_type == P_DATA_TF and assoc.is_established else NEGOTIATION_PDU_LIMIT
                _require(length <= limit, f"a PDU of {length} bytes read past its limit of {limit}")
                if pdu.pdu_type == 0x01:
                    assoc.is_established = True  # the acceptor answers; P-DATA limits apply from here
                for item in getattr(pdu, "presentation_data_value_items", []):
                    header = item.presentation_data_value[0] if item.presentation_data_value else 0
                    if not header & 0x01:
                        message_bytes += len(item.presentation_data_value) - 1
                        _require(message_bytes <= MESSAGE_LIMIT,
                                 f"{message_bytes} data-set bytes of one message read past {MESSAGE_LIMIT}")
                        if header & 0x02:
                            message_bytes = 0
        peer.settimeout(0)
        try:
            answer = peer.recv(64)
        except BlockingIOError:
            answer = b""
        _require(answer in (b"", A_ABORT_INVALID_PARAMETER, A_ABORT_NOT_SPECIFIED),
                 f"the reader sent {answer[:16].hex()} (only an A-ABORT PDU, once)")
        # the PDU the connection ended at: announced over its limit, it must have been aborted
        if event == "Evt17" and position + 6 <= len(data) and 0x01 <= data[position] <= 0x07:
            length = int.from_bytes(data[position + 2:position + 6], "big")
            limit = PDU_LIMIT if data[position] == P_DATA_TF and assoc.is_established else NEGOTIATION_PDU_LIMIT
            _require(length <= limit or answer == A_ABORT_INVALID_PARAMETER,
                     f"a PDU announcing {length} bytes, over its limit of {limit}, was not answered with A-ABORT")
    return read


STOW_PART_LIMIT = 4 * KiB


def stow_body(data: bytes) -> None:
    """node/receive/stow.py on a STOW-RS request: the Content-Type's boundary or a 400/415; the
    body's parts, the same however it is cut into chunks, none held over the part limit, each
    part an instance to store or a failure with its status; a broken body is a 400 or 413."""
    header, _, body = data.partition(b"\n\n")
    content_type = header.decode("latin-1")
    try:
        boundary = boundary_of(content_type)
    except StowError as exc:
        _require(exc.status in (400, 415), f"Content-Type refused with {exc.status}")
        return
    chunks = _chunks(body)
    with allocation_ceiling(4 * len(data) + FIRST_USE, "the STOW-RS body parser"):
        whole = _stow_parts(boundary, [body])
        cut = _stow_parts(boundary, chunks)
    _require(whole == cut, "the parts differ with how the body was cut into chunks")
    parts, error = whole
    _require(error in (None, 400, 413), f"a body refused with {error}")
    _require(len(parts) <= MAX_PARTS, "more parts than MAX_PARTS")
    for part in parts:
        _require(len(part.data) <= STOW_PART_LIMIT, f"a part of {len(part.data)} bytes kept past the limit")
        outcome = incoming(part, "STOWUSER", "127.0.0.1", None, None) if part.problem is None else None
        if isinstance(outcome, Incoming):  # pydicom reads the same file meta before the data set
            meta = pydicom.dcmread(io.BytesIO(bytes(part.data)[:len(part.data) - outcome.payload.nbytes]),
                                   force=True).file_meta
            _require((str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                      str(meta.TransferSyntaxUID)) == (outcome.sop_class_uid, outcome.sop_instance_uid,
                                                       outcome.transfer_syntax),
                     "the file meta is not where pydicom reads it")
        elif outcome is not None:
            _require(outcome.status != 0 and bool(outcome.reason), "a part refused without a status or reason")


def _chunks(body: bytes) -> list[bytes]:
    """The body cut into chunks where its first 16 bytes say (two bytes a cut: anywhere in it)."""
    cuts = sorted({int.from_bytes(body[i:i + 2], "big") % (len(body) + 1) for i in range(0, min(len(body), 16) - 1, 2)})
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


def _stow_parts(boundary: bytes, chunks: list[bytes]) -> tuple[list[Part], int | None]:
    request = StowRequest(boundary, STOW_PART_LIMIT)
    parts: list[Part] = []
    try:
        for chunk in chunks:
            parts += request.feed(chunk)
    except StowError as exc:
        parts += exc.completed
        return [Part(bytes(p.data), p.problem, p.reason) for p in parts], exc.status
    # as the STOW-RS route answers a body that ends before its closing boundary (the multipart
    # parser notices some breaks only at the end, some earlier: which depends on the chunks), and
    # one with no part at all
    return [Part(bytes(p.data), p.problem, p.reason) for p in parts], None if request.ended and parts else 400


UPLOAD_LIMIT = 8 * KiB  # http.max_upload_mb for the harness (small: the fuzzer reaches it)


def console_upload(data: bytes) -> None:
    """The console's upload path (node/console/limits.py around Starlette's multipart parser
    with the routes' FORM_LIMITS): 200 with at most MAX_UPLOAD_FILES files, 400 for a body the
    parser refuses, 413 past the body limit; never a 500, and never more than the limit read."""
    header, _, body = data.partition(b"\n\n")
    announce = bool(header[:1]) and header[0] % 2 == 0  # a Content-Length, or a chunked body
    boundary = header[1:].decode("latin-1").strip() or "x"
    chunks = _chunks(body)
    status, files, read = asyncio.run(_upload(boundary, chunks, len(body) if announce else None))
    _require(status in (200, 400, 413), f"the upload was answered {status}")
    _require(read <= UPLOAD_LIMIT + max(map(len, chunks), default=0), f"{read} body bytes read past the limit")
    _require(status != 413 or len(body) > UPLOAD_LIMIT, f"413 for a body of {len(body)} bytes")
    _require(status == 413 or not announce or len(body) <= UPLOAD_LIMIT,
             f"{status} for a body of {len(body)} bytes announced over the limit")
    _require(status in (400, 413) or len(body) <= UPLOAD_LIMIT, f"{status} for a body read past the limit")
    _require(files <= FORM_LIMITS["max_files"], f"{files} files taken")


async def _upload(boundary: str, chunks: list[bytes], length: int | None) -> tuple[int, int, int]:
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    read = 0
    files = 0

    async def form_route(scope: Any, receive: Any, send: Any) -> None:
        nonlocal files
        request = Request(scope, receive)
        try:
            async with request.form(**FORM_LIMITS) as form:
                files = sum(1 for _, value in form.multi_items() if not isinstance(value, str))
            response: Response = JSONResponse({"files": files})
        except MultiPartException as exc:  # what FastAPI answers for it: 400
            response = JSONResponse({"detail": exc.message}, status_code=400)
        except BodyTooLarge as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=413)
        await response(scope, receive, send)

    async def refuse(request: Any, exc: BodyTooLarge) -> Response:
        return JSONResponse({"detail": exc.detail}, status_code=413)

    app = BodyLimit(form_route, lambda path: (UPLOAD_LIMIT, "http.max_upload_mb"), refuse)
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode("latin-1"))]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/api/explain", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    pending = list(chunks) or [b""]
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status, files, read


class NoSignals:
    """The index side of an HL7 message: no study waits for any accession number here."""

    def create_hl7(self, key: str, accession_number: str, source: str, now: float) -> list[str]:
        return []


_HL7 = Hl7Listener(Hl7Config(), NoSignals(), lambda study_uid: None)  # type: ignore[arg-type]


def hl7_message(data: bytes) -> None:
    """node/receive/hl7.py on one MLLP block: always an acknowledgement that parses as HL7, whose
    MSA-1 is AA, AE or AR, in the codec the message was read with."""
    ack, codec = _HL7._handle(data)
    _require(codec in ("utf-8", "latin-1"), f"codec {codec}")
    ack.encode(codec)
    _require(ack.startswith("MSH") and ack.endswith("\r"), "an acknowledgement that is no HL7 message")
    try:
        parsed = hl7.parse(ack)
        code = str(parsed.segment("MSA")[1])
    except Exception as exc:
        raise InvariantBroken(f"the acknowledgement does not parse ({type(exc).__name__})") from exc
    _require(code in ("AA", "AE", "AR"), f"MSA-1 is {code[:8]!r}")


@dataclass(frozen=True)
class Target:
    """A harness and the largest input the fuzzer gives it (tests/fuzz/run.py names the modules
    atheris instruments for each)."""

    name: str
    harness: Callable[[bytes], object]
    max_len: int


TARGETS = {t.name: t for t in (
    Target("pdu_stream", pdu_stream, 16 * KiB),
    Target("data_set_check", data_set_check, 16 * KiB),
    Target("routing_tags", routing_tags, 16 * KiB),
    Target("deflate", deflate, 16 * KiB),
    Target("file_meta", file_meta, 4 * KiB),
    Target("stow_body", stow_body, 16 * KiB),
    Target("console_upload", console_upload, 16 * KiB),
    Target("hl7_message", hl7_message, 8 * KiB),
)}


def quiet() -> None:
    """The node's refusals are logged as warnings: thousands per second under a fuzzer."""
    logging.disable(logging.CRITICAL)
