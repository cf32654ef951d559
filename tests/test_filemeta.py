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
    sending = ae if called else None  # a C-STORE's file: (0002,0017) as well as (0002,0016)
    assert encode_file_meta(CTImageStorage, sop, ts, ae, sending, called, address) == pydicom_file_meta(
        CTImageStorage, sop, ts, ae, sending, called, address)


def test_the_peer_round_trips_through_its_presentation_address():
    """(0002,0027) Sending Presentation Address is a URI (VR UR): an RFC 3986 network-path
    reference, an IPv6 zone written as RFC 6874 says (ASCII whatever the zone's name); reconcile
    reads the peer back from it exactly as the index recorded it."""
    peers = ("10.1.2.3", "::1", "FD00::A:5", "::ffff:10.1.2.3", "fe80::1%eth0", "fe80::1%\u00e9th0")
    addresses = [presentation_address(p) for p in peers]
    assert addresses == ["//10.1.2.3", "//[::1]", "//[FD00::A:5]", "//[::ffff:10.1.2.3]", "//[fe80::1%25eth0]",
                         "//[fe80::1%25%C3%A9th0]"]
    assert all(a is not None and a.isascii() for a in addresses)
    assert [peer_of(a or "") for a in addresses] == list(peers)
    assert presentation_address("client.example") is None and presentation_address("testclient") is None
    assert peer_of("http://10.1.2.3/") == peer_of("//host") == peer_of("10.1.2.3") == peer_of("") == ""
