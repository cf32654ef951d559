"""Every reliance of the node on highdicom's private code, in one module, pinned by tests
(tests/test_encode.py, tests/test_deid.py). highdicom is pinned in pyproject.toml.

- Its tables of the standard (`_standard_utils`): which attributes each module holds, read for
  re-identification (node/deid/reidentify.py), and whether an IOD holds an attribute.
- That last question, remembered: highdicom 0.28 builds the SEG of a single-frame series by
  asking, for every source image, whether its SOP class allows several frames
  (`utils.get_plane_positions_of_series` -> `is_multiframe_image` -> `is_attribute_in_iod`).
  Each answer scans every attribute of every module of the IOD: ~0.25 ms, 300 times for a
  300-slice CT, a fifth of the SEG and SR's build and write. The answer depends only on the
  attribute and the SOP class (tables loaded once from the package, never changed), and no
  argument of highdicom's lets a caller keep it; to be proposed upstream.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from highdicom import _standard_utils

ANSWERS_KEPT = 1024  # (attribute, SOP class) pairs: a few per SOP class the node meets

highdicoms_answer = _standard_utils.is_attribute_in_iod  # highdicom's own, as imported


@functools.lru_cache(maxsize=ANSWERS_KEPT)
def remembered_answer(attribute: str, sop_class_uid: str) -> bool:
    """highdicom's answer, asked once per pair (an error, e.g. an unknown SOP class, is not kept)."""
    return highdicoms_answer(attribute, sop_class_uid)


def is_attribute_in_iod(
    attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
) -> bool:
    """highdicom's `is_attribute_in_iod`, remembered where the question can be a key."""
    if exclude_path_elements is not None:  # a rarer question: asked of highdicom each time, not kept
        return highdicoms_answer(attribute, sop_class_uid, exclude_path_elements)
    return remembered_answer(attribute, sop_class_uid)


def remember_iod_answers() -> None:
    """Put `is_attribute_in_iod` in place of highdicom's for the callers in its own module
    (`is_multiframe_image` looks the name up there at each call); idempotent. Modules that
    imported highdicom's by name keep it: they ask a few times per object."""
    _standard_utils.is_attribute_in_iod = is_attribute_in_iod


def module_attributes() -> dict[str, list[dict[str, Any]]]:
    """highdicom's table of each module's attributes, by the module's key ("patient",
    "general-study", ...): each attribute's keyword, type and path of enclosing sequences.
    highdicom's own object, which its functions read too: for reading only."""
    return _standard_utils.get_module_attribute_map()
