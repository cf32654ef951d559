import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless

from node.store.filemeta import encode_file_meta, peer_of, presentation_address
from tests.fuzz.targets import pydicom_file_meta


@pytest.mark.parametrize("sop, ts, ae, called, peer", [
    ("1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY", None, None),   # odd-length UID, even AE
    ("1.2.3.4.56", JPEGLSLossless, "CT1", None, None),               # even UID, odd AE (padded)
    ("1.2.840.99", ExplicitVRLittleEndian, None, None, None),
    ("1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY", "LUNG", "127.0.0.1"),  # odd URI (padded)
    ("1.2.3.4.5", ExplicitVRLittleEndian, "CT1", "AI_NODE", "fd00::a:5"),    # even URI, IPv6
])
def test_file_meta_matches_pydicom(sop, ts, ae, called, peer):
    address = presentation_address(peer) if peer else None
    assert encode_file_meta(CTImageStorage, sop, ts, ae, called, address) == pydicom_file_meta(
        CTImageStorage, sop, ts, ae, called, address)


def test_the_peer_round_trips_through_its_presentation_address():
    """(0002,0027) Sending Presentation Address is a URI (VR UR): an RFC 3986 network-path
    reference; reconcile reads the peer back from it."""
    assert [presentation_address(p) for p in ("10.1.2.3", "::1", "FD00::A:5")] == [
        "//10.1.2.3", "//[::1]", "//[fd00::a:5]"]
    assert presentation_address("client.example") is None and presentation_address("") is None
    assert [peer_of(presentation_address(p) or "") for p in ("10.1.2.3", "::1")] == ["10.1.2.3", "::1"]
    assert peer_of("http://10.1.2.3/") == peer_of("//host") == peer_of("") == ""
