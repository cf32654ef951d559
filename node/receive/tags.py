"""Read the routing tags of a received dataset from its raw bytes, without touching pixel data."""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.store.spool import checked_uid

ROUTING_KEYWORDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "SeriesNumber",
    "ImageType",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "SliceThickness",
)
_SPECIFIC_TAGS = [Tag(keyword) for keyword in ROUTING_KEYWORDS]
_LAST_TAG = max(_SPECIFIC_TAGS)  # parsing stops after it: the rest is stored, not read


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


def read_routing_tags(raw: bytes | memoryview, transfer_syntax: str) -> RoutingTags:
    """Parse only the routing tags of an encoded dataset (no pixel data is read)."""
    ts = UID(transfer_syntax)
    data = bytes(raw)
    if ts == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise UnreadableDataset(f"deflated dataset does not inflate: {exc}") from None
    try:
        ds = read_dataset(
            io.BytesIO(data),
            is_implicit_VR=ts.is_implicit_VR,
            is_little_endian=ts.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _LAST_TAG,
            specific_tags=_SPECIFIC_TAGS,
        )
        values = {keyword: ds.get(keyword) for keyword in ROUTING_KEYWORDS}
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise UnreadableDataset(f"dataset cannot be parsed: {type(exc).__name__}") from None
    try:
        study = checked_uid(values["StudyInstanceUID"], "StudyInstanceUID")
        series = checked_uid(values["SeriesInstanceUID"], "SeriesInstanceUID")
        sop = checked_uid(values["SOPInstanceUID"], "SOPInstanceUID")
        sop_class = checked_uid(values["SOPClassUID"], "SOPClassUID")
    except ValueError as exc:
        raise UnreadableDataset(str(exc)) from None
    return RoutingTags(
        patient_id=str(values["PatientID"] or ""),
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        series={
            "modality": _text(values["Modality"]),
            "body_part": _text(values["BodyPartExamined"]),
            "description": _text(values["SeriesDescription"]),
            "number": _number(values["SeriesNumber"], int),
            "image_type": _multi(values["ImageType"]),
            "orientation": _multi(values["ImageOrientationPatient"], as_json=True),
            "rows": _number(values["Rows"], int),
            "columns": _number(values["Columns"], int),
            "slice_thickness": _number(values["SliceThickness"], float),
        },
    )


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _number(value: Any, kind: type) -> Any:
    try:
        return None if value in (None, "") else kind(value)
    except (TypeError, ValueError):
        return None


def _multi(value: Any, as_json: bool = False) -> str | None:
    if value in (None, ""):
        return None
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    if as_json:
        try:
            return json.dumps([float(v) for v in items])
        except (TypeError, ValueError):
            return None
    return "\\".join(str(v) for v in items)
