import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless

from node.store.filemeta import encode_file_meta
from tests.fuzz.targets import pydicom_file_meta


@pytest.mark.parametrize("sop, ts, ae", [
    ("1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY"),   # odd-length UID, even AE
    ("1.2.3.4.56", JPEGLSLossless, "CT1"),               # even UID, odd AE (padded)
    ("1.2.840.99", ExplicitVRLittleEndian, None),
])
def test_file_meta_matches_pydicom(sop, ts, ae):
    assert encode_file_meta(CTImageStorage, sop, ts, ae) == pydicom_file_meta(CTImageStorage, sop, ts, ae)
