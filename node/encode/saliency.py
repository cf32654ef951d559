"""Saliency maps of a classification: DICOM Parametric Maps, or heat-map Secondary Captures.

A series with patient geometry (CT, MR) gets one Parametric Map per class (highdicom
``pm.ParametricMap``) on the source's own grid, frame for frame: float values with a Real World
Value Mapping without unit (UCUM ``1``: how much the class log-odds drop when that
neighbourhood is occluded, inference.saliency), the source's frame of reference and plane
positions. The Parametric Map IOD requires a Frame of Reference and plane geometry, which a
radiograph (DX, CR) does not have (dciodvfy rejects a map without them, and inventing a frame
of reference would claim patient coordinates that do not exist); so a radiograph gets a heat-map
Secondary Capture per class instead: the image in grey, tinted red in proportion to the
saliency, pixel for pixel on the source, which every viewer shows.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.pipeline import ClassificationResult
from inference.spec import Label
from node.config import OutputOptions
from node.encode.concepts import coded
from node.encode.seg import _with_shared_geometry, image_laterality, source_plane_positions
from node.encode.uids import ResultUIDs

KIND = "SALIENCY"
LOG_ODDS_UNIT = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
MAX_TINT = 0.6  # opacity of the red tint at the saliency maximum


def build_saliency_maps(result: ClassificationResult, options: OutputOptions,
                        uids: ResultUIDs) -> list[hd.pm.ParametricMap | hd.sc.SCImage]:
    """One object per label with a saliency map (Parametric Map, or heat-map SC for a radiograph);
    none when no explanation was computed."""
    build = _parametric_map if result.volume.patient_space else heat_map
    return [build(result, label, result.saliency[label.value], options, uids, number)
            for number, label in enumerate(result.spec.labels, start=1) if label.value in result.saliency]


def tint(grey: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """RGB uint8: `grey` (uint8) tinted red with opacity MAX_TINT * saliency / its maximum (none
    where it is not positive). The opacity is recoverable from the picture: R - G = 255 a."""
    peak = float(saliency.max())
    alpha = MAX_TINT * np.clip(saliency / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(saliency)
    g = grey.astype(np.float64) * (1.0 - alpha)
    return np.rint(np.stack([g + 255.0 * alpha, g, g], axis=-1)).astype(np.uint8)


def heat_map(result: ClassificationResult, label: Label, values: np.ndarray, options: OutputOptions,
             uids: ResultUIDs, number: int) -> hd.sc.SCImage:
    """A Secondary Capture of the (single-frame) radiograph with the saliency of `label` tinted in."""
    source = result.volume.datasets[0]
    image = result.volume.array[0].astype(np.float64)
    low, high = np.percentile(image, [1, 99])
    grey = np.clip((image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=tint(grey, values[0]),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",  # a patient image (not a slide): Patient Orientation, no frame of reference
        series_instance_uid=uids.series(KIND),
        series_number=options.saliency_series_number,
        sop_instance_uid=uids.instance(f"SC-{label.value}", options.variant),
        instance_number=number,
        manufacturer=options.manufacturer,
        pixel_spacing=[float(v) for v in spacing] if spacing else None,
        patient_orientation=tuple(source.get("PatientOrientation", ["", ""])) or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = options.describe(result.spec.name, "SALIENCY")
    sc.ImageLaterality = image_laterality(source)
    sc.ImageComments = (f"AI result, not for primary diagnosis. Occlusion saliency of {label.name} "
                        f"(red: where hiding the image lowers its probability most); {result.spec.name} "
                        f"{result.spec.version}")
    sc.ManufacturerModelName = result.spec.name[:64]
    sc.SoftwareVersions = options.software_version
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _parametric_map(result: ClassificationResult, label: Label, values: np.ndarray, options: OutputOptions,
                    uids: ResultUIDs, number: int) -> hd.pm.ParametricMap:
    lo, hi = float(values.min()), float(values.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY",
        lut_explanation=f"Drop in {label.name} log-odds when occluded"[:64],
        unit=LOG_ODDS_UNIT,
        value_range=(lo, hi if hi > lo else lo + 1e-6),
        slope=1.0,
        intercept=0.0,
        quantity_definition=coded(label.type),
    )
    source = result.volume.datasets[0]
    pm = hd.pm.ParametricMap(
        source_images=_with_shared_geometry(result.volume.datasets),
        pixel_array=values.astype(np.float32),
        series_instance_uid=uids.series(KIND),
        series_number=options.saliency_series_number,
        sop_instance_uid=uids.instance(f"{KIND}-{label.value}", options.variant),
        instance_number=number,
        manufacturer=options.manufacturer,
        manufacturer_model_name=result.spec.name,
        software_versions=options.software_version,
        device_serial_number=options.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(hi + max(lo, 0.0)) / 2,
                                                         window_width=max(hi - max(lo, 0.0), 1e-6),
                                                         voi_lut_function="LINEAR_EXACT")],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        plane_positions=source_plane_positions(result.volume),
        content_label="SALIENCY",
        content_description=f"Occlusion saliency, {label.name}"[:64],
        content_creator_name=options.content_creator_name,
        series_description=options.describe(result.spec.name, "SALIENCY"),
    )
    pm.ImageLaterality = image_laterality(source)
    return pm
