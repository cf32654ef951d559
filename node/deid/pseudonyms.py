"""Pseudonyms under a project key: the same source value always gives the same pseudonym within a
project, and two projects give unrelated ones. Keyed (HMAC-SHA256, RFC 2104), so no one without
the key can compute a source UID's pseudonym and look it up (a plain hash of a UID can be).

UIDs become `2.25.<integer>` (PS3.5 B.2: a UUID-derived UID, here 128 bits of the HMAC), at most
44 characters. The shift of dates (Retain Longitudinal Temporal Information with Modified Dates)
is one per patient, so intervals between a patient's studies stay true.
"""

from __future__ import annotations

import hashlib
import hmac

MAX_SHIFT_DAYS = 3650  # dates move back by 1 to 10 years


class Pseudonyms:
    def __init__(self, key: bytes, project: str):
        if len(key) < 16:
            raise ValueError("a de-identification key needs at least 16 bytes")
        # one key per project, derived: a project's pseudonyms say nothing of another's
        self._key = hmac.new(key, b"dicom-node project\x00" + project.encode(), hashlib.sha256).digest()
        self.project = project

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\x00" + value.encode(), hashlib.sha256).digest()

    def uid(self, source: str) -> str:
        return "2.25." + str(int.from_bytes(self._digest("uid", source)[:16], "big"))

    def patient_id(self, source: str) -> str:
        """A patient's pseudonymous ID (16 characters, fits LO and PN)."""
        return "P" + self._digest("patient", source).hex()[:15].upper()

    def lookup(self, pseudonym: str) -> str:
        """The digest a pseudonymous UID is filed under in the mapping (node/store/pseudonyms.py):
        the index never holds the pseudonym itself, so it cannot link it to a source study."""
        return self._digest("lookup", pseudonym).hex()

    def mapping_key(self) -> bytes:
        """The AES-256 key that seals this project's mapping (node/store/pseudonyms.py)."""
        return self._digest("mapping", "")

    def shift_days(self, patient_id: str) -> int:
        """How many days this patient's dates move back."""
        return 1 + int.from_bytes(self._digest("dates", patient_id)[:4], "big") % MAX_SHIFT_DAYS
