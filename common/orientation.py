"""The one rule for which plane an image is in: axial, coronal, sagittal or oblique.

The plane is named by the patient axis closest to the image plane's normal (the cross product of
the ImageOrientationPatient row and column cosines), as highdicom and viewers name it, and is
"oblique" when the normal is OBLIQUE_DEGREES or more off that axis. 30 degrees, because CT
gantries tilt by up to about 30 degrees and a gantry-tilted CT is still read, measured and
routed as an axial series (the stack advances along the table while its planes are tilted); a
plane 30 degrees or more off every axis (an MR double oblique) is oblique. The boundary itself
is oblique, so that a value written at exactly 30 degrees does not flip with rounding.

Routing (`orientation:` conditions, the console's series list) and the SR (the longest in-plane
diameter is reported for axial series) both use this rule.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Plane = Literal["axial", "coronal", "sagittal", "oblique"]
OBLIQUE_DEGREES = 30.0
_MIN_COSINE = math.cos(math.radians(OBLIQUE_DEGREES))


def plane_of_normal(normal: Sequence[float] | np.ndarray) -> Plane | None:
    """The plane whose normal (LPS, any length or sign) this is; None for a zero vector."""
    n = np.abs(np.asarray(normal, dtype=float).reshape(3))
    length = float(np.linalg.norm(n))
    if not math.isfinite(length) or length == 0:
        return None
    n /= length
    axis = int(np.argmax(n))
    if n[axis] <= _MIN_COSINE + 1e-6:  # 30 degrees or more off (1e-6: ~0.0001 degrees)
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def plane_of_orientation(iop: Sequence[float] | None) -> Plane | None:
    """The plane of an ImageOrientationPatient value (row cosines, then column cosines);
    None when it is missing or degenerate."""
    if iop is None or len(iop) != 6:
        return None
    values = np.asarray(iop, dtype=float)
    return plane_of_normal(np.cross(values[:3], values[3:]))
