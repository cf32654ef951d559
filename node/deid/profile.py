"""PS3.15 Annex E: the Basic Application Level Confidentiality Profile and its options.

The actions come from Table E.1-1 as machine-readable data (data/confidentiality_profile_attributes.json,
from innolitics/dicom-standard, which parses the standard's own tables: edition 2024b; MIT
licence in data/LICENSE-dicom-standard.txt), not from a list typed here. No maintained Python
package carries the table with its option columns under a licence this project can ship
(dicom-anonymizer has the Basic column only; idiscore is GPL and needs Python 3.12).

An option's column, where it has an entry, replaces the Basic Profile's action (E.3). The
compound actions that depend on an attribute's Type in its IOD (X/Z, X/D, Z/D, X/Z/D, X/Z/U*)
are taken at their strictest value that keeps any Type valid (Z, D, D, D, U): the node does not
carry every IOD's Type table, and a present, emptied attribute is as safe as an absent one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag

TABLE = Path(__file__).parent / "data" / "confidentiality_profile_attributes.json"
TABLE_EDITION = "2024b"


class Action(str, Enum):
    """PS3.15 Table E.1-1's action codes, compound ones resolved (see the module's docstring)."""

    DUMMY = "D"  # a non-empty dummy value of the VR
    EMPTY = "Z"  # an empty value
    REMOVE = "X"
    KEEP = "K"  # sequences: their items are de-identified in turn
    CLEAN = "C"  # the option's own cleaning (dates: shifted)
    UID = "U"  # the UID's pseudonym, the same for every instance


RESOLVED = {"D": Action.DUMMY, "Z": Action.EMPTY, "X": Action.REMOVE, "K": Action.KEEP, "C": Action.CLEAN,
            "U": Action.UID, "X/Z": Action.EMPTY, "X/D": Action.DUMMY, "Z/D": Action.DUMMY,
            "X/Z/D": Action.DUMMY, "X/Z/U*": Action.UID}


class Option(str, Enum):
    """The Annex E options (E.3) a routing rule may choose; the value is how it is written."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain_longitudinal_full_dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"


# Table E.1-1's option columns (as innolitics names them) and the CID 7050 code of each option.
COLUMNS = {
    Option.RETAIN_SAFE_PRIVATE: ("rtnSafePrivOpt", codes.DCM.RetainSafePrivateOption),
    Option.RETAIN_UIDS: ("rtnUIDsOpt", codes.DCM.RetainUidsOption),
    Option.RETAIN_DEVICE_IDENTITY: ("rtnDevIdOpt", codes.DCM.RetainDeviceIdentityOption),
    Option.RETAIN_INSTITUTION_IDENTITY: ("rtnInstIdOpt", codes.DCM.RetainInstitutionIdentityOption),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("rtnPatCharsOpt", codes.DCM.RetainPatientCharacteristicsOption),
    Option.RETAIN_LONGITUDINAL_FULL_DATES: (
        "rtnLongFullDatesOpt", codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption),
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "rtnLongModifDatesOpt", codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption),
    Option.CLEAN_DESCRIPTORS: ("cleanDescOpt", codes.DCM.CleanDescriptorsOption),
    Option.CLEAN_STRUCTURED_CONTENT: ("cleanStructContOpt", codes.DCM.CleanStructuredContentOption),
    Option.CLEAN_GRAPHICS: ("cleanGraphOpt", codes.DCM.CleanGraphicsOption),
}
# "C" in these columns asks for text cleaned by meaning, which no code can promise for free text:
# the node does not offer them (a rule that asks is refused when the configuration is checked).
NOT_OFFERED = {
    Option.CLEAN_DESCRIPTORS: "no cleaner can promise that free text (descriptions, comments) holds no identity",
    Option.CLEAN_STRUCTURED_CONTENT: "structured content (SR trees) is removed, not cleaned",
    Option.CLEAN_GRAPHICS: "graphics and overlays are removed, not cleaned",
}


# Where two chosen options both have an entry for an attribute: the dates options first (a date
# kept whole next to its shifted partners would give the patient's shift away), then E.3's order.
PRECEDENCE = [Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, Option.RETAIN_LONGITUDINAL_FULL_DATES] + [
    o for o in Option if o not in (Option.RETAIN_LONGITUDINAL_MODIFIED_DATES, Option.RETAIN_LONGITUDINAL_FULL_DATES)]


class ProfileError(ValueError):
    """Options that cannot be combined, or that the node does not offer."""


@dataclass(frozen=True)
class Row:
    basic: Action
    options: dict[Option, Action]


@lru_cache(maxsize=1)
def table() -> dict[int, Row]:
    """Table E.1-1 by tag, for the attributes with a single tag (the ranges are in `Profile`)."""
    rows: dict[int, Row] = {}
    for entry in json.loads(TABLE.read_text()):
        tag = entry["tag"].strip("()").replace(",", "")
        if len(tag) != 8 or not all(c in "0123456789ABCDEFabcdef" for c in tag):
            continue  # (50XX,XXXX), (60XX,...), private: ranges
        options = {option: RESOLVED[entry[column]] for option, (column, _) in COLUMNS.items() if column in entry}
        rows[int(tag, 16)] = Row(RESOLVED[entry["basicProfile"]], options)
    return rows


@dataclass(frozen=True)
class Profile:
    """The Basic Profile with `options`; `safe_private`: private elements kept under Retain Safe
    Private, as (private creator, element byte) pairs, e.g. ("SIEMENS CT VA0  COAD", 0x10)."""

    options: frozenset[Option] = frozenset()
    safe_private: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        problems = [f"{o.value}: {why}" for o, why in NOT_OFFERED.items() if o in self.options]
        dates = {Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}
        if dates <= self.options:
            problems.append("retain_longitudinal_full_dates and retain_longitudinal_modified_dates exclude each other")
        if self.safe_private and Option.RETAIN_SAFE_PRIVATE not in self.options:
            problems.append("a safe private list needs the retain_safe_private option")
        if problems:
            raise ProfileError("; ".join(problems))

    def action(self, tag: BaseTag) -> Action | None:
        """What Table E.1-1 says of a public attribute (None: it does not list it)."""
        group = tag >> 16
        if 0x5000 <= group <= 0x50FF and not group & 1:
            return Action.REMOVE  # curves
        if 0x6000 <= group <= 0x60FF and not group & 1:
            return Action.REMOVE  # overlays, their data and comments with the rest of the group
        row = table().get(int(tag))
        if row is None:
            return None
        for option in PRECEDENCE:
            if option in self.options and option in row.options:
                return row.options[option]
        return row.basic

    @property
    def dates(self) -> str:
        """LongitudinalTemporalInformationModified (0028,0303): what became of dates and times."""
        if Option.RETAIN_LONGITUDINAL_FULL_DATES in self.options:
            return "UNMODIFIED"
        if Option.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options:
            return "MODIFIED"
        return "REMOVED"

    def method_codes(self) -> list[Code]:
        """De-identification Method Code Sequence (0012,0064), CID 7050."""
        return [codes.DCM.BasicApplicationConfidentialityProfile] + [
            COLUMNS[o][1] for o in sorted(self.options, key=lambda o: list(Option).index(o))]

    def describe(self) -> str:
        """De-identification Method (0012,0063), at most 64 characters."""
        return f"PS3.15 E.1 basic{'+' + str(len(self.options)) + ' options' if self.options else ''}" \
               f" (Table E.1-1 {TABLE_EDITION})"
