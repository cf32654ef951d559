"""Synthetic training data and demo studies from the CT phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phantom.dicom import SeriesGeometry
from phantom.generator import random_phantom
from phantom.study import DEMO_FIELD_OF_VIEW
from training.data.msd import write_dataset_json, write_pair


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
