"""The spec's codes as highdicom's coded concepts (every encoder writes them)."""

from __future__ import annotations

import highdicom as hd

from inference.spec import Code


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)
