"""Right place in patient space for every input the node accepts (issue 12, items 1-3).

Phantoms are made here: a bright sphere (or disc, for radiographs) at a known centre, in
Enhanced CT multi-frame objects with frames stored ascending, descending, shuffled and as a
sagittal stack, a gantry-tilted (sheared) CT series, an MR multi-echo series and DX images.
The threshold model segments them; each case checks, against the phantom's truth:
- the SEG, read back with highdicom, by the positions of its own frames and through its
  references to the source frames: segment centroid within one voxel of the sphere's centre
  (patient LPS mm), volume within 5%;
- the SR: its centre of mass equals the SEG's centroid, its volume the SEG's volume.
One case runs through the whole running node with dcmtk storescu as the modality.
"""

from __future__ import annotations

import io
import math
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.backends.local import LocalBackend
from inference.pipeline import SegmentationResult, segment, to_model_space
from inference.spec import ModelSpec
from inference.volume import SeriesError, SeriesVolume, load_series, load_volumes, read_series
from node.config import OutputOptions
from node.encode.seg import build_seg
from node.encode.sr import build_sr, read_findings
from node.route.study import study_from_folder
from tests.identity import uids_for
from tests.models import threshold_spec
from tests.peers import NodeProcess, free_port, storescu, wait_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, image_header, write_ct_series

CENTRE = np.array([6.3, -8.1, 12.7])  # off every axis: a mirrored or shifted result is far from it
RADIUS = 12.0
SPHERE_HU, BODY_HU = 500.0, 40.0
SHAPE = (40, 64, 64)  # slices, rows, columns
SPACING = (2.0, 1.5, 1.5)  # slice, row, column (mm)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _backend(repo: Path) -> LocalBackend:
    return LocalBackend(repo / "threshold" / "1" / "model.onnx", threshold_spec())


# -- phantoms ----------------------------------------------------------------------------------


def _affine(orientation: Sequence[float], spacing: Sequence[float] = SPACING, shape: Sequence[int] = SHAPE,
            step: np.ndarray | None = None) -> np.ndarray:
    """(slice, row, column) -> LPS with the grid centred on the origin; `step` shears the stack."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    affine = np.eye(4)
    affine[:3, 0] = np.cross(row_dir, col_dir) * spacing[0] if step is None else step
    affine[:3, 1] = col_dir * spacing[1]
    affine[:3, 2] = row_dir * spacing[2]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def _sphere(affine: np.ndarray, shape: Sequence[int] = SHAPE, hu: float = SPHERE_HU,
            background: float = BODY_HU) -> np.ndarray:
    """The value at every voxel centre: `hu` inside the sphere, `background` outside."""
    k, r, c = np.indices(shape).reshape(3, -1)
    points = np.stack([k, r, c], axis=1) @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(points - CENTRE, axis=1) <= RADIUS
    return np.where(inside, hu, background).reshape(shape).astype(np.float32)


def _enhanced_ct(path: Path, hu: np.ndarray, affine: np.ndarray, order: Sequence[int],
                 identity: SeriesIdentity | None = None, per_frame_geometry: bool = False) -> Path:
    """An Enhanced CT object whose n-th frame is slice `order[n]` of `hu` (file order != slice order)."""
    frames = [(k, np.rint(hu[k] + 1024), {}) for k in order]
    identity = identity or SeriesIdentity(series_description="Enhanced CT")
    return _multiframe(path, ENHANCED_CT, "CT", affine, frames, identity, per_frame_geometry)


def _enhanced_mr(path: Path, by_echo: dict[float, np.ndarray], affine: np.ndarray, order: Sequence[tuple[float, int]],
                 identity: SeriesIdentity | None = None) -> Path:
    """An Enhanced MR object with several echoes at the same positions, frames in `order` (echo, slice)."""
    frames = [(k, by_echo[te], {"MREchoSequence": {"EffectiveEchoTime": te}}) for te, k in order]
    frames = [(k, volume[k], extra) for k, volume, extra in frames]
    identity = identity or SeriesIdentity(series_description="Enhanced MR")
    return _multiframe(path, ENHANCED_MR, "MR", affine, frames, identity)


def _multiframe(path: Path, sop_class: str, modality: str, affine: np.ndarray,
                frames: Sequence[tuple[int, np.ndarray, dict]], identity: SeriesIdentity,
                per_frame_geometry: bool = False) -> Path:
    """A multi-frame image with per-frame functional groups: frame n is slice frames[n][0] of the
    grid `affine` describes, with pixels frames[n][1] and extra per-frame sequences frames[n][2].
    `per_frame_geometry`: orientation and pixel spacing in every frame's group, not the shared one."""
    ds = image_header(sop_class, modality, identity)
    frame_type = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "M", "NONE"]
    ds.ImageType = frame_type
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = identity.frame_of_reference_uid, ""
    ds.AcquisitionDateTime = identity.study_date + "120000"
    ds.ContentQualification, ds.BurnedInAnnotation = "PRODUCT", "NO"
    ds.Rows, ds.Columns = frames[0][1].shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(frames)
    sr, sc = np.linalg.norm(affine[:3, 1]), np.linalg.norm(affine[:3, 2])
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{sr:g}", f"{sc:g}"]
    normal = np.cross(affine[:3, 2], affine[:3, 1]) / (sr * sc)
    measures.SliceThickness = f"{abs(float(np.dot(affine[:3, 0], normal))):g}"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.6f}" for v in np.r_[affine[:3, 2] / sc, affine[:3, 1] / sr]]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orientation]
    frame_type_item = Dataset()
    frame_type_item.FrameType = frame_type
    if modality == "CT":
        transform = Dataset()
        transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "-1024", "1", "HU"
        shared.PixelValueTransformationSequence = [transform]
        shared.CTImageFrameTypeSequence = [frame_type_item]
    else:
        shared.MRImageFrameTypeSequence = [frame_type_item]
    ds.SharedFunctionalGroupsSequence = [shared]
    dimension = Dataset()
    dimension.DimensionOrganizationUID = generate_uid()
    ds.DimensionOrganizationSequence = [dimension]
    index = Dataset()
    index.DimensionOrganizationUID = dimension.DimensionOrganizationUID
    index.DimensionIndexPointer = 0x00200032
    index.FunctionalGroupPointer = 0x00209113
    ds.DimensionIndexSequence = [index]
    items = []
    for k, _, extra in frames:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in affine[:3, :3] @ (k, 0, 0) + affine[:3, 3]]
        item.PlanePositionSequence = [position]
        content = Dataset()
        content.DimensionIndexValues = [int(k) + 1]
        item.FrameContentSequence = [content]
        if per_frame_geometry:
            item.PlaneOrientationSequence = shared.PlaneOrientationSequence
            item.PixelMeasuresSequence = shared.PixelMeasuresSequence
        for sequence, values in extra.items():
            element = Dataset()
            for keyword, value in values.items():
                setattr(element, keyword, value)
            setattr(item, sequence, [element])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = items
    if per_frame_geometry:
        del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    ds.PixelData = np.stack([np.rint(pixels) for _, pixels, _ in frames]).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ct_series(folder: Path, hu: np.ndarray, affine: np.ndarray, identity: SeriesIdentity | None = None,
               modality: str = "CT") -> list[Path]:
    """Single-frame images at the positions the (possibly sheared) affine gives each slice."""
    sc, sr = np.linalg.norm(affine[:3, 2]), np.linalg.norm(affine[:3, 1])
    orientation = tuple(np.r_[affine[:3, 2] / sc, affine[:3, 1] / sr])
    geometry = SeriesGeometry(spacing=(1.0, sr, sc), orientation=orientation)
    files = write_ct_series(hu, folder, geometry, identity or SeriesIdentity(),
                            **({"rescale_intercept": 0.0, "unsigned": False} if modality == "MR" else {}))
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in affine[:3, :3] @ (k, 0, 0) + affine[:3, 3]]
        ds.SliceLocation = f"{float(ds.ImagePositionPatient[2]):.6f}"
        ds.save_as(path, enforce_file_format=True)
    return files


# -- through load -> segment -> SEG/SR, checked against the truth ------------------------------


def _run(datasets: list[Dataset], repo: Path, volume: SeriesVolume | None = None,
         spec: ModelSpec | None = None) -> tuple[SegmentationResult, Dataset, Dataset]:
    volume = volume or load_series(datasets)
    result = segment(volume, spec or threshold_spec(), _backend(repo))
    uids = uids_for("geometry", "threshold")
    seg = build_seg(result, OutputOptions(), uids)
    assert seg is not None, "nothing segmented"
    sr = build_sr(result, OutputOptions(), uids, seg)
    return result, _roundtrip(seg), _roundtrip(sr)


def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _seg_points(seg: Dataset) -> tuple[np.ndarray, float]:
    """Patient coordinates of every segmented pixel from the SEG's own per-frame geometry, and
    the volume of one pixel (spacing x slice thickness)."""
    seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    sr, sc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    points = []
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels):
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        r, c = np.nonzero(frame)
        points.append(ipp + np.outer(c * sc, iop[:3]) + np.outer(r * sr, iop[3:]))
    return np.concatenate(points), sr * sc


def _seg_points_by_reference(seg: Dataset, source: Dataset) -> np.ndarray:
    """Segmented pixels placed at the positions of the source frames the SEG says they belong to."""
    seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    frames = int(source.NumberOfFrames)
    pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, frames + 1)),
                                            combine_segments=True, ignore_spatial_locations=False,
                                            assert_missing_frames_are_empty=True)
    shared = source.SharedFunctionalGroupsSequence[0]
    points = []
    for number in range(1, frames + 1):
        item = source.PerFrameFunctionalGroupsSequence[number - 1]
        group = item if "PlaneOrientationSequence" in item else shared
        iop = np.array([float(v) for v in group.PlaneOrientationSequence[0].ImageOrientationPatient])
        sr, sc = (float(v) for v in group.PixelMeasuresSequence[0].PixelSpacing)
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        r, c = np.nonzero(pixels[number - 1])
        points.append(ipp + np.outer(c * sc, iop[:3]) + np.outer(r * sr, iop[3:]))
    return np.concatenate(points)


def _check(result: SegmentationResult, seg: Dataset, sr: Dataset, truth_centre: np.ndarray,
           truth_volume: float, report: dict | None = None) -> None:
    """SEG centroid within one voxel of the truth, volume within 5%, SR agreeing with the SEG."""
    volume = result.volume
    points, pixel_area = _seg_points(seg)
    centroid = points.mean(axis=0)
    voxel_volume = volume.voxel_volume
    seg_volume = len(points) * voxel_volume
    error_voxels = np.linalg.inv(volume.affine[:3, :3]) @ (centroid - truth_centre)
    assert np.all(np.abs(error_voxels) <= 1.0), (centroid, truth_centre, error_voxels)
    assert abs(seg_volume / truth_volume - 1) <= 0.05, (seg_volume, truth_volume)
    findings = read_findings(sr)
    assert len(findings) == 1, findings
    found = findings[0]
    if volume.patient_space:
        np.testing.assert_allclose(found["centroid"], centroid, atol=1e-3)
    assert found["volume_mm3"] == pytest.approx(seg_volume, rel=1e-6)
    if report is not None:
        report.update(centroid_error_mm=float(np.linalg.norm(centroid - truth_centre)),
                      centroid_error_voxels=np.abs(error_voxels).round(3).tolist(),
                      volume_error=round(seg_volume / truth_volume - 1, 4))
        print(report)


SPHERE_VOLUME = 4.0 / 3.0 * math.pi * RADIUS**3
ENHANCED_CASES = {  # orientation, frame order, orientation and pixel spacing per frame (not shared)
    "ascending": (AXIAL, "ascending", False),
    "descending": (AXIAL, "descending", False),
    "shuffled": (AXIAL, "shuffled", False),
    "sagittal": (SAGITTAL, "ascending", False),
    "shuffled, geometry per frame": (AXIAL, "shuffled", True),
}


def _frame_order(kind: str, affine: np.ndarray) -> list[int]:
    """Slice indices in file order; 'ascending' = increasing patient z (or x for sagittal)."""
    k = np.arange(SHAPE[0])
    coordinate = (affine[:3, 0] @ np.ones(3)) * k  # signed position along the stack
    ascending = list(k[np.argsort(coordinate)])
    if kind == "ascending":
        return ascending
    if kind == "descending":
        return ascending[::-1]
    return list(np.random.default_rng(7).permutation(SHAPE[0]))


@pytest.mark.parametrize("case", sorted(ENHANCED_CASES))
def test_enhanced_ct_frames_in_any_order(case, tmp_path, model_repository):
    orientation, order, per_frame = ENHANCED_CASES[case]
    affine = _affine(orientation)
    path = _enhanced_ct(tmp_path / "enhanced.dcm", _sphere(affine), affine, _frame_order(order, affine),
                        per_frame_geometry=per_frame)
    source = pydicom.dcmread(path)
    result, seg, sr = _run([source], model_repository)
    if per_frame:  # the SEG got shared geometry from a copy; the source is unchanged
        assert "PlaneOrientationSequence" not in source.SharedFunctionalGroupsSequence[0]
    volume = result.volume
    assert volume.source_frames is not None and sorted(volume.source_frames) == list(range(1, SHAPE[0] + 1))
    for k, frame in enumerate(volume.source_frames):  # slice k is where its frame says it is
        ipp = source.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(volume.to_patient([k, 0, 0])[0], [float(v) for v in ipp], atol=1e-4)
    _check(result, seg, sr, CENTRE, SPHERE_VOLUME, {"case": f"enhanced {case}"})
    # the SEG's references: pixels of each source frame, placed at that frame's position
    by_reference = _seg_points_by_reference(seg, source)
    points, _ = _seg_points(seg)
    np.testing.assert_allclose(by_reference.mean(axis=0), points.mean(axis=0), atol=1e-6)
    assert len(by_reference) == len(points)
    for item in seg.PerFrameFunctionalGroupsSequence:
        referenced = item.DerivationImageSequence[0].SourceImageSequence
        assert len(referenced) == 1 and referenced[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = int(referenced[0].ReferencedFrameNumber)
        source_ipp = source.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source_ipp], atol=1e-4)


def _tilted(tilt_degrees: float) -> np.ndarray:
    """Gantry tilt: image planes tilted about the x axis, slice origins advancing along z."""
    t = math.radians(tilt_degrees)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(t), -math.sin(t))
    return _affine(orientation, step=np.array([0.0, 0.0, SPACING[0]]))


@pytest.mark.parametrize("tilt, model_spacing", [(20.0, None), (-12.5, None), (27.0, (1.7, 1.3, 2.1))])
def test_gantry_tilt_series(tilt, model_spacing, tmp_path, model_repository):
    """Resampled to a regular grid for the model (at the model's spacing, if it has one) and
    mapped back onto the tilted source frames."""
    affine = _tilted(tilt)
    files = _ct_series(tmp_path / "tilt", _sphere(affine), affine)
    datasets = read_series(files)[::-1]
    volume = load_series(datasets)
    assert volume.sheared and volume.tilt_degrees == pytest.approx(abs(tilt), abs=1e-3)
    np.testing.assert_allclose(np.abs(volume.affine[:3, 0]), [0, 0, SPACING[0]], atol=1e-5)  # along z
    spec = None
    if model_spacing:
        spec = threshold_spec(preprocessing={"orientation": "RAS", "spacing": list(model_spacing),
                                             "intensity": {"window": [-1000, 1000]}, "patch_size": [32, 32, 32]})
    # the model sees a regular (orthogonal) grid with the sphere undistorted at its place
    image = to_model_space(volume, spec or threshold_spec())
    model_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=float)  # RAS -> LPS
    gram = model_affine[:3, :3].T @ model_affine[:3, :3]
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-6)
    bright = np.argwhere(image[0].numpy() > 0.5 + SPHERE_HU / 4000)  # windowed [-1000, 1000] -> [0, 1]
    model_centre = bright.mean(axis=0) @ model_affine[:3, :3].T + model_affine[:3, 3]
    assert np.linalg.norm(model_centre - CENTRE) <= 0.5 * min(np.sqrt(np.diag(gram))), model_centre
    result, seg, sr = _run(datasets, model_repository, volume, spec)
    _check(result, seg, sr, CENTRE, SPHERE_VOLUME, {"case": f"gantry tilt {tilt}, model spacing {model_spacing}"})


def test_gantry_tilt_enhanced_ct(tmp_path, model_repository):
    affine = _tilted(15.0)
    order = list(np.random.default_rng(3).permutation(SHAPE[0]))
    source = pydicom.dcmread(_enhanced_ct(tmp_path / "tilt.dcm", _sphere(affine), affine, order))
    result, seg, sr = _run([source], model_repository)
    assert result.volume.tilt_degrees == pytest.approx(15.0, abs=1e-3)
    _check(result, seg, sr, CENTRE, SPHERE_VOLUME, {"case": "enhanced gantry tilt 15"})
    by_reference = _seg_points_by_reference(seg, source)
    np.testing.assert_allclose(by_reference.mean(axis=0), _seg_points(seg)[0].mean(axis=0), atol=1e-6)


@pytest.mark.parametrize("tilt, plane", [(20.0, "axial"), (40.0, "oblique")])
def test_routing_and_the_sr_agree_on_a_gantry_tilted_ct(tilt, plane, tmp_path, model_repository):
    """One orientation rule (common.orientation) for both: the image planes (ImageOrientationPatient
    rows [1,0,0], columns [0,cos t,-sin t]) decide, not the slice step (along z for gantry tilt).
    Before, routing called 20 degrees oblique (>10 degrees) while the SR, looking at the step,
    called it axial and reported an in-plane diameter; at 40 degrees the SR still did."""
    affine = _tilted(tilt)
    files = _ct_series(tmp_path / "tilt", _sphere(affine), affine)
    [study] = study_from_folder(tmp_path / "tilt")
    assert [s.orientation for s in study.series] == [plane]
    result, seg, sr = _run(read_series(files), model_repository)
    assert result.volume.sheared
    [finding] = read_findings(sr)
    if plane == "axial":
        assert finding["long_axis_mm"] == pytest.approx(result.findings[0].longest_in_plane_diameter_mm, abs=1e-3)
    else:
        assert finding["long_axis_mm"] is None


def test_refuses_stack_whose_step_varies(tmp_path):
    affine = _tilted(20.0)
    files = _ct_series(tmp_path / "bent", np.zeros((6, 8, 8)), affine)
    datasets = read_series(files)
    moved = [float(v) for v in datasets[3].ImagePositionPatient]
    moved[0] += 1.5  # in plane: the step into and out of slice 3 changes, the spacing along the normal does not
    datasets[3].ImagePositionPatient = moved
    with pytest.raises(SeriesError, match=r"slices are tilted by .*° but not as one regular sheared stack"):
        load_series(datasets)


def test_refuses_tilt_beyond_45_degrees(tmp_path):
    affine = _tilted(50.0)
    files = _ct_series(tmp_path / "steep", np.zeros((6, 8, 8)), affine)
    with pytest.raises(SeriesError, match=r"^gantry tilt 50.0° \(slices sheared by more than 45°\)$"):
        load_series(read_series(files))


def _mr_multi_echo(folder: Path) -> tuple[list[Path], SeriesIdentity]:
    identity = SeriesIdentity(series_description="MR multi-echo")
    affine = _affine(AXIAL)
    files = []
    for echo, (te, bright) in enumerate([(12.0, 900.0), (48.0, 420.0)], start=1):
        hu = _sphere(affine, hu=bright, background=100.0)
        for path in _ct_series(folder / f"echo{echo}", hu, affine, identity, modality="MR"):
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.Modality, ds.ImageType = "MR", ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.EchoTime, ds.EchoNumbers, ds.RepetitionTime = f"{te:g}", echo, "2000"
            ds.InstanceNumber = ds.InstanceNumber + (echo - 1) * SHAPE[0]
            for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
                delattr(ds, keyword)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files, identity


def test_mr_multi_echo_splits_into_one_volume_per_echo(tmp_path, model_repository):
    files, _ = _mr_multi_echo(tmp_path / "mr")
    datasets = read_series(files)
    np.random.default_rng(1).shuffle(datasets)
    with pytest.raises(SeriesError, match=r"the series holds 2 volumes at the same positions, told apart by EchoTime"
                                          r" \(EchoTime 12 ms, EchoTime 48 ms\)"):
        load_series(datasets)
    volumes = load_volumes(datasets)
    assert [v.label for v in volumes] == ["EchoTime 12 ms", "EchoTime 48 ms"]
    for volume, bright in zip(volumes, (900.0, 420.0)):
        assert {float(ds.EchoTime) for ds in volume.datasets} == {float(volume.label.split()[1])}
        assert volume.array.max() == bright
        result, seg, sr = _run(volume.datasets, model_repository, volume)
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == {ds.SOPInstanceUID for ds in volume.datasets}
        _check(result, seg, sr, CENTRE, SPHERE_VOLUME, {"case": f"MR {volume.label}"})


def test_enhanced_mr_multi_echo_splits_by_frame_and_references_its_own_frames(tmp_path, model_repository):
    affine = _affine(AXIAL)
    by_echo = {10.0: _sphere(affine, hu=900.0, background=100.0), 40.0: _sphere(affine, hu=420.0, background=100.0)}
    order = [(te, int(k)) for k in np.random.default_rng(5).permutation(SHAPE[0]) for te in (40.0, 10.0)]
    source = pydicom.dcmread(_enhanced_mr(tmp_path / "mr.dcm", by_echo, affine, order))
    with pytest.raises(SeriesError, match=r"the series holds 2 volumes at the same positions, told apart by EchoTime"):
        load_series([source])
    volumes = load_volumes([source])
    assert [v.label for v in volumes] == ["EchoTime 10 ms", "EchoTime 40 ms"]
    for volume in volumes:
        te = float(volume.label.split()[1])
        assert volume.source_frames is not None and len(volume.source_frames) == SHAPE[0]
        for k, frame in enumerate(volume.source_frames):  # slice k: the frame of this echo at slice k's position
            frame_te, frame_slice = order[frame - 1]
            assert frame_te == te
            expected = affine[:3, :3] @ (frame_slice, 0, 0) + affine[:3, 3]
            np.testing.assert_allclose(volume.to_patient([k, 0, 0])[0], expected, atol=1e-4)
        result, seg, sr = _run([source], model_repository, volume)
        for item in seg.PerFrameFunctionalGroupsSequence:  # each SEG frame: the one frame of its own echo
            referenced = item.DerivationImageSequence[0].SourceImageSequence
            frames = [int(r.ReferencedFrameNumber) for r in referenced]
            assert len(frames) == 1 and order[frames[0] - 1][0] == te, frames
        _check(result, seg, sr, CENTRE, SPHERE_VOLUME, {"case": f"Enhanced MR {volume.label}"})


def test_mr_diffusion_series_splits_by_b_value(tmp_path):
    affine = _affine(AXIAL, shape=(4, 8, 8))
    identity = SeriesIdentity()
    datasets = []
    for b in (0, 500, 1000):
        for path in _ct_series(tmp_path / f"b{b}", np.zeros((4, 8, 8)), affine, identity, modality="MR"):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = generate_uid()
            ds.Modality, ds.DiffusionBValue = "MR", b
            datasets.append(ds)
    expected = r"told apart by DiffusionBValue \(b-value 0 s/mm2, b-value 500 s/mm2, b-value 1000 s/mm2\)"
    with pytest.raises(SeriesError, match=expected):
        load_series(datasets)
    assert [v.label for v in load_volumes(datasets)] == [f"b-value {b} s/mm2" for b in (0, 500, 1000)]


def test_mr_dynamic_series_splits_by_temporal_position(tmp_path):
    affine = _affine(AXIAL, shape=(4, 8, 8))
    identity = SeriesIdentity()
    datasets = []
    for phase in (1, 2, 3):
        for path in _ct_series(tmp_path / f"t{phase}", np.zeros((4, 8, 8)), affine, identity, modality="MR"):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = generate_uid()
            ds.Modality, ds.TemporalPositionIdentifier = "MR", phase
            datasets.append(ds)
    volumes = load_volumes(datasets)
    assert [v.label for v in volumes] == [f"temporal position {p}" for p in (1, 2, 3)]
    assert all(v.array.shape == (4, 8, 8) for v in volumes)


DISC_CENTRE_MM = np.array([41.3, 27.9])  # (x along columns, y along rows) from the top left pixel centre
DISC_RADIUS = 11.0
DX_SPACING = np.array([0.4, 0.5])  # (row, column) mm


def _dx(path: Path, spacing_attribute: str, spacing: Sequence[float] = DX_SPACING) -> Path:
    """A DX image with a bright disc; spacing in `spacing_attribute` only (no patient geometry)."""
    ds = image_header(DX_PRESENTATION, "DX", SeriesIdentity(series_description="Chest PA"))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.BodyPartExamined, ds.ViewPosition = "FOR PRESENTATION", "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = 160, 128
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    setattr(ds, spacing_attribute, [f"{spacing[0]:g}", f"{spacing[1]:g}"])
    r, c = np.indices((ds.Rows, ds.Columns))
    inside = np.hypot(c * spacing[1] - DISC_CENTRE_MM[0], r * spacing[0] - DISC_CENTRE_MM[1]) <= DISC_RADIUS
    ds.PixelData = np.where(inside, 1500, 100).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("attribute", ["PixelSpacing", "ImagerPixelSpacing"])
def test_dx_as_a_one_slice_volume(attribute, tmp_path, model_repository):
    source = pydicom.dcmread(_dx(tmp_path / "dx.dcm", attribute, DX_SPACING))
    volume = load_series([source])
    assert volume.array.shape == (1, 160, 128) and not volume.patient_space and volume.frame_of_reference_uid is None
    result, seg, sr = _run([source], model_repository, volume)
    centre_mm = _check_dx(source, seg, sr, {"case": f"DX {attribute}"})
    np.testing.assert_allclose(result.findings[0].centroid[:2], centre_mm, atol=1e-3)


def test_cr_monochrome1_is_segmented_as_displayed(tmp_path, model_repository):
    """MONOCHROME1 (white = low values, common for CR) reaches the model inverted to MONOCHROME2 sense
    (highdicom's presentation LUT), so the disc that is displayed bright is the one segmented."""
    source = pydicom.dcmread(_dx(tmp_path / "cr.dcm", "ImagerPixelSpacing"))
    source.Modality, source.PhotometricInterpretation = "CR", "MONOCHROME1"
    stored = np.frombuffer(source.PixelData, dtype=np.uint16)
    source.PixelData = (4095 - stored).astype(np.uint16).tobytes()
    result, seg, sr = _run([source], model_repository)
    _check_dx(source, seg, sr, {"case": "CR MONOCHROME1"})


def _check_dx(source: Dataset, seg: Dataset, sr: Dataset, report: dict) -> np.ndarray:
    """The SEG, read back with highdicom by its reference to the DX image: disc centre within one
    pixel, area within 5%; the SR's SCOORD centre (pixel corner origin) and area agree with it."""
    back = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        [source.SOPInstanceUID], combine_segments=True)[0]
    r, c = np.nonzero(back)
    centre_px = np.array([c.mean(), r.mean()])
    centre_mm = centre_px * DX_SPACING[::-1]
    error = np.abs(centre_mm - DISC_CENTRE_MM) / DX_SPACING[::-1]
    area = len(r) * DX_SPACING[0] * DX_SPACING[1]
    truth_area = math.pi * DISC_RADIUS**2
    assert np.all(error <= 1.0), (centre_mm, DISC_CENTRE_MM)
    assert abs(area / truth_area - 1) <= 0.05
    finding = read_findings(sr)[0]
    np.testing.assert_allclose(finding["centroid"], centre_px + 0.5, atol=1e-3)
    assert finding["area_mm2"] == pytest.approx(area, rel=1e-6) and finding["volume_mm3"] is None
    report.update(centroid_error_pixels=error.round(3).tolist(), area_error=round(area / truth_area - 1, 4))
    print(report)
    return centre_mm


def test_refuses_dx_without_pixel_spacing(tmp_path):
    ds = pydicom.dcmread(_dx(tmp_path / "dx.dcm", "PixelSpacing"))
    del ds.PixelSpacing
    with pytest.raises(SeriesError, match="^DX image has neither PixelSpacing nor ImagerPixelSpacing: no size in mm$"):
        load_series([ds])


def test_several_dx_images_are_several_volumes(tmp_path):
    first = pydicom.dcmread(_dx(tmp_path / "pa.dcm", "PixelSpacing"))
    second = pydicom.dcmread(_dx(tmp_path / "lat.dcm", "ImagerPixelSpacing"))
    second.InstanceNumber = 2
    with pytest.raises(SeriesError, match="the series holds 2 projection images"):
        load_series([second, first])
    assert [v.datasets[0].InstanceNumber for v in load_volumes([second, first])] == [1, 2]


# -- through the whole running node ------------------------------------------------------------


def _by_study(datasets: list[Dataset]) -> dict[str, dict[str, Dataset]]:
    """Results by study UID and modality."""
    out: dict[str, dict[str, Dataset]] = {}
    for ds in datasets:
        out.setdefault(str(ds.StudyInstanceUID), {})[str(ds.Modality)] = ds
    return out


class _StoreSCP:
    """dcmtk storescp as the PACS that receives the results (accepts any storage SOP class)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", "RESULTS", "-od", str(folder), "-fe", ".dcm", "-pm", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})

    def datasets(self) -> list[Dataset]:
        """Every file storescp has written that reads (one still being written may not)."""
        out = []
        for path in self.folder.glob("*.dcm"):
            try:
                out.append(pydicom.dcmread(path))
            except Exception:  # still being written
                continue
        return out

    def received(self, node: NodeProcess, complete: Callable[[list[Dataset]], bool],
                 timeout: float = 240) -> list[Dataset]:
        """The results once `complete` holds of them and the node has recorded every delivery as
        answered: storescp writes each file in place and answers after closing it, so a file read
        before the answer may be partial (pydicom reads a short Pixel Data without an error)."""
        wait_for(lambda: complete(self.datasets()) and not node.query("SELECT id FROM outbox WHERE state<>'delivered'"),
                 timeout=timeout, interval=0.5)
        return self.datasets()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_enhanced_ct_tilted_ct_and_dx_through_the_running_node(start_node, model_repository, tmp_path):
    """storescu (the modality) sends an Enhanced CT (frames ascending), a gantry-tilted CT series and
    a DX image -> node -> threshold model -> SEG + SR -> dcmtk storescp: each at the truth."""
    pacs = _StoreSCP(tmp_path / "pacs")
    affine = _affine(AXIAL)
    enhanced = _enhanced_ct(tmp_path / "enhanced.dcm", _sphere(affine), affine, _frame_order("ascending", affine),
                            SeriesIdentity(patient_id="P1", series_description="Enhanced CT"))
    tilted_affine = _tilted(20.0)
    tilted = _ct_series(tmp_path / "tilted", _sphere(tilted_affine), tilted_affine, SeriesIdentity(patient_id="P2"))
    dx = _dx(tmp_path / "dx.dcm", "ImagerPixelSpacing")
    studies = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
               for name, files in (("enhanced", [enhanced]), ("tilted", tilted), ("dx", [dx]))}
    try:
        node = start_node(
            routing={"rules": [{
                "name": "threshold", "match": {"tag": "Modality", "in": ["CT", "DX"]},
                "actions": {"run": ["threshold"], "send_to": ["results"]}}]},
            completion={"quiet_period_s": 1.0},
            destinations={"results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": pacs.port}},
            sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
            inference={"model_repository": str(model_repository)},
        )
        wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aec", "TESTNODE", "127.0.0.1", str(node.port)],
                                        capture_output=True, timeout=30).returncode == 0, timeout=60, interval=0.5)
        for files in ([enhanced], tilted, [dx]):
            sent = storescu(node.port, files)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        found = _by_study(pacs.received(node, lambda ds: all({"SEG", "SR"} <= set(_by_study(ds).get(uid, {}))
                                                             for uid in studies.values())))
    finally:
        pacs.stop()
    results = {name: found[uid] for name, uid in studies.items()}
    source = pydicom.dcmread(enhanced)
    volume = load_series([source])
    result = SegmentationResult(threshold_spec(), volume, np.zeros(volume.array.shape, np.uint8), [])
    _check(result, results["enhanced"]["SEG"], results["enhanced"]["SR"], CENTRE, SPHERE_VOLUME,
           {"case": "enhanced ascending, through the node"})
    by_reference = _seg_points_by_reference(results["enhanced"]["SEG"], source)
    np.testing.assert_allclose(by_reference.mean(axis=0), CENTRE, atol=max(SPACING))
    volume = load_series(read_series(tilted))
    result = SegmentationResult(threshold_spec(), volume, np.zeros(volume.array.shape, np.uint8), [])
    _check(result, results["tilted"]["SEG"], results["tilted"]["SR"], CENTRE, SPHERE_VOLUME,
           {"case": "gantry tilt 20, through the node"})
    _check_dx(pydicom.dcmread(dx), results["dx"]["SEG"], results["dx"]["SR"], {"case": "DX, through the node"})


def test_mr_multi_echo_through_the_running_node_gives_one_result_set_per_echo(start_node, model_repository,
                                                                               tmp_path):
    """A two-echo MR series routed to a model: the job runs it once per echo; each echo's SEG
    references only that echo's images, and every result has its own UIDs."""
    files, _ = _mr_multi_echo(tmp_path / "mr")
    pacs = _StoreSCP(tmp_path / "pacs")
    try:
        node = start_node(
            routing={"rules": [{"name": "mr", "match": {"tag": "Modality", "equals": "MR"},
                                "actions": {"run": ["threshold"], "send_to": ["results"]}}]},
            completion={"quiet_period_s": 1.0},
            destinations={"results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": pacs.port}},
            sending={"retry_initial_s": 0.5, "sweep_s": 0.5},
            inference={"model_repository": str(model_repository)},
        )
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr

        found = pacs.received(node, lambda ds: len(ds) == 4)
    finally:
        pacs.stop()
    segs = [ds for ds in found if ds.Modality == "SEG"]
    assert len(segs) == 2 and sum(ds.Modality == "SR" for ds in found) == 2
    assert len({ds.SOPInstanceUID for ds in found}) == 4 and len({ds.SeriesInstanceUID for ds in found}) == 4
    echo_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
               float(pydicom.dcmread(f, stop_before_pixels=True).EchoTime) for f in files}
    echoes = []
    for seg in segs:
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert len(referenced) == SHAPE[0] and len({echo_of[uid] for uid in referenced}) == 1
        echoes.append(echo_of[next(iter(referenced))])
        points, _ = _seg_points(seg)
        np.testing.assert_allclose(points.mean(axis=0), CENTRE, atol=max(SPACING))
    assert sorted(echoes) == [12.0, 48.0]
