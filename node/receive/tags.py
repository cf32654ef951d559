"""Read the routing tags of a received dataset from its raw bytes, without touching pixel data."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.receive.validate import inflate
from node.routing_tags import ROUTING_KEYWORDS, routing_values
from node.store.spool import checked_uid

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
    """Parse only the routing tags of an encoded dataset (no pixel data is read). Raises
    UnreadableDataset, or MalformedDataset for a deflated data set that does not inflate whole."""
    ts = UID(transfer_syntax)
    data = bytes(raw)
    if ts == DeflatedExplicitVRLittleEndian:
        # a deflate stream that is cut short, too large or followed by stray bytes is malformed
        # (0xC212, as README's status table says), not merely unreadable: MalformedDataset goes on
        data = inflate(data)
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
