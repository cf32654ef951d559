"""STOW-RS receive (PS3.18 10.5, Store Instances): the instances of a `multipart/related;
type="application/dicom"` request body, each part a DICOM Part 10 file, stored one at a time as
they stream in, with the same checks, statuses and durability as C-STORE (node/receive/store.py).

`StowRequest` is fed the body's chunks as they arrive (python-multipart's streaming parser finds
the parts); it holds at most one part in memory (at most `scp.max_instance_mb`, as a C-STORE),
and hands each complete part to the caller to store. `response` is the Store Instances response
data set (PS3.18 10.5.3): a Referenced SOP Sequence item per stored instance, a Failed SOP
Sequence item with its Failure Reason (the C-STORE status the instance would have had) per
refused one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Iterator, cast

import pydicom
from pydicom.dataset import Dataset
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header

from pynetdicom import AllStoragePresentationContexts

from node.receive.store import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, TRANSFER_SYNTAXES, Incoming

PART10_PREFIX = 132  # preamble and "DICM" (PS3.10 7.1)
CALLED = "STOW-RS"  # what the index records as the called AE title of a STOW request
# RFC 2046 5.1.1 allows 70 characters, but Orthanc's DICOMweb client sends 73 (two UUIDs): the
# limit is the multipart parser's own, past which it raises outside the request's handling.
MAX_BOUNDARY = MAX_BOUNDARY_LENGTH
MAX_PREAMBLE = 64 * 1024  # bytes before the first boundary (RFC 2046's preamble), at most
MAX_PARTS = 10_000  # parts per request: an empty part is a few bytes, its outcome is not
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.18 10.5.3: Referenced SOP Class not supported
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 10.5.3: Referenced Transfer Syntax not supported
STORAGE_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)
ACCEPTED_SYNTAXES = frozenset(str(uid) for uid in TRANSFER_SYNTAXES)


class StowError(ValueError):
    """The request as a whole is not one this node takes: `status` is the HTTP answer;
    `completed`: the parts completed before the error in the chunk that raised it (still to be
    stored: what was stored is answered along with the error)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.completed: list[Part] = []


@dataclass(frozen=True)
class Part:
    """One part of the body: its bytes, or why it cannot be stored (too large, not DICOM)."""

    data: bytes | bytearray
    problem: int | None = None
    reason: str = ""


@dataclass
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str = ""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a STOW-RS body, or StowError(415) for anything but multipart/related of
    application/dicom parts (the JSON and XML metadata forms are not taken)."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/related":
        raise StowError(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
    part_type = options.get(b"type", b"application/dicom").lower()
    if part_type != b"application/dicom":
        raise StowError(415, f"parts of type {part_type.decode(errors='replace')} are not taken: application/dicom only")
    boundary = options.get(b"boundary")
    if not boundary:
        raise StowError(400, "the multipart/related Content-Type has no boundary")
    if len(boundary) > MAX_BOUNDARY:  # found by fuzzing: the multipart parser raised its own error, a 500
        raise StowError(400, f"the multipart boundary is longer than {MAX_BOUNDARY} characters")
    return boundary


class StowRequest:
    """Parts of a STOW-RS body as its chunks arrive: `feed(chunk)` returns the parts it completed."""

    def __init__(self, boundary: bytes, max_part: int):
        self.max_part = max_part
        self._delimiter = b"--" + boundary
        self._preamble: bytearray | None = bytearray()  # the body until its first delimiter
        self._data = bytearray()
        self._too_large = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_type = b""
        self._done: list[Part] = []
        self.parts = 0
        self.ended = False
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._part_data, "on_part_end": self._end,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end, "on_end": self._on_end})

    def feed(self, chunk: bytes) -> list[Part]:
        """The parts this chunk completed. On a StowError, those are its `completed` (found by
        fuzzing: they were lost when the error came later in the same chunk, so what was stored
        depended on how the body happened to be cut)."""
        if self._preamble is not None:
            chunk = self._past_preamble(chunk)
            if not chunk:
                return []
        try:
            self._parser.write(chunk)
        except StowError as exc:
            exc.completed = self._take()
            raise
        except Exception as exc:  # python-multipart raises its own errors for a broken body
            error = StowError(400, f"the multipart body cannot be parsed ({type(exc).__name__})")
            error.completed = self._take()
            raise error from None
        return self._take()

    def _past_preamble(self, chunk: bytes) -> bytes:
        """RFC 2046 5.1.1: what comes before the first delimiter is a preamble, to be ignored.
        Dropped here: the multipart parser takes one only when it arrives in the same chunk as
        the delimiter (found by fuzzing: a body with a preamble stored its parts or was refused
        with 400 depending on where TCP cut it)."""
        preamble, delimiter = cast(bytearray, self._preamble), self._delimiter
        start = max(0, len(preamble) - len(delimiter) + 1)  # earlier starts were looked at already
        preamble += chunk
        at = preamble.find(delimiter, start)
        while at > 0 and preamble[at - 1] != 0x0A:  # a delimiter opens a line (CRLF, or a lone LF)
            at = preamble.find(delimiter, at + 1)
        # the limit on where the first delimiter begins, whatever the chunks
        if (at < 0 and len(preamble) - len(delimiter) + 1 > MAX_PREAMBLE) or at > MAX_PREAMBLE:
            raise StowError(400, f"no multipart boundary in the first {MAX_PREAMBLE // 1024} KiB of the body")
        if at < 0:
            return b""
        self._preamble = None
        return bytes(preamble[at:])

    def _take(self) -> list[Part]:
        done, self._done = self._done, []
        return done

    def _begin(self) -> None:
        self._data = bytearray()
        self._too_large = False
        self._part_type = b""

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-type":
            self._part_type = parse_options_header(bytes(self._header_value))[0]
        self._header_field.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._too_large:
            return
        if len(self._data) + end - start > self.max_part:
            self._too_large, self._data = True, bytearray()  # the rest of the part is passed over
            return
        self._data.extend(data[start:end])

    def _end(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise StowError(413, f"more than {MAX_PARTS} parts in one request: send fewer per request")
        if self._too_large:
            self._done.append(Part(b"", OUT_OF_RESOURCES, f"the part is larger than scp.max_instance_mb"
                                                           f" ({self.max_part / 1024 / 1024:g} MB)"))
        elif self._part_type not in (b"", b"application/dicom"):
            self._done.append(Part(b"", CANNOT_UNDERSTAND, f"a part of type {self._part_type.decode(errors='replace')}"
                                                           " (application/dicom only)"))
        else:
            self._done.append(Part(self._data))  # handed over, not copied
        self._data = bytearray()

    def _on_end(self) -> None:
        self.ended = True


def incoming(part: Part, calling: str, peer: str, association_id: int | None,
             study_uid: str | None) -> Incoming | Outcome:
    """The instance in a Part 10 file, ready to store; or the failure when it is none."""
    data = memoryview(part.data)
    try:
        # By hand: pydicom reads the file meta only from a path (read_file_meta_info); the
        # layout is fixed (PS3.10 7.1): the group length (0002,0000) UL comes first and says
        # where the data set begins.
        if len(data) < PART10_PREFIX + 12 or bytes(data[128:132]) != b"DICM":
            raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
        group, element, vr, length = struct.unpack_from("<HH2sH", data, PART10_PREFIX)
        if (group, element, vr, length) != (2, 0, b"UL", 4):
            raise ValueError("the file meta information does not begin with its group length")
        end = PART10_PREFIX + 12 + struct.unpack_from("<I", data, PART10_PREFIX + 8)[0]
        if end > len(data):
            raise ValueError("the file meta information is longer than the part")
        meta = pydicom.dcmread(BytesIO(bytes(data[:end]))).file_meta
        transfer_syntax = str(meta.TransferSyntaxUID)
        sop_class, sop_instance = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged meta group
        return Outcome("", "", CANNOT_UNDERSTAND, str(exc) if type(exc) is ValueError else type(exc).__name__)
    if sop_class not in STORAGE_CLASSES:
        return Outcome(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED, "not a storage SOP class this node takes")
    if transfer_syntax not in ACCEPTED_SYNTAXES:
        return Outcome(sop_class, sop_instance, TRANSFER_SYNTAX_NOT_SUPPORTED, "a transfer syntax this node does not take")
    return Incoming(data[end:], transfer_syntax, sop_class, sop_instance, calling, CALLED, peer, association_id,
                    announced_by="file meta", study_uid=study_uid, by_association=False)


@dataclass
class Response:
    """What a STOW-RS request stored and refused (PS3.18 10.5.3)."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def stored(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == SUCCESS]

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some, 409 none (PS3.18 10.5.3.1)."""
        if not self.outcomes:
            return 400
        stored = len(self.stored)
        return 200 if stored == len(self.outcomes) else 202 if stored else 409

    def dataset(self, retrieve_urls: dict[str, str] | None = None, study_url: str | None = None) -> Dataset:
        """`retrieve_urls`: the WADO-RS URL of each stored SOP Instance UID; `study_url`: the
        study's, when every stored instance is of one study."""
        ds = Dataset()
        if study_url:
            ds.RetrieveURL = study_url
        if self.stored:
            ds.ReferencedSOPSequence = list(self._items(self.stored))
            for item in ds.ReferencedSOPSequence:
                if retrieve_urls and str(item.ReferencedSOPInstanceUID) in retrieve_urls:
                    item.RetrieveURL = retrieve_urls[str(item.ReferencedSOPInstanceUID)]
        failed = [o for o in self.outcomes if o.status != SUCCESS]
        if failed:
            ds.FailedSOPSequence = list(self._items(failed, failed=True))
        return ds

    @staticmethod
    def _items(outcomes: list[Outcome], failed: bool = False) -> Iterator[Dataset]:
        for outcome in outcomes:
            item = Dataset()
            item.ReferencedSOPClassUID = outcome.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
            if failed:
                item.FailureReason = outcome.status
            yield item
