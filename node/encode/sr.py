"""Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom).

Segmentation results: one measurement group per finding (per label, or per connected
component for lesion models) with tracking identifier and UID, finding type, category and
site, volume (mm3), longest in-plane diameter (axial series), the centre of mass as a 3D
point, and a reference to the finding's SEG segment; a label with no finding gets a group
whose qualitative evaluation says it is absent. Classification results: one group with
the predicted class as a qualitative evaluation and each class probability as a measurement.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.findings import Finding
from inference.pipeline import ClassificationResult, SegmentationResult
from inference.spec import Label
from node.encode.options import OutputOptions
from node.encode.seg import coded, segment_labels
from node.encode.uids import ResultUIDs

UNITLESS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
AXIAL_TOLERANCE = 0.05  # |normal . z| within this of 1: the acquisition plane is axial


def _observation_context(result: SegmentationResult | ClassificationResult, options: OutputOptions,
                         uids: ResultUIDs) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device, name="dicom-node", manufacturer_name=options.manufacturer,
        model_name=result.spec.name[:64], serial_number=options.device_serial_number,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device)
    )


def _algorithm(result: SegmentationResult | ClassificationResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=result.spec.name, version=str(result.spec.version),
                                         family=coded(result.spec.algorithm_family))


def _is_axial(result: SegmentationResult) -> bool:
    normal = result.volume.affine[:3, 0] / np.linalg.norm(result.volume.affine[:3, 0])
    return abs(abs(float(normal[2])) - 1.0) <= AXIAL_TOLERANCE


def _finding_group(finding: Finding, result: SegmentationResult, seg: hd.seg.Segmentation, segment_number: int,
                   uids: ResultUIDs) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(result)
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(finding.volume_mm3, 3),
                                      unit=codes.UCUM.CubicMillimeter, algorithm_id=algorithm)]
    if _is_axial(result) and finding.longest_in_plane_diameter_mm > 0:
        measurements.append(hd.sr.Measurement(name=codes.SCT.LongAxis,
                                              value=round(finding.longest_in_plane_diameter_mm, 3),
                                              unit=codes.UCUM.Millimeter, algorithm_id=algorithm))
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(finding.tracking_id),
                                                     identifier=finding.tracking_id),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(str(result.volume.datasets[0].SeriesInstanceUID)),
        ),
        finding_type=coded(finding.label.type),
        finding_category=coded(finding.label.category),
        finding_sites=[hd.sr.FindingSite(anatomic_location=coded(finding.label.region))] if finding.label.region else None,
        algorithm_id=algorithm,
        measurements=measurements,
    )
    # Centre of mass: a 3D point in the group (TID 1500 has no numeric measurement for it).
    group[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
        name=codes.DCM.CenterOfMass, graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([finding.centroid], dtype=float),
        frame_of_reference_uid=result.volume.frame_of_reference_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    ))
    return group


def build_sr(
    result: SegmentationResult | ClassificationResult,
    options: OutputOptions,
    uids: ResultUIDs,
    seg: hd.seg.Segmentation | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The measurement report for a result; `seg` is the SEG its findings reference."""
    if isinstance(result, SegmentationResult):
        groups: list = []
        if seg is not None:
            numbers = {label.value: n for n, label in enumerate(segment_labels(result), start=1)}
            groups = [_finding_group(f, result, seg, numbers[f.label.value], uids) for f in result.findings]
        found = {f.label.value for f in result.findings}
        groups += [_absent_group(label, result, uids) for label in result.spec.labels if label.value not in found]
        evidence: list[Dataset] = list(result.volume.datasets) + ([seg] if seg is not None else [])
    else:
        groups = [_classification_group(result, uids)]
        evidence = list(result.volume.datasets)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result, options, uids),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if str(result.volume.datasets[0].get("Modality", "")) == "CT" else codes.DCM.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    variant = options.variant if isinstance(result, SegmentationResult) else ""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids.series("SR"),
        series_number=options.sr_series_number,
        sop_instance_uid=uids.instance("SR", variant),
        instance_number=1,
        manufacturer=options.manufacturer,
        is_complete=True,
        series_description=options.describe(result.spec.name, "SR"),
    )


def _absent_group(label: Label, result: SegmentationResult, uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Says that the model looked for `label` and found none (a silent report would be ambiguous)."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking(f"absent {label.name}"),
                                                     identifier=f"No {label.name}"[:64]),
        finding_category=coded(label.category),
        algorithm_id=_algorithm(result),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(label.type), value=codes.SCT.Absent)],
    )


def _classification_group(result: ClassificationResult, uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = _algorithm(result)
    predicted = result.predicted
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking("classification"), identifier="Classification"),
        finding_category=coded(predicted.category),
        algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=coded(predicted.category), value=coded(predicted.type))],
        measurements=[
            hd.sr.Measurement(name=coded(label.type), value=round(result.probabilities[label.value], 6),
                              unit=UNITLESS, algorithm_id=algorithm)
            for label in result.spec.labels
        ],
    )


def read_findings(dataset: Dataset) -> list[dict]:
    """Findings of a TID 1500 report written by `build_sr` (for the demo, tests and tools)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=False)
    findings = []
    for group in report.content.get_volumetric_roi_measurement_groups():
        volume = group.get_measurements(name=codes.SCT.Volume)
        axis = group.get_measurements(name=codes.SCT.LongAxis)
        centre = [item.value[0] for item in group[0].ContentSequence if item.name == codes.DCM.CenterOfMass]
        findings.append({
            "tracking_id": group.tracking_identifier,
            "finding_type": group.finding_type.meaning if group.finding_type else None,
            "volume_mm3": float(volume[0].value) if volume else None,
            "long_axis_mm": float(axis[0].value) if axis else None,
            "centroid": [float(v) for v in centre[0]] if centre else None,
            "segment_number": group.referenced_segment.referenced_segment_numbers[0]
            if group.referenced_segment is not None else None,
        })
    return findings
