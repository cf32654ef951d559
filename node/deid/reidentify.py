"""Re-identification of results that come back from a project (README, "De-identification").

A result made outside (a SEG, an SR...) names the pseudonymous study and refers to instances the
node sent. Here every UID in it, in sequences and private elements too, becomes:
- the source UID, where the project's mapping has the value (the study, the series and
  instances it refers to, the frame of reference);
- itself, where it names a kind of thing (a SOP class, a coding scheme: registered in PS3.6);
- a new UID minted from the installation's identity (`mint`) for what the service made (its
  series, its instances, tracking UIDs): the same external UID always gives the same new one,
  so an SR that refers to a SEG still refers to it, and results sent again are stored once.
Its patient and study attributes are replaced by the source's (kept sealed with the round trip).

A result is refused (quarantined by the caller) when it is no result at all (it is an instance
that was sent, claims a series that was sent, or names itself with a registered UID) or when it
refers to an instance, or (inside a sequence) a series or study, that neither was sent nor came
back with it: re-identified, that reference would point nowhere. `source_of` itself refuses a UID
sent with another study (node/jobs/returns.py).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from node.deid.engine import KEPT_UID_KEYWORDS

# References that must resolve: to what was sent with the study (the mapping) or came back with
# the result; at any depth, and a study or series named inside a sequence item
REFERENCE_KEYWORDS = {"ReferencedSOPInstanceUID"}
NESTED_REFERENCE_KEYWORDS = {"SeriesInstanceUID", "StudyInstanceUID"}
# Attributes that say the data set was de-identified: not true of the re-identified result
DEIDENTIFIED_MARKS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                      "LongitudinalTemporalInformationModified")


class Refused(Exception):
    """The returned instance cannot be re-identified; the message says why (UIDs only)."""


@functools.cache  # read on first use: the tables cost the node's start 0.3 s
def patient_and_study_keywords() -> tuple[str, ...]:
    """The root attributes of the Patient, General Study, Patient Study and Clinical Trial
    Subject/Study modules, from highdicom's tables of the standard (the modules highdicom's
    own SOPClass.copy_patient_and_study_information copies; the function needs a highdicom
    object, the tables are what we need: node/highdicom_internals.py reads them)."""
    from node.highdicom_internals import module_attributes

    modules = module_attributes()
    return tuple(dict.fromkeys(
        str(item["keyword"]) for name in ("patient", "general-study", "patient-study", "clinical-trial-subject",
                                          "clinical-trial-study")
        for item in modules[name] if not item["path"]))


def patient_and_study(source: Dataset) -> Dataset:
    """The source's patient and study attributes (what a re-identified result gets back)."""
    kept = Dataset()
    if "SpecificCharacterSet" in source:  # the restored names are in the source's character set
        kept.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    for keyword in patient_and_study_keywords():
        if keyword in source and keyword not in DEIDENTIFIED_MARKS:
            kept[keyword] = copy.deepcopy(source[keyword])
    return kept


def reidentify(result: Dataset, *, source_of: Callable[[str], str | None], study: Dataset,
               mint: Callable[[str], str], returned: set[str]) -> Dataset:
    """`result` re-identified: `source_of(uid)` is the mapping (None: not sent), `study` the
    source's patient and study attributes (patient_and_study), `mint(uid)` a new UID for one the
    service made, `returned` the SOP Instance and Series UIDs of everything that came back with it."""
    ds = copy.deepcopy(result)
    own = str(ds.get("SOPInstanceUID", "") or "")
    if not own or not ds.get("SeriesInstanceUID"):
        raise Refused("an instance without its SOP Instance or Series UID")
    if own in UID_dictionary or str(ds.SeriesInstanceUID) in UID_dictionary:
        raise Refused(f"instance {own} names itself or its series with a registered UID, not one of its own")
    if source_of(own) is not None:
        raise Refused(f"instance {own} is one that was sent, not a result")
    if source_of(str(ds.SeriesInstanceUID)) is not None:
        raise Refused(f"instance {own} claims series {ds.SeriesInstanceUID}, which was sent:"
                      " results need a series of their own")
    _Uids(source_of, mint, returned, own).dataset(ds, nested=False)
    for keyword in (*patient_and_study_keywords(), *DEIDENTIFIED_MARKS):
        if keyword in ds:
            del ds[keyword]
    ds.update(copy.deepcopy(study))  # its SpecificCharacterSet too, where the source has one
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


class _Uids:
    def __init__(self, source_of: Callable[[str], str | None], mint: Callable[[str], str], returned: set[str],
                 instance: str):
        self.source_of, self.mint, self.returned, self.instance = source_of, mint, returned, instance

    def dataset(self, ds: Dataset, nested: bool) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    self.dataset(item, nested=True)
            elif elem.VR == "UI" and elem.value and not (
                    elem.keyword.endswith("ClassUID") or elem.keyword in KEPT_UID_KEYWORDS):
                values = [self._one(elem.keyword, str(v), nested)
                          for v in (elem.value if elem.VM > 1 else [elem.value])]
                elem.value = values if elem.VM > 1 else values[0]

    def _one(self, keyword: str, value: str, nested: bool) -> str:
        if value in UID_dictionary:
            return value
        source = self.source_of(value)
        if source is not None:
            return source
        reference = keyword in REFERENCE_KEYWORDS or (nested and keyword in NESTED_REFERENCE_KEYWORDS)
        if reference and value not in self.returned:
            what = {"SeriesInstanceUID": "series", "StudyInstanceUID": "study"}.get(keyword, "instance")
            raise Refused(f"instance {self.instance} refers to {what} {value}, which was neither sent nor"
                          " returned with it")
        return self.mint(value)
