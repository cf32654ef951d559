"""DICOM Segmentation (highdicom) from a label volume on its source grid."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from inference.findings import foreground_box
from inference.pipeline import SegmentationResult
from inference.spec import Label
from inference.volume import SeriesVolume
from node.config import OutputOptions
from node.encode.concepts import coded
from node.encode.provenance import algorithm_source, contributing_equipment
from node.encode.uids import ResultUIDs
from node.highdicom_internals import remember_iod_answers

remember_iod_answers()  # as this module is imported: every SEG this process builds, built the same way


def segment_labels(result: SegmentationResult) -> list[Label]:
    """Labels present in the result, in segment-number order (segment n = n-th of these)."""
    box = foreground_box(result.labels)  # one comparison per label within the box: np.unique sorts,
    crop = result.labels[box] if box is not None else None  # np.bincount widens 8 to 64 bits
    return [label for label in sorted(result.segments, key=lambda l: l.value)
            if crop is not None and bool((crop == label.value).any())]


def algorithm(result: SegmentationResult) -> hd.AlgorithmIdentificationSequence:
    spec = result.spec
    return hd.AlgorithmIdentificationSequence(
        name=spec.name, family=coded(spec.algorithm_family), version=str(spec.version), source=algorithm_source(spec)
    )


def build_seg(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs) -> hd.seg.Segmentation | None:
    """One Segmentation with a segment per label present; None when nothing was segmented."""
    labels = segment_labels(result)
    if not labels:
        return None
    pixels = result.labels
    if [label.value for label in labels] != list(range(1, len(labels) + 1)):  # else already segment numbers
        remap = np.zeros(256, dtype=np.uint8)
        for number, label in enumerate(labels, start=1):
            remap[label.value] = number
        pixels = remap[result.labels]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name,
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm(result),
            tracking_uid=uids.tracking(label.name),
            tracking_id=label.name,
            anatomic_regions=[coded(label.region)] if label.region else None,
            display_color=hd.color.CIELabColor.from_rgb(*label.color),
        )
        for number, label in enumerate(labels, start=1)
    ]
    labelmap = options.segmentation_type == "LABELMAP"
    seg = _segmentation(result, options, uids, pixels, descriptions, labelmap)
    if not result.volume.patient_space:
        _projection_image_attributes(seg, result.volume.datasets[0])
    if result.volume.source_frames is not None:
        _keep_own_frame_references(seg, result)
    seg.ImageLaterality = image_laterality(result.volume.datasets[0])
    return seg


def image_laterality(source: Dataset) -> str:
    """General Image Image Laterality for the SEG: the source's (image, series or frame level),
    or U (unpaired) when the source records none, which a conformant modality does only for an
    unpaired body part. Without it pixelmed asks for the series-level Laterality, which dciodvfy
    forbids for an unpaired body part; Image Laterality satisfies both."""
    frame = next(iter(source.get("SharedFunctionalGroupsSequence", [])), Dataset())
    anatomy = next(iter(frame.get("FrameAnatomySequence", [])), Dataset())
    for value in (source.get("ImageLaterality"), source.get("Laterality"), anatomy.get("FrameLaterality")):
        if value in ("R", "L", "B", "U"):
            return str(value)
    return "U"


def _keep_own_frame_references(seg: hd.seg.Segmentation, result: SegmentationResult) -> None:
    """Each SEG frame references exactly the source frame of its slice.

    highdicom matches SEG frames to source frames by position; when one multi-frame object holds
    several volumes at the same positions (echoes, b-values, time points) it references all of
    them. The volume knows which frame each slice came from: keep only that one."""
    volume = result.volume
    frames = volume.source_frames
    assert frames is not None
    inverse = np.linalg.inv(volume.affine)
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        k = int(round(float((inverse @ np.append(position, 1.0))[0])))
        for derivation in item.get("DerivationImageSequence", []):
            own = [ref for ref in derivation.SourceImageSequence
                   if int(ref.get("ReferencedFrameNumber", 0)) == frames[k]]
            if own:
                derivation.SourceImageSequence = own


def _projection_image_attributes(seg: hd.seg.Segmentation, source: Dataset) -> None:
    """A SEG of a projection image (DX, CR, MG), which has no patient geometry.

    Its frames map to the source pixel for pixel, so it carries the source's Patient Orientation
    (General Image, required without Image Orientation (Patient)). The source has PixelSpacing but
    no SliceThickness; highdicom copies that into a Pixel Measures item that its own reader then
    refuses, so the incomplete item is left out."""
    seg.PatientOrientation = source.get("PatientOrientation", "")
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and "SliceThickness" not in measures[0]:
        del shared.PixelMeasuresSequence


def _with_shared_geometry(datasets: list[Dataset]) -> list[Dataset]:
    """highdicom reads a multi-frame source's orientation and pixel spacing from its shared
    functional groups only; many Enhanced MR objects carry them per frame. The volume was only
    built if every frame has the same values, so give highdicom a shallow copy whose shared
    group holds the first frame's (the stored object is unchanged)."""
    if len(datasets) != 1 or "PerFrameFunctionalGroupsSequence" not in datasets[0]:
        return datasets
    source = datasets[0]
    shared = source.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in source else Dataset()
    first = source.PerFrameFunctionalGroupsSequence[0]
    missing = [name for name in ("PlaneOrientationSequence", "PixelMeasuresSequence")
               if name not in shared and name in first]
    if not missing:
        return datasets
    copy = _shallow_copy(source)  # shares every element but the one replaced below
    copy.file_meta = source.file_meta
    item = _shallow_copy(shared)
    for name in missing:
        item[name] = first[name]
    if "SharedFunctionalGroupsSequence" in copy:
        del copy.SharedFunctionalGroupsSequence  # setting it would change the shared element's value
    copy.SharedFunctionalGroupsSequence = [item]
    return [copy]


def _shallow_copy(dataset: Dataset) -> Dataset:
    """A new Dataset holding the same elements (``Dataset(ds)`` would share ds's element dict)."""
    out = Dataset()
    for element in dataset:
        out.add(element)
    return out


def source_plane_positions(volume: SeriesVolume) -> list[hd.PlanePositionSequence] | None:
    """Plane position of each label slice, taken from the source frame behind that slice.

    A multi-frame source's frames are in file order, which need not be slice order (ascending,
    descending, shuffled): without positions highdicom pairs label slice k with frame k+1.
    Given each slice's own frame position, highdicom matches every SEG frame to the source
    frame at that position (Derivation Image / Referenced Frame Number). Single-frame series
    need none: ``datasets[k]`` already is slice k.
    """
    frames = volume.source_frames
    if frames is None:
        return None
    source = volume.datasets[0]
    return [hd.PlanePositionSequence.from_sequence(source.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence)
            for f in frames]


def _segmentation(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs, pixels: np.ndarray,
                  descriptions: list, labelmap: bool) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=_with_shared_geometry(result.volume.datasets),
        pixel_array=pixels,
        plane_positions=source_plane_positions(result.volume),
        segmentation_type=options.segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=uids.series("SEG"),
        series_number=options.seg_series_number,
        sop_instance_uid=uids.instance("SEG", options.variant),
        instance_number=1,
        manufacturer=options.manufacturer,
        manufacturer_model_name=result.spec.name,
        software_versions=options.software_version,
        device_serial_number=options.device_serial_number,
        content_description=result.spec.description[:64] or None,
        content_creator_name=options.content_creator_name,
        content_label="AI_SEGMENTATION",
        contributing_equipment=contributing_equipment(result.spec, options),
        series_description=options.describe(result.spec.name, "SEG"),
        omit_empty_frames=options.omit_empty_frames,
        # BINARY allows no compression but bit packing; LABELMAP compresses well with JPEG-LS.
        transfer_syntax_uid=JPEGLSLossless if labelmap else ExplicitVRLittleEndian,
    )
