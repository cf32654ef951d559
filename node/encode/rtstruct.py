"""RT Structure Set from a label volume: for PACS and planning systems that cannot show SEG.

One ROI per label present, one CLOSED_PLANAR contour per connected outline and slice, traced
with OpenCV through the centres of the label's boundary pixels (holes are contours of their own;
readers combine a slice's contours by even-odd filling). Filling the contours again gives the
mask back to within one pixel (tests/test_fallbacks.py checks it).
"""

from __future__ import annotations

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from inference.pipeline import SegmentationResult
from node.config import OutputOptions
from node.encode.seg import segment_labels
from node.encode.uids import ResultUIDs

# "Detached Study Management" (retired): the class RT Referenced Study Sequence items conventionally name.
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
PATIENT_AND_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                     "AccessionNumber", "StudyDescription")
OPTIONAL = {"IssuerOfPatientID", "StudyDescription"}


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D mask as (N, 2) arrays of (column, row) pixel centres; a run of
    fewer than 3 points (a one- or two-pixel island) becomes the outline of its pixels' box."""
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for contour in found:
        points = contour.reshape(-1, 2).astype(float)
        if len(points) < 3:
            (c0, r0), (c1, r1) = points.min(axis=0), points.max(axis=0)
            points = np.array([[c0, r0], [c1 + 0.5, r0], [c1 + 0.5, r1 + 0.5], [c0, r1 + 0.5]])
        out.append(points)
    return out


def rasterise(contours: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of (column, row) contours: what a reader draws for one slice."""
    out = np.zeros(shape, dtype=bool)
    for points in contours:
        filled = np.zeros(shape, dtype=np.uint8)
        cv2.fillPoly(filled, [np.round(points).astype(np.int32)], 1)
        out ^= filled.astype(bool)
    return out


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """The result belongs to the source study: same patient and study attributes (type 2 ones
    the source lacks are written empty)."""
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            target[keyword] = source[keyword]
        elif keyword not in OPTIONAL:
            setattr(target, keyword, "")


def _image_reference(result: SegmentationResult, k: int) -> Dataset:
    source, frame = result.volume.source_of(k)
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def build_rtstruct(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs) -> Dataset | None:
    """The label volume's outlines as an RT Structure Set; None when nothing was segmented or the
    source has no patient coordinates (a projection image: contours need a frame of reference)."""
    labels = segment_labels(result)
    volume = result.volume
    if not labels or not volume.patient_space or volume.frame_of_reference_uid is None:
        return None
    first = volume.datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uids.instance("RTSTRUCT")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = uids.instance("RTSTRUCT")
    copy_patient_and_study(first, ds)
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid  # Frame of Reference module (dciodvfy wants it)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.series("RTSTRUCT")
    ds.SeriesNumber = options.rtstruct_series_number
    ds.SeriesDescription = options.describe(result.spec.name, "RTSTRUCT")
    ds.OperatorsName = ""
    ds.Manufacturer = options.manufacturer
    ds.ManufacturerModelName = result.spec.name[:64]
    ds.SoftwareVersions = options.software_version
    ds.DeviceSerialNumber = options.device_serial_number
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AI"
    ds.StructureSetName = f"{result.spec.name} {result.spec.version}"[:64]
    ds.StructureSetDate = ""  # type 2; left empty so that a re-run writes the same object
    ds.StructureSetTime = ""

    every_slice = Sequence([_image_reference(result, k) for k in range(volume.shape[0])])
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = every_slice
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    rois, contours, observations = [], [], []
    for number, label in enumerate(labels, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        roi.ROIName = label.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{result.spec.name} {result.spec.version}"[:64]
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(label.color)
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = _contours(result, label.value)
        contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = label.name[:16]
        observation.RTROIInterpretedType = ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    return ds


def _contours(result: SegmentationResult, value: int) -> Sequence:
    """Contour items of one label, slice by slice, in patient coordinates."""
    volume = result.volume
    items = []
    for k in np.flatnonzero((result.labels == value).any(axis=(1, 2))):
        for points in slice_contours(result.labels[k] == value):
            # (column, row) -> (slice, row, column) -> patient x, y, z
            patient = volume.to_patient(np.column_stack([np.full(len(points), k), points[:, 1], points[:, 0]]))
            item = Dataset()
            item.ContourImageSequence = [_image_reference(result, int(k))]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(patient)
            item.ContourNumber = len(items) + 1
            item.ContourData = [f"{v:.4f}".rstrip("0").rstrip(".") for v in patient.ravel()]
            items.append(item)
    return Sequence(items)
