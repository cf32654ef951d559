"""A series volume through a model and back onto the series' own voxel grid.

MONAI's Orientation and Spacing say where the model's grid lies (run lazily: geometry only), the
voxels are moved there from the stored integers (``inference.resample``), sliding-window
inference runs the backend patch by patch, and the class probabilities are resampled back onto
the source grid (from the two affines), where they become labels.
So every label voxel lies on a source frame and pixel, and carries that frame's geometry.
A sheared stack (gantry tilt) goes onto a model grid laid on its regular grid, so that the model
sees undistorted anatomy; the probabilities go back onto the tilted source frames the same way.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from scipy import ndimage
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    Orientation,
    Resize,
    ScaleIntensityRange,
    Spacing,
)

from common.cpus import usable_cpus
from inference.backends.base import Backend, BackendError, TimedCalls
from inference.findings import Finding, clean_labels, foreground_box, measure
from inference.resample import MANY_CHANNELS, copy_in_blocks, map_kind, resample, resample_argmax, resample_clamped
from inference.spec import Label, ModelSpec
from inference.volume import SeriesVolume
from inference.room import ARRAYS
from inference.windows import sliding_window

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SLAB_PLANES = 16  # planes a per-voxel transform is applied to at a time (_in_slabs)
# Voxels an intensity window is applied to at a time (_in_slabs, _window_planes): 2 MiB of float32, 22 planes of a
# 300-slice CT on a 1.5 mm grid. A radiograph's 3000-voxel rows 16 at a time took 0.29 s, 174 at a time 0.04 s, 350
# at a time 0.03 s (on a loaded machine: each slab is a call of MONAI's ScaleIntensityRange).
WINDOW_SLAB_VOXELS = 1 << 19
# A broken model's output (an FP16 overflow, an export gone wrong), failed by name: read on, it gave
# no labels at all (nothing found, as the radiologist would see it) or some wherever a box fell
NOT_NUMBERS = ("model {} answered NaN (not a number), infinities of both signs, or an infinity under its softmax (whose"
               " probabilities are NaN there): no result can be read from it")


@dataclass
class SegmentationResult:
    spec: ModelSpec
    volume: SeriesVolume
    labels: np.ndarray  # uint8 (slice, row, column) on the source grid
    findings: list[Finding]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def segments(self) -> list[Label]:
        """What the values of `labels` stand for: the spec's labels (a detector's: each finding)."""
        return self.spec.labels

    def segment_of(self, finding: Finding) -> int:
        """The value of `labels` that holds the finding."""
        return finding.label.value


@dataclass
class ClassificationResult:
    spec: ModelSpec
    volume: SeriesVolume
    probabilities: dict[int, float]  # label value -> probability
    seconds: dict[str, float] = field(default_factory=dict)
    # label value -> saliency on the source grid (slice, row, column), when an explanation was asked for
    saliency: dict[int, np.ndarray] = field(default_factory=dict)

    def present(self, label: Label) -> bool:
        """The decision per class: above the threshold (sigmoid, one decision per label), or the
        most probable class (softmax, exactly one class is present)."""
        if self.spec.output_activation == "sigmoid":
            return self.probabilities[label.value] >= self.spec.postprocessing.threshold
        return label.value == self.predicted.value

    @property
    def predicted(self) -> Label:
        return self.spec.label(max(self.probabilities, key=self.probabilities.__getitem__))


def confine_threads() -> int:
    """torch's intra-op threads at most the usable CPUs (common.cpus: the affinity, or a smaller
    CPU quota, which torch's default does not see); set once, as the pipeline loads, before a
    job's thread first runs torch (OpenMP keeps a count per thread; a thread takes the one set
    when it first runs torch). Returns the count. Threads beyond a quota are throttled in turns:
    under a 1-CPU quota on two CPUs the node's own time around the model came to 2.33 s against
    2.92 s with torch's and ONNX Runtime's threads fitted (benchmarks.cpu_quota)."""
    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return torch.get_num_threads()


def torch_threads() -> int:
    """torch's intra-op threads in the calling thread (a job's: what `model_ran` reports)."""
    return torch.get_num_threads()


def _model_grid(volume: MetaTensor, spec: ModelSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The model's grid (RAS affine, shape) for a volume: MONAI's Orientation and Spacing, lazily,
    so that only their geometry is computed."""
    moved = Orientation(axcodes=spec.preprocessing.orientation, labels=None, lazy=True)(volume)
    if spec.preprocessing.spacing is not None:
        moved = Spacing(pixdim=spec.preprocessing.spacing, mode="bilinear", lazy=True)(moved)
    shape = tuple(int(v) for v in moved.peek_pending_shape())
    return np.asarray(moved.peek_pending_affine(), dtype=float), shape  # type: ignore[return-value]


def _intensity(spec: ModelSpec) -> Compose:
    settings = spec.preprocessing.intensity
    if settings.window is not None:
        lo, hi = settings.window
        b_lo, b_hi = settings.output_range
        return Compose([ScaleIntensityRange(a_min=lo, a_max=hi, b_min=b_lo, b_max=b_hi, clip=True)])
    if settings.normalize == "zscore":
        return Compose([NormalizeIntensity()])
    return Compose([])


def to_model_space(volume: SeriesVolume, spec: ModelSpec) -> MetaTensor:
    """The volume on the model's grid, intensity-transformed: (channel, *spatial) with its RAS affine.
    Its memory is checked before it is built (inference.room, input_need), and again for the
    intensity transform once the input's layout is known: a model whose grid is much finer than the
    series' fails saying so. A sheared stack's model grid is laid on its regular grid
    (`regular_grid`), whose geometry alone is needed: the stack goes onto the model's grid in one
    interpolation, with the regular grid's box as its edges (inference.resample.resample_clamped).

    An intensity window is applied slab by slab into the resampled array itself: MONAI's
    ScaleIntensityRange allocates three model-grid arrays of temporaries (130 MiB for a 300-slice
    CT on a 2 mm grid), the job's peak before inference. It is per voxel, so the values are the
    same to the bit. z-score normalisation needs the whole image's statistics and runs whole."""
    affine = _LPS_TO_RAS @ volume.affine
    grid = regular_grid(volume) if volume.sheared else None
    source_affine, source_shape = (_LPS_TO_RAS @ grid[0], grid[1]) if grid is not None else (affine, volume.shape)
    # (MONAI's lazy transforms read the geometry only: a placeholder without memory stands for the voxels)
    target, shape = _model_grid(MetaTensor(torch.zeros(()).expand(1, *source_shape),
                                           affine=torch.from_numpy(source_affine)), spec)
    need, detail = input_need(shape)
    with ARRAYS.loading(f"model {spec.name}'s input on this series",
                        "give the node more memory, or the model a coarser grid") as fits:
        fits(need, detail)
        if grid is None:
            moved = torch.from_numpy(resample(volume.array, affine, target, shape))
        else:  # air beside the stack within its regular grid's box, as that grid had it made whole (the lowest value)
            moved = torch.from_numpy(resample_clamped(volume.array, affine, target, shape, source_affine, source_shape,
                                                      fill=float(volume.array.min())))
        fits(need + _intensity_need(spec, moved), detail, taken=moved.nbytes)
        if spec.preprocessing.intensity.window is not None:
            axis = _slab_axis(moved)
            _in_slabs(moved, _intensity(spec), axis=axis, slab=_window_planes(moved, axis))
            return MetaTensor(moved[None], affine=torch.from_numpy(target))
        return _intensity(spec)(MetaTensor(moved[None], affine=torch.from_numpy(target)))


def input_need(shape: tuple[int, ...]) -> tuple[int, str]:
    """What resampling a volume onto the model's grid of `shape` takes at its peak, and what that
    is: the float32 input, and the resampling's threads and buffers (`INPUT_OVERHEAD`, and 2% of
    the input). tests/test_memory.py checks it and `_intensity_need` against the resident peak."""
    size = 4 * math.prod(shape)
    return size + INPUT_OVERHEAD + size // 50, f"{'x'.join(map(str, shape))} voxels, float32"


# Measured 9-10 MB beside a 120 MB input (a 0.15 mm grid over a small CT), 22 MB with the process's
# first run of the transforms and another process busy beside it (tests/test_memory.py)
INPUT_OVERHEAD = 32 << 20


def _intensity_need(spec: ModelSpec, moved: torch.Tensor) -> int:
    """What the intensity transform takes beside the resampled input: with a window, ten slabs'
    worth of ScaleIntensityRange's temporaries (`_in_slabs`, over a slab of a transposed view: up
    to eight measured); with z-score normalisation, two arrays of the input's size (MONAI's
    NormalizeIntensity: its result and a temporary, measured)."""
    if spec.preprocessing.intensity.window is not None:
        axis = _slab_axis(moved)
        planes = moved.shape[axis]
        return 10 * min(_window_planes(moved, axis), planes) * (moved.numel() // planes) * moved.element_size()
    if spec.preprocessing.intensity.normalize == "zscore":
        return 2 * moved.numel() * moved.element_size()
    return 0


def _window_planes(moved: torch.Tensor, axis: int) -> int:
    """The planes along `axis` an intensity window takes at a time: WINDOW_SLAB_VOXELS' worth, at
    least one (a slab of planes whatever their size made a radiograph's 2500 rows of 3000 voxels 157
    calls of MONAI's transform)."""
    return max(1, WINDOW_SLAB_VOXELS // max(1, moved.numel() // moved.shape[axis]))


def _slab_axis(moved: torch.Tensor) -> int:
    """The axis whose planes lie apart in memory (the resampled input may be a transposed view),
    of those with more than one plane (a radiograph's one plane may have the largest stride)."""
    return max(range(moved.ndim), key=lambda axis: (moved.shape[axis] > 1, moved.stride(axis)))


def _in_slabs(tensor: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], axis: int,
              slab: int = SLAB_PLANES) -> None:
    """Write `transform` of `tensor` into `tensor`, `slab` planes along `axis` at a time: for a
    transform that is per voxel (or, along `axis`, per plane), the values of one whole pass
    without a second array of the tensor's size."""
    for start in range(0, tensor.shape[axis], slab):
        part = tensor.narrow(axis, start, min(slab, tensor.shape[axis] - start))
        part.copy_(transform(part))


def regular_grid(volume: SeriesVolume) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The regular (orthogonal) grid that covers a sheared stack: same rows, columns at their
    spacing across the rows within the planes (the columns themselves where the stack's rows and
    columns are orthogonal; rounded ImageOrientationPatient values can leave them off by 1e-6 or
    more, and MONAI's Spacing makes a grid orthogonal, so the model's grid would not follow this
    one's axes), slices along the plane normal at the stack's spacing along it. Returns its LPS
    affine and shape."""
    normal = volume.normal
    step = volume.affine[:3, 0]
    affine = volume.affine.copy()
    affine[:3, 0] = normal * float(np.dot(step, normal))
    rows, columns = affine[:3, 1] / np.linalg.norm(affine[:3, 1]), affine[:3, 2]
    affine[:3, 2] = columns - float(np.dot(columns, rows)) * rows
    shape = np.array(volume.array.shape)
    corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
    in_grid = (np.c_[volume.to_patient(corners), np.ones(len(corners))] @ np.linalg.inv(affine).T)[:, :3]
    lo = np.floor(in_grid.min(0) + 1e-6)
    hi = np.ceil(in_grid.max(0) - 1e-6)
    affine = affine @ _translation(lo)
    return affine, tuple(int(v) for v in hi - lo + 1)  # type: ignore[return-value]


def _activation(logits: torch.Tensor, spec: ModelSpec, slab: int = SLAB_PLANES) -> torch.Tensor:
    """The output activation over (batch, class[, *spatial]) logits, written into them: a second
    class x volume float32 array (130 MiB for a 300-slice CT on a 2 mm grid) would be the job's
    peak. Softmax is per voxel over the classes, so slab by slab along the first spatial axis it
    gives the values of one piece (to the last bit of float rounding)."""
    if spec.output_activation == "softmax":
        _in_slabs(logits, lambda part: torch.softmax(part, dim=1), axis=2 if logits.ndim > 2 else 0, slab=slab)
    elif spec.output_activation == "sigmoid":
        logits.sigmoid_()
    return logits


def segment(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> SegmentationResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    image = to_model_space(volume, spec)
    seconds["preprocess"] = time.perf_counter() - start

    calls = TimedCalls(backend)

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        answer = calls.infer(patches.numpy())
        # the way back takes the output voxel for voxel on the input's grid, a channel per value
        if answer.shape != (patches.shape[0], spec.output_channels, *patches.shape[2:]):
            raise BackendError(f"model {spec.name} answered windows of shape {tuple(patches.shape)} with an output"
                               f" of shape {answer.shape}: a segmentation model's output is (windows,"
                               f" {spec.output_channels} channels, *window)")
        return torch.from_numpy(answer)

    volume.set_pixels_aside()  # read again only if something needs them (key images, run figures)
    start = time.perf_counter()
    output, held = ARRAYS.allocate(spec, tuple(image.shape[1:]), image.dtype)  # (its memory checked first)
    try:
        with torch.no_grad():
            logits = sliding_window(image[None].as_tensor(), spec.preprocessing.patch_size,
                                    spec.preprocessing.batch_size, predictor, spec.preprocessing.overlap,
                                    spec.preprocessing.blend, output)
        del output  # logits is it, or a view of it: let go with logits, below
        seconds["inference"] = time.perf_counter() - start
        seconds["model"] = calls.seconds
        total = logits.sum()  # (one reduction, a NaN anywhere makes it one: 0.03 s at a CT's own grid)
        if torch.isnan(total) or (spec.output_activation == "softmax" and torch.isinf(total) and total > 0):
            raise BackendError(NOT_NUMBERS.format(spec.name))

        start = time.perf_counter()
        model_affine = image.affine
        del image  # the model's input: no longer needed
        labels = clean_labels(_labels_on_source(logits[0], model_affine, volume, spec), spec)
        del logits
    except BaseException as exc:
        # The traceback keeps this frame's arrays, and those of the frames it came through, until
        # the job's failure is recorded and notified: let them go before the output is counted
        # free, or the next job's check would count it as the service's own (inference.room).
        output = logits = image = None  # noqa: F841
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        ARRAYS.release(held)
    seconds["postprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    findings = measure(labels, volume, spec)
    seconds["measure"] = time.perf_counter() - start
    return SegmentationResult(spec, volume, labels, findings, seconds)


def _labels_on_source(outputs: torch.Tensor, model_affine: torch.Tensor, volume: SeriesVolume,
                      spec: ModelSpec) -> np.ndarray:
    """A model's outputs (channel, *model grid; its activation not yet applied) taken onto the
    source grid as labels.

    Only boxes around the regions where a label is possible are taken back, one per region: most
    of a study is background (resampling every channel over all of a 300x512x512 grid took ~15 s
    here once). The regions are found inside the box that holds all the evidence, grown by the
    dilation's reach (what lies further out is background either way): on the whole model grid the
    dilation and labelling took 0.06-0.13 s of a job. Within a box, `argmax` interpolates only
    where the label can change (`resample_argmax`); `threshold` resamples each label's channel.
    `argmax` takes a softmax only where it interpolates (it keeps each voxel's order of classes, but
    for classes within float32 rounding of each other) where the model's voxels are the source's
    (there it needs none: an organ at a CT's own grid, benchmarks.native_grid, back on the source
    grid in 0.37 s instead of 0.54 s) and where a network has many classes on an axis-aligned map
    or a sheared one, a tilted stack's (105 at 1.5 mm on a CT: 5.3-8.3 s for the whole softmax).
    Otherwise the activation is applied whole, in place, first (into `outputs`):
    over a few channels and an axis-aligned map, scipy interpolates the boundaries channel by
    channel more quickly (`MANY_CHANNELS`); saturated sigmoids tie in float32 where their logits do
    not (sigmoid(20) and sigmoid(30) are both 1.0), and the labels are the sigmoids' argmax.
    """
    kind = map_kind(model_affine.numpy(), _LPS_TO_RAS @ volume.affine)
    if spec.postprocessing.mode == "argmax" and spec.output_activation == "softmax" and (
            kind == "whole voxels" or (kind in ("axis-aligned", "sheared") and spec.output_channels > MANY_CHANNELS)):
        activation: Callable[[np.ndarray], np.ndarray] | None = _softmax
    else:
        _activation(outputs[None], spec)
        activation = None
    labels = np.zeros(volume.shape, dtype=np.uint8)
    # one label's evidence at a time, no copy; the first label's made, not or-ed into zeros (0.09 ->
    # 0.03 s on a CT's own grid)
    first, *others = spec.labels  # (a spec has a label at least)
    evidence = _evidence(outputs, first, spec)
    for label in others:
        evidence |= _evidence(outputs, label, spec)
    found = foreground_box(evidence)
    if found is None:
        return labels
    reach = 2  # the dilation's iterations: a voxel of evidence marks its neighbours this far (6-connected steps)
    area = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(found, evidence.shape))
    corner = np.array([s.start for s in area])
    regions, count = ndimage.label(ndimage.binary_dilation(evidence[area], iterations=reach))
    # One region (an organ) spans the whole area: the evidence's box grown by the dilation's reach
    # on every side, as far as the grid goes. find_objects over it would take 0.06 s to say so.
    boxes = [tuple(slice(0, n) for n in regions.shape)] if count == 1 else ndimage.find_objects(regions)
    for box in boxes:
        lo = corner + [s.start for s in box]
        hi = corner + [s.stop for s in box]
        _resample_box(outputs, np.asarray(model_affine, dtype=float), lo, hi, volume, spec, labels, activation)
    return labels


def _evidence(outputs: torch.Tensor, label: Label, spec: ModelSpec) -> np.ndarray:
    """The model voxels next to which `label` may be found on the source grid: with `argmax`, where
    its channel is above the background's (in the raw outputs or their activation alike: it keeps
    each voxel's order, and where the raw values' order is lost to float32 rounding the activation's
    is a tie, which the background wins); with `threshold`, where it is at or above the threshold.
    Interpolated values are mixes of neighbouring voxels with weights of at least zero (and the
    padding's zeros), so a label beats the background (which wins ties), or reaches a threshold,
    between voxels only where it does at one of them: exact, whatever the activation (a fixed
    level of 0.05 lost a softmax's winner over more than 20 channels and an argmax of sigmoids
    or logits; the dilation's reach covers the neighbours)."""
    channel = outputs[label.value].numpy()
    if spec.postprocessing.mode == "argmax":
        return channel > outputs[0].numpy()
    return channel >= spec.postprocessing.threshold


def _resample_box(outputs: torch.Tensor, model_affine: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  volume: SeriesVolume, spec: ModelSpec, labels: np.ndarray,
                  activation: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Resample the model-space box [lo, hi) onto the source voxels it covers; write its labels.
    The source voxels at its edges are interpolated from the model voxels around them, past the
    box where they reach it, as over the whole grid: zeros past the box, not the grid, outweighed
    the background there, and an edge voxel could take a label it has not. `activation`: applied
    to the voxels `argmax` interpolates (`resample_argmax`), where the outputs are raw."""
    source_ras = _LPS_TO_RAS @ volume.affine
    to_source = np.linalg.inv(source_ras) @ model_affine
    # at the grid's faces a voxel further: the padding's zeros scale every channel alike up to a
    # voxel past the last centres, and the whole grid mapped back labels what lies there
    faces = np.array(outputs.shape[1:])
    src_lo, src_hi = _reached(to_source, np.where(lo == 0, -1, lo), np.where(hi == faces, hi, hi - 1), labels.shape)
    if np.any(src_hi <= src_lo):
        return
    read_lo, read_hi = _reached(np.linalg.inv(to_source), src_lo, src_hi - 1, outputs.shape[1:])
    read_lo, read_hi = np.minimum(read_lo, lo), np.maximum(read_hi, hi)
    model = model_affine @ _translation(read_lo)
    box = outputs[:, read_lo[0]:read_hi[0], read_lo[1]:read_hi[1], read_lo[2]:read_hi[2]].numpy()
    grid = source_ras @ _translation(src_lo)
    shape = tuple(int(n) for n in src_hi - src_lo)
    if spec.postprocessing.mode == "argmax":
        found = _named_only(resample_argmax(box, model, grid, shape, padding="constant", activation=activation), spec)
    else:
        found = _above_threshold(((label.value, resample(box[label.value], model, grid, shape, padding="constant"))
                                  for label in spec.labels), spec)
    target = labels[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    copy_in_blocks(target, found, nonzero_only=True)  # (`found` possibly a view in the model's axis order)


def _softmax(values: np.ndarray) -> np.ndarray:
    """The softmax over (class, voxels) values: for the voxels the way back interpolates."""
    return torch.softmax(torch.from_numpy(values), dim=0).numpy()


def _named_only(found: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """`argmax` labels with the values of the channels the spec does not name made background: there
    the network says the voxel is one of its other classes (a multi-organ network of which the spec
    names a few; label values that skip numbers), not the named one that came second."""
    values = [label.value for label in spec.labels]
    if len(values) == spec.output_channels - 1:  # every channel but the background's named
        return found
    named = np.zeros(256, dtype=np.uint8)
    named[values] = values
    return named[found]


def _reached(index_map: np.ndarray, first: np.ndarray, last: np.ndarray, shape: tuple[int, ...]
             ) -> tuple[np.ndarray, np.ndarray]:
    """The voxels [lo, hi) of a grid of `shape` around the box of voxels first..last (inclusive) of
    another grid, mapped through `index_map`: a voxel more below, two above (a point's neighbours
    are its floor and the voxel after), within the grid."""
    corners = np.array([[a, b, c, 1.0] for a in (first[0], last[0]) for b in (first[1], last[1])
                        for c in (first[2], last[2])])
    mapped = (corners @ index_map.T)[:, :3]
    return (np.clip(np.floor(mapped.min(0)).astype(int) - 1, 0, shape),
            np.clip(np.ceil(mapped.max(0)).astype(int) + 2, 0, shape))


def _translation(offset: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = np.asarray(offset, dtype=float)
    return out


def _above_threshold(channels: Iterable[tuple[int, np.ndarray]], spec: ModelSpec) -> np.ndarray:
    """`threshold` labels from each label's (value, probabilities) given one at a time: a mask per
    label, set in the spec's order (a later label wins where two are above)."""
    threshold = spec.postprocessing.threshold
    above = {value: channel >= threshold for value, channel in channels}
    labels = np.zeros(next(iter(above.values())).shape, dtype=np.uint8)
    for label in spec.labels:
        labels[above[label.value]] = label.value
    return labels


def classification_input(volume: SeriesVolume, spec: ModelSpec) -> MetaTensor:
    """The model's input (channel, *patch_size) with its affine: training uses this too, so a
    classifier is trained on exactly what the node feeds it."""
    image = to_model_space(volume, spec)
    return Resize(spatial_size=spec.preprocessing.patch_size)(image)


def classify(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> ClassificationResult:
    start = time.perf_counter()
    resized = classification_input(volume, spec)
    seconds = {"preprocess": time.perf_counter() - start}
    start = time.perf_counter()
    calls = TimedCalls(backend)
    logits = torch.from_numpy(calls.infer(resized[None].as_tensor().numpy()))  # (the activation is written into it)
    if tuple(logits.shape) != (1, spec.output_channels):
        raise BackendError(f"model {spec.name} answered an input of shape {tuple(resized[None].shape)} with an output"
                           f" of shape {tuple(logits.shape)}: a classifier's output is (1, {spec.output_channels}),"
                           " a score per class")
    probabilities = _activation(logits, spec)[0].numpy()
    if np.isnan(probabilities).any():  # (a NaN logit, or an infinity under a softmax)
        raise BackendError(NOT_NUMBERS.format(spec.name))
    seconds["inference"] = time.perf_counter() - start
    seconds["model"] = calls.seconds
    return ClassificationResult(
        spec, volume, {label.value: float(probabilities[i]) for i, label in enumerate(spec.labels)}, seconds
    )
