"""DICOM Segmentation (highdicom) from a label volume on its source grid."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import highdicom as hd
import numpy as np
import pydicom.config
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from inference.pipeline import SegmentationResult
from inference.spec import Code, Label
from node.encode.options import OutputOptions
from node.encode.uids import ResultUIDs


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def segment_labels(result: SegmentationResult) -> list[Label]:
    """Labels present in the result, in segment-number order (segment n = n-th of these)."""
    present = set(np.unique(result.labels).tolist()) - {0}
    return [label for label in sorted(result.spec.labels, key=lambda l: l.value) if label.value in present]


def algorithm(result: SegmentationResult) -> hd.AlgorithmIdentificationSequence:
    spec = result.spec
    return hd.AlgorithmIdentificationSequence(
        name=spec.name, family=coded(spec.algorithm_family), version=str(spec.version)
    )


@contextmanager
def _values_already_checked() -> Iterator[None]:
    """highdicom re-creates the DS values of every source frame's position and spacing; their
    regex validation costs ~0.5 s for 300 frames. They come from stored files that were read
    once already, so skip the (warn-only) re-validation while building."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = saved


def build_seg(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs) -> hd.seg.Segmentation | None:
    """One Segmentation with a segment per label present; None when nothing was segmented."""
    labels = segment_labels(result)
    if not labels:
        return None
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
    with _values_already_checked():
        return _segmentation(result, options, uids, pixels, descriptions, labelmap)


def _segmentation(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs, pixels: np.ndarray,
                  descriptions: list, labelmap: bool) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=result.volume.datasets,
        pixel_array=pixels,
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
        series_description=options.describe(result.spec.name, "SEG"),
        omit_empty_frames=options.omit_empty_frames,
        # BINARY allows no compression but bit packing; LABELMAP compresses well with JPEG-LS.
        transfer_syntax_uid=JPEGLSLossless if labelmap else ExplicitVRLittleEndian,
    )
