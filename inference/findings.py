"""Measurements of a label volume on its source grid: what the SR reports for each finding."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
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


def label_mask(labels: np.ndarray, box: tuple[slice, ...], value: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`value`'s mask within the smallest box inside `box` that holds it, and that box's first voxel
    (slice, row, column) in the grid; None where `value` is absent. A label's work is then over its
    own box, not over the box of all labels (two organs far apart span most of the body)."""
    mask = labels[box] == value
    own = foreground_box(mask)
    if own is None:
        return None
    return mask[own], np.array([b.start + o.start for b, o in zip(box, own)])


# Values from which `value_boxes` finds every value's box in one pass over the box of all labels (scipy's
# find_objects, ~2 ns a voxel here) instead of leaving each to be compared over it (~0.3 ns a voxel each): a
# 105-class network's 25 organs found in a CT, its 104 labels measured in 4.2 -> 1.4 s (benchmarks.many_classes).
MANY_VALUES = 8


def value_boxes(labels: np.ndarray, box: tuple[slice, ...], values: list[int]) -> dict[int, tuple[slice, ...]]:
    """Where `label_mask` is to look for each of `values` inside `box`: with many values, each present
    one's own smallest box (absent ones left out); with a few, `box` itself for each."""
    if len(values) <= MANY_VALUES:
        return {value: box for value in values}
    objects = ndimage.find_objects(labels[box], max_label=max(values))
    return {value: tuple(slice(b.start + o.start, b.start + o.stop) for b, o in zip(box, objects[value - 1]))
            for value in values if objects[value - 1] is not None}


def clean_labels(labels: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Drop each label's components smaller than the spec's minimum; optionally keep only the largest
    (in place; returns `labels`)."""
    post = spec.postprocessing
    if not post.keep_largest_component and post.min_component_voxels <= 1:
        return labels
    values = [label.value for label in spec.labels]
    looks = [value_boxes(labels, box, values) for box in separate_boxes(labels)]
    for label in spec.labels:
        held = [found for found in (label_mask(labels, look[label.value], label.value)
                                    for look in looks if label.value in look) if found is not None]
        labelled = [ndimage.label(mask) for mask, _ in held]  # in the grid's order
        # one component (an organ, often) is its mask's count: bincount would copy its numbers to 8 bytes each
        sizes = [np.bincount(components.ravel())[1:] if count > 1 else np.full(count, np.count_nonzero(mask))
                 for (mask, _), (components, count) in zip(held, labelled)]
        largest = max(((int(s.max()), -i) for i, s in enumerate(sizes)), default=(0, 1))  # the first on ties
        for i, ((mask, origin), (components, _)) in enumerate(zip(held, labelled)):
            keep = sizes[i] >= max(post.min_component_voxels, 1)
            if post.keep_largest_component:
                keep = np.zeros_like(keep)
                if -largest[1] == i:
                    keep[int(np.argmax(sizes[i]))] = True
            if keep.all():
                continue
            drop = np.concatenate([[False], ~keep])
            crop = labels[tuple(slice(o, o + n) for o, n in zip(origin, mask.shape))]  # a view: edits land in `labels`
            crop[drop[components]] = 0
    return labels


def measure(labels: np.ndarray, volume: SeriesVolume, spec: ModelSpec) -> list[Finding]:
    """Findings per label, or per connected component (largest first) when the spec reports lesions."""
    findings: list[Finding] = []
    values = [label.value for label in spec.labels]
    if spec.postprocessing.findings != "per_component":
        box = foreground_box(labels)
        look = value_boxes(labels, box, values) if box is not None else {}
        for label in spec.labels:
            found = label_mask(labels, look[label.value], label.value) if label.value in look else None
            if found is not None:
                findings.append(_measure_one(*found, volume, label))
        return findings
    looks = [value_boxes(labels, box, values) for box in separate_boxes(labels)]
    for label in spec.labels:
        # measured as they are found, one mask at a time, then numbered by size
        measured = [_measure_one(mask, origin, volume, label) for look in looks if label.value in look
                    for mask, origin in _components(labels, look[label.value], label.value)]
        measured.sort(key=lambda finding: finding.voxel_count, reverse=True)  # stable: equal sizes keep grid order
        findings += [replace(finding, component=n) for n, finding in enumerate(measured, start=1)]
    return findings


def _components(labels: np.ndarray, box: tuple[slice, ...], value: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each component of `value` in `box`, in grid order: its mask within its own box and that box's
    first voxel (slice, row, column) in the grid."""
    found = label_mask(labels, box, value)
    if found is None:
        return
    mask, origin = found
    components, count = ndimage.label(mask)
    if count == 1:  # the mask is its own box (label_mask): an organ skips find_objects and a comparison, 0.07 s
        yield mask, origin
        return
    for number, where in enumerate(ndimage.find_objects(components), start=1):
        yield components[where] == number, origin + [s.start for s in where]


SMALL_BOX = 4096  # voxels: a finding in a box this small is measured from its voxels' indices, in fewer calls


def _measure_one(mask: np.ndarray, origin: np.ndarray, volume: SeriesVolume, label: Label) -> Finding:
    """Measurements of one finding from its mask in a box whose first voxel is `origin` (slice, row,
    column). Read off the mask's projections, not a list of its voxels: an organ of 8 million voxels
    took 200 MB of indices and 0.7 s that way (issue 28). A small box is read from its voxels'
    indices all the same: the projections' dozen numpy calls cost more there."""
    if mask.size <= SMALL_BOX:
        indices = np.argwhere(mask) + origin  # in slice order
        count, centre, low, high = len(indices), indices.mean(axis=0), indices.min(axis=0), indices.max(axis=0)
        candidates = indices
    else:
        per_slice = mask.sum(axis=(1, 2), dtype=np.int64)
        in_plane = mask.sum(axis=0, dtype=np.int64)
        projections = (per_slice, in_plane.sum(axis=1), in_plane.sum(axis=0))
        count = int(per_slice.sum())
        # integer sums divided once: the same mean as np.argwhere(mask).mean(axis=0), to the last bit
        centre = np.array([(int(np.dot(n, np.arange(n.size))) + int(o) * count) / count
                           for n, o in zip(projections, origin)])
        present = [np.flatnonzero(n) for n in projections]
        low = np.array([p[0] for p in present]) + origin
        high = np.array([p[-1] for p in present]) + origin
        candidates = _row_ends(mask) + origin
    centroid = volume.to_patient(centre)[0]
    return Finding(
        label=label,
        component=None,  # numbered by the caller when it reports components
        voxel_count=count,
        volume_mm3=float(count * volume.voxel_volume),
        centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        bbox_min_index=tuple(int(v) for v in low),  # type: ignore[arg-type]
        bbox_max_index=tuple(int(v) for v in high),  # type: ignore[arg-type]
        longest_in_plane_diameter_mm=_longest_in_plane(candidates, volume),
    )


def _row_ends(mask: np.ndarray) -> np.ndarray:
    """The first and the last voxel (slice, row, column) of each row of the mask, in slice order:
    the corners of each slice's convex hull are among them (a voxel between two others on its row
    lies on the segment between them)."""
    slices, rows = np.nonzero(mask.any(axis=2))
    first = mask.argmax(axis=2)[slices, rows]
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)[slices, rows]
    wide = first != last
    ends = np.concatenate([np.stack([slices, rows, first], axis=1), np.stack([slices, rows, last], axis=1)[wide]])
    return ends[np.argsort(ends[:, 0], kind="stable")]


HULL_OVER = 64  # points in a slice: up to this many are compared pair by pair, quicker than finding their hull


def _longest_in_plane(points: np.ndarray, volume: SeriesVolume) -> float:
    """Largest distance, in patient space, between two of `points` (voxel indices in slice order) in
    the same slice. The farthest pair are corners of the slice's convex hull, and the grid-to-patient
    map is affine, so it keeps the corners: of many points in a slice only the hull's are compared."""
    if len(points) < 2:
        return 0.0
    if len(points) <= HULL_OVER:  # every pair at once
        where = volume.to_patient(points)
        same = points[:, :1] == points[:, 0]
        squares = ((where[:, None, :] - where[None, :, :]) ** 2).sum(axis=2)
        return float(np.sqrt(squares[same].max()))
    best = 0.0
    for in_slice in np.split(points, np.flatnonzero(np.diff(points[:, 0])) + 1):
        if len(in_slice) > HULL_OVER:
            try:
                in_slice = in_slice[ConvexHull(in_slice[:, 1:]).vertices]
            except QhullError:  # every point on one line: its two ends, first and last by row, then column
                in_slice = in_slice[np.lexsort((in_slice[:, 2], in_slice[:, 1]))[[0, -1]]]
        if len(in_slice) > 1:
            best = max(best, float(pdist(volume.to_patient(in_slice)).max()))
    return best
