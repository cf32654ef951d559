"""Patient and study attributes copied into results, tolerantly.

highdicom copies the patient and study modules from the source images and converts dates and
times on the way; one malformed value (a birth date "1970-01-01X") would fail the whole job and
put the value into the failure reason. A result must never fail on demographics it only copies:
a value that does not convert is left empty (these attributes are Type 2 in the result IODs).
"""

from __future__ import annotations

from typing import Iterable

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

# Attributes highdicom copies from the source into SEG and SR, with the conversion it applies.
_CONVERTED = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM, "PatientBirthTime": TM,
              "SeriesDate": DA, "SeriesTime": TM, "AcquisitionDateTime": DT}
_CODED = {"PatientSex": {"M", "F", "O", ""}}


def tolerate_demographics(datasets: Iterable[Dataset]) -> list[str]:
    """Empty every copied attribute that would not convert; return the keywords emptied (no values)."""
    emptied: set[str] = set()
    for ds in datasets:
        for keyword, convert in _CONVERTED.items():
            value = ds.get(keyword)
            if value in (None, ""):
                continue
            try:
                convert(str(value))
            except (ValueError, TypeError, OverflowError):
                setattr(ds, keyword, "")
                emptied.add(keyword)
        for keyword, allowed in _CODED.items():
            if keyword in ds and str(ds.get(keyword) or "") not in allowed:
                setattr(ds, keyword, "")
                emptied.add(keyword)
    return sorted(emptied)
