"""Is a received data set whole? Checked before the C-STORE is acknowledged, without decoding pixels.

Checks, to the last byte of the data set:
- every element's value lies inside its data set, item or sequence; defined-length items and
  sequences end exactly where their length says; undefined-length items and sequences are
  closed by their delimiters; nothing follows the last element;
- native Pixel Data (and Float / Double Float Pixel Data) is exactly
  Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames bits, in whole bytes
  (BitsAllocated 1: packed, rounded up to a byte), plus one pad byte when that is odd
  (native YBR_FULL_422: two thirds of that, as PS3.5 8.2.4 packs it); this holds for every
  data set level (an icon image in a sequence is checked against its own attributes);
- encapsulated Pixel Data is a valid fragment sequence: a Basic Offset Table item, at least
  one fragment item, each with a defined length inside the data set, and the sequence
  delimiter, of VR OB (or OW) in explicit VR; encapsulated where the transfer syntax says
  so, native where it does not.

Why a raw walker rather than pydicom: pydicom's reader is lenient by design (it returns a
truncated last value as a shorter one, guesses another VR encoding when the bytes look wrong,
and defers values until they are used), so it would accept most of what this must refuse, and
to find out it would have to build and convert every element (about a millisecond per image,
more than the rest of the acknowledgement path). This walker reads only tags and lengths (a
CT image has ~100 elements: tens of microseconds), the six image-pixel attributes it needs,
and the dictionary's VR only to descend into defined-length sequences in implicit VR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from pydicom.datadict import DicomDictionary
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node import deflate
from node.deflate import MAX_INFLATED_BYTES


class MalformedDataset(ValueError):
    """The data set is not whole. `pixel` tells a pixel-data problem from a structural one."""

    def __init__(self, reason: str, pixel: bool = False):
        super().__init__(reason)
        self.pixel = pixel


_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float, Double Float
_PIXEL_DATA = 0x7FE00010
_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS = (
    0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100)
_IMAGE_ATTRIBUTES = {_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
# Implicit VR carries no VR: defined-length sequences are found through the dictionary.
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class TopLevelElement(NamedTuple):
    """Where a top-level element's value lies in the walked data: `vr` as encoded (None in
    implicit VR), `offset` and `length` of its value (0xFFFFFFFF: undefined, items follow).
    A named tuple: made for ~17 elements of every arriving instance, a quarter of the cost of a
    frozen dataclass."""

    vr: str | None
    offset: int
    length: int

    @property
    def undefined_length(self) -> bool:
        return self.length == _UNDEFINED


@dataclass(frozen=True)
class WalkedDataset:
    """What `check_dataset` walked (inflated when it came deflated), and the top-level elements it
    was asked to note."""

    data: bytes | memoryview
    elements: dict[int, TopLevelElement]


class _Walker:
    def __init__(self, data: bytes | memoryview, little: bool, noted: frozenset[int] = frozenset()):
        self.data = data
        # Top-level tags to note as a reader that stops after the greatest of them would see them
        # (node.receive.tags parses its values from here instead of reading the header twice).
        self.noted, self.last_noted, self.noting = noted, max(noted, default=-1), bool(noted)
        self.found: dict[int, TopLevelElement] = {}
        order = "<" if little else ">"
        self.tag_length = struct.Struct(order + "HHL").unpack_from  # implicit header, items
        self.explicit = struct.Struct(order + "HH2sH").unpack_from
        self.ulong = struct.Struct(order + "L").unpack_from
        self.ushort = struct.Struct(order + "H").unpack_from

    def dataset(self, pos: int, end: int, implicit: bool, delimited: bool, top: bool = False,
                encapsulated: bool = False) -> int:
        """Walk one data set from `pos`; `delimited`: up to its item delimiter, else to `end`."""
        data = self.data
        image: dict[int, object] = {}
        pixel_tag = pixel_length = None
        while pos < end:
            if pos + 8 > end:
                raise MalformedDataset(f"element header at offset {pos} runs past the end")
            if implicit:
                group, element, length = self.tag_length(data, pos)
                vr = None
                value = pos + 8
            else:
                group, element, vr, length = self.explicit(data, pos)
                value = pos + 8
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise MalformedDataset(f"element header at offset {pos} runs past the end")
                    (length,) = self.ulong(data, pos + 8)
                    value = pos + 12
                elif vr not in _SHORT_VRS and group != 0xFFFE:
                    raise MalformedDataset(
                        f"element {_tag(group << 16 | element)} at offset {pos} has no valid VR")
            tag = group << 16 | element
            if top and self.noting and tag > self.last_noted:  # past the last noted tag
                self.noting = False  # nothing more is noted
            if group == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    self._check_pixels(image, pixel_tag, pixel_length, top, encapsulated)
                    return pos + 8
                raise MalformedDataset(f"unexpected {_tag(tag)} at offset {pos}")
            if top and self.noting and tag in self.noted:  # (its length is checked below)
                self.found[tag] = TopLevelElement(vr.decode("ascii") if vr is not None else None, value, length)
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    if vr is not None and vr not in (b"OB", b"OW"):
                        # PS3.5 A.4: OB. Found by fuzzing: as SQ or UN, pydicom reads the fragments
                        # as sequence items and cannot read the data set at all.
                        raise MalformedDataset(f"encapsulated Pixel Data has VR {vr.decode('ascii', 'replace')}, "
                                               "not OB or OW", pixel=True)
                    pos = self._fragments(value, end)
                    pixel_tag, pixel_length = tag, None
                elif implicit or vr == b"SQ" or vr == b"UN":
                    # UN of undefined length: a sequence in implicit VR little endian (PS3.5 6.2.2)
                    pos = self._sequence(value, end, implicit or vr == b"UN")
                else:
                    raise MalformedDataset(f"{_tag(tag)} has an undefined length but is not a sequence")
                continue
            stop = value + length
            if stop > end:
                raise MalformedDataset(
                    f"value of {_tag(tag)} at offset {pos} ({length} bytes) runs past the end of its "
                    f"{'data set' if top else 'item'}")
            if vr == b"SQ" or (implicit and tag in _SEQUENCE_TAGS):
                self._items(value, stop, implicit)
            elif tag in _IMAGE_ATTRIBUTES:
                image[tag] = self._value(tag, value, length)
            elif tag in _PIXEL_TAGS:
                pixel_tag, pixel_length = tag, length
            pos = stop
        if delimited:
            raise MalformedDataset("an item of undefined length is not closed by its delimiter")
        if pos != end:  # cannot happen: every step checks against `end`
            raise MalformedDataset(f"data set ends at offset {pos}, not at {end}")
        self._check_pixels(image, pixel_tag, pixel_length, top, encapsulated)
        return pos

    def _value(self, tag: int, pos: int, length: int) -> object:
        if tag in (_PHOTOMETRIC, _FRAMES):
            return bytes(self.data[pos:pos + length]).decode("ascii", "replace").strip(" \0")
        return self.ushort(self.data, pos)[0] if length == 2 else None

    def _sequence(self, pos: int, end: int, implicit: bool) -> int:
        """Items of an undefined-length sequence, up to and including its delimiter."""
        while pos + 8 <= end:
            group, element, length = self.tag_length(self.data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return pos + 8
            pos = self._item(tag, pos, length, end, implicit)
        raise MalformedDataset("a sequence of undefined length is not closed by its delimiter")

    def _items(self, pos: int, end: int, implicit: bool) -> None:
        """Items of a defined-length sequence: they must fill it exactly."""
        while pos < end:
            if pos + 8 > end:
                raise MalformedDataset(f"item header at offset {pos} runs past its sequence")
            group, element, length = self.tag_length(self.data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END and pos + 8 == end:  # tolerated: a redundant delimiter
                return
            pos = self._item(tag, pos, length, end, implicit)

    def _item(self, tag: int, pos: int, length: int, end: int, implicit: bool) -> int:
        if tag != _ITEM:
            raise MalformedDataset(f"{_tag(tag)} at offset {pos} where a sequence item must be")
        if length == _UNDEFINED:
            return self.dataset(pos + 8, end, implicit, delimited=True)
        stop = pos + 8 + length
        if stop > end:
            raise MalformedDataset(f"item at offset {pos} ({length} bytes) runs past its sequence")
        self.dataset(pos + 8, stop, implicit, delimited=False)
        return stop

    def _fragments(self, pos: int, end: int) -> int:
        """Encapsulated Pixel Data: offset table item, fragment items, sequence delimiter."""
        items = 0
        while pos + 8 <= end:
            group, element, length = self.tag_length(self.data, pos)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                if items < 2:
                    raise MalformedDataset("encapsulated Pixel Data has no fragment", pixel=True)
                return pos + 8
            if tag != _ITEM:
                raise MalformedDataset(
                    f"encapsulated Pixel Data: {_tag(tag)} at offset {pos} where an item must be", pixel=True)
            if length == _UNDEFINED or pos + 8 + length > end:
                raise MalformedDataset(
                    f"encapsulated Pixel Data: fragment at offset {pos} has an undefined length or runs past "
                    "the end", pixel=True)
            if items == 0 and length % 4:
                raise MalformedDataset("encapsulated Pixel Data: Basic Offset Table length is not a "
                                       "multiple of 4", pixel=True)
            items += 1
            pos += 8 + length
        raise MalformedDataset("encapsulated Pixel Data is not closed by a sequence delimiter", pixel=True)

    @staticmethod
    def _check_pixels(image: dict[int, object], tag: int | None, length: int | None, top: bool,
                      encapsulated: bool) -> None:
        if tag is None:
            return
        if top and tag == _PIXEL_DATA and encapsulated != (length is None):
            raise MalformedDataset(
                "Pixel Data is " + ("native" if encapsulated else "encapsulated")
                + " but the transfer syntax says " + ("encapsulated" if encapsulated else "native"),
                pixel=True)
        if length is None:
            return
        rows, columns, bits = image.get(_ROWS), image.get(_COLUMNS), image.get(_BITS)
        if not isinstance(rows, int) or not isinstance(columns, int) or not isinstance(bits, int):
            raise MalformedDataset(f"{_tag(tag)} without Rows, Columns or BitsAllocated", pixel=True)
        samples = image.get(_SAMPLES)
        samples = samples if isinstance(samples, int) else 1
        frames_text = image.get(_FRAMES) or "1"
        try:
            frames = int(str(frames_text))
        except ValueError:
            raise MalformedDataset("NumberOfFrames is not an integer", pixel=True) from None
        expected = (rows * columns * samples * bits * frames + 7) // 8
        if image.get(_PHOTOMETRIC) == "YBR_FULL_422" and bits != 1:
            expected = expected // 3 * 2
        expected += expected & 1
        if length != expected:
            raise MalformedDataset(
                f"native {_tag(tag)} is {length} bytes; Rows {rows} x Columns {columns} x SamplesPerPixel "
                f"{samples} x BitsAllocated {bits} x NumberOfFrames {frames} make {expected}",
                pixel=True)


def inflate(raw: bytes | memoryview, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """A deflated data set inflated within `limit` (node/deflate.py); what does not inflate whole
    is malformed (0xC212)."""
    try:
        return deflate.inflate(raw, limit)
    except deflate.NotInflatable as exc:
        raise MalformedDataset(str(exc)) from None


@lru_cache(maxsize=64)
def transfer_syntax_uid(value: str) -> UID:
    """`value` as pydicom's UID, validated once: UID() checks its text against a regular
    expression every time (1.9 µs; three stages of a receiver made one per instance from the same
    few transfer syntaxes)."""
    return UID(value)


def check_dataset(raw: bytes | memoryview, transfer_syntax: str, note: frozenset[int] = frozenset()) -> WalkedDataset:
    """Raise MalformedDataset unless the encoded data set is whole (see the module docstring);
    else return where the top-level elements tagged in `note` are, up to the first top-level
    tag greater than all of them."""
    ts = transfer_syntax_uid(transfer_syntax)
    data: bytes | memoryview = raw
    if ts == DeflatedExplicitVRLittleEndian:
        data = inflate(raw)
    walker = _Walker(data, ts.is_little_endian, note)
    try:
        walker.dataset(0, len(data), ts.is_implicit_VR, delimited=False, top=True,
                       encapsulated=ts.is_encapsulated)
    except RecursionError:
        raise MalformedDataset("sequences nested too deeply") from None
    except (struct.error, IndexError, OverflowError) as exc:  # bounds are checked first: a bug guard
        raise MalformedDataset(f"data set cannot be walked ({type(exc).__name__})") from None
    return WalkedDataset(data, walker.found)
