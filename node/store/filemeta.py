"""Part-10 file meta header for a received data set, encoded without pydicom's element machinery.

It runs once per received instance on the DIMSE thread, where pydicom's FileMetaDataset plus
``write_file_meta_info`` cost about 0.8 ms (16% of receive CPU); this writes the same bytes
(explicit VR little endian, PS3.10 7.1) in microseconds. A test checks it against pydicom.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


MAX_UID = 64  # PS3.5 6.2: a UI value is at most 64 characters
MAX_AE = 16


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str | None = None
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for one instance. ValueError for
    a UID over 64 characters (UnicodeEncodeError, a ValueError, for one that is not ASCII): a
    STOW-RS part's file meta can announce anything (found by fuzzing: a 65,535-character UID
    overflowed the element's length and failed the whole request)."""
    if max(len(sop_class_uid), len(sop_instance_uid), len(transfer_syntax)) > MAX_UID or len(source_ae or "") > MAX_AE:
        raise ValueError("a UID longer than 64 characters or an AE title longer than 16")
    body = b"".join(
        [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax)),
            _element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)),
        ]
        + ([_element(0x0016, b"AE", _text(source_ae))] if source_ae else [])
    )
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(body))) + body
