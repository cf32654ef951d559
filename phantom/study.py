"""The demo study: an axial CT series of a random phantom, with its truth beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from phantom.generator import Phantom, random_phantom

# The demo study's field of view (mm, x y z): training phantoms have the same anatomy scale.
DEMO_FIELD_OF_VIEW = (384.0, 384.0, 192.0)


def make_dicom_study(
    folder: Path,
    slices: int = 96,
    size: int = 256,
    pixel_spacing: float = 1.5,
    slice_spacing: float = 2.0,
    seed: int = 0,
    identity: SeriesIdentity | None = None,
) -> tuple[list[Path], Phantom]:
    """An axial CT series of a random phantom; its truth (lesion centres, volumes) is written
    beside the folder as ``<folder>.truth.json``."""
    return write_study(folder, lambda rng, fov: random_phantom(rng, fov, lesions=(2, 3)), slices, size,
                       pixel_spacing, slice_spacing, seed, identity or SeriesIdentity())


def write_study(folder: Path, anatomy: Callable[[np.random.Generator, tuple[float, float, float]], Phantom],
                slices: int, size: int, pixel_spacing: float, slice_spacing: float, seed: int,
                identity: SeriesIdentity) -> tuple[list[Path], Phantom]:
    """An axial CT series of the phantom `anatomy` makes for the field of view (centred on the
    origin), its truth beside the folder as ``<folder>.truth.json``."""
    rng = np.random.default_rng(seed)
    geometry = SeriesGeometry(spacing=(slice_spacing, pixel_spacing, pixel_spacing))
    fov = (size * pixel_spacing, size * pixel_spacing, slices * slice_spacing)
    geometry.origin = (-fov[0] / 2, -fov[1] / 2, -fov[2] / 2)
    phantom = anatomy(rng, fov)
    hu, _ = phantom.sample((slices, size, size), geometry, seed=seed)
    files = write_ct_series(hu, folder, geometry, identity)
    phantom.write_truth(truth_path(folder))
    return files, phantom


def truth_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".truth.json")
