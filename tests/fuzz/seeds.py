"""Seed corpora for the fuzz targets, from real traffic and real files:

    python -m tests.fuzz.seeds        (writes tests/fuzz/corpus/<target>/seed-*)

- pdu_stream: what dcmtk's echoscu and storescu and a pynetdicom requestor really send (captured
  through a recording relay in front of dcmtk's storescp, which announces 4096-byte PDUs as the
  harness does), and the same sessions with their P-DATA over the harness's limits;
- data_set_check, routing_tags: small phantom CT images in each transfer syntax the node takes
  (explicit and implicit little endian, big endian, deflated, encapsulated) and pydicom's small
  test files from many vendors;
- stow_body, console_upload: request bodies carrying those files; hl7_message: the order and
  result messages of the completion tests; deflate, file_meta: a few of each kind.

The seeds are committed (each under 16 KiB); this is how they were made, and how to make them
again after a change of what the targets take.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE

from tests.fuzz.protocol import pdu, pdv
from tests.fuzz.targets import MESSAGE_LIMIT, PDU_LIMIT, SYNTAXES
from tests.peers import StallingLink, dataset_bytes, free_port, make_study, port_open, wait_for
from tests.processes import stop_process_group

CORPUS = Path(__file__).resolve().parent / "corpus"
SEED_LIMIT = 16 * 1024


def write_seed(target: str, data: bytes) -> None:
    if len(data) > SEED_LIMIT:
        return
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


def capture_sessions(files: list[Path], workdir: Path) -> list[bytes]:
    """Client-side byte streams of real sessions with dcmtk's storescp (4096-byte PDUs)."""
    port = free_port()
    out = workdir / "received"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "-pdu", str(PDU_LIMIT), "-od", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    streams = []
    try:
        wait_for(lambda: port_open(port), timeout=30)
        clients = [  # (tool, options, files): dcmtk takes options, host, port, files
            ("echoscu", [], []),
            ("storescu", ["-xe"], files[:1]),
            ("storescu", ["-xi"], files[:2]),
            ("storescu", ["-xb"], files[1:2]),
        ]
        for tool, options, sent in clients:
            link = StallingLink(port)  # a session is over when its client is: all it sent went through
            subprocess.run([tool, *options, "127.0.0.1", str(link.port), *map(str, sent)], capture_output=True,
                           timeout=60, check=True)
            link.close()
            streams.append(bytes(link.sent))
        streams.append(_pynetdicom_session(port, files[0]))
    finally:
        stop_process_group(scp, 5)
    return streams


def _pynetdicom_session(port: int, file: Path) -> bytes:
    link = StallingLink(port)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", link.port, max_pdu=PDU_LIMIT)
    assert assoc.is_established
    assoc.send_c_echo()
    assoc.send_c_store(pydicom.dcmread(file))
    assoc.release()
    link.close()
    return bytes(link.sent)


def oversized(stream: bytes) -> bytes:
    """The session with its first P-DATA PDU replaced by a well-formed one a byte over the
    harness's limit (one data-set fragment)."""
    pos = 0
    while pos + 6 <= len(stream):
        length = int.from_bytes(stream[pos + 2:pos + 6], "big")
        if stream[pos] == 0x04:
            return stream[:pos] + pdu(0x04, pdv(1, 0x00, b"\0" * (PDU_LIMIT + 1 - 6))) + stream[pos + 6 + length:]
        pos += 6 + length
    return stream


def data_sets(files: list[Path]) -> list[tuple[int, bytes]]:
    """(index in SYNTAXES, data set bytes): the phantom images in each syntax, and pydicom's
    small test files in the syntaxes the harness chooses from."""
    seeds = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        ds = pydicom.dcmread(files[0])
        ds.file_meta.TransferSyntaxUID = syntax
        path = files[0].with_suffix(f".{SYNTAXES.index(syntax)}")
        dcmwrite(path, ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian,
                 force_encoding=True)
        seeds.append((SYNTAXES.index(syntax), dataset_bytes(path)))
    ds = pydicom.dcmread(files[0])
    ds.compress(RLELossless, encoding_plugin="pydicom")
    path = files[0].with_suffix(".rle")
    ds.save_as(path, enforce_file_format=True)
    seeds.append((SYNTAXES.index(SYNTAXES[-1]), dataset_bytes(path)))  # encapsulated: its kind is what counts
    for name in get_testdata_files("*"):
        path = Path(name)
        if path.suffix not in (".dcm", "") or path.stat().st_size > SEED_LIMIT:
            continue
        try:
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            data = dataset_bytes(path)
        except Exception:  # noqa: BLE001 - not a Part 10 file, or one pydicom's test suite damaged on purpose
            continue
        kind = SYNTAXES.index(syntax) if syntax in SYNTAXES else (len(SYNTAXES) - 1 if syntax.is_encapsulated else None)
        if kind is not None:
            seeds.append((kind, data))
    return seeds


def hardening_data_sets() -> list[bytes]:
    """The shapes of the receiver's hardening cases, at seed size (explicit VR little endian):
    sequences nested 400 deep (past the walker's recursion: refused as nested too deeply), a
    thousand private elements, an 8,000-character LO value."""
    uid = struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", 8) + b"1.2.3.4\0"
    nested = b""
    for _ in range(400):
        nested = (struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
                  + nested + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    private = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"ACME" + b"".join(
        struct.pack("<HH2sH", 0x0009, 0x1000 + i, b"SH", 2) + b"x " for i in range(1000))
    long_text = struct.pack("<HH2sH", 0x0008, 0x103E, b"LO", 8000) + b"x" * 8000
    return [uid + nested, uid + private, uid + long_text]


def never_ending_message(rq: bytes) -> bytes:
    """An A-ASSOCIATE-RQ, a C-STORE command, then data-set fragments past the message limit."""
    command = pdu(0x04, pdv(1, 0x03, b"\0" * 64))
    fragments = pdu(0x04, pdv(1, 0x00, b"\0" * 2000)) * ((MESSAGE_LIMIT // 2000) + 2)
    return rq + command + fragments


def multipart(boundary: bytes, parts: list[bytes], headers: bytes) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + part + b"\r\n" for part in parts)
    return body + b"--" + boundary + b"--\r\n"


def hl7_messages() -> list[bytes]:
    msh = "MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123101500||{kind}|{control}|P|2.5.1"
    orm = [msh.format(kind="ORM^O01", control="M1"), "PID|1||PAT1", "ORC|SC|PL1|FI1||CM",
           "OBR|1|PL1|FI1|CT^CT CHEST" + "|" * 14 + "ACC1"]
    oru = [msh.format(kind="ORU^R01", control="M2"), "PID|1||PAT1", "OBR|1|PL1|FI1|CT^CT CHEST" + "|" * 14 + "ACC2"
           + "|" * 7 + "F"]
    omi = [msh.format(kind="OMI^O23", control="M3"), "PID|1||PAT1", "ORC|SC|PL1|FI1||CM", "TQ1|1", "OBR|1|PL1|FI1|CT",
           "IPC|ACC3|RP1|1.2.3|SPS1"]
    adt = [msh.format(kind="ADT^A01", control="M4"), "PID|1||PAT1"]
    return [("\r".join(m) + "\r").encode() for m in (orm, oru, omi, adt)] + [("\n".join(orm) + "\n").encode("latin-1")]


def main() -> None:
    shutil.rmtree(CORPUS, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = make_study(workdir / "study", slices=2, size=8)
        streams = capture_sessions(files, workdir)
        for stream in streams:
            write_seed("pdu_stream", stream)
            write_seed("pdu_stream", oversized(stream))
        rq = streams[-1][:6 + int.from_bytes(streams[-1][2:6], "big")]  # pynetdicom's A-ASSOCIATE-RQ
        write_seed("pdu_stream", never_ending_message(rq))
        write_seed("pdu_stream", rq[:2] + (1 << 31).to_bytes(4, "big") + rq[6:])  # a lying length
        sets = data_sets(files) + [(0, data) for data in hardening_data_sets()]
        for kind, data in sets:
            write_seed("data_set_check", bytes([kind]) + data)
            write_seed("routing_tags", bytes([kind]) + data)
        raw = dataset_bytes(files[0])
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        stream = packer.compress(raw) + packer.flush()
        write_seed("deflate", b"\x00" + stream)
        write_seed("deflate", b"\x00" + stream + b"\x00")
        write_seed("deflate", b"\x00" + zlib.compress(b"\x00" * 65536)[2:-4])  # a small bomb: 64 KiB from a few bytes
        write_seed("deflate", b"\x01\x01" + b"\x00" + raw[:2000])
        for values in ([CTImageStorage, generate_uid(), ExplicitVRLittleEndian, "MODALITY"],
                       [CTImageStorage, "1.2.3.4", ImplicitVRLittleEndian, ""],
                       ["1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", str(RLELossless), "CT1"],
                       [CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "CT1", "CT1", "LUNG", "//127.0.0.1"],
                       [CTImageStorage, "1.2.3.45", ExplicitVRLittleEndian, "", "", "AI_NODE", "//[fd00::a:5]"]):
            write_seed("file_meta", "\x1e".join(values).encode())
        part10 = [f.read_bytes() for f in files]
        content_type = b'multipart/related; type="application/dicom"; boundary=BOUNDARY\n\n'
        write_seed("stow_body", content_type + multipart(b"BOUNDARY", part10, b"Content-Type: application/dicom"))
        write_seed("stow_body", content_type + multipart(b"BOUNDARY", part10[:1] + [b"not dicom"],
                                                         b"Content-Type: application/dicom"))
        write_seed("stow_body", b'multipart/related; type="application/dicom+json"; boundary=B\n\n')
        for i, data in enumerate(part10):
            disposition = f'Content-Disposition: form-data; name="files"; filename="{i}.dcm"'.encode()
            write_seed("console_upload", bytes([0]) + b"FORMBOUNDARY\n\n" + multipart(b"FORMBOUNDARY", [data], disposition))
        fields = b'Content-Disposition: form-data; name="calling_ae"'
        write_seed("console_upload", bytes([1]) + b"F\n\n" + multipart(b"F", [b"MODALITY"], fields))
        for message in hl7_messages():
            write_seed("hl7_message", message)


if __name__ == "__main__":
    main()
