"""A stored series as a volume with its patient-space affine (highdicom does the geometry).

Before handing the datasets to highdicom, the series is checked for what would make a
volume wrong rather than merely unusual, so that the refusal names the cause: non-image
objects, mixed orientations, varying spacing, missing slices, multi-frame objects without
per-frame geometry.

What is accepted (each becomes a ``SeriesVolume`` whose affine puts every voxel where it is):
- single-frame series (CT, MR, PET, ...): placed like multi-frame frames, by their positions;
- multi-frame images with per-frame functional groups (Enhanced CT/MR/PET, ...): frames are
  placed by their Plane Position (highdicom's ``get_volume_positions``), never by file order,
  and the volume keeps which source frame each slice came from (``source_frames``), so that
  the SEG can reference the right frame;
- sheared stacks (gantry tilt): slices that advance along a fixed direction that is not the
  normal of the image plane. The affine is then sheared (exact for every voxel); the pipeline
  resamples to a regular grid for the model and maps labels back onto the source frames;
- series holding several volumes at the same positions (MR multi-echo, multi-b-value,
  dynamic/4D, magnitude+phase): ``load_volumes`` splits them by the attribute that tells them
  apart; ``load_series`` refuses them and names that attribute;
- single 2D projection images (DX, CR, MG, IO, RG) with PixelSpacing or ImagerPixelSpacing:
  one-slice volumes in image-plane millimetres (no patient coordinates: the affine is not
  patient LPS, ``frame_of_reference_uid`` is None).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from inference.errors import SeriesChanged, SeriesError  # noqa: F401 (raised here, caught by callers)
from inference.prefault import PrefaultedBuffer, prefaulted

PROJECTION_MODALITIES = {"DX", "CR", "MG", "IO", "RG", "PX"}
SPACING_TOLERANCE = 0.05  # relative: slice gaps and pixel spacings that count as equal
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that count as equal
MAX_TILT_DEGREES = 45.0  # beyond this a "tilted stack" is more likely a mislabelled series
SHEAR_PIXELS = 0.25  # in-plane drift over the whole stack above this (in pixels): treated as sheared
SHEAR_DEGREES = 1.0  # or a tilt above this: highdicom's regular-volume check would refuse it




@dataclass
class SeriesVolume:
    """Voxels (slice, row, column) in modality units (float32, or int16 where that is exact), and
    where they are.

    ``affine`` maps (slice, row, column, 1) to patient LPS millimetres; for a sheared stack
    (gantry tilt) its slice column is the step between slice origins, not the plane normal.
    ``datasets[k]`` is the source instance of slice k (same order) for a single-frame series;
    for a multi-frame source, ``datasets`` is that one instance and ``source_frames[k]`` is the
    (1-based) frame number of slice k. ``label`` names the volume when a series holds several
    ("EchoTime 20 ms"). ``patient_space`` is False for 2D projection images: their affine maps
    to image-plane millimetres and ``frame_of_reference_uid`` is None.
    """

    array: np.ndarray = field(repr=False)  # (not in the repr: reading it may read the files again)
    affine: np.ndarray
    datasets: list[Dataset]
    frame_of_reference_uid: str | None
    source_frames: list[int] | None = None
    label: str = ""
    patient_space: bool = True
    _reread: Callable[[], np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _as_read: Any = field(default=None, init=False, repr=False, compare=False)  # weakref to what _reread gave
    _shape: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    _intensity: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    def rereadable(self, reread: Callable[[], np.ndarray] | None) -> "SeriesVolume":
        """The loader's word that `reread` gives these very voxels again from the stored files (None:
        it cannot cheaply, e.g. decoded data), so that `set_pixels_aside` may let them go."""
        self._reread = reread
        self._as_read = weakref.ref(self.array) if reread is not None else None
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        """The voxel grid's shape, also while the voxels are set aside."""
        array = self.__dict__.get("array")
        return self._shape if array is None else tuple(array.shape)

    def intensity(self) -> tuple[float, float]:
        """Mean and standard deviation of every 4th voxel along each axis (a model run's input
        figures: milliseconds for a 300-slice CT), also while the voxels are set aside."""
        if self._intensity is None or "array" in self.__dict__:
            sample = self.array[::4, ::4, ::4]
            return float(sample.mean()), float(sample.std())
        return self._intensity

    def set_pixels_aside(self) -> bool:
        """Let the voxels go until something reads ``array`` again, which then reads them from the
        same files (SeriesChanged if one was replaced meanwhile, as on the first read). A model's
        inference keeps arrays of its grid alive (its input, its output: inference.windows) and
        needs only the geometry of the source, as do the SEG and SR: the int16 volume (150 MiB for
        a 300-slice CT) beside them would be the job's peak. A volume that cannot be re-read
        cheaply (decoded, built in memory, or given other voxels since it was read) stays whole.
        Returns whether the voxels were let go."""
        array = self.__dict__.get("array")
        if array is None or self._reread is None or self._as_read is None or self._as_read() is not array:
            return False
        self._intensity = self.intensity()
        self._shape = tuple(array.shape)
        del self.array
        return True

    def __getattr__(self, name: str) -> Any:
        """Only reached for an attribute the instance lacks: ``array`` while it is set aside."""
        reread = self.__dict__.get("_reread")
        if name == "array" and reread is not None and self.__dict__.get("_shape"):
            self.array = reread()
            self._as_read = weakref.ref(self.array)
            return self.array
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) patient coordinates (mm)."""
        indices = np.atleast_2d(np.asarray(indices, dtype=float))
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the image planes (pointing along increasing slice index)."""
        n = np.cross(self.affine[:3, 1], self.affine[:3, 2])
        n /= np.linalg.norm(n)
        return n if float(np.dot(n, self.affine[:3, 0])) >= 0 else -n

    @property
    def tilt_degrees(self) -> float:
        """Angle between the slice step and the plane normal: 0 for a regular stack."""
        step = self.affine[:3, 0]
        cos = abs(float(np.dot(step, self.normal))) / float(np.linalg.norm(step))
        return math.degrees(math.acos(min(1.0, cos)))

    @property
    def sheared(self) -> bool:
        """True when the slice step is not along the normal (the model gets a resampled grid)."""
        return self.tilt_degrees > 1e-3

    def source_of(self, k: int) -> tuple[Dataset, int | None]:
        """The instance and (for multi-frame) frame number that slice k was read from."""
        if self.source_frames is not None:
            return self.datasets[0], self.source_frames[k]
        return self.datasets[k], None


# Values longer than this stay in the file when a series is read: Pixel Data is then read straight
# into the volume (one copy instead of three for a 300-slice CT), anything else when first used.
DEFER_BYTES = 16384


@dataclass(frozen=True)
class StoredFile:
    """Which file (inode, size, modification time) a dataset's header was parsed from: its
    deferred Pixel Data is read only from that same file (a resend replaces it with a new one)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "StoredFile":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# A frame's Python objects while its volume is built (its header's elements, position, attributes):
# 10-15 KiB a frame measured (a 60-image CT series, a 3,000-frame object); tests/test_corpus.py
# checks the peak of loading the corpus against load_need with them counted.
FRAME_OBJECT_BYTES = 24 << 10


def read_series(files: Sequence[Path], ahead: Mapping[Path, Dataset] | None = None) -> list[Dataset]:
    """The series' datasets. The Pixel Data of single-frame uncompressed grayscale images is left
    in the files (``DEFER_BYTES``) and read into the volume later from the very file each header
    came from; every other data set is read whole. `ahead`: headers parsed already
    (inference.headers.ParsedHeaders), used for their files instead of parsing them again."""
    return [_read(f, ahead) for f in files]


def _read(file_path: Path, ahead: Mapping[Path, Dataset] | None,
          seen: Callable[[Dataset], None] | None = None) -> Dataset:
    """One file's data set (read_series); `seen` is given its header before anything more is read."""
    ds = ahead.get(file_path) if ahead else None
    if ds is not None:
        if seen is not None:
            seen(ds)
        return ds
    with open(file_path, "rb") as file:
        ds = parse_header(file)
        if seen is not None:
            seen(ds)
        if read_whole(ds):
            # Read whole, from this same file: deflated offsets are not file offsets, other pixel
            # data is decoded by highdicom (which would read a deferred value by name, from
            # whatever file is there by then), and a multi-frame object's functional groups may be
            # long enough to be deferred too.
            file.seek(0)
            ds = pydicom.dcmread(file)
    return ds


def parse_header(file: BinaryIO) -> Dataset:
    """The data set with its long values (Pixel Data) left in the file, and which file that is."""
    ds = pydicom.dcmread(file, defer_size=DEFER_BYTES)
    ds._stored_file = StoredFile.of(os.fstat(file.fileno()))  # kept on the dataset for _StoredPixels
    return ds


def read_whole(header: Dataset) -> bool:
    """Whether the data set must be read whole (see read_series): its header alone is no use."""
    return (header.file_meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
            or _frames(header) > 1 or _StoredPixels.of(header) is None)


def read_volumes(files: Sequence[Path], ahead: Mapping[Path, Dataset] | None = None,
                 room: Callable[[int, str, int], None] | None = None) -> list[SeriesVolume]:
    """``load_volumes(read_series(files, ahead))`` for a job, which needs the volume at once: the
    volume's memory is faulted in on another core while the headers after the first are parsed
    (inference.prefault), and taken by the volume when its size is the one foreseen. `room`: told
    the bytes, what they are and how many of them are allocated already, before the rest is: from
    the first header (load_need), before anything is; again before the volume is built where the
    instances differ in how their values are stored or kept (mixed_need); raises to refuse them."""
    if not files:
        return load_volumes([])
    sizes = [os.path.getsize(f) for f in files] if room is not None else []

    def foresee(header: Dataset) -> None:
        try:
            need = load_need(header, len(files), sum(sizes))
        except Exception:  # noqa: BLE001 - a header it cannot read: left to the checks that name what is wrong
            return
        room(*need, 0)  # type: ignore[misc]

    first = [_read(files[0], ahead, foresee if room is not None else None)]
    buffer = _prefaulted_for(first[0], len(files))
    try:
        datasets = first + read_series(files[1:], ahead)
        if room is not None and len(layouts := _layouts(datasets)) > 1:
            need, detail = mixed_need(layouts, len(files), sum(sizes))
            decoded = detail.endswith("decoded to float32")  # (the files in its need: those read whole are taken)
            if decoded and buffer is not None:
                buffer.release()  # (not taken by decoded frames)
                buffer.wait(10)  # its thread's hold ends with its chunk: gone before memory is counted
            room(need, detail, sum(size for size, ds in zip(sizes, datasets) if read_whole(ds)) if decoded else 0)
        return _load(datasets, SPACING_TOLERANCE, ORIENTATION_TOLERANCE, split=True, buffer=buffer)
    finally:
        if buffer is not None:
            buffer.release()


# What tells how a data set's values are stored and kept (read_volumes: the instances of a series
# that differ in it are foreseen again). By tag: half the time of keywords.
_LAYOUT = tuple(pydicom.tag.Tag(tag_for_keyword(keyword)) for keyword in (
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "LargestImagePixelValue"))


def _layouts(datasets: Sequence[Dataset]) -> list[Dataset]:
    """One data set of each layout: how its values are stored, and whether they are kept as int16
    (`_int16_intercept`, worked out once for each distinct rescale: a PET series' slopes, or each
    instance's Largest Image Pixel Value, differ without changing that); none where a header
    cannot be read so (left to the checks that name what is wrong)."""
    def stored(ds: Dataset) -> tuple[Any, ...]:
        return (*(None if (element := ds.get(tag)) is None else element.value for tag in _LAYOUT),
                ds.file_meta.get("TransferSyntaxUID"))

    try:
        distinct = {stored(ds): ds for ds in datasets}
        return list({(*key[:8], key[-1], _int16_intercept(ds)): ds for key, ds in distinct.items()}.values())
    except Exception:  # noqa: BLE001 - see the docstring
        return []


def load_need(first: Dataset, count: int, file_bytes: int, alike: bool = True) -> tuple[int, str]:
    """The most memory reading a series of `count` instances like `first` (`file_bytes` in all)
    takes at once, foreseen from the first one's header, and what that is (sizes only): the stored
    values; beside them their float32 modality values, unless they are kept as int16 (`_as_int16`,
    nearly every CT: foreseen from the rescale, for values that cannot pass int16's range); decoded
    by highdicom (compressed data, colour): `_decoded_need`; the instances read whole (read_whole:
    multi-frame), their files' bytes; the frames' Python objects (`FRAME_OBJECT_BYTES`).
    Uncompressed, the files' bytes bound the stored values from below: a series whose first
    instance is smaller than the others is foreseen from the others' size. `alike`: the others'
    values are kept as `first`'s are; else they are not foreseen as kept as int16."""
    frames = count * _frames(first)
    source = _StoredPixels.of(first)
    if source is None:
        return _decoded_need(first, count, file_bytes)
    size = source.dtype.itemsize
    held = (file_bytes if read_whole(first) else 0) + frames * FRAME_OBJECT_BYTES
    voxels = max(frames * math.prod(source.shape[1:]), file_bytes // size)
    bits = f"{_images(first, count)}, {8 * size}-bit stored values"
    if alike and _int16_intercept(first) is not None:
        return held + voxels * (size + (0 if size == 2 else 2)), f"{bits}, kept as int16"
    return held + voxels * (size + 4), f"{bits}, with float32 values"


def mixed_need(layouts: Sequence[Dataset], count: int, file_bytes: int) -> tuple[int, str]:
    """load_need for a series whose instances differ in layout (one header of each, `_layouts`):
    stored alike, uncompressed (their transfer syntaxes or rescales differ), as int16 where every
    layout is kept so with one intercept, else their float32 values; else highdicom decodes every
    instance (`_decoded_need`), foreseen from the layout that needs the most (images of different
    sizes: a projection series, volumes loaded apart)."""
    sources = [_StoredPixels.of(ds) for ds in layouts]
    if all(sources) and len({(s.dtype, s.shape, s.unused_bits) for s in sources}) == 1:  # type: ignore[union-attr]
        kept = {_int16_intercept(ds) for ds in layouts}
        return load_need(layouts[0], count, file_bytes, alike=len(kept) == 1 and None not in kept)
    return max(_decoded_need(ds, count, file_bytes) for ds in layouts)


# What highdicom keeps for each instance it decodes (its frame index in an in-memory SQLite
# database, ~43 KiB measured, and the Python objects around it)
DECODED_INSTANCE_BYTES = 64 << 10


def _decoded_need(first: Dataset, count: int, file_bytes: int) -> tuple[int, str]:
    """Data highdicom decodes frame by frame into the volume (compressed, colour, mixed layouts):
    the files' bytes (read whole, by the decoder where not before), what it keeps for each instance
    (`DECODED_INSTANCE_BYTES`), the frames' Python objects, the float32 volume, and beside it a
    frame's stored values and two float32 copies as it is decoded (highdicom's pixel transform: a
    1-bit SEG measured)."""
    frames, rows, columns = count * _frames(first), int(first.get("Rows") or 0), int(first.get("Columns") or 0)
    samples = int(first.get("SamplesPerPixel") or 1)
    plane = rows * columns * samples
    stored = plane * math.ceil(int(first.get("BitsAllocated") or 16) / 8)
    held = file_bytes + count * DECODED_INSTANCE_BYTES + frames * FRAME_OBJECT_BYTES
    return held + frames * plane * 4 + plane * 8 + stored, f"{_images(first, count)}, decoded to float32"


def _images(first: Dataset, count: int) -> str:
    frames, rows, columns = count * _frames(first), int(first.get("Rows") or 0), int(first.get("Columns") or 0)
    return f"{count} images of {rows}x{columns}" if frames == count else f"{frames} frames of {rows}x{columns}"


def _int16_intercept(ds: Dataset) -> int | None:
    """The intercept of a single-frame image whose values are foreseen kept as int16 (`_as_int16`):
    8- or 16-bit stored values, slope 1, a whole intercept, and stored bits that cannot pass int16's
    range with it (unsigned ones up to their Bits Stored, or Largest Image Pixel Value where given;
    signed ones are: a value near int16's ends plus an intercept is not foreseen). None for float32
    values. (A multi-frame object's rescale may differ frame by frame: its functional groups are not
    read here.)"""
    slope, intercept = float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    bits = int(ds.get("BitsAllocated") or 0)
    if _frames(ds) != 1 or slope != 1.0 or not intercept.is_integer() or bits not in (8, 16):
        return None
    if bits == 16 and not ds.get("PixelRepresentation"):
        largest = ds.get("LargestImagePixelValue")
        high = int(largest) if isinstance(largest, int) else (1 << int(ds.get("BitsStored") or 16)) - 1
        if not (-(1 << 15) <= intercept and high + intercept < (1 << 15)):
            return None
    return int(intercept)


def _prefaulted_for(first: Dataset, count: int) -> PrefaultedBuffer | None:
    """Memory for `count` frames like the first instance's, when it is a single-frame image with
    patient geometry whose Pixel Data the fast path reads (nearly every CT and MR series)."""
    if count < 2 or _frames(first) != 1 or _is_projection(first):
        return None
    source = _StoredPixels.of(first)
    if source is None:
        return None
    return prefaulted(count * math.prod(source.shape[1:]) * source.dtype.itemsize)


def load_series(
    datasets: Sequence[Dataset], spacing_tolerance: float = SPACING_TOLERANCE,
    orientation_tolerance: float = ORIENTATION_TOLERANCE
) -> SeriesVolume:
    """Check a series and build its one volume (rescale applied, any order in).

    A series that holds several volumes (echoes, b-values, time points) is refused with the
    attribute that tells them apart: ``load_volumes`` gives each of them.
    """
    volumes = _load(datasets, spacing_tolerance, orientation_tolerance, split=False)
    return volumes[0]


def load_volumes(
    datasets: Sequence[Dataset], spacing_tolerance: float = SPACING_TOLERANCE,
    orientation_tolerance: float = ORIENTATION_TOLERANCE
) -> list[SeriesVolume]:
    """Every volume of a series: one for most, one per echo / b-value / time point / image type
    for series that hold several at the same positions, one per image for projection images.

    Each volume's ``label`` says which it is ("EchoTime 20 ms"); ``datasets`` (and for a
    multi-frame source ``source_frames``) hold only that volume's instances or frames.
    """
    return _load(datasets, spacing_tolerance, orientation_tolerance, split=True)


def _load(datasets: Sequence[Dataset], spacing_tol: float, orientation_tol: float, split: bool,
          buffer: PrefaultedBuffer | None = None) -> list[SeriesVolume]:
    if not datasets:
        raise SeriesError("the series has no instances")
    for ds in datasets:
        _check_image(ds)
    if any(_frames(ds) > 1 for ds in datasets):
        if buffer is not None:
            buffer.release()  # foreseen for single-frame images: not kept while these are built
        if len(datasets) > 1:
            if not split:
                raise SeriesError("the series mixes multi-frame objects with other instances")
            multi = [ds for ds in datasets if _frames(ds) > 1]
            single = [ds for ds in datasets if _frames(ds) == 1]
            volumes = [v for ds in multi for v in _load([ds], spacing_tol, orientation_tol, split)]
            return volumes + (_load(single, spacing_tol, orientation_tol, split) if single else [])
        groups = _split(_multiframe_frames(datasets[0]), split)
        return [_stack(frames, label, spacing_tol, orientation_tol) for label, frames in groups]
    if all(_is_projection(ds) for ds in datasets):
        if len(datasets) > 1 and not split:
            raise SeriesError(
                f"the series holds {len(datasets)} projection images: each is its own 2D volume (load_volumes)")
        ordered = sorted(datasets, key=lambda ds: int(ds.get("InstanceNumber") or 0))
        return [_projection(ds) for ds in ordered]
    if any(_is_projection(ds) for ds in datasets):
        raise SeriesError("the series mixes projection images without patient geometry with other images")
    groups = _split([_Frame.of_instance(ds) for ds in datasets], split)
    return [_series(frames, label, spacing_tol, orientation_tol, buffer) for label, frames in groups]


# -- one frame, wherever it comes from --------------------------------------------------------


@dataclass
class _Frame:
    """One image plane: its instance, frame number (multi-frame) and geometry."""

    dataset: Dataset
    number: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_instance(cls, ds: Dataset) -> "_Frame":
        return cls(ds, None, _floats(ds.ImagePositionPatient), _floats(ds.ImageOrientationPatient),
                   _spacing(ds.get("PixelSpacing")), _instance_attributes(ds))


def _frames(ds: Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def _floats(values: Any) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=float)


def _spacing(values: Any) -> tuple[float, float]:
    if values is None or len(values) != 2:
        raise SeriesError("an image has no PixelSpacing: no patient geometry")
    return float(values[0]), float(values[1])


# Attributes that tell apart several volumes stored at the same positions in one series, in the
# order they are tried: (attribute, how a value is written in the volume's label).
_SPLIT_KEYS: list[tuple[str, Callable[[Any], str]]] = [
    ("EchoTime", lambda v: f"EchoTime {v:g} ms"),
    ("EchoNumbers", lambda v: f"echo {v:g}"),
    ("DiffusionBValue", lambda v: f"b-value {v:g} s/mm2"),
    ("DiffusionGradientOrientation", lambda v: "gradient (" + ", ".join(f"{x:.3f}" for x in v) + ")"),
    ("TemporalPositionIdentifier", lambda v: f"temporal position {v:g}"),
    ("TemporalPositionIndex", lambda v: f"temporal position {v:g}"),
    ("TriggerTime", lambda v: f"trigger time {v:g} ms"),
    ("StackID", lambda v: f"stack {v}"),
    ("ImageType", lambda v: "ImageType " + "\\".join(v)),
]


# The values the volume reads from every single-frame header (geometry, rescale, what tells
# volumes apart; the Frame of Reference from the first in slice order, which any may be), past the
# pixel layout its parse decodes already: the node decodes them while the study waits
# (inference.headers), so that its job finds them decoded.
HEADER_KEYWORDS: tuple[str, ...] = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Modality", "RescaleSlope",
    "RescaleIntercept", "FrameOfReferenceUID", *(key for key, _ in _SPLIT_KEYS),
)


def _value(raw: Any) -> Any:
    if raw is None or raw == "":
        return None
    if isinstance(raw, (list, tuple, MultiValue)):
        try:
            return tuple(round(float(x), 4) for x in raw)
        except (TypeError, ValueError):
            return tuple(str(x) for x in raw)
    try:
        return round(float(raw), 4)
    except (TypeError, ValueError):
        return str(raw)


def _instance_attributes(ds: Dataset) -> dict[str, Any]:
    return {key: _value(ds.get(key)) for key, _ in _SPLIT_KEYS}


def _frame_attributes(shared: Dataset, item: Dataset) -> dict[str, Any]:
    """Per-frame values of the splitting attributes (Enhanced MR echo, diffusion, temporal...)."""
    def find(sequence: str, keyword: str) -> Any:
        for group in (item, shared):
            if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
                return group[sequence][0].get(keyword)
        return None

    return {
        "EchoTime": _value(find("MREchoSequence", "EffectiveEchoTime")),
        "DiffusionBValue": _value(find("MRDiffusionSequence", "DiffusionBValue")),
        "TemporalPositionIndex": _value(find("FrameContentSequence", "TemporalPositionIndex")),
        "StackID": _value(find("FrameContentSequence", "StackID")),
        "ImageType": _value(find("MRImageFrameTypeSequence", "FrameType")
                            or find("CTImageFrameTypeSequence", "FrameType")),
    }


def _split(frames: list[_Frame], split: bool) -> list[tuple[str, list[_Frame]]]:
    """Frames grouped into volumes: one group unless several frames share a position."""
    if _positions_unique(frames):
        return [("", frames)]
    for key, describe in _SPLIT_KEYS:
        values = {f.attributes.get(key) for f in frames}
        if len(values) < 2 or None in values:
            continue
        groups: dict[Any, list[_Frame]] = defaultdict(list)
        for f in frames:
            groups[f.attributes[key]].append(f)
        if not split:
            shown = ", ".join(describe(v) for v in sorted(groups)[:4]) + (", ..." if len(groups) > 4 else "")
            raise SeriesError(
                f"the series holds {len(groups)} volumes at the same positions, told apart by {key}"
                f" ({shown}): each is its own volume (load_volumes)")
        out = []
        for value in sorted(groups):
            for label, sub in _split(groups[value], split):
                out.append((describe(value) + (f", {label}" if label else ""), sub))
        return out
    return [("", frames)]  # duplicate positions, nothing tells them apart: the stack check refuses


def _positions_unique(frames: list[_Frame]) -> bool:
    keys = {tuple(np.round(f.position, 3)) for f in frames}
    return len(keys) == len(frames)


# -- checks ------------------------------------------------------------------------------------


def _check_image(ds: Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SeriesError(f"SOP class {ds.get('SOPClassUID', 'unknown')} ({_sop_name(ds)}) is not an image")
    frames = _frames(ds)
    if frames > 1:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        has_positions = per_frame and all("PlanePositionSequence" in item for item in per_frame)
        if not has_positions:
            raise SeriesError(
                f"multi-frame object with {frames} frames has no per-frame geometry"
                " (Per-frame Functional Groups with Plane Position)"
            )
    elif _is_projection(ds):
        if ds.get("PixelSpacing") is None and ds.get("ImagerPixelSpacing") is None:
            raise SeriesError(f"{ds.Modality} image has neither PixelSpacing nor ImagerPixelSpacing: no size in mm")
    elif "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise SeriesError("an image has no ImagePositionPatient/ImageOrientationPatient: no patient geometry")
    if frames > 1 or not _is_projection(ds):
        if not ds.get("FrameOfReferenceUID"):  # (Type 1 with patient geometry: PS3.3 C.7.4.1)
            raise SeriesError("an image has no FrameOfReferenceUID: its results could not be placed in its frame of"
                              " reference")


def _is_projection(ds: Dataset) -> bool:
    """A 2D projection image (radiograph): no Image Plane module, size from (Imager)PixelSpacing."""
    return (str(ds.get("Modality", "")) in PROJECTION_MODALITIES and _frames(ds) == 1
            and "ImagePositionPatient" not in ds)


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", "unknown") if uid else "unknown"


def _check_stack(frames: list[_Frame], spacing_tol: float, orientation_tol: float) -> None:
    """Refuse what would make the volume wrong, naming the cause."""
    orientations = np.array([f.orientation for f in frames])
    if np.max(np.abs(orientations - orientations[0])) > orientation_tol:
        distinct = {tuple(np.round(o, 3)) for o in orientations}
        raise SeriesError(f"mixed orientations in one series: {len(distinct)} different ImageOrientationPatient values")
    shapes = {(int(f.dataset.Rows), int(f.dataset.Columns)) for f in frames}
    if len(shapes) > 1:
        raise SeriesError(f"images of different sizes in one series: {sorted(shapes)}")
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        raise SeriesError(f"images with different PixelSpacing in one series: {sorted(spacings)}")
    if len(frames) < 2:
        return
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    positions = np.sort([float(np.dot(f.position, normal)) for f in frames])
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


def _shear(frames: list[_Frame], spacing_tol: float) -> tuple[list[_Frame], np.ndarray] | None:
    """For a sheared stack (gantry tilt): frames in slice order and the step between slice origins.

    None when the stack is regular (slices along the normal, to within a quarter pixel over the
    whole stack). A step that changes from slice to slice is refused: no affine describes it.
    """
    if len(frames) < 2:
        return None
    normal = get_normal_vector(frames[0].orientation, index_convention=VOLUME_INDEX_CONVENTION)
    ordered = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))
    positions = np.array([f.position for f in ordered])
    steps = np.diff(positions, axis=0)
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    along = float(np.dot(step, normal))
    drift = np.linalg.norm((positions[-1] - positions[0]) - (along * (len(ordered) - 1)) * normal)
    tilt = math.degrees(math.atan2(float(np.linalg.norm(step - along * normal)), along))
    if drift <= SHEAR_PIXELS * min(frames[0].pixel_spacing) and tilt <= SHEAR_DEGREES:
        return None
    deviation = float(np.max(np.linalg.norm(steps - step, axis=1)))
    if deviation > spacing_tol * along:
        raise SeriesError(
            f"slices are tilted by {tilt:.1f}° but not as one regular sheared stack: the step between"
            f" slices varies by {deviation:.2f} mm")
    if tilt > MAX_TILT_DEGREES:
        raise SeriesError(f"gantry tilt {tilt:.1f}° (slices sheared by more than {MAX_TILT_DEGREES:.0f}°)")
    return ordered, step


# -- building volumes --------------------------------------------------------------------------


def _series(frames: list[_Frame], label: str, spacing_tol: float, orientation_tol: float,
            buffer: PrefaultedBuffer | None = None) -> SeriesVolume:
    """Single-frame instances: a regular stack (as for multi-frame images), or a sheared one."""
    return _stack(frames, label, spacing_tol, orientation_tol, buffer)


def _multiframe_frames(ds: Dataset) -> list[_Frame]:
    """Every frame of a multi-frame image with its own position, orientation and spacing."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else Dataset()
    frames = []
    for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        def group(sequence: str) -> Dataset | None:
            for source in (item, shared):
                if sequence in source and len(source[sequence].value):
                    return source[sequence][0]
            return None

        orientation = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        if orientation is None or measures is None or "PixelSpacing" not in measures:
            raise SeriesError("multi-frame object has no Plane Orientation or Pixel Measures functional group")
        frames.append(_Frame(ds, number, _floats(item.PlanePositionSequence[0].ImagePositionPatient),
                             _floats(orientation.ImageOrientationPatient), _spacing(measures.PixelSpacing),
                             _frame_attributes(shared, item)))
    return frames


def _stack(frames: list[_Frame], label: str, spacing_tol: float, orientation_tol: float,
           buffer: PrefaultedBuffer | None = None) -> SeriesVolume:
    """Frames (of one multi-frame image, or single-frame instances) as a volume, each placed by
    its own position.

    highdicom's ``get_volume_positions`` gives each frame its slice index (file or frame order
    plays no part); the volume records the source of every slice for the SEG's references.
    (highdicom's ``get_volume_from_series`` does the same for single-frame series but checks
    each instance against its IOD first: 2.6 s of 3 s for a 300-slice CT.)
    """
    _check_stack(frames, spacing_tol, orientation_tol)
    ds = frames[0].dataset
    sheared = _shear(frames, spacing_tol)
    if sheared is not None:
        return _sheared_volume(*sheared, label, buffer)
    orientation = frames[0].orientation
    spacing, indices = get_volume_positions([f.position for f in frames], orientation, rtol=spacing_tol)
    if spacing is None or indices is None:
        raise SeriesError("multi-frame object is not a regular volume: its frame positions are not regularly spaced")
    ordered: list[_Frame] = [frames[0]] * len(frames)
    for frame, index in zip(frames, indices):
        ordered[index] = frame
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=ordered[0].position, image_orientation=orientation, rows=int(ds.Rows),
        columns=int(ds.Columns), pixel_spacing=ordered[0].pixel_spacing, number_of_frames=len(frames),
        spacing_between_slices=spacing, coordinate_system="PATIENT",
    )
    multiframe = ordered[0].number is not None
    pixels, reread = _pixels(ordered, buffer)
    return SeriesVolume(pixels, np.asarray(geometry.affine),
                        [ds] if multiframe else [f.dataset for f in ordered], str(ds.FrameOfReferenceUID),
                        source_frames=[int(f.number) for f in ordered] if multiframe else None,
                        label=label).rereadable(reread)


def _sheared_volume(ordered: list[_Frame], step: np.ndarray, label: str,
                    buffer: PrefaultedBuffer | None = None) -> SeriesVolume:
    """A sheared stack: slice k at the position of its own frame, the affine's slice column = step."""
    first = ordered[0]
    sr, sc = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = first.orientation[3:] * sr
    affine[:3, 2] = first.orientation[:3] * sc
    affine[:3, 3] = first.position
    multiframe = first.number is not None
    pixels, reread = _pixels(ordered, buffer)
    return SeriesVolume(
        pixels, affine, [first.dataset] if multiframe else [f.dataset for f in ordered],
        str(first.dataset.FrameOfReferenceUID),
        source_frames=[int(f.number) for f in ordered] if multiframe else None, label=label,
    ).rereadable(reread)


def _pixels(ordered: list[_Frame], buffer: PrefaultedBuffer | None = None
            ) -> tuple[np.ndarray, Callable[[], np.ndarray] | None]:
    """Frames in slice order, modality transform (rescale) applied: float32, or int16 when the
    values are integers that fit; and how to read them again when that is cheap (uncompressed).
    `buffer`: memory made ready for the stored values (read_volumes), taken when it fits."""
    native = _native_pixels(ordered, buffer)
    if native is None:
        if buffer is not None:
            buffer.release()  # not kept beside the decoded frames
        return _decoded_pixels(ordered), None

    def again() -> np.ndarray:
        pixels = _native_pixels(ordered)
        if pixels is None:  # a dataset no longer reads as it did: only a change to its file does that
            raise SeriesChanged("the series' pixel data no longer reads as it did when the series was loaded")
        return pixels

    return native, again


def _decoded_pixels(ordered: list[_Frame]) -> np.ndarray:
    """Any image highdicom can decode, frame by frame (compressed data, LUTs, MONOCHROME1...),
    each frame copied into the volume as it is decoded: the volume's 4 bytes a voxel and one
    frame's, not a list of frames beside their stack (8 bytes a voxel, load_need)."""
    images: dict[int, hd.Image] = {}
    out: np.ndarray | None = None
    for k, frame in enumerate(ordered):
        key = id(frame.dataset)
        if key not in images:
            images[key] = _image(frame.dataset)
        try:
            plane = images[key].get_frame(frame.number or 1, dtype=np.float32, apply_real_world_transform=False,
                                          apply_modality_transform=None, apply_palette_color_lut=False,
                                          apply_icc_profile=False)
        except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
            raise SeriesError(f"the image cannot be decoded: {exc}") from None
        if out is None:
            out = np.empty((len(ordered), *plane.shape), dtype=np.float32)
        elif plane.shape != out.shape[1:]:
            raise SeriesError(f"the images decode to different shapes: {out.shape[1:]} and {plane.shape}")
        out[k] = plane
    assert out is not None  # (a volume has at least one frame: _load)
    return out


def _native_pixels(ordered: list[_Frame], buffer: PrefaultedBuffer | None = None) -> np.ndarray | None:
    """The fast path for uncompressed grayscale data with a linear rescale (nearly every CT and MR):
    the stored values straight from the Pixel Data bytes, rescaled once for the whole stack.

    Gives the same values as highdicom's ``get_frame`` (a test compares them), unused high bits
    ignored as pydicom does; None when the data needs anything else (compression, LUTs,
    MONOCHROME1, colour, short Pixel Data), which then goes through highdicom frame by frame.
    """
    sources: dict[int, _StoredPixels] = {}
    for ds in {id(f.dataset): f.dataset for f in ordered}.values():
        source = _StoredPixels.of(ds)
        if source is None:
            return None
        sources[id(ds)] = source
    layouts = {(s.dtype.newbyteorder("="), s.shape[1:], s.unused_bits) for s in sources.values()}
    if len(layouts) != 1:
        return None
    dtype, plane, unused = layouts.pop()
    shape = (len(ordered), *plane)
    taken = buffer.take(shape, dtype) if buffer is not None else None
    stored = taken if taken is not None else np.empty(shape, dtype=dtype)
    for k, frame in enumerate(ordered):
        sources[id(frame.dataset)].read_frame(frame.number or 1, stored[k])
    if unused > 0:  # bits above Bits Stored carry no value (PS3.5 8.1.1): shift them out, sign-extending
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)
    slope = np.ones(len(ordered), dtype=np.float32)
    intercept = np.zeros(len(ordered), dtype=np.float32)
    for k, frame in enumerate(ordered):
        slope[k], intercept[k] = _rescale(frame)
    uniform = bool(np.all(slope == slope[0]) and np.all(intercept == intercept[0]))
    if uniform and slope[0] == 1.0 and float(intercept[0]).is_integer():
        exact = _as_int16(stored, int(intercept[0]))
        if exact is not None:
            return exact
    out = stored.astype(np.float32)
    if uniform:
        if slope[0] != 1.0:
            out *= slope[0]
        if intercept[0] != 0.0:
            out += intercept[0]
    else:
        out *= slope[:, None, None]
        out += intercept[:, None, None]
    return out


@dataclass(frozen=True)
class _StoredPixels:
    """One object's uncompressed grayscale Pixel Data: in memory, or left in its file by
    ``read_series`` (then read frame by frame straight into the volume)."""

    dataset: Dataset
    dtype: np.dtype  # with the stored byte order
    shape: tuple[int, int, int]  # frames, rows, columns
    unused_bits: int  # above Bits Stored

    @classmethod
    def of(cls, ds: Dataset) -> "_StoredPixels | None":
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if (syntax not in _NATIVE or ds.get("PhotometricInterpretation") != "MONOCHROME2"
                or int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("BitsAllocated", 0)) not in (8, 16, 32)
                or "PixelData" not in ds or "ModalityLUTSequence" in ds or "RealWorldValueMappingSequence" in ds):
            return None
        bits = int(ds.BitsAllocated)
        dtype = np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{bits // 8}")
        dtype = dtype.newbyteorder(">" if syntax == pydicom.uid.ExplicitVRBigEndian else "<")
        source = cls(ds, dtype, (_frames(ds), int(ds.Rows), int(ds.Columns)), bits - int(ds.get("BitsStored", bits)))
        if source._length() < math.prod(source.shape) * dtype.itemsize:
            return None  # highdicom says what is wrong with it
        return source

    def _element(self) -> Any:
        return self.dataset.get_item("PixelData", keep_deferred=True)

    def _length(self) -> int:
        """Bytes of Pixel Data there are: in memory, or in the file read_series parsed (0: none usable)."""
        element = self._element()
        if element.value is not None:
            return len(element.value)
        stored: StoredFile | None = getattr(self.dataset, "_stored_file", None)
        if stored is None or not isinstance(self.dataset.filename, str):
            return 0  # deferred by someone else: pydicom and highdicom read it
        return min(int(element.length), stored.size - int(element.value_tell))

    def read_frame(self, number: int, out: np.ndarray) -> None:
        """Frame `number` (1-based) into `out` (native byte order, C-contiguous)."""
        element = self._element()
        offset = (number - 1) * out.nbytes
        if element.value is not None:
            out[...] = np.frombuffer(element.value, dtype=self.dtype, count=out.size, offset=offset).reshape(out.shape)
            return
        with open(self.dataset.filename, "rb", buffering=0) as file:
            if StoredFile.of(os.fstat(file.fileno())) != self.dataset._stored_file:
                raise SeriesChanged(f"instance {self.dataset.SOPInstanceUID} was replaced while its series was read")
            count = os.preadv(file.fileno(), [memoryview(out).cast("B")], element.value_tell + offset)
        if count != out.nbytes:  # the same file, shorter than _length said: it was cut since
            raise SeriesChanged(f"instance {self.dataset.SOPInstanceUID}: its file ends before its pixel data does")
        if self.dtype.byteorder == ">":
            out.byteswap(inplace=True)


def _as_int16(stored: np.ndarray, intercept: int) -> np.ndarray | None:
    """Integer modality values (slope 1, integral intercept: nearly every CT) as int16 when they
    fit: half the memory of float32 and no conversion pass over the volume; None otherwise.
    Unsigned 16-bit values below 32768 are the same bits as int16: reinterpreted, not copied."""
    if stored.dtype.itemsize > 2:
        return None
    low, high = int(stored.min()), int(stored.max())
    limits = np.iinfo(np.int16)
    if low + intercept < limits.min or high + intercept > limits.max:
        return None
    if stored.dtype == np.int16 or (stored.dtype == np.uint16 and high <= limits.max):
        out = stored.view(np.int16)
    else:
        out = stored.astype(np.int16)
    if intercept:
        out += np.int16(intercept)
    return out


_NATIVE = {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian,
           pydicom.uid.DeflatedExplicitVRLittleEndian}


def _rescale(frame: _Frame) -> tuple[float, float]:
    """(slope, intercept) of a frame: its Pixel Value Transformation group, else the instance's."""
    ds = frame.dataset
    if frame.number is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        shared = ds.get("SharedFunctionalGroupsSequence")
        for item in (per_frame[frame.number - 1] if per_frame else None, shared[0] if shared else None):
            if item is not None and "PixelValueTransformationSequence" in item:
                transform = item.PixelValueTransformationSequence[0]
                return float(transform.get("RescaleSlope", 1.0)), float(transform.get("RescaleIntercept", 0.0))
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _image(ds: Dataset) -> hd.Image:
    try:
        return ds if isinstance(ds, hd.Image) else hd.Image.from_dataset(ds, copy=False)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise SeriesError(f"the image cannot be decoded: {exc}") from None


def _projection(ds: Dataset) -> SeriesVolume:
    """A radiograph as a one-slice volume in image-plane mm (rows along +y, columns along +x).

    PixelSpacing (calibrated to the patient) is preferred to ImagerPixelSpacing (at the detector).
    There are no patient coordinates: results refer to the image's pixels, not to patient space.
    """
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    sr, sc = _spacing(spacing)
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, 1.0)
    affine[:3, 1] = (0.0, sr, 0.0)
    affine[:3, 2] = (sc, 0.0, 0.0)
    pixels, reread = _pixels([_Frame(ds, None, np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0]), (sr, sc))])
    return SeriesVolume(pixels, affine, [ds], None, patient_space=False).rereadable(reread)
