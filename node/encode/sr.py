"""Comprehensive 3D SR with a TID 1500 Measurement Report (highdicom).

Segmentation results: one measurement group per finding (per label, or per connected
component for lesion models) with tracking identifier and UID, finding type, category and
site, volume (mm3), longest in-plane diameter (axial series), the centre of mass as a 3D
point, and a reference to the finding's SEG segment; a label with no finding is "Absent" in
the report's Qualitative Evaluations. Detection results: the same groups, each referencing the
finding's own box segment, with its long and short axis and the detector's score (Certainty of
Finding) instead of a volume. Classification results: the predicted class in the
Qualitative Evaluations and one group with each class probability as a measurement. The
algorithm is identified under Imaging Measurements, on every measurement and with the
evaluations (TID 4019). Where each item sits, and why: README, "IHE AI Results conformance".
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from common.orientation import plane_of_normal
from inference.findings import Finding
from inference.pipeline import ClassificationResult, SegmentationResult
from inference.spec import Label
from inference.volume import SeriesVolume
from node.config import OutputOptions
from node.encode.concepts import coded
from node.encode.provenance import contributing_equipment, sr_algorithm
from node.encode.seg import segment_labels
from node.encode.uids import ResultUIDs

QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS",
                                             meaning="Qualitative Evaluations")
PROBABILITY = hd.sr.CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
# TID 1411 row 12's meaning (highdicom writes "Source Series for Segmentation")
SOURCE_SERIES_FOR_SEGMENTATION = hd.sr.CodedConcept(value="121232", scheme_designator="DCM",
                                                    meaning="Source series for segmentation")


def device_observer(result: SegmentationResult | ClassificationResult, options: OutputOptions,
                    uids: ResultUIDs) -> hd.sr.ObserverContext:
    """The node as the observer of its reports (TID 1004): the device, named by the model."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device, name="dicom-node", manufacturer_name=options.manufacturer,
        model_name=result.spec.name[:64], serial_number=options.device_serial_number,
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)


def _observation_context(result: SegmentationResult | ClassificationResult, options: OutputOptions,
                         uids: ResultUIDs) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=device_observer(result, options, uids))


def _algorithm(result: SegmentationResult | ClassificationResult) -> hd.sr.AlgorithmIdentification:
    return sr_algorithm(result.spec)


def _is_axial(result: SegmentationResult) -> bool:
    """The image planes' orientation (their normal, not the slice step: a gantry-tilted stack
    advances along z while its planes are tilted), by the rule routing uses too."""
    return plane_of_normal(result.volume.normal) == "axial"


def _finding_group(finding: Finding, result: SegmentationResult, seg: hd.seg.Segmentation, segment_number: int,
                   uids: ResultUIDs) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = _detection_measurements(finding, result) if finding.probability is not None \
        else _segment_measurements(finding, result)
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
        # TID 4019 sits on each measurement (TID 1419) and once under Imaging Measurements
        # (TID 1500 row 7, see build_sr); the 2022 TID 1411 has no row for it on the group.
        measurements=measurements,
    )
    _use_template_meaning(group[0], SOURCE_SERIES_FOR_SEGMENTATION)
    # Centre of mass (TID 1500 has no numeric measurement for it): a point on the source image
    # nearest to it, then (with patient coordinates) the 3D point. The image point comes first:
    # OHIF places a group by its first SCOORD/SCOORD3D, and only an image reference lets its SR
    # viewport open the slice and draw the finding with its measurements (README, OHIF).
    group[0].ContentSequence.extend(centre_of_mass(finding, result))
    return group


def _segment_measurements(finding: Finding, result: SegmentationResult) -> list[hd.sr.Measurement]:
    """A segmented region: its volume (its area on a projection image), its long axis on an axial series."""
    algorithm = _algorithm(result)
    if result.volume.patient_space:
        measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(finding.volume_mm3, 3),
                                          unit=codes.UCUM.CubicMillimeter, algorithm_id=algorithm)]
    else:  # a projection image (one nominal 1 mm slice): the region's area on the image
        measurements = [hd.sr.Measurement(name=codes.SCT.Area, value=round(finding.volume_mm3, 3),
                                          unit=codes.UCUM.SquareMillimeter, algorithm_id=algorithm)]
    if _is_axial(result) and finding.longest_in_plane_diameter_mm > 0:
        measurements.append(hd.sr.Measurement(name=codes.SCT.LongAxis,
                                              value=round(finding.longest_in_plane_diameter_mm, 3),
                                              unit=codes.UCUM.Millimeter, algorithm_id=algorithm))
    return measurements


def _detection_measurements(finding: Finding, result: SegmentationResult) -> list[hd.sr.Measurement]:
    """A detected finding: the detector's score as Certainty of Finding (DCM 111012, in %, as CAD
    reports give it: a score, not a calibrated probability) and, on an axial series, its long and
    short axis in the image plane (inference.detection). No volume: the group's segment is the
    finding's box, not its outline."""
    algorithm = _algorithm(result)
    assert finding.probability is not None and finding.short_axis_mm is not None
    measurements = [hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=round(100 * finding.probability, 4),
                                      unit=codes.UCUM.Percent, algorithm_id=algorithm)]
    if _is_axial(result):
        measurements = [
            hd.sr.Measurement(name=codes.SCT.LongAxis, value=round(finding.longest_in_plane_diameter_mm, 3),
                              unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.SCT.ShortAxis, value=round(finding.short_axis_mm, 3),
                              unit=codes.UCUM.Millimeter, algorithm_id=algorithm),
            *measurements,
        ]
    return measurements


def centre_of_mass(finding: Finding, result: SegmentationResult) -> list[hd.sr.ContentItem]:
    """The finding's centre of mass: a SCOORD point (column, row) on the source image (frame) of
    the nearest slice, and, for a volume in patient space, a SCOORD3D point in its frame of
    reference (a 2D projection image has no patient coordinates)."""
    volume = result.volume
    points: list[hd.sr.ContentItem] = [_image_point(finding, volume)]
    if volume.patient_space:
        points.append(hd.sr.Scoord3DContentItem(
            name=codes.DCM.CenterOfMass, graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.array([finding.centroid], dtype=float),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ))
    return points


def _image_point(finding: Finding, volume: SeriesVolume) -> hd.sr.ContentItem:
    index = np.linalg.inv(volume.affine) @ np.append(finding.centroid, 1.0)  # (slice, row, column)
    source, frame = volume.source_of(int(round(float(index[0]))))
    # image coordinates: (0, 0) is the top left corner of the top left pixel (PS3.3 C.18.6.1.1)
    item = hd.sr.ScoordContentItem(
        name=codes.DCM.CenterOfMass, graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[index[2] + 0.5, index[1] + 0.5]], dtype=float),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = [hd.sr.SourceImageForRegion.from_source_image(source, [frame] if frame else None)]
    return item


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
            groups = [_finding_group(f, result, seg, numbers[result.segment_of(f)], uids) for f in result.findings]
        found = {f.label.value for f in result.findings}
        evaluations = [_absent(label) for label in result.spec.labels if label.value not in found]
        evidence: list[Dataset] = list(result.volume.datasets) + ([seg] if seg is not None else [])
    else:
        groups = [_classification_group(result, uids)]
        evaluations = class_decisions(result)
        evidence = list(result.volume.datasets)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result, options, uids),
        procedure_reported=_procedure(str(result.volume.datasets[0].get("Modality", ""))),
        # highdicom needs a group; TID 1500 needs Imaging Measurements or Qualitative Evaluations
        imaging_measurements=groups or [_placeholder(uids)],
        title=codes.DCM.ImagingMeasurementReport,
    )
    if not groups:  # keep Imaging Measurements for its algorithm identification, without the placeholder
        container = next(item for item in report[0].ContentSequence if item.name == codes.DCM.ImagingMeasurements)
        del container.ContentSequence
    _identify_algorithm(report, _algorithm(result))
    if evaluations:
        report[0].ContentSequence.append(_qualitative_evaluations(evaluations))
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
        contributing_equipment=contributing_equipment(result.spec, options),
    )


def _identify_algorithm(report: hd.sr.MeasurementReport, algorithm: hd.sr.AlgorithmIdentification) -> None:
    """TID 4019 under Imaging Measurements (TID 1500 row 7): the algorithm behind every group,
    ahead of the groups. highdicom's MeasurementReport has no argument for this row."""
    container = next(item for item in report[0].ContentSequence if item.name == codes.DCM.ImagingMeasurements)
    items = list(container.ContentSequence) if "ContentSequence" in container else []
    container.ContentSequence = hd.sr.ContentSequence([*algorithm, *items])


def _placeholder(uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group that only lets highdicom build a report without measurements; removed after."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking("none"), identifier="none"))


def _qualitative_evaluations(evaluations: list[hd.sr.QualitativeEvaluation]) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 12-13: evaluations of the whole study (a label looked for and not found,
    the predicted class). Kept out of Imaging Measurements: a TID 1501 group beside TID 1411
    groups is judged as TID 1411 by pixelmed (and fails it)."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([item for e in evaluations for item in e])
    return container


def _use_template_meaning(item: Dataset, code: hd.sr.CodedConcept) -> None:
    """Give child items the code meaning their template row uses (highdicom capitalises some)."""
    for child in item.get("ContentSequence", []):
        name = child.ConceptNameCodeSequence[0]
        if (name.CodeValue, name.CodingSchemeDesignator) == (code.value, code.scheme_designator):
            name.CodeMeaning = code.meaning


def _procedure(modality: str) -> Code:
    """Procedure reported (CID 100) for the source modality; a generic imaging procedure otherwise.
    CID 100 has no radiography (XR) procedure: LN "XR unspecified body region" is an error for
    pixelmed, so radiographs get the generic code too (the evidence names the DX/CR images)."""
    by_modality = {"CT": codes.LN.CTUnspecifiedBodyRegion, "MR": codes.LN.MRIUnspecifiedBodyRegion,
                   "PT": codes.LN.PETUnspecifiedBodyRegion, "NM": codes.LN.NMUnspecifiedBodyRegion}
    return by_modality.get(modality, codes.SCT.ImagingProcedure)


def _absent(label: Label) -> hd.sr.QualitativeEvaluation:
    """Says that the model looked for `label` and found none (a silent report would be ambiguous)."""
    return hd.sr.QualitativeEvaluation(name=coded(label.type), value=codes.SCT.Absent)


def class_decisions(result: ClassificationResult) -> list[hd.sr.QualitativeEvaluation]:
    """TID 1500 row 12: one evaluation per class, the finding (label type) Present or Absent as
    the model decided it (ClassificationResult.present: threshold for sigmoid, argmax for softmax)."""
    return [hd.sr.QualitativeEvaluation(name=coded(label.type),
                                        value=codes.SCT.Present if result.present(label) else codes.SCT.Absent)
            for label in result.spec.labels]


def _classification_group(result: ClassificationResult, uids: ResultUIDs) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: each class probability (UCUM {probability}) with the algorithm (TID 4019) and the
    source image(s) it was computed from (TID 300 "Source of Measurement")."""
    algorithm = _algorithm(result)
    predicted = result.predicted
    volume = result.volume
    if volume.source_frames is None:
        sources = [hd.sr.SourceImageForMeasurement.from_source_image(ds) for ds in volume.datasets]
    else:  # one multi-frame object: the frames of this volume
        sources = [hd.sr.SourceImageForMeasurement.from_source_image(volume.datasets[0], sorted(volume.source_frames))]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.tracking("classification"), identifier="Classification"),
        finding_category=coded(predicted.category),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=coded(label.type), value=round(result.probabilities[label.value], 6),
                              unit=PROBABILITY, algorithm_id=algorithm, referenced_images=sources)
            for label in result.spec.labels
        ],
    )


def read_findings(dataset: Dataset) -> list[dict]:
    """Findings of a TID 1500 report written by `build_sr` (for the demo, tests and tools)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(dataset, copy=False)
    findings = []
    for group in report.content.get_volumetric_roi_measurement_groups():
        volume = group.get_measurements(name=codes.SCT.Volume)
        area = group.get_measurements(name=codes.SCT.Area)
        axis = group.get_measurements(name=codes.SCT.LongAxis)
        short = group.get_measurements(name=codes.SCT.ShortAxis)
        certainty = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        points = [item for item in group[0].ContentSequence if item.name == codes.DCM.CenterOfMass]
        # patient coordinates when there are (SCOORD3D), else the image point (projection images)
        centre = [item.value[0] for item in sorted(points, key=lambda item: item.value_type != hd.sr.ValueTypeValues.SCOORD3D)]
        findings.append({
            "tracking_id": group.tracking_identifier,
            "finding_type": group.finding_type.meaning if group.finding_type else None,
            "volume_mm3": float(volume[0].value) if volume else None,
            "area_mm2": float(area[0].value) if area else None,
            "long_axis_mm": float(axis[0].value) if axis else None,
            "short_axis_mm": float(short[0].value) if short else None,
            "probability": float(certainty[0].value) / 100 if certainty else None,  # the detector's score
            "centroid": [float(v) for v in centre[0]] if centre else None,
            "segment_number": group.referenced_segment.referenced_segment_numbers[0]
            if group.referenced_segment is not None else None,
        })
    return findings
