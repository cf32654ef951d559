"""Patient and study attributes copied into results, tolerantly.

highdicom copies the patient and study modules from the source images and converts dates and
times on the way; one malformed value (a birth date "1970-01-01X") would fail the whole job and
put the value into the failure reason. A result must never fail on demographics it only copies:
a value that does not convert is left empty (these attributes are Type 2 in the result IODs).
"""

from __future__ import annotations

from typing import Callable, Iterable

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

# Attributes highdicom copies from the source into SEG and SR, with the conversion it applies.
_CONVERTED = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM, "PatientBirthTime": TM,
              "SeriesDate": DA, "SeriesTime": TM, "AcquisitionDateTime": DT}
_CODED = {"PatientSex": {"M", "F", "O", ""}}


def _converts_with(convert: Callable[[str], object]) -> Callable[[object], bool]:
    """A check that a value is empty or that `convert` (what highdicom applies) accepts it."""
    def check(value: object) -> bool:
        if value in (None, ""):
            return True
        try:
            convert(str(value))
        except (ValueError, TypeError, OverflowError):
            return False
        return True
    return check


def _coded_as(allowed: set[str]) -> Callable[[object], bool]:
    """A check that a value is one of the codes `allowed`."""
    return lambda value: str(value or "") in allowed


# What each copied attribute must be to be copied as it is.
_CHECKS: dict[str, Callable[[object], bool]] = {
    **{keyword: _converts_with(convert) for keyword, convert in _CONVERTED.items()},
    **{keyword: _coded_as(allowed) for keyword, allowed in _CODED.items()},
}
# Values of these VRs (DA, TM, DT, CS) decode from the same bytes to the same value whatever the
# header's character set or byte order; under another VR (a vendor's LO, UL...) they may not.
_SHARED_VR = {keyword: dictionary_VR(keyword) for keyword in _CHECKS}


def tolerate_demographics(datasets: Iterable[Dataset]) -> list[str]:
    """Empty every copied attribute that would not convert; return the keywords emptied (no values).

    The headers of a series share these values byte for byte: each distinct value (its bytes as
    parsed, under the attribute's own VR) is decoded and checked once and its verdict applied to
    every header holding the same bytes, instead of decoding it in each of 300 headers (0.05-0.07
    -> 0.03 s in one process). A value under another VR, or decoded already, is checked on its own."""
    emptied: set[str] = set()
    verdicts: dict[tuple[str, bytes], bool] = {}
    for ds in datasets:
        for keyword, check in _CHECKS.items():
            if keyword not in ds:
                continue
            raw = ds.get_item(keyword, keep_deferred=True)
            shared = (isinstance(raw, RawDataElement) and raw.value is not None
                      and raw.VR in (None, _SHARED_VR[keyword]))  # None: implicit VR, the dictionary's
            key = (keyword, raw.value) if shared else None
            verdict = verdicts.get(key) if key is not None else None
            if verdict is None:
                verdict = check(ds.get(keyword))
                if key is not None:
                    verdicts[key] = verdict
            if not verdict:
                setattr(ds, keyword, "")
                emptied.add(keyword)
    return sorted(emptied)
