"""The routing tags: the series attributes that routing rules decide on, as plain values.

The receiver reads them from each arriving dataset's raw bytes (node.receive.tags) and files
them in the index; routing reads them from the index, or from a folder of files for `route
explain` (node.route.study). Both take the keyword list and the conversion from here, so a
study routes the same whichever way it was read.
"""

from __future__ import annotations

import math
from typing import Any

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
    if kind is int and number is not None and not -2**31 <= number < 2**31:
        return None
    return None if kind is float and number is not None and not math.isfinite(number) else number


def _list(value: Any, kind: type) -> list | None:
    if value in (None, ""):
        return None
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    try:
        values = [kind(v) for v in items]
    except (TypeError, ValueError, OverflowError):
        return None
    if kind is float and not all(math.isfinite(v) for v in values):  # NaN and Infinity are no JSON (fuzzing)
        return None
    # as in _text: NUL padding is no text (found by fuzzing: an ImageType value with a NUL in it)
    return [v.replace("\x00", "") for v in values] if kind is str else values
