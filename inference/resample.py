"""Resampling a voxel array from one grid onto another, given the two grids' affines.

MONAI decides *where* the model's grid is (Orientation and Spacing, run lazily: geometry only);
this module moves the voxels. Written here because MONAI's execution path (``grid_sample``)
first converts the whole source to float and builds a coordinate for every output voxel: 2.4 s
for a 300x512x512 CT on two cores, against 0.2 s for scipy's ``affine_transform`` reading the
stored integers directly. Same interpolation (linear), same voxel-centre convention.

When the two grids differ only by flips, axis order and scale (any axial, coronal or sagittal
series into RAS), the map is diagonal in the source's own axis order: scipy then walks the
source in memory order and the small output is transposed afterwards, which is 5-10x faster
than a general matrix over a transposed view. Where every target voxel is a source voxel (flips
and axis order only: a model without a spacing step) nothing is interpolated: the values are
copied into the target's axis order, in blocks (`_relaid`). Where each target plane along one of
its axes lies across one source axis and is only moved within itself (a sheared stack onto a model's
grid laid on its regular grid, `resample_clamped`, and back; a stack whose rows and columns are not
quite orthogonal), it is interpolated plane by plane in two dimensions (`_shifted_planes`).

A large output is interpolated in slabs along its first axis, on as many threads as there are
usable CPUs (common.cpus: the affinity, or a smaller CPU quota; at most one per slab): scipy
lets go of the GIL while it interpolates, and before and after the model a job (one pipeline
worker, the default) has the second core to itself. A slab's offset is the whole grid's moved
by its first index: each voxel is interpolated at the same point as in one call up to the
rounding of that point, which moves a rare voxel by one float32 step (2 of 2.16 million in a
check). The slabs depend on the output's size only, never on the cores, so a volume gets the
same values on every machine (with the same scipy). A 300x512x512 CT onto a 2 mm grid:
0.29-0.34 s on one core, 0.12-0.17 s on two (back to back, taskset to one core for the first).
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Callable, Iterable, Literal, TypeVar

import numpy as np
from scipy import ndimage

from common.cpus import usable_cpus

# "border": outside the source takes the nearest edge voxel (MONAI/torch "border");
# "constant": linear interpolation towards `fill` over the half voxel beyond the edge and
# `fill` further out (MONAI/torch "zeros" with the fill added back).
Padding = Literal["border", "constant"]
_SCIPY_MODE = {"border": "nearest", "constant": "grid-constant"}
# A slab this size takes ~15 ms here; a thread's start and join ~0.1 ms.
MIN_SLAB_VOXELS = 1 << 18
# Enough for the cores a job's service is usually given; fixed, so that the slabs (and the
# values) do not depend on the machine.
MAX_SLABS = 4
# Target voxels looked at per round for interpolation in `resample_argmax` (~70 bytes each interpolated), and
# where `_argmax_at` interpolates them, the points times channels at once (~45 bytes each where a cell holds several
# points, up to ~120 where each holds one: at most 126 MB; 10,000 points of a 105-channel output).
UNDECIDED_CHUNK = 1 << 20
UNDECIDED_VALUES = 1 << 20
# Channels over which `resample_argmax` interpolates where each can win (`_argmax_at`), not each one everywhere with
# scipy: two channels of an organ's boundary on a CT (1.3 million points) 0.40 s with scipy, 0.57 s where each can
# win; four, 0.67 s and 0.69 s; 105 (a 105-class network's 25 organs), 12.3 s and 3.5 s.
MANY_CHANNELS = 8
# The first two axes' lengths of a block `copy_in_blocks` copies: a block of a 512x512 CT's slices
# (16 x 64 x 512 voxels, 2 MiB as float32) is read in rows of one array and written in runs of 16
# values of the other.
RELAY_BLOCK = (16, 64)
# Voxels up to which `copy_in_blocks` copies at once: a few blocks' worth, where asking for the usable
# CPUs (~0.3 ms) would cost more than the blocks save (a lesion's box of labels).
MIN_BLOCKED_VOXELS = 1 << 18
# Planes along the first axis `argmax_in_blocks` takes at a time: 8 of a 239x239 model grid's are 1.8 MB of running
# maximum (2, 4 and 8 took 1.97, 1.88 and 1.83 s for 105 channels of a 196x237x237 box on two cores).
ARGMAX_BLOCK = 8
T = TypeVar("T")


def resample(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
             shape: tuple[int, ...], padding: Padding = "border", fill: float = 0.0) -> np.ndarray:
    """``array`` (on the grid of ``source_affine``) linearly interpolated at the voxel centres of
    the grid ``target_affine`` x ``shape``; float32. Interpolated: C-contiguous in the source's
    axis order (so possibly a transposed view); where every target voxel is a source voxel (flips
    and axis order only): copied, C-contiguous in the target's. Affines map voxel indices to one
    common space."""
    index_map = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    shape = tuple(int(s) for s in shape)
    mode = _SCIPY_MODE[padding]
    order = _axis_order(linear)
    if order is None:
        planes = _plane_by_plane(linear)
        if planes is not None:  # (interpolated with the planes' axis first, then transposed back: a view)
            order, across, reads = planes
            out = np.empty(tuple(shape[j] for j in order), dtype=np.float32)
            _shifted_planes(array, linear[:, order], offset, out, mode, fill, across, reads)
            return out.transpose(np.argsort(order))
        return _interpolate(array, linear, offset, shape, mode, fill)
    # target axis j reads source axis order[j]: resample in the source's axis order, then transpose
    scale, source_order_shape = _in_source_order(linear, order, shape)
    window = _whole_voxels(scale, offset, source_order_shape, array.shape)
    if window is not None:  # only flips and axis order (a model without a spacing step): a copy
        return _relaid(array[window], order)
    out = _interpolate(array, scale, offset, tuple(source_order_shape), mode, fill)
    return out.transpose(order)  # a view: the output is interpolated in the source's axis order


def resample_clamped(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
                     shape: tuple[int, ...], box_affine: np.ndarray, box_shape: tuple[int, ...],
                     fill: float = 0.0) -> np.ndarray:
    """``array`` resampled with "constant" padding at the target's voxel centres, each first moved to
    the nearest point of a box, the grid ``box_affine`` x ``box_shape``: what `resample` of the array
    onto the box's grid ("constant") and of that onto the target's ("border") gives, interpolated
    once and without the box's voxels. A sheared stack (gantry tilt) onto a model's grid laid on its
    regular grid (inference.pipeline): where the model's grid reaches beyond that grid's box, by the
    rounding of its spacing, it repeats the box's faces as it repeats any series' edges, and a tilted
    300x512x512 CT's regular grid (300x754x512, 442 MiB) is not made. For a map `_plane_by_plane`
    from a target whose axes follow the box's (a ValueError otherwise); float32, in the target's
    axis order, possibly a transposed view.

    Along each target axis the centres within the box are one run and those beyond either end are
    each one point on its face, so the target is at most 27 blocks: each is interpolated once, with a
    face's one plane repeated over the block's others (written here: no library clamps coordinates
    before a resampling; MONAI's and scipy's paddings act at the source's edges, not at a box's)."""
    index_map = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    to_box = np.linalg.inv(np.asarray(box_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    axes, planes = _axis_order(to_box[:3, :3]), _plane_by_plane(linear)
    if axes is None or planes is None:
        raise ValueError("a map clamped to a box must follow the box's axes and lie across the source plane by plane")
    order, across, reads = planes
    shape = tuple(int(s) for s in shape)
    out = np.empty(tuple(shape[j] for j in order), dtype=np.float32).transpose(np.argsort(order))
    runs = [_clamped_runs(to_box[axes[j], j], to_box[axes[j], 3], shape[j], int(box_shape[axes[j]])) for j in range(3)]
    for blocks in itertools.product(*runs):
        where = tuple(block[0] for block in blocks)
        start = np.array([block[1] for block in blocks])
        counts = tuple(block[2] for block in blocks)
        direct = counts == out[where].shape
        into = out[where] if direct else np.empty(counts, dtype=np.float32)
        _shifted_planes(array, linear[:, order], offset + linear @ start, into.transpose(order), "grid-constant",
                        fill, across, reads)
        if not direct:
            out[where] = into  # (a face's plane over the block's planes beyond the box)
    return out


def _clamped_runs(step: float, first: float, count: int, box: int, tolerance: float = 1e-6
                  ) -> list[tuple[slice, float, int]]:
    """The runs of a target axis whose centres lie at box coordinates first + step * i (i < count),
    clamped to [0, box - 1]: (the target's indices, the index the run starts at, which for a run
    beyond the box is the one on its face, and the number of planes interpolated: 1 for a face)."""
    at = first + step * np.arange(count)
    low, high = at < -tolerance, at > box - 1 + tolerance
    before, after = (low, high) if step > 0 else (high, low)  # (a prefix and a suffix: the centres are in order)
    begin, end = int(before.sum()), count - int(after.sum())
    runs = []
    if begin:
        runs.append((slice(0, begin), (min(max(at[0], 0.0), box - 1.0) - first) / step, 1))
    if end > begin:
        runs.append((slice(begin, end), float(begin), end - begin))
    if end < count:
        runs.append((slice(end, count), (min(max(at[-1], 0.0), box - 1.0) - first) / step, 1))
    return runs


def _interpolate(array: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, ...], mode: str,
                 fill: float, slabs: int | None = None) -> np.ndarray:
    """scipy's linear ``affine_transform`` into a new float32 array of `shape`, in `slabs` slabs
    along its first axis (default: by the output's size, up to MAX_SLABS), on the usable CPUs
    (`_on_usable_cpus`). `matrix` is the full 3x3 map or its diagonal; output index o reads the
    source at matrix @ o + offset, so the slab that starts at o0 = s has offset + matrix[:, 0] * s."""
    out = np.empty(shape, dtype=np.float32)
    if slabs is None:
        slabs = min(MAX_SLABS, max(1, math.prod(shape) // MIN_SLAB_VOXELS))
    starts = sorted({round(k * shape[0] / slabs) for k in range(slabs)} | {shape[0]})
    first_column = matrix[:, 0] if matrix.ndim == 2 else np.array([matrix[0], 0.0, 0.0])

    def slab(bounds: tuple[int, int]) -> None:
        start, stop = bounds
        ndimage.affine_transform(array, matrix, offset + first_column * start, output_shape=(stop - start, *shape[1:]),
                                 output=out[start:stop], order=1, mode=mode, cval=fill, prefilter=False)

    _on_usable_cpus(slab, list(zip(starts, starts[1:])))
    return out


def _plane_by_plane(linear: np.ndarray, tolerance: float = 1e-6
                    ) -> tuple[tuple[int, int, int], int, tuple[int, int] | None] | None:
    """For a map under which each target plane along one target axis lies across one source axis (a
    constant coordinate along it, possibly between two of its planes): the target's axes with that
    one first, that source axis, and where within the plane the map only shifts, scales, flips or
    swaps the other two axes, the source axis each of the target's other two axes reads (else None:
    a general 2D map within the plane). A sheared stack (gantry tilt) onto its regular grid
    (inference.pipeline.regular_grid) or a model's grid laid on that (planes along the slices'
    normal), and a model's output back onto the stack; a stack whose rows and columns are not quite
    orthogonal (rounded ImageOrientationPatient values) onto a model's grid, which MONAI makes
    orthogonal, within the plane."""
    significant = np.abs(linear) > tolerance * np.abs(linear).max()
    general = None
    for along in range(3):
        order = (along, *(j for j in range(3) if j != along))
        ordered = significant[:, order]
        across = [axis for axis in range(3) if not ordered[axis, 1:].any()]
        if len(across) != 1:
            continue
        others = [axis for axis in range(3) if axis != across[0]]
        within = ordered[np.ix_(others, [1, 2])]
        if within[0, 0] and within[1, 1] and not within[0, 1] and not within[1, 0]:
            return order, across[0], (others[0], others[1])  # type: ignore[return-value]
        if within[0, 1] and within[1, 0] and not within[0, 0] and not within[1, 1]:
            return order, across[0], (others[1], others[0])  # type: ignore[return-value]
        general = general or (order, across[0], None)
    return general  # type: ignore[return-value]


def _aligned_planes(linear: np.ndarray) -> tuple[tuple[int, int, int], int, tuple[int, int]] | None:
    """`_plane_by_plane` where within the plane each target axis reads one source axis (what the
    labels' cells plane by plane need: `_cells_plane_by_plane`)."""
    planes = _plane_by_plane(linear)
    return planes if planes is not None and planes[2] is not None else None  # type: ignore[return-value]


def _shifted_planes(array: np.ndarray, linear: np.ndarray, offset: np.ndarray, out: np.ndarray, mode: str,
                    fill: float, across: int, reads: tuple[int, int] | None) -> None:
    """`_interpolate` for a map `_plane_by_plane` (its planes' axis first), into `out` (float32, of the
    target's shape with that axis first; a view will do): target plane s lies at the source
    coordinate x = linear[across, 0] * s + offset[across] across the source axis `across`, so it is
    the two source planes around x, each interpolated within itself, weighed (1 - w, w) by where x
    lies between them, as linear interpolation weighs them (one plane where x is on one, to 1e-9:
    the affines' rounding). scipy's general matrix path computes eight corners' weights at every
    voxel (a tilted 300x512x512 CT onto its regular grid: 3.5-8.8 s on this machine); in two
    dimensions, four, and a diagonal map (`reads`: each target axis reads one source axis) takes its
    faster path still (a 512x512 plane onto 227x200: 1.6 ms, 3.9 ms with a general 2x2 matrix).
    Plane by plane on the usable CPUs. Beyond the source's first and last planes: the fill
    ("constant"), or the edge plane ("border")."""
    if reads is None:  # (a general 2D map: the plane's source axes in their order)
        rows, columns = (axis for axis in range(3) if axis != across)
        scale = linear[np.ix_([rows, columns], [1, 2])]
        swapped = False
    else:
        rows, columns = reads  # the source axes the target's rows and columns read
        swapped = rows > columns  # the plane's source axes in the target's column-then-row order
        scale = np.array([linear[rows, 1], linear[columns, 2]])
        if swapped:
            scale = scale[::-1]
    planes = array.shape[across]

    def interpolated(plane: int, index: int, into: np.ndarray) -> None:
        """Source plane `plane` (a whole number) interpolated within itself for target plane `index`."""
        if not 0 <= plane < planes:
            if mode != "nearest":
                into.fill(fill)
                return
            plane = min(max(plane, 0), planes - 1)
        shift = np.array([linear[rows, 0], linear[columns, 0]]) * index + [offset[rows], offset[columns]]
        source = array[(slice(None),) * across + (plane,)]  # (a view: np.take would copy a strided plane)
        if swapped:
            into = into.T
            shift = shift[::-1]
        ndimage.affine_transform(source, scale, shift, output=into, order=1, mode=mode, cval=fill, prefilter=False)

    def plane(index: int) -> None:
        at = linear[across, 0] * index + offset[across]
        first = math.floor(at + 1e-9)
        weight = max(at - first, 0.0)
        interpolated(first, index, out[index])
        if weight > 1e-9:
            above = np.empty(out.shape[1:], dtype=np.float32)
            interpolated(first + 1, index, above)
            out[index] *= np.float32(1.0 - weight)
            out[index] += np.float32(weight) * above

    _on_usable_cpus(plane, list(range(out.shape[0])))


def _relaid(source: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """``source.transpose(order)`` as a new C-contiguous float32 array, copied in blocks of
    RELAY_BLOCK along the source's first two axes (on the usable CPUs). A transposed view is what
    the consumers read window by window (MONAI's sliding window gathers each batch of windows
    from the model's input): over a view whose last axis is the source's first, a 300x512x512 CT's
    49 batches at native resolution took 14 ms each, 0.70 s in all, against 1.6 ms (0.08 s) from a
    contiguous copy. One copy in target order with numpy (or torch) directly: 0.7-1.6 s (every read
    or every write a cache miss); in blocks: 0.16-0.21 s, against 0.09 s for the conversion alone."""
    out = np.empty(tuple(source.shape[axis] for axis in order), dtype=np.float32)
    if tuple(order) == tuple(range(source.ndim)):
        np.copyto(out, source, casting="unsafe")
        return out
    copy_in_blocks(out.transpose(np.argsort(order)), source)  # (out's memory seen in the source's axis order)
    return out


def copy_in_blocks(target: np.ndarray, source: np.ndarray, nonzero_only: bool = False) -> None:
    """`source` into `target` (the same shape; one of them possibly a transposed view of its
    memory), in blocks of RELAY_BLOCK along their first two axes, on the usable CPUs: each block
    reads and writes runs of both arrays that stay in the cache, where one pass over the whole would
    miss it at every read or every write. `nonzero_only`: only the source's nonzero values (labels
    laid over labels; an organ's labels from the model's axis order into the image's: 0.08 -> 0.02
    s). Up to MIN_BLOCKED_VOXELS, at once."""
    if target.shape != source.shape:
        raise ValueError(f"copying {source.shape} into {target.shape}")
    if source.size <= MIN_BLOCKED_VOXELS:
        np.copyto(target, source, casting="unsafe", where=source != 0 if nonzero_only else True)
        return
    rows, columns = RELAY_BLOCK

    def block(start: tuple[int, int]) -> None:
        part = (slice(start[0], start[0] + rows), slice(start[1], start[1] + columns))
        if nonzero_only:
            values = source[part]
            np.copyto(target[part], values, where=values != 0)
        else:
            np.copyto(target[part], source[part], casting="unsafe")

    starts = [(a, b) for a in range(0, source.shape[0], rows) for b in range(0, source.shape[1], columns)]
    _on_usable_cpus(block, starts)


def _on_usable_cpus(work: Callable[[T], None], items: list[T]) -> None:
    """`work` on each item, on as many threads as there are usable CPUs (the caller's among them,
    at most one per item), each taking every n-th item: numpy and scipy let go of the GIL while
    they copy or interpolate. The first failure is raised in the caller's thread."""
    failures: list[Exception] = []

    def run(share: list[T]) -> None:
        try:
            for item in share:
                work(item)
        except Exception as exc:  # raised again in the caller's thread
            failures.append(exc)

    threads = max(1, min(usable_cpus(), len(items)))
    shares = [items[k::threads] for k in range(threads)]
    started = []
    for share in shares[1:]:
        thread = threading.Thread(target=run, args=(share,), name="resample", daemon=True)
        try:
            thread.start()
            started.append(thread)
        except RuntimeError:  # no thread to spare (a pids limit): this thread takes its share
            run(share)
    run(shares[0])
    for thread in started:
        thread.join()
    if failures:
        raise failures[0]


def _in_source_order(linear: np.ndarray, order: tuple[int, int, int], shape: tuple[int, ...]
                     ) -> tuple[np.ndarray, list[int]]:
    """For a diagonal map (`_axis_order`): the scale along each source axis, and the target's shape
    in the source's axis order."""
    scale = np.empty(3)
    source_order_shape = [0, 0, 0]
    for j, axis in enumerate(order):
        scale[axis] = linear[axis, j]
        source_order_shape[axis] = shape[j]
    return scale, source_order_shape


def _whole_voxels(scale: np.ndarray, offset: np.ndarray, shape: list[int],
                  source: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The source slices when every target voxel centre is a source voxel centre (steps of +-1,
    whole-voxel offsets, inside the source): interpolation would only copy values."""
    overlap = _whole_voxel_overlap(scale, offset, shape, source)
    if overlap is None or any(part.stop - part.start != n for part, n in zip(overlap[0], shape)):
        return None
    return overlap[1]


def _whole_voxel_overlap(scale: np.ndarray, offset: np.ndarray, shape: list[int], source: tuple[int, ...]
                         ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """For a map whose target voxel centres are all source voxel centres (steps of +-1, whole-voxel
    offsets): the target's slices whose voxels lie inside the source, and the source slices they
    read (empty where none do); None for any other map."""
    target, window = [], []
    for step, start, n, size in zip(scale, offset, shape, source):
        first = float(start)
        if not _whole_step(step, first):
            return None
        first_i = int(round(first))  # target index o reads source index first_i + step * o
        if step > 0:
            lo, hi = max(0, -first_i), min(n, size - first_i)
        else:
            lo, hi = max(0, first_i - size + 1), min(n, first_i + 1)
        if hi <= lo:  # no target voxel on this axis is inside the source
            target.append(slice(0, 0))
            window.append(slice(0, 0))
            continue
        target.append(slice(lo, hi))
        end = first_i + int(round(step)) * hi  # the source index after the last one read
        window.append(slice(first_i + lo, end) if step > 0 else slice(first_i - lo, end if end >= 0 else None, -1))
    return tuple(target), tuple(window)


def _axis_order(linear: np.ndarray, tolerance: float = 1e-6) -> tuple[int, int, int] | None:
    """For a map that only flips, permutes and scales axes: the source axis of each target axis."""
    significant = np.abs(linear) > tolerance * np.abs(linear).max()
    if not (significant.sum(axis=0) == 1).all() or not (significant.sum(axis=1) == 1).all():
        return None
    return tuple(int(np.argmax(significant[:, j])) for j in range(3))  # type: ignore[return-value]


def first_argmax(channels: Iterable[np.ndarray], count: int | None = None) -> np.ndarray:
    """np.argmax over the channels (uint8), the first on ties and the first NaN as the maximum, as
    numpy's: channel by channel, which over a handful of channels is 3-4x quicker than argmax along
    a short first axis (numpy walks it voxel by voxel) and holds two channels, not all. `count`,
    the number of channels when it is known: the last one need not update the running maximum
    (two channels over an organ's box of 13.8 million voxels: 0.16-0.19 -> 0.10 s)."""
    given = iter(channels)
    first = next(given)
    best = first if count is not None and count <= 2 else np.array(first)  # a copy, where it is written
    out = np.zeros(best.shape, dtype=np.uint8)
    for number, channel in enumerate(given, start=1):
        if number > 255:
            raise ValueError("over 256 channels: labels are one byte each")
        take = channel > best
        undefined = np.isnan(channel)
        if undefined.any():
            take |= undefined & ~np.isnan(best)
        out[take] = number
        if number + 1 != count:
            np.copyto(best, channel, where=take)
    return out


def argmax_in_blocks(channels: np.ndarray) -> np.ndarray:
    """`first_argmax` of the channels (channel, *grid) as float32, in blocks of ARGMAX_BLOCK planes
    along the grid's first axis on the usable CPUs: each block's running maximum stays in the
    cache while the channels stream past it (105 channels of a 196x237x237 box, random values:
    5.5 s in one pass, 1.8 s in blocks of 8 planes on two cores). Up to MIN_BLOCKED_VOXELS, at once."""
    out = np.empty(channels.shape[1:], dtype=np.uint8)

    def block(start: int, planes: int = ARGMAX_BLOCK) -> None:
        out[start:start + planes] = first_argmax(
            (np.asarray(c[start:start + planes], dtype=np.float32) for c in channels), len(channels))

    if out.size <= MIN_BLOCKED_VOXELS:
        block(0, out.shape[0])
    else:
        _on_usable_cpus(block, list(range(0, out.shape[0], ARGMAX_BLOCK)))
    return out


MapKind = Literal["whole voxels", "axis-aligned", "sheared", "oblique"]


def map_kind(source_affine: np.ndarray, target_affine: np.ndarray) -> MapKind:
    """How the target grid's voxel centres lie on the source grid: on its voxel centres (flips, axis
    order, whole-voxel offsets: a model without a spacing step), on its axes (any axial, coronal or
    sagittal series into RAS), plane by plane (`_aligned_planes`: a model's grid back onto a tilted
    stack), or obliquely. `resample_argmax` reads whole voxels as they are, takes an activation for
    the voxels it interpolates where the map is axis-aligned or sheared (interpolating only where the
    label can change), and interpolates an oblique map whole."""
    index_map = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    order = _axis_order(linear)
    if order is None:
        return "oblique" if _aligned_planes(linear) is None else "sheared"
    scale, _ = _in_source_order(linear, order, (1, 1, 1))
    return "whole voxels" if all(_whole_step(step, start) for step, start in zip(scale, offset)) else "axis-aligned"


def _whole_step(step: float, start: float) -> bool:
    """Whether an axis of a diagonal map goes from voxel centre to voxel centre: a step of +-1 from a
    whole-voxel start (to the affines' rounding)."""
    return abs(abs(step) - 1) <= 1e-9 and abs(start - round(start)) <= 1e-6


def resample_argmax(channels: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
                    shape: tuple[int, ...], padding: Padding = "constant", fill: float = 0.0,
                    activation: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """`first_argmax` of every channel of ``channels`` (channel, *grid of ``source_affine``) resampled
    as `resample` does, interpolating only where the answer can depend on it; uint8, C-contiguous in
    the source's axis order where the map is axis-aligned (so possibly a transposed view; `resample`
    copies a whole-voxel map into the target's order instead: the labels go on through
    `copy_in_blocks`, which takes either), in the target's otherwise.

    Where the eight source voxels around a target voxel centre all have the same argmax a, every
    interpolated channel is a convex combination of those eight values with the same weights, so a
    stays the largest (the first on ties) and the voxel takes a without interpolating. Only target
    voxels in cells whose corners disagree, or that reach beyond the source's edge, are
    interpolated: the boundaries between labels, a surface against a volume (a finer target grid
    than the source makes that a few percent of its voxels). The result differs from interpolating
    everything only where two channels come out equal to float32 rounding. A sheared map
    (`_aligned_planes`: a model's grid back onto a tilted stack) finds the cells plane by plane
    (`_cells_plane_by_plane`; a tilted CT's organ, benchmarks.tilted: 3.2-7.8 s -> 1.2 s; where a
    target plane lies on a source plane, a NaN or -inf in the next source plane, weighed 0, still
    makes an interpolated voxel's channel NaN, as scipy's 3D interpolation does, where `resample`
    reads the one plane). Other maps that are not diagonal in the source's axis order (oblique
    grids) are interpolated whole. A whole-voxel map (a model without a spacing step) takes the
    argmax of the channels' own voxels, and with "constant" padding label 0 a whole voxel or more
    beyond the source, where every channel is the fill (interpolating there weighs the edge voxel by
    the rounding error of the position, a tie broken by noise; with "border" such a map is
    interpolated as any other). (A cell whose corners all say 255, the mark of an undecided one, is
    interpolated too: the same answer.)

    `activation`: ``channels`` are a model's raw outputs, and what is resampled is `activation` of
    them over the channel axis, (channels, voxels) -> the same shape. It must keep each voxel's
    order of channels, ties included: the argmax of a voxel is read from its raw values (a softmax
    of finite values does, but for values within float32 rounding of each other; not a sigmoid,
    whose saturated values tie where their inputs differ). It is applied only to the voxels an
    interpolation reads: a softmax over the whole of a 105-class network's output at 1.5 mm took
    5.3 s of a CT's job. Not for oblique maps other than sheared ones (`map_kind`)."""
    index_map = np.linalg.inv(np.asarray(source_affine, dtype=float)) @ np.asarray(target_affine, dtype=float)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    shape = tuple(int(s) for s in shape)
    order = _axis_order(linear)
    planes = _aligned_planes(linear) if order is None else None
    if order is None and planes is None:
        if activation is not None:
            raise ValueError("an activation is applied on the way only where the map is axis-aligned or plane by plane")
        return first_argmax((resample(c, source_affine, target_affine, shape, padding, fill) for c in channels),
                            len(channels))
    if planes is not None:  # (decided with the planes' axis first, then transposed back: a view)
        order, across, reads = planes
        cells = _agreeing_cells(argmax_in_blocks(channels))
        out, points_at = _cells_plane_by_plane(cells, linear[:, order], offset, tuple(shape[j] for j in order),
                                               across, reads)
        _decide(out, points_at, channels, padding, fill, activation)
        return out.transpose(np.argsort(order))
    scale, source_order_shape = _in_source_order(linear, order, shape)
    overlap = _whole_voxel_overlap(scale, offset, source_order_shape, channels.shape[1:])
    if overlap is not None:  # a model without a spacing step
        inside, read = overlap
        beyond = any(part.stop - part.start != n for part, n in zip(inside, source_order_shape))
        if padding == "constant" or not beyond:  # ("border" repeats the edge beyond it: interpolated below)
            out = np.zeros(source_order_shape, dtype=np.uint8)
            if all(part.stop > part.start for part in inside):
                out[inside] = argmax_in_blocks(channels[(slice(None), *read)])
            return out.transpose(order)
    # along each source axis, the source coordinate of each target index (as scipy's zoom computes it)
    coordinates = [(np.arange(n) + offset[axis] / scale[axis]) * scale[axis]
                   for axis, n in enumerate(source_order_shape)]
    cells = _agreeing_cells(argmax_in_blocks(channels))  # (of the values as float32, as `resample` gives them)
    cell_of = [_cell_of(x, n) for x, n in zip(coordinates, cells.shape)]
    out = cells.take(cell_of[2], axis=2).take(cell_of[1], axis=1).take(cell_of[0], axis=0)  # 7x np.ix_'s speed
    _decide(out, lambda at: np.stack([coordinates[0][at[0]], coordinates[1][at[1]], coordinates[2][at[2]]]),
            channels, padding, fill, activation)
    return out.transpose(order)


_UNDECIDED = np.uint8(255)


def _agreeing_cells(grid: np.ndarray) -> np.ndarray:
    """Each cell of a grid of labels (by its first corner) labelled where its eight corners agree,
    else _UNDECIDED; the last slot on each axis (beyond the edge) _UNDECIDED."""
    corner = grid[:-1, :-1, :-1]
    agree = np.ones(corner.shape, dtype=bool)
    for step in np.ndindex(2, 2, 2):
        if any(step):
            agree &= corner == grid[tuple(slice(k, k + n - 1) for k, n in zip(step, grid.shape))]
    cells = np.full(grid.shape, _UNDECIDED, dtype=np.uint8)
    cells[:-1, :-1, :-1] = np.where(agree, corner, _UNDECIDED)
    return cells


def _cell_of(x: np.ndarray, n: int) -> np.ndarray:
    """The cell (its first corner) of each coordinate along an axis of n voxels; n - 1 (the slot
    beyond the edge) where there is none."""
    first = np.floor(x)
    return np.where((first >= 0) & (first <= n - 2), first, n - 1).astype(np.intp)


def _cells_plane_by_plane(cells: np.ndarray, linear: np.ndarray, offset: np.ndarray, shape: tuple[int, ...],
                          across: int, reads: tuple[int, int]
                          ) -> tuple[np.ndarray, Callable[[tuple[np.ndarray, ...]], np.ndarray]]:
    """For a map `_aligned_planes`: the cell label of each target voxel, plane by plane (each
    target plane lies in one layer of cells across `across`, and within it each axis reads one
    source axis), and the source coordinates of target voxels (s, r, c) (as `_decide` takes them)."""
    rows, columns = reads
    out = np.empty(shape, dtype=np.uint8)
    r, c = np.arange(shape[1]), np.arange(shape[2])
    for index in range(shape[0]):
        layer = cells[(slice(None),) * across + (int(_cell_of(np.array(linear[across, 0] * index + offset[across]),
                                                                  cells.shape[across])),)]
        along_rows = _cell_of(linear[rows, 1] * r + (linear[rows, 0] * index + offset[rows]), cells.shape[rows])
        along_columns = _cell_of(linear[columns, 2] * c + (linear[columns, 0] * index + offset[columns]),
                                 cells.shape[columns])
        if rows < columns:
            out[index] = layer.take(along_rows, axis=0).take(along_columns, axis=1)
        else:
            out[index] = layer.take(along_columns, axis=0).take(along_rows, axis=1).T

    def points_at(at: tuple[np.ndarray, ...]) -> np.ndarray:
        points = np.empty((3, at[0].size))
        points[across] = linear[across, 0] * at[0] + offset[across]
        points[rows] = linear[rows, 1] * at[1] + (linear[rows, 0] * at[0] + offset[rows])
        points[columns] = linear[columns, 2] * at[2] + (linear[columns, 0] * at[0] + offset[columns])
        return points

    return out, points_at


def _decide(out: np.ndarray, points_at: Callable[[tuple[np.ndarray, ...]], np.ndarray], channels: np.ndarray,
            padding: Padding, fill: float, activation: Callable[[np.ndarray], np.ndarray] | None) -> None:
    """The labels of `out`'s _UNDECIDED voxels, interpolated from the channels at their source
    coordinates (`points_at` of their indices), a bounded number of voxels at a time: with many
    channels or an activation where each can win (`_argmax_at`); a few, channel by channel."""
    rows = max(1, UNDECIDED_CHUNK // max(1, math.prod(out.shape[1:])))
    pruned = activation is not None or len(channels) > MANY_CHANNELS
    for start in range(0, out.shape[0], rows):
        part = out[start:start + rows]
        where = np.nonzero(part == _UNDECIDED)
        at_once = max(1, UNDECIDED_VALUES // len(channels) if pruned else where[0].size)
        for first in range(0, where[0].size, at_once):
            at = tuple(w[first:first + at_once] for w in where)
            points = points_at((at[0] + start, *at[1:]))
            if pruned:
                part[at] = _argmax_at(channels, points, padding, fill, activation)
            else:
                part[at] = first_argmax((ndimage.map_coordinates(c, points, output=np.float32, order=1, prefilter=False,
                                                                 mode=_SCIPY_MODE[padding], cval=fill)
                                         for c in channels), len(channels))


def _argmax_at(channels: np.ndarray, points: np.ndarray, padding: Padding, fill: float,
               activation: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """`first_argmax` of the channels linearly interpolated at `points` (3, n source coordinates),
    as scipy's map_coordinates (order 1, no prefilter) interpolates each: in float64 from the eight
    voxels around each point (its cell), weighted by the products of (1 - t, t) along each axis,
    beyond the source the fill ("constant") or the edge voxel ("border"), rounded to float32.

    Written here because map_coordinates goes channel by channel, each point's voxels and weights
    found again for every channel: 70 ns a point and channel, 12 s for a 105-class network's
    boundaries on a CT (3.5 s here). Here a channel is interpolated only in the cells where it can
    win: its interpolated value is at most its greatest over the cell's corners, and the best
    channel's is at least what some channel has all over the cell (below). And the activation is
    applied once to each voxel read."""
    size = np.array(channels.shape[1:])[:, None]
    low = np.floor(points).astype(np.intp)
    upper = points - low  # the weight of the voxel above along each axis
    # a cell by its first corner, clipped where both corners along an axis lie beyond the source alike
    first, cell_of = _unique_points(np.clip(low, -2, size))
    steps = list(np.ndindex(2, 2, 2))
    weights = np.stack([np.prod(np.where(np.array(step)[:, None] == 1, upper, 1.0 - upper), axis=0) for step in steps],
                       axis=1)  # (point, corner)
    corners = np.concatenate([first + np.array(step)[:, None] for step in steps], axis=1)  # (3, corner x cell)
    if padding == "border":
        corners = np.clip(corners, 0, size - 1)
    inside = np.all((corners >= 0) & (corners < size), axis=0)
    voxels, slot_inside = _unique_points(corners[:, inside])
    read = channels[(slice(None), *voxels)]
    values = np.empty((len(channels), read.shape[1] + 1), dtype=np.float32 if channels.dtype.itemsize <= 4 else float)
    values[:, :-1] = read if activation is None or read.shape[1] == 0 else activation(read)
    values[:, -1] = fill  # (the last slot, where a corner lies beyond the source)
    slot = np.full(corners.shape[1], read.shape[1])
    slot[inside] = slot_inside
    at_corners = values[:, slot.reshape(8, -1)]  # (channel, corner, cell)
    # Beyond the source every channel has the fill: each channel's value is its inside corners' share plus the same
    # number, so only those corners bound it. A point with none is all fill, channel 0's (so it is always a candidate).
    beyond = ~inside.reshape(8, -1)  # (corner, cell)
    least = np.where(beyond, np.inf, at_corners).min(axis=1)  # (channel, cell)
    most = np.where(beyond, -np.inf, at_corners).max(axis=1)
    winners = np.where(beyond, -1, at_corners.argmax(axis=0))  # (corner, cell): the channel that wins each corner
    # What the best channel has at least, anywhere in the cell: what a corner's winner has at every corner, and the
    # mean of the m corner winners (the best is at least that), at least the least of their sum over the corners.
    # Less a relative 1e-5, for the float32 rounding of the sums.
    reached = np.where(beyond, -np.inf, np.take_along_axis(least, np.maximum(winners, 0), axis=0)).max(axis=0)
    distinct = winners >= 0
    for j in range(1, 8):
        distinct[j] &= np.all(winners[j] != winners[:j], axis=0)
    mine = at_corners[np.maximum(winners, 0), :, np.arange(winners.shape[1])]  # (winner, cell, corner)
    sums = np.where(distinct[:, :, None], mine, 0).sum(axis=0, dtype=np.float64)
    mean = np.where(beyond.T, np.inf, sums).min(axis=1) / np.maximum(distinct.sum(axis=0), 1)
    reached = np.fmax(reached, mean)
    reached -= 1e-5 * np.abs(np.where(np.isfinite(reached), reached, 0.0))  # (a cell wholly beyond: inf)
    # a channel can win a point of the cell only if its most reaches that
    # (or where it is not a number, or infinite at a corner: a weight of 0 makes that NaN, which wins, as in scipy)
    candidate = (most >= reached) | ~np.isfinite(least) | np.isnan(reached)  # (channel, cell)
    candidate[:, beyond.all(axis=0)] = False
    candidate[0] = True
    # each cell's candidates in channel order, padded with its first (a tie goes to the first all the same)
    cell, channel = np.nonzero(candidate.T)
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])  # (every cell has a candidate: a corner's winner)
    rank = np.arange(cell.size) - np.repeat(starts, np.diff(np.r_[starts, cell.size]))
    ids = np.repeat(channel[starts][:, None], int(rank.max()) + 1, axis=1)  # (cell, candidate)
    ids[cell, rank] = channel
    near = at_corners[ids, :, np.arange(first.shape[1])[:, None]]  # (cell, candidate, corner)
    value = np.einsum("pkc,pc->pk", near[cell_of], weights).astype(np.float32)
    return ids[cell_of, value.argmax(axis=1)].astype(np.uint8)  # (numpy's argmax: the first NaN, else first maximum)


def _unique_points(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct points of `index` (3, m integer coordinates) in raster order, and each one's
    number among them: np.unique through a table over their bounding box, which is a slab of a
    few planes here (sorting eight corners a point was a round's largest cost)."""
    if index.shape[1] == 0:
        return index, np.zeros(0, dtype=np.intp)
    lo = index.min(axis=1)[:, None]
    span = tuple(int(n) for n in index.max(axis=1) - lo[:, 0] + 1)
    flat = np.ravel_multi_index(tuple(index - lo), span)
    seen = np.zeros(math.prod(span), dtype=bool)
    seen[flat] = True
    distinct = np.flatnonzero(seen)
    number = np.empty(seen.size, dtype=np.intp)
    number[distinct] = np.arange(distinct.size)
    return np.array(np.unravel_index(distinct, span)) + lo, number[flat]
