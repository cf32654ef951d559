"""Read the routing tags of a received dataset from its raw bytes, without touching pixel data."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.receive.validate import MalformedDataset, WalkedDataset, check_dataset, inflate, transfer_syntax_uid
from node.routing_tags import ROUTING_KEYWORDS, routing_values
from node.store.signals import CountGroup
from node.store.spool import checked_uid

# What completion signals read besides the routing tags: the accession number (HL7 messages name
# the exam by it) and the counts an instance may carry (README, "Completion signals").
COMPLETION_KEYWORDS = ("AccessionNumber", "AcquisitionNumber", "ImagesInAcquisition", "ConcatenationUID",
                       "InConcatenationTotalNumber", "NumberOfFrames")
_SPECIFIC_TAGS = [Tag(keyword) for keyword in ROUTING_KEYWORDS + COMPLETION_KEYWORDS]
_LAST_TAG = max(_SPECIFIC_TAGS)  # parsing stops after it: the rest is stored, not read
_CHARSET = 0x00080005  # Specific Character Set: text values are decoded by it
_NOTED_TAGS = frozenset({*map(int, _SPECIFIC_TAGS), _CHARSET})
_UI_KEYWORDS = {int(tag): keyword_for_tag(tag) for tag in _SPECIFIC_TAGS if dictionary_VR(tag) == "UI"}
# A UID as PS3.5 9.1 has it (no leading zero in a component), padded as DICOM pads it: pydicom's
# conversion (convert_UI, then a UID whose validation finds nothing to say) is the text itself.
_PLAIN_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*[\0 ]*")


class UnreadableDataset(ValueError):
    """The dataset cannot be parsed or lacks what the node needs to file it."""


@dataclass(frozen=True)
class RoutingTags:
    patient_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series: dict[str, Any]
    accession_number: str | None = None
    count: CountGroup | None = None  # the expected count of the instance's group, if it carries one
    # node.receive.validate.check_dataset found the data set whole on the way: no need to walk it again
    whole: bool = field(default=False, compare=False)


def read_routing_tags(raw: bytes | memoryview, transfer_syntax: str) -> RoutingTags:
    """Parse only the routing tags of an encoded dataset (no pixel data is read). Raises
    UnreadableDataset, or MalformedDataset for a deflated data set that does not inflate whole."""
    ts = transfer_syntax_uid(transfer_syntax)
    try:
        walked: WalkedDataset | None = check_dataset(raw, ts, note=_NOTED_TAGS)
    except MalformedDataset:
        walked = None  # not whole: the receiver refuses it (0xC212/0xC213) once its UIDs are checked
    ds: Any = None
    if walked is None or not _as_pydicom_reads(walked, ts):
        # read as leniently as pydicom reads, so that a refusal says what it always said
        ds = _read_leniently(raw, ts)
    try:
        if ds is None:
            ds = _converted(cast(WalkedDataset, walked), ts)
        values = routing_values(ds)
        accession, count = _accession(ds), _count(ds, values["SeriesInstanceUID"], values["SOPInstanceUID"])
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDataset(f"dataset cannot be parsed: {type(exc).__name__}") from None
    try:
        study = checked_uid(values["StudyInstanceUID"], "StudyInstanceUID")
        series = checked_uid(values["SeriesInstanceUID"], "SeriesInstanceUID")
        sop = checked_uid(values["SOPInstanceUID"], "SOPInstanceUID")
        sop_class = checked_uid(values["SOPClassUID"], "SOPClassUID")
    except ValueError as exc:
        raise UnreadableDataset(str(exc)) from None
    orientation = values["ImageOrientationPatient"]
    image_type = values["ImageType"]
    return RoutingTags(
        patient_id=values["PatientID"] or "",
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        series={
            "modality": values["Modality"],
            "body_part": values["BodyPartExamined"],
            "description": values["SeriesDescription"],
            "number": values["SeriesNumber"],
            "image_type": "\\".join(image_type) if image_type else None,
            "orientation": json.dumps(orientation) if orientation else None,
            "rows": values["Rows"],
            "columns": values["Columns"],
            "slice_thickness": values["SliceThickness"],
        },
        accession_number=accession,
        count=count,
        whole=walked is not None,
    )


def _read_leniently(raw: bytes | memoryview, ts: UID) -> Any:
    data = bytes(raw)
    if ts == DeflatedExplicitVRLittleEndian:
        # a deflate stream that is cut short, too large or followed by stray bytes is malformed
        # (0xC212, as README's status table says), not merely unreadable: MalformedDataset goes on
        data = inflate(data)
    try:
        return read_dataset(
            io.BytesIO(data),
            is_implicit_VR=ts.is_implicit_VR,
            is_little_endian=ts.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _LAST_TAG,
            specific_tags=_SPECIFIC_TAGS,
        )
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDataset(f"dataset cannot be parsed: {type(exc).__name__}") from None


def _as_pydicom_reads(walked: WalkedDataset, ts: UID) -> bool:
    """Whether pydicom's reader would see the noted elements where the walk found them. Not when
    a noted element has an undefined length (pydicom reads its items as a value), nor when an
    implicit VR data set's first element looks explicit (two capital letters where its length
    begins: pydicom then reads it as explicit VR, whatever the transfer syntax says)."""
    if any(e.undefined_length for e in walked.elements.values()):
        return False
    head = bytes(walked.data[4:6])
    return not (ts.is_implicit_VR and len(head) == 2 and head.isalpha() and head.isupper())


def _converted(walked: WalkedDataset, ts: UID) -> dict[str, Any]:
    """The noted elements' values by keyword, converted by pydicom as `Dataset.get` converts
    them (the same hooks, the data set's Specific Character Set): the whole-data-set check has
    found them, so pydicom's reader and its Dataset need not walk the header again (together
    about 0.15 ms of the 0.25 ms this took per instance)."""
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    data = walked.data
    elements = walked.elements
    charset = elements.get(_CHARSET)
    encoding: str | tuple[str, ...] = default_encoding
    if charset is not None:
        value = bytes(data[charset.offset:charset.offset + charset.length])
        encoding = _remembered(_encoding, value)(charset.vr, value, implicit, little)
    converted: dict[str, Any] = {}
    for tag, e in elements.items():
        if tag != _CHARSET:
            value = bytes(data[e.offset:e.offset + e.length])
            uid = _plain_uid(tag, e.vr, value)
            if uid is not None:
                converted[_UI_KEYWORDS[tag]] = uid
                continue
            keyword, converted_value = _remembered(_value, value)(tag, e.vr, value, implicit, little, encoding)
            converted[keyword] = converted_value
    return converted


def _plain_uid(tag: int, vr: str | None, value: bytes) -> str | None:
    """A UI element's value, when it is a plain valid UID (what nearly every one is): the text of
    the UID pydicom converts it to (what routing_values takes of it). The SOP Instance UID
    differs in every instance, so no remembered conversion serves it, and pydicom's took 23 of
    this module's ~140 µs per instance."""
    if tag in _UI_KEYWORDS and vr in ("UI", None) and len(value) <= 66 and _PLAIN_UID.fullmatch(value):
        text = value.decode("ascii").rstrip("\0 ")
        if len(text) <= 64:
            return text
    return None


# Conversions are remembered (per receiver process): the images of a series repeat most of their
# noted values byte for byte (only the SOP Instance UID always differs), and pydicom's conversion
# (its hooks, value validation, UID and number types) was two thirds of reading the tags (0.11 of
# 0.17 ms per instance). Bounded in entries and in what one entry may hold (a peer may send
# a noted element of any length, and what pydicom makes of 1 KB of "0\\0\\..." is 200 KB of
# numbers). Nothing downstream changes a value: routing_values copies them.
CONVERSIONS_KEPT = 4096
REMEMBERED_VALUE_MAX = 128  # bytes
REMEMBERED_VALUES_MAX = 9  # values of a multi-valued element (an orientation has 6)


def _remembered(conversion: Any, value: bytes) -> Any:
    """`conversion` (an lru_cache) for a value it may keep, else the conversion itself."""
    if len(value) <= REMEMBERED_VALUE_MAX and value.count(b"\\") < REMEMBERED_VALUES_MAX:
        return conversion
    return conversion.__wrapped__


@lru_cache(maxsize=256)
def _encoding(vr: str | None, value: bytes, implicit: bool, little: bool) -> tuple[str, ...]:
    """The Python codecs of a Specific Character Set value, as pydicom chooses them."""
    raw = RawDataElement(BaseTag(_CHARSET), vr, len(value), value, 0, implicit, little)
    return tuple(convert_encodings(convert_raw_data_element(raw).value))


@lru_cache(maxsize=CONVERSIONS_KEPT)
def _value(tag: int, vr: str | None, value: bytes, implicit: bool, little: bool,
           encoding: str | tuple[str, ...]) -> tuple[str, Any]:
    """One element's keyword and value, as pydicom converts them."""
    raw = RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, little)
    return keyword_for_tag(tag), convert_raw_data_element(
        raw, encoding=list(encoding) if isinstance(encoding, tuple) else encoding).value


def _accession(ds: Any) -> str | None:
    value = str(ds.get("AccessionNumber") or "").replace("\x00", "").strip()
    return value[:64] or None


def _positive(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if 0 < number < 2**31 else None


def _count(ds: Any, series_uid: str | None, sop_instance_uid: str | None) -> CountGroup | None:
    """The count an instance carries: the instances of its concatenation (an Enhanced object
    split over several instances, PS3.3 C.7.6.16), the images of its acquisition in its series
    (ImagesInAcquisition), or, for a multi-frame object not split, itself: all its frames are in
    it. An odd value is no count (the quiet period decides)."""
    concatenation = str(ds.get("ConcatenationUID") or "").replace("\x00", "").strip()  # NUL: as in routing_tags
    total = _positive(ds.get("InConcatenationTotalNumber"))
    if concatenation and total:
        return CountGroup(f"concatenation:{concatenation[:64]}", total)
    images = _positive(ds.get("ImagesInAcquisition"))
    if images and series_uid:
        acquisition = _positive(ds.get("AcquisitionNumber"))
        return CountGroup(f"acquisition:{series_uid}:{acquisition or ''}", images)
    frames = _positive(ds.get("NumberOfFrames"))
    if frames and frames > 1 and sop_instance_uid:
        return CountGroup(f"instance:{sop_instance_uid}", 1)
    return None
