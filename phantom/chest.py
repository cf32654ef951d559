"""Synthetic chest CT phantoms for the nodule detector: lungs crossed by vessels, solid nodules.

Nodules are spheres of known centre and diameter (the detector's truth); vessels are tubes of
the same density, so that a detector has to tell a round blob from a cut through a tube, which
is what makes nodule detection hard on real chests too. Nodules keep clear of vessels and of
the lung wall, so that their size measured on the image is theirs alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phantom.dicom import SeriesIdentity
from phantom.generator import BODY_HU, Ellipsoid, Phantom
from phantom.study import write_study

LUNG_HU = -850.0
VESSEL_HU = 40.0
NODULE_DIAMETERS = (4.0, 12.0)  # mm: the solid nodules a screening report measures
CHEST_FIELD_OF_VIEW = (240.0, 240.0, 120.0)  # mm, x y z


@dataclass(frozen=True)
class Vessel:
    """A straight tube (a capsule) from `start` to `end` (patient mm), drawn only inside `within`
    (its lung): it runs through the lung wall to wall, as vessels do, so that no blunt tube end, a
    round cap much like a nodule, sits in the lung."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: float
    hu: float = VESSEL_HU
    within: Ellipsoid | None = None

    def distance(self, points: np.ndarray) -> np.ndarray:
        a, b = np.asarray(self.start, dtype=np.float32), np.asarray(self.end, dtype=np.float32)
        axis = b - a
        t = np.clip(((points - a) @ axis) / float(axis @ axis), 0.0, 1.0)
        return np.linalg.norm(points - (a + t[..., None] * axis), axis=-1)

    def contains(self, points: np.ndarray) -> np.ndarray:
        inside = self.distance(points) <= self.radius
        return inside & self.within.contains(points) if self.within is not None else inside

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        ends = np.array([self.start, self.end])
        lo, hi = ends.min(axis=0) - self.radius, ends.max(axis=0) + self.radius
        if self.within is not None:
            outer = self.within.bounds()
            lo, hi = np.maximum(lo, outer[0]), np.minimum(hi, outer[1])
        return lo, hi


def chest_phantom(
    rng: np.random.Generator,
    field_of_view: tuple[float, float, float] = CHEST_FIELD_OF_VIEW,
    nodules: tuple[int, int] = (0, 3),
    diameters: tuple[float, float] = NODULE_DIAMETERS,
    vessels_per_lung: tuple[int, int] = (6, 12),
    noise_hu: float = 15.0,
    sizes: tuple[float, ...] = (),
) -> Phantom:
    """A chest: body, two lungs with vessels, and `nodules` solid nodules (spheres, label 1), of
    random diameters in `diameters`, or of the diameters `sizes` (mm) when given."""
    fx, fy, fz = field_of_view
    body = Ellipsoid((0.0, 0.0, 0.0), (fx * 0.45, fy * 0.36, fz * 10), BODY_HU)
    lungs = [Ellipsoid((side * fx * 0.2, 0.0, 0.0), (fx * 0.16, fy * 0.27, fz * 0.6), LUNG_HU) for side in (-1, 1)]
    vessels = [_vessel(rng, lung) for lung in lungs for _ in range(int(rng.integers(*vessels_per_lung) + 1))]
    found: list[Ellipsoid] = []
    wanted = list(sizes) or [float(rng.uniform(*diameters)) for _ in range(int(rng.integers(nodules[0], nodules[1] + 1)))]
    for diameter in wanted:
        for _attempt in range(200):
            radius = diameter / 2
            lung = lungs[int(rng.integers(2))]
            centre = _inside(rng, lung, margin=radius + 4.0)
            clear = all(float(v.distance(np.asarray(centre, dtype=np.float32)[None])[0]) > radius + v.radius + 3.0
                        for v in vessels)
            within = abs(centre[2]) < fz / 2 - radius - 3.0  # whole in the scanned range
            apart = within and all(np.linalg.norm(np.subtract(centre, o.centre)) > radius + o.radii[0] + 10.0 for o in found)
            if clear and apart:
                found.append(Ellipsoid(centre, (radius,) * 3, float(rng.uniform(-20.0, 80.0))))
                break
    return Phantom(body, [*lungs, *vessels], found, noise_hu)


def _inside(rng: np.random.Generator, lung: Ellipsoid, margin: float) -> tuple[float, float, float]:
    """A point inside `lung` at least `margin` mm from its wall (approximately: shrunk radii)."""
    radii = np.asarray(lung.radii) - margin
    while True:
        unit = rng.uniform(-1.0, 1.0, size=3)
        if unit @ unit <= 1.0:
            return tuple(float(v) for v in np.asarray(lung.centre) + unit * radii)  # type: ignore[return-value]


def _vessel(rng: np.random.Generator, lung: Ellipsoid) -> Vessel:
    """A tube across a lung, 1.5-5 mm across, through a random point in a random direction."""
    through = np.asarray(_inside(rng, lung, margin=2.0))
    direction = rng.normal(size=3)
    direction *= 2 * max(lung.radii) / np.linalg.norm(direction)  # beyond the wall both ways
    start, end = (tuple(float(v) for v in through + sign * direction) for sign in (-1, 1))
    return Vessel(start, end, float(rng.uniform(0.75, 2.5)), within=lung)  # type: ignore[arg-type]


def make_chest_study(
    folder: Path,
    slices: int = 80,
    size: int = 256,
    pixel_spacing: float = 0.9,
    slice_spacing: float = 1.25,
    seed: int = 0,
    sizes: tuple[float, ...] = (4.5, 7.0, 11.0),
    identity: SeriesIdentity | None = None,
) -> tuple[list[Path], Phantom]:
    """An axial chest CT series with nodules of diameters `sizes` (mm), their truth beside it
    (``<folder>.truth.json``)."""
    return write_study(folder, lambda rng, fov: chest_phantom(rng, fov, sizes=sizes), slices, size, pixel_spacing,
                       slice_spacing, seed, identity or SeriesIdentity(series_description="Synthetic chest CT"))
