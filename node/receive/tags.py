"""Read the routing tags of a received dataset from its raw bytes, without touching pixel data."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.receive.validate import MalformedDataset, inflate
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
            data = inflate(data)
        except MalformedDataset as exc:
            raise UnreadableDataset(str(exc)) from None
    try:
        ds = read_dataset(
            io.BytesIO(data),
            is_implicit_VR=ts.is_implicit_VR,
            is_little_endian=ts.is_little_endian,
            stop_when=lambda tag, vr, length: tag > _LAST_TAG,
            specific_tags=_SPECIFIC_TAGS,
        )
        values = routing_values(ds)
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
    )


def routing_values(ds: Any) -> dict[str, Any]:
    """The routing tags of a dataset as plain Python values (text, numbers, lists)."""
    get = ds.get
    return {
        "PatientID": _text(get("PatientID")),
        "StudyInstanceUID": _text(get("StudyInstanceUID")),
        "SeriesInstanceUID": _text(get("SeriesInstanceUID")),
        "SOPInstanceUID": _text(get("SOPInstanceUID")),
        "SOPClassUID": _text(get("SOPClassUID")),
        "Modality": _text(get("Modality")),
        "BodyPartExamined": _text(get("BodyPartExamined")),
        "SeriesDescription": _text(get("SeriesDescription")),
        "SeriesNumber": _number(get("SeriesNumber"), int),
        "ImageType": _list(get("ImageType"), str),
        "ImageOrientationPatient": _list(get("ImageOrientationPatient"), float),
        "Rows": _number(get("Rows"), int),
        "Columns": _number(get("Columns"), int),
        "SliceThickness": _number(get("SliceThickness"), float),
    }


def _text(value: Any) -> str | None:
    # NUL padding (seen in vendor files) is no text; PostgreSQL refuses it in any text value.
    text = None if value in (None, "") else str(value).replace("\x00", "")
    return text or None


def _number(value: Any, kind: type) -> Any:
    try:
        number = None if value in (None, "") else kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    # IS/US values beyond a 32-bit column carry nothing the routing can use (and PostgreSQL refuses them)
    return None if kind is int and number is not None and not -2**31 <= number < 2**31 else number


def _list(value: Any, kind: type) -> list | None:
    if value in (None, ""):
        return None
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    try:
        return [kind(v) for v in items]
    except (TypeError, ValueError):
        return None
