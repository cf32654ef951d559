"""The encoders' one reliance on highdicom's private code, pinned by tests/test_encode.py.

highdicom 0.28 builds the SEG of a single-frame series by asking, for every source image,
whether its SOP class allows several frames (``utils.get_plane_positions_of_series`` ->
``_standard_utils.is_multiframe_image`` -> ``is_attribute_in_iod``). Each answer scans every
attribute of every module of the IOD in highdicom's tables of the standard: ~0.25 ms, 300 times
for a 300-slice CT, a fifth of the SEG and SR's build and write. The answer depends only on the
attribute and the SOP class (tables loaded once from the package and never changed), so it is
remembered per pair. Not something a caller can ask highdicom for: its functions take no
cache; to be proposed upstream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from highdicom import _standard_utils

ANSWERS_KEPT = 1024  # pairs of (attribute, SOP class): a few per SOP class the node meets


def _remembering(ask: Callable[..., bool]) -> Callable[..., bool]:
    @functools.lru_cache(maxsize=ANSWERS_KEPT)
    def remembered(attribute: str, sop_class_uid: str) -> bool:
        return ask(attribute, sop_class_uid)

    @functools.wraps(ask)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        if exclude_path_elements is not None:  # a list: not a key; asked as before
            return ask(attribute, sop_class_uid, exclude_path_elements)
        return remembered(str(attribute), str(sop_class_uid))  # an unknown SOP class raises, uncached

    is_attribute_in_iod.remembered = remembered  # type: ignore[attr-defined]  # its cache_info, for the test
    is_attribute_in_iod.asks = ask  # type: ignore[attr-defined]
    return is_attribute_in_iod


def remember_iod_answers() -> None:
    """Put the remembering form in place of highdicom's ``is_attribute_in_iod`` for its own module's
    callers (``is_multiframe_image`` looks it up there at each call); idempotent. Modules that
    imported the function by name keep highdicom's: they ask a few times per object."""
    if not hasattr(_standard_utils.is_attribute_in_iod, "remembered"):
        _standard_utils.is_attribute_in_iod = _remembering(_standard_utils.is_attribute_in_iod)
