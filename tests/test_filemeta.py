from io import BytesIO

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from node.store.filemeta import encode_file_meta


@pytest.mark.parametrize("sop, ts, ae", [
    ("1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY"),   # odd-length UID, even AE
    ("1.2.3.4.56", JPEGLSLossless, "CT1"),               # even UID, odd AE (padded)
    ("1.2.840.99", ExplicitVRLittleEndian, None),
])
def test_file_meta_matches_pydicom(sop, ts, ae):
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if ae:
        meta.SourceApplicationEntityTitle = ae
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    assert encode_file_meta(CTImageStorage, sop, ts, ae) == expected.getvalue()
