"""Synthetic CT phantoms with known truth, defined in patient space.

Shapes are placed in millimetres (patient LPS), then sampled on whatever grid a series has, so
the same phantom can be written axial, sagittal, oblique or anisotropic and its truth (lesion
centres and volumes) holds for all of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from phantom.dicom import SeriesGeometry

BODY_HU = 40.0
AIR_HU = -1000.0


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # patient mm
    radii: tuple[float, float, float]  # mm along x, y, z
    hu: float

    def contains(self, points: np.ndarray) -> np.ndarray:
        scaled = (points - np.asarray(self.centre)) / np.asarray(self.radii)
        return np.einsum("...i,...i->...", scaled, scaled) <= 1.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.subtract(self.centre, self.radii), np.add(self.centre, self.radii)

    @property
    def volume_mm3(self) -> float:
        return float(4.0 / 3.0 * np.pi * np.prod(self.radii))


class Shape(Protocol):
    """A region of constant HU in patient space (an organ, a vessel)."""

    hu: float

    def contains(self, points: np.ndarray) -> np.ndarray: ...

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The corners of a box holding the shape (mm)."""
        ...


def _inside(shape: Shape, points: np.ndarray, extent: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`shape.contains`, skipped when its bounding box misses the points' `extent` (many small
    shapes, such as vessels, miss most slices)."""
    lo, hi = shape.bounds()
    if np.any(lo > extent[1]) or np.any(hi < extent[0]):
        return np.zeros(points.shape[:-1], dtype=bool)
    return shape.contains(points)


@dataclass
class Phantom:
    """A body ellipse (as a cylinder along z), organs of constant HU (drawn in order), and lesions
    (label 1, drawn last)."""

    body: Ellipsoid
    organs: list[Shape] = field(default_factory=list)
    lesions: list[Ellipsoid] = field(default_factory=list)
    noise_hu: float = 10.0

    def sample(self, shape: tuple[int, int, int], geometry: SeriesGeometry, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """HU volume and lesion label volume (uint8) on a grid of `shape` with `geometry`."""
        return self.sample_grid(shape, geometry.affine(), seed)

    def sample_grid(self, shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """HU and labels on the grid whose index (i, j, k) lies at `affine` @ (i, j, k, 1) (LPS mm)."""
        hu = np.empty(shape, dtype=np.float32)
        labels = np.zeros(shape, dtype=np.uint8)
        r, c = np.meshgrid(np.arange(shape[1], dtype=np.float32), np.arange(shape[2], dtype=np.float32), indexing="ij")
        affine = np.asarray(affine, dtype=np.float32)
        for k in range(shape[0]):  # slice by slice: a 300x512x512 grid would need GBs at once
            index = np.stack([np.full_like(r, k), r, c, np.ones_like(r)], axis=-1)
            points = (index @ affine.T)[..., :3]
            hu[k], labels[k] = self._sample_points(points)
        if self.noise_hu:
            hu += np.random.default_rng(seed).normal(0, self.noise_hu, size=shape).astype(np.float32)
        return hu, labels

    def _sample_points(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hu = np.full(points.shape[:-1], AIR_HU, dtype=np.float32)
        in_body = ((points[..., 0] - self.body.centre[0]) / self.body.radii[0]) ** 2 + (
            (points[..., 1] - self.body.centre[1]) / self.body.radii[1]
        ) ** 2 <= 1.0
        hu[in_body] = self.body.hu
        extent = (points.min(axis=tuple(range(points.ndim - 1))), points.max(axis=tuple(range(points.ndim - 1))))
        for organ in self.organs:
            hu[_inside(organ, points, extent)] = organ.hu
        labels = np.zeros(points.shape[:-1], dtype=np.uint8)
        for lesion in self.lesions:
            inside = _inside(lesion, points, extent)
            hu[inside] = lesion.hu
            labels[inside] = 1
        return hu, labels

    def truth(self) -> dict:
        return {
            "lesions": [
                {"centre_mm": list(lesion.centre), "radii_mm": list(lesion.radii), "volume_mm3": lesion.volume_mm3,
                 "hu": lesion.hu}
                for lesion in self.lesions
            ],
            "body": asdict(self.body),
            "organs": [asdict(o) for o in self.organs],
        }

    def write_truth(self, path: Path) -> None:
        path.write_text(json.dumps(self.truth(), indent=2))


def random_phantom(
    rng: np.random.Generator,
    field_of_view: tuple[float, float, float],
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    lesions: tuple[int, int] = (1, 3),
    lesion_radius: tuple[float, float] = (6.0, 12.0),
    noise_hu: float = 5.0,
) -> Phantom:
    """A body filling most of the field of view, two organs and 1-3 lesions of random contrast."""
    fx, fy, fz = field_of_view
    cx, cy, cz = centre
    body = Ellipsoid((cx, cy, cz), (fx * 0.42, fy * 0.34, fz * 10), BODY_HU)
    organs = [
        Ellipsoid((cx - fx * 0.15, cy, cz), (fx * 0.12, fy * 0.16, fz * 0.3), 60.0),  # liver-like
        Ellipsoid((cx + fx * 0.18, cy - fy * 0.05, cz), (fx * 0.08, fy * 0.1, fz * 0.25), -700.0),  # lung-like
    ]
    found: list[Ellipsoid] = []
    for _ in range(int(rng.integers(lesions[0], lesions[1] + 1))):
        for _attempt in range(50):
            radii = tuple(float(rng.uniform(*lesion_radius)) * s for s in rng.uniform(0.8, 1.2, size=3))
            margin = np.asarray(radii) + 2.0
            span = np.array([fx * 0.3, fy * 0.22, fz * 0.5]) - margin
            if np.any(span <= 0):
                continue
            point = tuple(float(c + rng.uniform(-s, s)) for c, s in zip((cx, cy, cz), span))
            candidate = Ellipsoid(point, radii, float(rng.choice([-1, 1]) * rng.uniform(150, 300) + BODY_HU))
            if all(np.linalg.norm(np.subtract(point, o.centre)) > max(radii) + max(o.radii) + 3 for o in found):
                found.append(candidate)
                break
    return Phantom(body, organs, found, noise_hu)
