"""Detection: a series volume through a box detector, each box then measured on the source voxels.

The detector (a MONAI RetinaNet, ``training.detection``) sees what a segmentation model sees:
the volume on the spec's grid, orientation and intensity window (``to_model_space``). It runs on
fixed patches windowed over that grid with the spec's overlap. Its ONNX file decodes its own
boxes (anchors and box regression stay inside the model): for every anchor it answers a box
(x0, y0, z0, x1, y1, z1 in the patch's voxel indices, voxel centres at integers) and a score per
label. The node keeps the boxes scoring at least the operating threshold, drops a box that a
window edge inside the volume cuts (the overlap shows that object whole in a neighbouring
window), merges the rest with MONAI's non-maximum suppression, and (with the spec's
`body_threshold`) drops those outside the body.

Each box is then measured where the radiologist measures, on the source voxels: the finding is
the connected region brighter than halfway between its core (the box's brightest voxels) and its
surroundings, inside the box grown to twice its size. Its centre is that region's centroid, its long and short axes those of the
ellipse with the region's second moments on its largest cross-section in the image plane (for
a round nodule: its diameter). Where no such region stands out, or it runs out of the enlarged
box (a finding attached to a vessel or a wall), the box itself is measured instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.box_utils import batched_nms, box_iou
from scipy import ndimage

from inference.backends.base import Backend, BackendError, TimedCalls
from inference.findings import Finding
from inference.pipeline import _LPS_TO_RAS, NOT_NUMBERS, SegmentationResult, to_model_space
from inference.spec import Label, ModelSpec
from inference.volume import SeriesVolume

EDGE_VOXELS = 1.0  # a box this close to a window side inside the volume is cut by it
MIN_CONTRAST = 100.0  # modality units (HU) between a finding's core and its surroundings
MARGIN = 1.0  # the measured region must lie inside the box enlarged by this fraction of its size


@dataclass
class DetectionResult(SegmentationResult):
    """A detector's findings (each with its probability, long and short axis), most probable
    first; ``labels`` holds each finding's box on the source grid, valued by the finding's number:
    each finding is a segment of its own in the SEG ("Nodule 2"), the region its SR group
    references, and its outline on the key images."""

    @property
    def segments(self) -> list[Label]:
        return [finding.label.model_copy(update={"value": finding.component, "name": finding.tracking_id})
                for finding in self.findings]

    def segment_of(self, finding: Finding) -> int:
        assert finding.component is not None
        return finding.component


@dataclass(frozen=True)
class Box:
    """A detected box on the model's grid (voxel indices, centres at integers) and its scores."""

    lo: np.ndarray  # (3,)
    hi: np.ndarray
    label: Label
    score: float


def windows(size: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> list[tuple[int, ...]]:
    """Start indices of the patches covering a grid of `size` (each axis at least `patch` long),
    neighbours overlapping by `overlap` of a patch, the last flush with the end."""
    axes = []
    for n, p in zip(size, patch):
        stride = max(1, int(p * (1 - overlap)))
        axes.append(sorted({*range(0, n - p, stride), n - p}))
    return [tuple(int(v) for v in start) for start in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(size))]


def detect(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> DetectionResult:
    """The detector's findings on a series volume, each measured on the source voxels (module
    docstring); a box whose centre falls outside the series (the model grid's padding) is none."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    image = to_model_space(volume, spec)
    model_affine = np.asarray(image.affine, dtype=float)
    seconds["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    calls = TimedCalls(backend)
    boxes = model_boxes(image[0].numpy(), spec, calls)
    seconds["inference"] = time.perf_counter() - start
    seconds["model"] = calls.seconds

    start = time.perf_counter()
    findings: list[Finding] = []
    extents = []
    body = _Body(volume, spec.postprocessing.body_threshold)
    for box in boxes:
        lo, hi = _on_source(box, model_affine, volume)
        if np.any((lo + hi) / 2 < -0.5) or np.any((lo + hi) / 2 > np.array(volume.array.shape) - 0.5):
            continue
        if not body.holds((lo + hi) / 2):
            continue
        number = len(findings) + 1  # the finding's number, and its value in `labels` (its SEG segment)
        findings.append(_measure(volume, lo, hi, box, number))
        extents.append(_clipped(lo, hi, volume.array.shape))
    seconds["measure"] = time.perf_counter() - start
    return DetectionResult(spec, volume, _box_labels(volume.array.shape, extents), findings, seconds)


class _Body:
    """Where the patient is, slice by slice: the largest connected region above `threshold`, holes
    filled. A detection outside it (a skin marker, an ECG pad, the table) is not a finding of the
    patient's; with no threshold every point is in the body."""

    def __init__(self, volume: SeriesVolume, threshold: float | None):
        self.volume, self.threshold = volume, threshold
        self.slices: dict[int, np.ndarray] = {}

    def holds(self, index: np.ndarray) -> bool:
        if self.threshold is None:
            return True
        shape = self.volume.array.shape
        k, r, c = (int(np.clip(round(float(v)), 0, n - 1)) for v, n in zip(index, shape))
        if k not in self.slices:
            components, count = ndimage.label(self.volume.array[k] > self.threshold)
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            self.slices[k] = (ndimage.binary_fill_holes(components == int(sizes.argmax())) if count
                              else np.zeros(shape[1:], dtype=bool))
        return bool(self.slices[k][r, c])


def _box_labels(shape: tuple[int, ...], extents: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each finding's box valued by its number, the larger boxes drawn first so that a box inside
    another stays whole; a box wholly covered by another box of the same size keeps its centre
    voxel, so that every finding has its segment."""
    labels = np.zeros(shape, dtype=np.uint8)
    order = sorted(range(len(extents)), key=lambda i: -int(np.prod(extents[i][1] - extents[i][0])))
    for i in order:
        (k0, r0, c0), (k1, r1, c1) = extents[i]
        labels[k0:k1, r0:r1, c0:c1] = i + 1
    for i, (start, stop) in enumerate(extents):
        if not (labels[tuple(slice(a, b) for a, b in zip(start, stop))] == i + 1).any():
            labels[tuple((start + stop - 1) // 2)] = i + 1
    return labels


def model_boxes(grid: np.ndarray, spec: ModelSpec, backend: Backend, threshold: float | None = None) -> list[Box]:
    """The detector over every window of a grid in model space (X, Y, Z): the boxes scoring at
    least `threshold` (the spec's operating point unless given), merged, most probable first.

    A box that a window side inside the grid cuts is a part of an object that the overlap shows
    whole in a neighbouring window; it is kept only where no uncut box overlaps it (an object
    larger than the overlap is cut in every window). Boxes centred in the padding of a grid
    smaller than a patch are not the series'."""
    patch = spec.preprocessing.patch_size
    size = grid.shape
    padded = np.pad(grid, [(0, max(0, p - n)) for n, p in zip(size, patch)], constant_values=float(grid.min()))
    starts = windows(padded.shape, patch, spec.preprocessing.overlap)
    threshold = spec.postprocessing.threshold if threshold is None else threshold
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for first in range(0, len(starts), spec.preprocessing.batch_size):
        batch = starts[first:first + spec.preprocessing.batch_size]
        stack = np.stack([padded[tuple(slice(s, s + p) for s, p in zip(origin, patch))] for origin in batch])
        answer = np.asarray(backend.infer(np.ascontiguousarray(stack[:, None], dtype=np.float32)))
        if answer.ndim != 3 or answer.shape[0] != len(batch) or answer.shape[2] != spec.output_channels:
            raise BackendError(f"model {spec.name} answered {answer.shape} for {len(batch)} patches; a detector"
                               f" answers (patches, anchors, {spec.output_channels}): boxes and a score per label")
        if np.isnan(answer).any():  # (a NaN score is below every threshold: nothing found, silently)
            raise BackendError(NOT_NUMBERS.format(spec.name))
        for origin, anchors in zip(batch, answer):
            scores = anchors[:, 6:]
            best = scores.max(axis=1)
            boxes = anchors[:, :6] + np.tile(origin, 2)
            centres = (boxes[:, :3] + boxes[:, 3:]) / 2
            keep = ((best >= threshold) & ((boxes[:, 3:] - boxes[:, :3]) >= 1).all(axis=1)
                    & (centres < np.array(size) - 0.5).all(axis=1))
            cut = ~_uncut(anchors[:, :6], origin, patch, size)
            found.append((boxes[keep], best[keep], scores[keep].argmax(axis=1), cut[keep]))
    if not found or not sum(len(f[0]) for f in found):
        return []
    boxes, scores, classes, cut = (np.concatenate([f[i] for f in found]) for i in range(4))
    kept = _merge(boxes, scores, classes, ~cut, spec)
    if cut.any():
        alone = np.flatnonzero(cut)
        if kept:
            overlaps = box_iou(torch.from_numpy(boxes[alone]).float(), torch.from_numpy(boxes[kept]).float())
            alone = alone[(overlaps.max(dim=1).values <= 0).numpy()]
        kept += [int(alone[i]) for i in _merge(boxes[alone], scores[alone], classes[alone], None, spec)]
    order = sorted(kept, key=lambda i: -float(scores[i]))[:spec.postprocessing.max_findings]
    return [Box(boxes[i, :3].astype(float), boxes[i, 3:].astype(float), spec.labels[int(classes[i])], float(scores[i]))
            for i in order]


def _merge(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, only: np.ndarray | None,
           spec: ModelSpec) -> list[int]:
    """Indices (into the arrays) of the boxes MONAI's non-maximum suppression keeps, per label,
    among `only` (a mask) or all."""
    where = np.flatnonzero(only) if only is not None else np.arange(len(boxes))
    if len(where) == 0:
        return []
    kept = batched_nms(torch.from_numpy(boxes[where]).float(), torch.from_numpy(scores[where]).float(),
                       torch.from_numpy(classes[where]), spec.postprocessing.nms_iou, spec.postprocessing.max_findings)
    return [int(where[int(i)]) for i in kept]


def _uncut(boxes: np.ndarray, origin: tuple[int, ...], patch: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Boxes (in patch voxels) that no window side inside the grid cuts (a side on the grid's own
    border cuts nothing)."""
    keep = np.ones(len(boxes), dtype=bool)
    for axis, (s, p, n) in enumerate(zip(origin, patch, size)):
        if s > 0:
            keep &= boxes[:, axis] >= EDGE_VOXELS
        if s + p < n:
            keep &= boxes[:, axis + 3] <= p - 1 - EDGE_VOXELS
    return keep


def _on_source(box: Box, model_affine: np.ndarray, volume: SeriesVolume) -> tuple[np.ndarray, np.ndarray]:
    """The box on the source grid: the smallest (slice, row, column) box holding its corners."""
    corners = np.array([[x, y, z, 1.0] for x in (box.lo[0], box.hi[0]) for y in (box.lo[1], box.hi[1])
                        for z in (box.lo[2], box.hi[2])])
    to_source = np.linalg.inv(volume.affine) @ np.linalg.inv(_LPS_TO_RAS) @ model_affine
    on_source = (corners @ to_source.T)[:, :3]
    return on_source.min(axis=0), on_source.max(axis=0)


def _clipped(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Integer [start, stop) bounds of the voxels inside a (float, inclusive) box, within the grid;
    along an axis where the box holds no voxel centre (a box thinner than the slices), the voxel
    nearest its centre."""
    start = np.ceil(lo - 1e-6).astype(int)
    stop = np.floor(hi + 1e-6).astype(int) + 1
    nearest = np.rint((lo + hi) / 2).astype(int)
    empty = stop <= start
    start, stop = np.where(empty, nearest, start), np.where(empty, nearest + 1, stop)
    start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    return start, np.maximum(stop, start)


def _measure(volume: SeriesVolume, lo: np.ndarray, hi: np.ndarray, box: Box, number: int) -> Finding:
    """One detection measured on the source voxels (module docstring); the box when no region
    stands out (its voxels, its in-plane sides as the axes)."""
    region = _region(volume, lo, hi)
    if region is not None:
        long_axis, short_axis = in_plane_axes(region, volume)
    else:
        start, stop = _clipped(lo, hi, volume.array.shape)
        region = np.argwhere(np.ones(tuple(stop - start), dtype=bool)) + start
        sides = sorted(((hi - lo)[1:] * np.linalg.norm(volume.affine[:3, 1:3], axis=0)).tolist(), reverse=True)
        long_axis, short_axis = float(sides[0]), float(sides[1])
    centroid = volume.to_patient(region.mean(axis=0))[0]
    return Finding(
        label=box.label, component=number, voxel_count=int(len(region)),
        volume_mm3=float(len(region) * volume.voxel_volume),
        centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        bbox_min_index=tuple(int(v) for v in region.min(axis=0)),  # type: ignore[arg-type]
        bbox_max_index=tuple(int(v) for v in region.max(axis=0)),  # type: ignore[arg-type]
        longest_in_plane_diameter_mm=long_axis, short_axis_mm=short_axis, probability=box.score,
    )


def _region(volume: SeriesVolume, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Voxel indices (slice, row, column) of the finding in the box: the connected region above
    halfway between the box's core (its brightest voxels) and its surroundings that holds most of
    the core; None when the core does not stand out or the region leaves the enlarged box."""
    half = (hi - lo) / 2
    centre = (lo + hi) / 2
    start, stop = _clipped(centre - half * (1 + MARGIN) - 1, centre + half * (1 + MARGIN) + 1, volume.array.shape)
    crop = volume.array[tuple(slice(a, b) for a, b in zip(start, stop))].astype(np.float32)
    box_start, box_stop = _clipped(lo, hi, volume.array.shape)
    inside = tuple(slice(a - s, b - s) for a, b, s in zip(box_start, box_stop, start))
    if crop.size == 0 or crop[inside].size == 0:
        return None
    # the core: the brightest tenth of the box, wherever the finding sits in it (a box a voxel off
    # a 4 mm nodule has lung at its centre)
    core = np.zeros(crop.shape, dtype=bool)
    core[inside] = crop[inside] >= np.percentile(crop[inside], 90)
    inner, outer = float(np.median(crop[core])), float(np.percentile(crop, 10))
    if inner - outer < MIN_CONTRAST:
        return None
    components, _ = ndimage.label(crop > (inner + outer) / 2)
    counts = np.bincount(components[core], minlength=components.max() + 1)
    counts[0] = 0
    if counts.max() == 0:
        return None
    region = components == int(counts.argmax())
    touches = any(region.take(0, axis=a).any() or region.take(-1, axis=a).any() for a in range(3)
                  if crop.shape[a] > 1)
    if touches:
        return None
    return np.argwhere(region) + start


def in_plane_axes(indices: np.ndarray, volume: SeriesVolume) -> tuple[float, float]:
    """Long and short axis (mm) of a region on its largest cross-section in the image plane: those
    of the ellipse with the same second moments (each pixel counted as the square it covers), so
    that a digitised disc measures its diameter, not the distance between its outer pixel centres."""
    slices, counts = np.unique(indices[:, 0], return_counts=True)
    in_slice = indices[indices[:, 0] == slices[int(counts.argmax())]][:, 1:].astype(float)
    row_step, column_step = volume.affine[:3, 1], volume.affine[:3, 2]
    points = in_slice[:, :1] * row_step + in_slice[:, 1:] * column_step  # mm, in the plane
    pixel = float(np.sqrt(np.linalg.norm(row_step) * np.linalg.norm(column_step)))
    covariance = np.cov(points.T, bias=True) if len(points) > 1 else np.zeros((3, 3))
    variances = np.sort(np.linalg.eigvalsh(covariance))[::-1][:2] + pixel ** 2 / 12
    return float(4 * np.sqrt(variances[0])), float(4 * np.sqrt(variances[1]))
