"""Synthetic training data and demo studies from the CT phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.msd import write_dataset_json, write_pair
from training.phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from training.phantom.generator import Phantom, random_phantom


# The demo study's field of view (mm, x y z): training phantoms have the same anatomy scale.
DEMO_FIELD_OF_VIEW = (384.0, 384.0, 192.0)


def make_training_set(root: Path, count: int, spacing: float = 2.0, seed: int = 0,
                      field_of_view: tuple[float, float, float] = DEMO_FIELD_OF_VIEW) -> Path:
    """`count` random phantoms as an MSD-layout dataset (label 1: lesion), sampled at `spacing`."""
    rng = np.random.default_rng(seed)
    geometry = SeriesGeometry(spacing=(spacing,) * 3)
    fx, fy, fz = field_of_view
    shape = (int(fz / spacing), int(fy / spacing), int(fx / spacing))  # (slice, row, column)
    geometry.origin = (-fx / 2, -fy / 2, -fz / 2)
    pairs = []
    for i in range(count):
        phantom = random_phantom(rng, field_of_view)
        hu, labels = phantom.sample(shape, geometry, seed=seed * 100_000 + i)
        pairs.append(write_pair(root, f"phantom_{i:04d}", hu, labels, geometry.affine()))
    write_dataset_json(root, "synthetic-lesions", pairs, {0: "background", 1: "lesion"})
    return root


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
    rng = np.random.default_rng(seed)
    geometry = SeriesGeometry(spacing=(slice_spacing, pixel_spacing, pixel_spacing))
    fov = (size * pixel_spacing, size * pixel_spacing, slices * slice_spacing)
    geometry.origin = (-fov[0] / 2, -fov[1] / 2, -fov[2] / 2)
    phantom = random_phantom(rng, fov, lesions=(2, 3))
    hu, _ = phantom.sample((slices, size, size), geometry, seed=seed)
    files = write_ct_series(hu, folder, geometry, identity or SeriesIdentity())
    phantom.write_truth(truth_path(folder))
    return files, phantom


def truth_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".truth.json")
