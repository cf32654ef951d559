"""A stored series as a volume with its patient-space affine (highdicom does the geometry).

Before handing the datasets to highdicom, the series is checked for what would make a
volume wrong rather than merely unusual, so that the refusal names the cause: non-image
objects, mixed orientations, varying spacing, missing slices, multi-frame objects without
per-frame geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset


class SeriesError(ValueError):
    """The series cannot be made into one volume; the message says why."""


@dataclass
class SeriesVolume:
    """Voxels (slice, row, column) in modality units, and where they are.

    ``affine`` maps (slice, row, column, 1) to patient LPS millimetres. ``datasets[k]`` is the
    source instance of slice k (same order), for references in the results.
    """

    array: np.ndarray
    affine: np.ndarray
    datasets: list[Dataset]
    frame_of_reference_uid: str

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) patient coordinates (mm)."""
        indices = np.atleast_2d(np.asarray(indices, dtype=float))
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]


def read_series(files: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(str(f)) for f in files]


def load_series(
    datasets: Sequence[Dataset], spacing_tolerance: float = 0.05, orientation_tolerance: float = 1e-3
) -> SeriesVolume:
    """Check a single-frame image series and build its volume (rescale applied, any order in)."""
    if not datasets:
        raise SeriesError("the series has no instances")
    for ds in datasets:
        _check_image(ds)
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        return _multiframe(datasets[0])
    _check_geometry(datasets, spacing_tolerance, orientation_tolerance)
    try:
        volume = hd.get_volume_from_series(list(datasets), dtype=np.float32, apply_modality_transform=True)
    except (ValueError, RuntimeError) as exc:
        raise SeriesError(f"the series is not a regular volume: {exc}") from None
    ordered = _order_by_volume(datasets, volume.affine)
    return SeriesVolume(np.asarray(volume.array), np.asarray(volume.affine), ordered,
                        str(datasets[0].FrameOfReferenceUID))


def _check_image(ds: Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError(f"SOP class {ds.get('SOPClassUID', 'unknown')} ({_sop_name(ds)}) is not an image")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        has_positions = per_frame and all("PlanePositionSequence" in item for item in per_frame)
        if not has_positions:
            raise SeriesError(
                f"multi-frame object with {frames} frames has no per-frame geometry"
                " (Per-frame Functional Groups with Plane Position)"
            )
    elif "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise SeriesError("an image has no ImagePositionPatient/ImageOrientationPatient: no patient geometry")


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", "unknown") if uid else "unknown"


def _check_geometry(datasets: Sequence[Dataset], spacing_tol: float, orientation_tol: float) -> None:
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesError("the series mixes multi-frame objects with other instances")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.max(np.abs(orientations - orientations[0])) > orientation_tol:
        distinct = {tuple(np.round(o, 3)) for o in orientations}
        raise SeriesError(f"mixed orientations in one series: {len(distinct)} different ImageOrientationPatient values")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise SeriesError(f"images of different sizes in one series: {sorted(shapes)}")
    if len(datasets) < 2:
        return
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    positions = np.sort([float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets])
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        raise SeriesError("two images share one position: duplicate slices or several stacks in one series")
    typical = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if abs(gap - typical) <= spacing_tol * typical:
            continue
        ratio = gap / typical
        if ratio > 1.5 and abs(ratio - round(ratio)) <= spacing_tol * round(ratio):
            raise SeriesError(
                f"missing slices: gap of {gap:.2f} mm after position {positions[i]:.2f} mm"
                f" where the spacing is {typical:.2f} mm ({round(ratio) - 1} slice(s) missing)"
            )
        raise SeriesError(
            f"slice spacing varies: {gaps.min():.2f} to {gaps.max():.2f} mm"
            f" (tolerance {spacing_tol:.0%} of {typical:.2f} mm)"
        )


def _order_by_volume(datasets: Sequence[Dataset], affine: np.ndarray) -> list[Dataset]:
    """Source instance of each slice: the slice index of its ImagePositionPatient."""
    inverse = np.linalg.inv(affine)
    ordered: list[Dataset | None] = [None] * len(datasets)
    for ds in datasets:
        position = np.append([float(v) for v in ds.ImagePositionPatient], 1.0)
        k = int(round(float((inverse @ position)[0])))
        ordered[k] = ds
    return [ds for ds in ordered if ds is not None]


def _multiframe(ds: Dataset) -> SeriesVolume:
    try:
        image = ds if isinstance(ds, hd.Image) else hd.Image.from_dataset(ds, copy=False)
        volume = image.get_volume(dtype=np.float32, apply_modality_transform=True)
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise SeriesError(f"multi-frame object is not a regular volume: {exc}") from None
    return SeriesVolume(np.asarray(volume.array), np.asarray(volume.affine), [ds],
                        str(ds.FrameOfReferenceUID))
