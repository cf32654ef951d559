"""Measurements of a label volume on its source grid: what the SR reports for each finding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

from inference.spec import Label, ModelSpec
from inference.volume import SeriesVolume


@dataclass(frozen=True)
class Finding:
    """One label (or one connected component of it) with its measurements in patient space."""

    label: Label
    component: int | None  # 1-based component number, None for a whole label
    voxel_count: int
    volume_mm3: float
    centroid: tuple[float, float, float]  # patient LPS mm
    bbox_min_index: tuple[int, int, int]  # (slice, row, column)
    bbox_max_index: tuple[int, int, int]
    longest_in_plane_diameter_mm: float  # in the acquisition plane (axial for axial series)
    short_axis_mm: float | None = None  # a detection's: perpendicular to the long axis, same plane
    probability: float | None = None  # a detection's score; None for a segmented finding

    @property
    def tracking_id(self) -> str:
        return self.label.name if self.component is None else f"{self.label.name} {self.component}"


def foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every nonzero voxel (None: there is none).

    Findings are small against a 300x512x512 grid: labelling and measuring inside this box
    instead of the whole grid turns seconds into milliseconds.
    """
    # Two passes over the grid, not one per axis: the slices holding anything, then the projection of
    # those slices, whose own box (a 2-D plane: cheap) gives the other axes. On uint8 and bool,
    # maximum is nonzero exactly where any is, and quicker (300x512x512: 0.023 -> 0.010 s).
    if labels.size == 0:
        return None
    project = np.maximum.reduce if labels.dtype.kind in "bu" else np.logical_or.reduce
    along_first = project(labels, axis=tuple(range(1, labels.ndim))) if labels.ndim > 1 else labels
    present = np.flatnonzero(along_first)
    if present.size == 0:
        return None
    first = slice(int(present[0]), int(present[-1]) + 1)
    if labels.ndim == 1:
        return (first,)
    rest = foreground_box(project(labels[first], axis=0))
    assert rest is not None  # the projection of slices holding something holds something
    return (first, *rest)


def separate_boxes(labels: np.ndarray) -> list[tuple[slice, ...]]:
    """Boxes that together hold every nonzero voxel, cut along empty planes, so that no connected
    component crosses from one box to another.

    Labelling box by box finds the same components as labelling the whole grid: lesions far
    apart in a 300x512x512 grid span a box of ~10 million voxels together, a few thousand each.
    """
    first = foreground_box(labels)
    pending, boxes = ([first] if first is not None else []), []
    while pending:
        box = pending.pop()
        parts = _cut(labels, box)
        if parts is None:
            boxes.append(box)
        else:
            pending.extend(parts)
    return sorted(boxes, key=lambda b: tuple(s.start for s in b))


def _cut(labels: np.ndarray, box: tuple[slice, ...]) -> list[tuple[slice, ...]] | None:
    """The tight boxes of the runs of occupied planes along the first axis with an empty plane
    inside `box` (None: every plane along every axis is occupied). Each part is smaller than `box`."""
    crop = labels[box]
    for axis in range(crop.ndim):
        occupied = crop.any(axis=tuple(a for a in range(crop.ndim) if a != axis))
        edges = np.flatnonzero(np.diff(np.r_[False, occupied, False].astype(np.int8)))
        if len(edges) <= 2:
            continue
        parts = []
        for start, stop in zip(edges[::2], edges[1::2]):
            part = list(box)
            part[axis] = slice(box[axis].start + int(start), box[axis].start + int(stop))
            tight = foreground_box(labels[tuple(part)])
            assert tight is not None  # the run is occupied
            parts.append(tuple(slice(p.start + t.start, p.start + t.stop) for p, t in zip(part, tight)))
        return parts
    return None


def clean_labels(labels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Drop each label's components smaller than the spec's minimum; optionally keep only the largest
    (in place; returns `labels`)."""
    post = spec.postprocessing
    if not post.keep_largest_component and post.min_component_voxels <= 1:
        return labels
    boxes = separate_boxes(labels)
    for label in spec.labels:
        parts = [(box, *ndimage.label(labels[box] == label.value)) for box in boxes]
        sizes = [np.bincount(components.ravel())[1:] for _, components, _ in parts]
        largest = max(((int(s.max()), -i) for i, s in enumerate(sizes) if s.size), default=(0, 1))  # first on ties
        for i, (box, components, count) in enumerate(parts):
            if count == 0:
                continue
            keep = sizes[i] >= max(post.min_component_voxels, 1)
            if post.keep_largest_component:
                keep = np.zeros_like(keep)
                if -largest[1] == i:
                    keep[int(np.argmax(sizes[i]))] = True
            drop = np.concatenate([[False], ~keep])
            crop = labels[box]  # a view: edits land in `labels`
            crop[drop[components]] = 0
    return labels


def measure(labels: np.ndarray, volume: SeriesVolume, spec: ModelSpec) -> list[Finding]:
    """Findings per label, or per connected component (largest first) when the spec reports lesions."""
    findings: list[Finding] = []
    if spec.postprocessing.findings != "per_component":
        box = foreground_box(labels)
        if box is None:
            return findings
        offset = np.array([s.start for s in box])
        for label in spec.labels:
            mask = labels[box] == label.value
            if mask.any():
                findings.append(_measure_one(np.argwhere(mask) + offset, volume, label, None))
        return findings
    boxes = separate_boxes(labels)
    for label in spec.labels:
        components = [indices for box in boxes for indices in _components(labels, box, label.value)]
        components.sort(key=len, reverse=True)  # stable: equal sizes keep grid order
        findings += [_measure_one(indices, volume, label, n) for n, indices in enumerate(components, start=1)]
    return findings


def _components(labels: np.ndarray, box: tuple[slice, ...], value: int) -> list[np.ndarray]:
    """Voxel indices (slice, row, column; in slice order) of each component of `value` in `box`."""
    components, count = ndimage.label(labels[box] == value)
    offset = np.array([s.start for s in box])
    out = []
    for number, where in enumerate(ndimage.find_objects(components), start=1):
        out.append(np.argwhere(components[where] == number) + [s.start for s in where] + offset)
    return out


def _measure_one(indices: np.ndarray, volume: SeriesVolume, label: Label, component: int | None) -> Finding:
    """Measurements of one finding from its voxel indices (slice, row, column), in slice order."""
    centroid = volume.to_patient(indices.mean(axis=0))[0]
    return Finding(
        label=label,
        component=component,
        voxel_count=int(len(indices)),
        volume_mm3=float(len(indices) * volume.voxel_volume),
        centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        bbox_min_index=tuple(int(v) for v in indices.min(axis=0)),  # type: ignore[arg-type]
        bbox_max_index=tuple(int(v) for v in indices.max(axis=0)),  # type: ignore[arg-type]
        longest_in_plane_diameter_mm=_longest_in_plane(indices, volume),
    )


def _longest_in_plane(indices: np.ndarray, volume: SeriesVolume) -> float:
    """Largest distance between voxel centres of the finding within one image plane."""
    best = 0.0
    # np.argwhere lists voxels in slice order: each slice is one contiguous run
    slices, starts = np.unique(indices[:, 0], return_index=True)
    for start, end in zip(starts, list(starts[1:]) + [len(indices)]):
        in_slice = indices[start:end]
        if len(in_slice) < 2:
            continue
        points = _outline(in_slice)
        best = max(best, float(pdist(volume.to_patient(points)).max()))
    return best


def _outline(in_slice: np.ndarray) -> np.ndarray:
    """Voxels on the outline of a slice's region: the longest chord runs between two of them."""
    if len(in_slice) <= 64:
        return in_slice
    rows, cols = in_slice[:, 1], in_slice[:, 2]
    grid = np.zeros((rows.max() - rows.min() + 3, cols.max() - cols.min() + 3), dtype=bool)
    grid[rows - rows.min() + 1, cols - cols.min() + 1] = True
    edge = grid & ~ndimage.binary_erosion(grid)
    r, c = np.nonzero(edge)
    k = np.full(len(r), in_slice[0, 0])
    return np.stack([k, r + rows.min() - 1, c + cols.min() - 1], axis=1)
