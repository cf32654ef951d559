"""De-identify one instance by a `Profile` (PS3.15 Annex E), its UIDs and patient under a
project's `Pseudonyms`.

Every element is visited, in every sequence item at any depth: attributes of Table E.1-1 get
their action; UIDs not in the table (references in any sequence) get their pseudonym too, unless
they name a registered DICOM object (SOP classes, transfer syntaxes, coding schemes); private
elements go unless Retain Safe Private keeps them by creator and element; curves and overlays go.
The source data set is not changed. pydicom walks and decodes; the actions are the table's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (  # type: ignore[attr-defined]
    PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    UID_dictionary,
)

from node.deid.profile import Action, Option, Profile
from node.deid.pseudonyms import Pseudonyms


DUMMY_TEXT = "DEIDENTIFIED"
# PN with its component separator: a name without one reads as PS3.5's retired form (dciodvfy)
DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y", "IS": "0", "DS": "0",
         "PN": "DEIDENTIFIED^"}
NUMBERS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
TEXT = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
BYTES = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# UIDs that name a kind of thing, not an instance: never pseudonyms
KEPT_UID_KEYWORDS = {"TransferSyntaxUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
                     "PrivateInformationCreatorUID", "ContextUID", "MappingResourceUID"}
# Public attributes Table E.1-1 does not list are kept only when their VR cannot hold a name or
# an identifier (codes, numbers, times, bulk data) or they are named here: coding items and how
# the image was made, which an outside model may need and which identify no one. Any other text,
# person name, date (unless a dates option says otherwise) or unknown element is removed.
SAFE_UNLISTED_VRS = {"CS", "AT", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "IS", "DS", "TM",
                     "OB", "OW", "OF", "OD", "OL", "OV"}
SAFE_UNLISTED_TEXT = {
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue", "URNCodeValue",
    "MappingResource", "MappingResourceName", "ContextGroupVersion", "ContextGroupLocalVersion",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "ConvolutionKernel", "FilterType",
    "ImagedNucleus", "PulseSequenceName", "ReceiveCoilName", "TransmitCoilName", "RescaleType", "LUTExplanation",
    "LUTLabel", "WindowCenterWidthExplanation", "PositionReferenceIndicator", "ContrastBolusRoute",
    "ProcessingFunction", "PostprocessingFunction", "PlateType", "CollimatorGridName", "DimensionDescriptionLabel",
    "StackID", "SegmentLabel", "SegmentAlgorithmName",
}
# Pictures of screens, scanned pages, ultrasound and photographs: text is presumed in the pixels
SCREEN_CLASSES_PREFIXES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.", "1.2.840.10008.5.1.4.1.1.3.1",
                           "1.2.840.10008.5.1.4.1.1.77.")
DOCUMENT_CLASSES_PREFIX = "1.2.840.10008.5.1.4.1.1.104."  # encapsulated PDF, CDA, STL...: never sent
SCREEN_MODALITIES = {"US", "IVUS", "OT", "SC", "XC", "ES", "DOC", "GM", "SM", "OP"}


class BurnedInAnnotation(Exception):
    """The pixels may show identifying text; the rule does not allow such instances."""


@dataclass
class Deidentified:
    dataset: Dataset
    uids: dict[str, str] = field(default_factory=dict)  # source UID -> pseudonym, for every one replaced
    patient_id: str = ""  # the pseudonymous Patient ID


def burned_in_risk(ds: Dataset) -> str | None:
    """Why the pixels may carry identifying text, or None. Documents always; an overlay kept in
    the pixel data's unused bits always; else BurnedInAnnotation (0028,0301) decides when
    present, and without it screens, scans, ultrasound and photographs are presumed to."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class.startswith(DOCUMENT_CLASSES_PREFIX):
        return f"an encapsulated document ({UID(sop_class).name})"
    for elem in ds:
        if 0x6000 <= elem.tag.group <= 0x60FF and elem.tag.element == 0x0102 and elem.value not in (None, 0, ""):
            return "an overlay kept in the pixel data's unused bits"
    said = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if said == "YES":
        return "BurnedInAnnotation is YES"
    if said == "NO" or not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    if sop_class.startswith(SCREEN_CLASSES_PREFIXES):
        return f"a secondary capture, ultrasound or photograph ({UID(sop_class).name}) without BurnedInAnnotation NO"
    modality = ds.get("Modality") or ""
    for value in (list(modality) if isinstance(modality, MultiValue) else [modality]):
        if str(value).strip().upper() in SCREEN_MODALITIES:
            return f"modality {str(value).strip().upper()} without BurnedInAnnotation NO"
    image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    if any(v in ("SCREEN SAVE", "SCREEN SHOT") for v in image_type):
        return "a screen save without BurnedInAnnotation NO"
    return None


def deidentify(source: Dataset, profile: Profile, pseudonyms: Pseudonyms,
               allow_burned_in: bool = False) -> Deidentified:
    """A de-identified copy of `source` (with its file meta, if it has one)."""
    if not source.get("SOPInstanceUID") or not source.get("SOPClassUID"):
        raise ValueError("not a composite instance: no SOP Class or SOP Instance UID")
    risk = burned_in_risk(source)
    if risk is not None and not allow_burned_in:
        raise BurnedInAnnotation(risk)
    patient = _patient_key(source)
    out = Deidentified(copy.deepcopy(source))
    ds = out.dataset
    ds.preamble = b"\0" * 128  # a file's preamble is free bytes (PS3.10 7.1), written by whoever made it
    for tag in [t for t in ds.keys() if t.group == 0x0000]:
        del ds[tag]  # command elements have no place in a stored instance
    _Walker(profile, pseudonyms, timedelta(days=pseudonyms.shift_days(patient)), out.uids).dataset(ds)
    out.patient_id = pseudonyms.patient_id(patient)
    ds.PatientID = out.patient_id
    ds.PatientName = f"{out.patient_id}^"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = profile.describe()
    method = []
    for code in profile.method_codes():
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        method.append(item)
    ds.DeidentificationMethodCodeSequence = method
    ds.LongitudinalTemporalInformationModified = profile.dates
    meta = FileMetaDataset()  # made again: the source's may name its SOP instance and sender
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = _transfer_syntax(source)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return out


def _patient_key(source: Dataset) -> str:
    """Whose pseudonym and date shift: the patient ID with its issuer; without an ID, the study
    alone (patients without IDs must not share one pseudonym)."""
    patient_id = str(source.get("PatientID", "") or "").strip()
    if not patient_id:
        return "study\x00" + str(source.get("StudyInstanceUID", "") or "")
    return "patient\x00" + str(source.get("IssuerOfPatientID", "") or "") + "\x00" + patient_id


def _transfer_syntax(source: Dataset) -> UID:
    """The source's, from its file meta, else from how it was read (a file without meta)."""
    given = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
    if given:
        return UID(given)
    implicit, little = getattr(source, "original_encoding", (True, True))
    if implicit in (None, True):
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


class _Walker:
    def __init__(self, profile: Profile, pseudonyms: Pseudonyms, shift: timedelta, uids: dict[str, str]):
        self.profile, self.pseudonyms, self.shift, self.uids = profile, pseudonyms, shift, uids
        self.retain_uids = Option.RETAIN_UIDS in profile.options
        self.top: Dataset | None = None

    def dataset(self, ds: Dataset) -> None:
        if self.top is None:
            self.top = ds
        creators: dict[tuple[int, int], str] = {}  # (group, block) -> private creator, of this data set
        for tag in list(ds.keys()):
            if tag.is_private and tag.is_private_creator:
                creators[(tag.group, tag.element)] = str(ds[tag].value or "")
        kept_blocks: set[tuple[int, int]] = set()
        for tag in list(ds.keys()):
            if tag.group in (0x0000, 0x0002):
                if ds is not self.top:  # in an item: command or file meta elements do not belong
                    del ds[tag]
                continue  # the file meta is made again by deidentify
            if tag.is_private:
                if tag.is_private_creator:
                    continue
                block = (tag.group, tag.element >> 8)
                creator = creators.get(block, "")
                if (creator, tag.element & 0xFF) in self.profile.safe_private and ds[tag].VR != "UN":
                    kept_blocks.add(block)  # (UN: read without its VR, a sequence cannot be walked)
                    self.element(ds, tag, Action.KEEP)
                else:
                    del ds[tag]
                continue
            self.element(ds, tag, self.profile.action(tag))
        for (group, block) in creators:
            if (group, block) not in kept_blocks:
                del ds[Tag(group, block)]

    def element(self, ds: Dataset, tag: BaseTag, action: Action | None) -> None:
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - a value pydicom cannot decode is not kept
            del ds[tag]
            return
        vr = elem.VR
        if action is None:
            action = self._unlisted(elem)
        if action is Action.REMOVE:
            del ds[tag]
        elif vr == "SQ":
            if action in (Action.EMPTY, Action.DUMMY):
                elem.value = Sequence()
            else:  # K, C, U, not listed: each item in turn
                for item in elem.value:
                    self.dataset(item)
        elif action is Action.EMPTY:
            elem.value = None
        elif action is Action.DUMMY:
            elem.value = _dummy(vr)
        elif action is Action.UID:
            elem.value = self._uids(elem) if not self.retain_uids else elem.value
        elif action is Action.CLEAN:
            self._clean(ds, elem)

    def _unlisted(self, elem: DataElement) -> Action:
        """Not in Table E.1-1 (see SAFE_UNLISTED_VRS): a UID of an instance (a reference) gets its
        pseudonym; dates follow the dates option; what may hold a name or an ID goes."""
        vr = elem.VR
        if vr == "SQ":
            return Action.KEEP
        if vr == "UI":  # registered UIDs among the values stay as they are (_uids)
            if self.retain_uids or elem.keyword.endswith("ClassUID") or elem.keyword in KEPT_UID_KEYWORDS:
                return Action.KEEP
            return Action.UID
        if vr in ("DA", "DT"):
            if Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.profile.options:
                return Action.CLEAN
            return Action.KEEP if Option.RETAIN_LONGITUDINAL_FULL_DATES in self.profile.options else Action.REMOVE
        if vr in SAFE_UNLISTED_VRS or elem.keyword in SAFE_UNLISTED_TEXT:
            return Action.KEEP
        return Action.REMOVE

    def _uids(self, elem: DataElement) -> object:
        def one(value: object) -> str:
            source = str(value)
            if not source or source in UID_dictionary:
                return source
            pseudonym = self.uids.get(source)
            if pseudonym is None:
                pseudonym = self.uids[source] = self.pseudonyms.uid(source)
            return pseudonym

        if elem.VM > 1:
            return [one(v) for v in elem.value]
        return one(elem.value) if elem.value else elem.value

    def _clean(self, ds: Dataset, elem: DataElement) -> None:
        """C: dates and date-times move back by the patient's shift (Modified Dates); times of
        day and AE titles (Retain Device Identity) stay; other text is removed, since no code can
        promise to clean it."""
        if elem.VR in ("DA", "DT") and elem.value:
            try:
                elem.value = [_shifted(elem.VR, str(v), self.shift) for v in elem.value] if elem.VM > 1 \
                    else _shifted(elem.VR, str(elem.value), self.shift)
            except (ValueError, OverflowError):
                elem.value = None  # not a date, or none that can move back: nothing to keep
        elif elem.VR in ("TM", "AE"):
            return
        else:
            del ds[elem.tag]


def _dummy(vr: str) -> object:
    if vr in DUMMY:
        return DUMMY[vr]
    if vr in NUMBERS:
        return 0
    if vr in BYTES:
        return b"\x00\x00"
    return DUMMY_TEXT if vr in TEXT else None


def _shifted(vr: str, value: str, shift: timedelta) -> str:
    """A DA, or a DT keeping its precision and what follows the date (time, UTC offset)."""
    text = value.strip()
    if vr == "DA":
        day = datetime.strptime(text[:8], "%Y%m%d").date() - shift
        return f"{day.year:04d}{day.month:02d}{day.day:02d}"
    day = date(int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1)) - shift
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"[:max(4, min(8, len(text)))] + text[8:]
