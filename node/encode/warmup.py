"""A throwaway SEG and SR built once when the pipeline loads, off the path of any study.

highdicom reads its tables of the standard (IOD modules and their attributes, JSON) the first
time it builds an object, and pydicom's writer warms up on the first nested sequences: together
~0.5-0.9 s on this machine kind that would otherwise land on the first study after every start.
The source image is synthetic and nothing is stored (both objects are written to memory).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.encode.writing import dataset_bytes


def _source_image() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        setattr(ds, keyword, generate_uid())
    ds.Modality = "CT"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(ds, keyword, "")
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelData = bytes(32)
    return ds


def warm_up() -> tuple[hd.seg.Segmentation, hd.sr.Comprehensive3DSR]:
    """Build a one-frame SEG of a synthetic 4x4 CT image and an SR on it, write both to memory
    (and return them, for their test)."""
    source = _source_image()
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="warm-up", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=np.ones((1, 4, 4), np.uint8), segmentation_type="BINARY",
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dicom-node",
        manufacturer_model_name="warm-up", software_versions="0", device_serial_number="0")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="warm-up"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person, observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="warm^up"))),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg], content=report[0], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dicom-node")
    for obj in (seg, sr):
        dataset_bytes(obj)
    return seg, sr
