"""Write a volume as a DICOM CT series with correct patient-space geometry.

Used by the phantom generator (training data, demos) and by the tests. Geometry follows
PS3.3 C.7.6.2: the first orientation triplet is the direction of increasing column index,
the second the direction of increasing row index, PixelSpacing is (row spacing, column
spacing), and slice k sits at ``origin + k * slice_spacing * normal``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass
class SeriesGeometry:
    """Where the voxels are: volume index (k, r, c) -> patient coordinates in mm."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # slice, row, column spacing
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of voxel (0, 0, 0)
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # axial

    @property
    def row_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[:3], dtype=float)

    @property
    def col_dir(self) -> np.ndarray:
        return np.asarray(self.orientation[3:], dtype=float)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (k, r, c, 1) to patient (x, y, z, 1)."""
        sk, sr, sc = self.spacing
        out = np.eye(4)
        out[:3, 0] = self.normal * sk
        out[:3, 1] = self.col_dir * sr
        out[:3, 2] = self.row_dir * sc
        out[:3, 3] = self.origin
        return out

    def to_patient(self, index: Sequence[float]) -> np.ndarray:
        return (self.affine() @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


@dataclass
class SeriesIdentity:
    """Patient/study/series attributes; UIDs are generated when not given."""

    patient_id: str = "PHANTOM-001"
    patient_name: str = "Phantom^Synthetic"
    study_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_uid: str = field(default_factory=lambda: str(generate_uid()))
    frame_of_reference_uid: str = field(default_factory=lambda: str(generate_uid()))
    series_number: int = 1
    series_description: str = "Synthetic CT"
    body_part: str = "CHEST"
    accession_number: str = "ACC0001"
    study_date: str = "20260101"


def write_ct_series(
    hu: np.ndarray,
    folder: str | Path,
    geometry: SeriesGeometry | None = None,
    identity: SeriesIdentity | None = None,
    rescale_intercept: float = -1024.0,
    unsigned: bool = True,
) -> list[Path]:
    """Write `hu[k, r, c]` (Hounsfield units) as one CT image file per slice; return the paths.

    Files are explicit VR little endian; compress them with a real codec (dcmtk's
    ``dcmcjpeg``, say) when a test needs another transfer syntax.
    """
    geometry = geometry or SeriesGeometry()
    identity = identity or SeriesIdentity()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.rint(hu - rescale_intercept)
    if unsigned:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    else:
        stored = np.clip(stored, -32768, 32767).astype(np.int16)
    sk, sr, sc = geometry.spacing
    paths = []
    for k in range(hu.shape[0]):
        ds = _ct_slice(identity, geometry, k, stored[k], rescale_intercept, unsigned)
        ds.SliceThickness = f"{sk:g}"
        ds.PixelSpacing = [f"{sr:g}", f"{sc:g}"]
        path = folder / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def image_header(sop_class: str, modality: str, identity: SeriesIdentity) -> Dataset:
    """A new instance's file meta, SOP, patient and study attributes (explicit VR little endian):
    what every phantom image starts from."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = identity.accession_number, "", "1"
    ds.Modality, ds.Manufacturer = modality, "dicom-node phantom"
    ds.PatientName, ds.PatientID = identity.patient_name, identity.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = identity.study_uid, identity.series_uid
    ds.SeriesNumber, ds.InstanceNumber = identity.series_number, 1
    ds.SeriesDescription = identity.series_description
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    return ds


def _ct_slice(
    identity: SeriesIdentity,
    geometry: SeriesGeometry,
    k: int,
    pixels: np.ndarray,
    rescale_intercept: float,
    unsigned: bool,
) -> Dataset:
    ds = image_header(CTImageStorage, "CT", identity)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientBirthDate = "19700101"
    ds.BodyPartExamined = identity.body_part
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    position = geometry.to_patient((k, 0, 0))
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in geometry.orientation]
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{float(np.dot(position, geometry.normal)):.6f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if unsigned else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0 if unsigned else 1
    ds.RescaleIntercept = f"{rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
