"""A result object's bytes, as pydicom's `save_as` writes them, with its sequences encoded here.

Why (issue 28): pydicom spends about 24 µs on each element it writes (each nested dataset's
ambiguous-VR correction, the character sets converted again for every element, a buffer per
element), and a SEG's Per-Frame Functional Groups Sequence holds some twenty elements a frame:
0.26-0.28 s of writing a 600-frame SEG, most of it. Here each sequence of the top level is walked
once, with the character sets converted once, each value still encoded by pydicom's own writer
for its VR, and handed to pydicom as a raw element, which it writes as it is (0.10-0.12 s for
that SEG). The bytes are pydicom's: a test compares the two for the SEG, SR, RTSTRUCT, KOS and key
images and for each case below. An ambiguous VR at the top level is settled first as pydicom
settles it. An item read from a file (highdicom copies some from the source images) or with a
character set of its own is written by pydicom's `write_sequence_item` in its place, its
ambiguous VRs settled against the data sets around it as pydicom settles them. Whatever else the
walk does not know (a raw value at the top level, an object read from a file, an ambiguous or
buffered VR inside an item, a value too long for its length field, encapsulated pixel data inside
an item, a value pydicom's writer refuses, an implicit or big-endian transfer syntax) sends the
object through `save_as` whole, as before: the same bytes, or the same error.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from io import BytesIO
from typing import Iterator

from pydicom import filewriter
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.tag import ItemDelimiterTag, ItemTag, SequenceDelimiterTag
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32, VR

_TAG = struct.Struct("<HH")


class _NotHere(Exception):
    """An element this walk does not encode: the object is written by pydicom whole."""


def dataset_bytes(dataset: Dataset) -> bytes:
    """`dataset` as `dataset.save_as(buffer, enforce_file_format=True)` writes it."""
    buffer = BytesIO()
    with _sequences_encoded(dataset):
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@contextmanager
def _sequences_encoded(dataset: Dataset) -> Iterator[None]:
    """While writing: `dataset`'s sequences as raw elements encoded here (explicit VR little
    endian, the encoding of every result the node makes), and the data set marked as encoded so
    (pydicom re-encodes a data set only where that differs from its output); all put back after."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if (syntax is None or syntax.is_implicit_VR or not syntax.is_little_endian
            or dataset.original_encoding != (None, None)):  # read from a file: what pydicom converts is its own
        yield
        return
    for element in dataset.elements():  # what pydicom's correction of the top level does
        if element.VR is not None and len(element.VR) != 2 and isinstance(element, DataElement):
            filewriter.correct_ambiguous_vr_element(element, dataset, True)
    if any(isinstance(element, RawDataElement) or element.VR is None or len(element.VR) != 2
           for element in dataset.elements()):
        yield  # a raw value pydicom would convert, or a VR not settled (pydicom would raise): its own way
        return
    charset = dataset.get("SpecificCharacterSet")
    encodings = convert_encodings(charset or default_encoding)
    # (a private one would be parsed again as it is set: pydicom's own, as is a raw one)
    sequences = [e for e in dataset.elements()
                 if e.VR == VR.SQ and isinstance(e, DataElement) and not e.tag.is_private]
    encoded = []
    try:
        for sequence in sequences:
            value = bytearray()
            for item in sequence.value:
                _item(item, value, encodings, [dataset])
            length = 0xFFFFFFFF if sequence.is_undefined_length else len(value)
            encoded.append(RawDataElement(sequence.tag, VR.SQ, length, bytes(value), 0, False, True))
    except Exception:  # noqa: BLE001 - _NotHere, or a value pydicom's writer refuses: pydicom decides,
        yield  # as before (the same bytes, or the same error)
        return
    encoding, original_charset = dataset.original_encoding, dataset.original_character_set
    for raw in encoded:
        dataset[raw.tag] = raw
    dataset.set_original_encoding(False, True, convert_encodings(charset) if charset else default_encoding)
    try:
        yield
    finally:
        for sequence in sequences:
            dataset[sequence.tag] = sequence
        dataset.set_original_encoding(*encoding, original_charset)


def _item(item: Dataset, out: bytearray, encodings: list[str], enclosing: list[Dataset]) -> None:
    """One sequence item as pydicom's `write_sequence_item` writes it (its length filled in);
    `enclosing`: the data sets around it, the nearest first. An item read from a file (one highdicom
    copied from a source image: raw values pydicom writes as read, or converts where the file's
    encoding was another) or with a character set of its own is written by pydicom itself, its
    ambiguous VRs settled first against the data sets around it, as pydicom's correction of the
    whole object settles them."""
    if ("SpecificCharacterSet" in item or item.original_encoding != (None, None)
            or any(isinstance(element, RawDataElement) for element in item.elements())):
        filewriter.correct_ambiguous_vr(item, True, [item, *enclosing])
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        filewriter.write_sequence_item(buffer, item, encodings)
        out += buffer.getvalue()
        return
    out += _TAG.pack(ItemTag >> 16, ItemTag & 0xFFFF)
    start = len(out)
    out += b"\xff\xff\xff\xff"
    for tag in sorted(item.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths: not written
            continue
        _element(item[tag], out, encodings, [item, *enclosing])
    if getattr(item, "is_undefined_length_sequence_item", False):
        out += _TAG.pack(ItemDelimiterTag >> 16, ItemDelimiterTag & 0xFFFF) + bytes(4)
    else:
        out[start:start + 4] = struct.pack("<L", len(out) - start - 4)


def _element(element: DataElement, out: bytearray, encodings: list[str], enclosing: list[Dataset]) -> None:
    """One element as pydicom's `write_data_element` writes it in explicit VR little endian;
    `enclosing`: the data sets around it, the nearest first."""
    vr = element.VR
    undefined = element.is_undefined_length
    if vr is None or len(vr) != 2 or element.is_buffered or vr not in filewriter.writers:
        raise _NotHere()
    if undefined and vr != VR.SQ:  # encapsulated pixel data (an icon image's): pydicom adds a delimiter
        raise _NotHere()
    out += _TAG.pack(element.tag >> 16, element.tag & 0xFFFF)
    if vr == VR.SQ:
        out += b"SQ\x00\x00"
        start = len(out)
        out += b"\xff\xff\xff\xff"
        for item in element.value:
            _item(item, out, encodings, enclosing)
        if undefined:
            out += _TAG.pack(SequenceDelimiterTag >> 16, SequenceDelimiterTag & 0xFFFF) + bytes(4)
        else:
            out[start:start + 4] = struct.pack("<L", len(out) - start - 4)
        return
    value = b""
    if not element.is_empty:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write, parameter = filewriter.writers[vr]
        if vr in CUSTOMIZABLE_CHARSET_VR:
            write(buffer, element, encodings=encodings)
        elif parameter is not None:
            write(buffer, element, parameter)
        else:
            write(buffer, element)
        value = buffer.getvalue()
    if vr in EXPLICIT_VR_LENGTH_32:
        out += vr.encode() + bytes(2) + struct.pack("<L", len(value))
    elif len(value) > 0xFFFF:  # pydicom writes it as UN
        raise _NotHere()
    else:
        out += vr.encode() + struct.pack("<H", len(value))
    out += value
