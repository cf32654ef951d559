"""Fuzzing in CI (README, "Fuzzing"): every committed seed and finding replayed through its
harness, each coverage-guided target run briefly under atheris, and the stateful protocol
fuzzer against a live node. `python -m benchmarks.fuzz --minutes N` runs them for longer."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from node.receive import hl7 as hl7_listener, pynetdicom_internals
from node.receive.stow import StowRequest, boundary_of, incoming
from node.receive.tags import read_routing_tags
from node.receive.validate import check_dataset
from tests.fuzz import targets
from tests.fuzz.campaign import fuzz
from tests.fuzz.minimise import failure, minimise
from tests.fuzz.protocol import LiveNode, node_for_fuzzing, run
from tests.fuzz.run import INSTRUMENTED
from tests.fuzz.protocol import RELEASE_RQ, associate_rq, c_store_fragments
from tests.fuzz.seeds import CORPUS, hl7_messages, multipart
from tests.fuzz.targets import TARGETS, InvariantBroken
from tests.peers import dataset_bytes, make_study

FINDINGS = Path(__file__).resolve().parent / "fuzz" / "findings"
FUZZ_SECONDS = 5  # per target: eight targets and the protocol fuzzer stay within 90 s together


@pytest.fixture(autouse=True)
def _logging_back_on() -> Iterator[None]:
    """`targets.quiet()` turns logging off for the whole process (a fuzzer's own process wants
    that); the tests that run after these in the same worker assert on log records."""
    yield
    logging.disable(logging.NOTSET)


def test_every_target_has_seeds_and_instrumentation() -> None:
    assert set(INSTRUMENTED) == set(TARGETS)
    for name in TARGETS:
        assert any((CORPUS / name).iterdir()), f"no seeds for {name}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_hold(name: str) -> None:
    targets.quiet()
    for seed in sorted((CORPUS / name).iterdir()):
        TARGETS[name].harness(seed.read_bytes())


@pytest.mark.parametrize("finding", sorted(FINDINGS.glob("*/*")), ids=lambda p: f"{p.parent.name}/{p.name[:14]}")
def test_finding_stays_fixed(finding: Path) -> None:
    """Each input a campaign found (README, "Fuzzing": what it broke and the fix) holds now."""
    targets.quiet()
    TARGETS[finding.parent.name].harness(finding.read_bytes())


def test_what_real_peers_send_is_taken(tmp_path: Path) -> None:
    """The other side of every harness: a parser that refused everything would pass them all."""
    targets.quiet()
    files = make_study(tmp_path / "study", slices=2, size=8)
    data = dataset_bytes(files[0])
    check_dataset(data, ExplicitVRLittleEndian)
    assert read_routing_tags(data, ExplicitVRLittleEndian).sop_instance_uid == pydicom.dcmread(files[0]).SOPInstanceUID
    uid, message = "1.2.826.0.1.3680043.8.498.1", dataset_bytes(files[1])
    stream = associate_rq() + b"".join(c_store_fragments(message, uid, max_pdu=targets.PDU_LIMIT)) + RELEASE_RQ
    assert targets.pdu_stream(stream)[0] == 0x01 and targets.pdu_stream(stream)[-1] == 0x05
    body = multipart(b"B", [f.read_bytes() for f in files], b"Content-Type: application/dicom")
    request = StowRequest(boundary_of('multipart/related; type="application/dicom"; boundary=B'), 1 << 20)
    stored = [incoming(part, "STOWUSER", "127.0.0.1", None, None) for part in request.feed(body)]
    assert [s.sop_instance_uid for s in stored] == [pydicom.dcmread(f).SOPInstanceUID for f in files]
    acks = [targets._HL7._handle(message)[0] for message in hl7_messages()[:3]]
    assert all("MSA|AA|" in ack for ack in acks), acks


def test_harnesses_catch_a_parser_that_breaks_its_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariants can fail: an inflate without its limit, and a PDU reader that reads past
    its limit, are caught."""
    targets.quiet()
    bomb = b"\x00" + zlib.compress(b"\x00" * (2 * targets.INFLATE_LIMIT))[2:-4]
    monkeypatch.setattr(targets, "inflate", lambda raw, limit: zlib.decompress(bytes(raw), -zlib.MAX_WBITS))
    with pytest.raises(InvariantBroken, match="past the limit|over the ceiling"):
        targets.deflate(bomb)
    monkeypatch.setattr(pynetdicom_internals.PduSocket, "_refuse", lambda *args: None)
    oversized = [p for p in (CORPUS / "pdu_stream").iterdir() if b"\x04\x00\x00\x00\x10\x01" in p.read_bytes()]
    assert oversized, "the seeds carry a P-DATA PDU one byte over the harness's limit"
    with pytest.raises(InvariantBroken, match="past its limit"):
        targets.pdu_stream(oversized[0].read_bytes())


def test_a_finding_is_minimised_to_what_breaks_the_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/fuzz/minimise.py on an HL7 message that the delimiter check, taken out, lets through."""
    targets.quiet()
    monkeypatch.setattr(hl7_listener, "_delimiters_valid", lambda message: True)
    found = b"MSH|^AA&|RIS|HOSP|NODE|HOSP|21||OMI^O23|M3|P|2.5.1\rPID|1||PAT1\rORC|SC|PL1|FI1||CM\r"
    smaller = minimise("hl7_message", found)
    assert len(smaller) < len(found) // 2 and failure("hl7_message", smaller) == failure("hl7_message", found)
    with pytest.raises(ValueError, match="does not break"):
        minimise("hl7_message", b"MSH|^~\\&|RIS|HOSP|NODE|HOSP|21||ADT^A01|M3|P|2.5\r")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target(name: str, tmp_path: Path) -> None:
    """A few seconds of coverage-guided fuzzing (a fixed seed: the same inputs every run)."""
    result = fuzz(name, FUZZ_SECONDS, tmp_path, seed=1)
    assert result.clean, f"{name}: {[f.name for f in result.findings]}\n{result.output[-4000:]}"
    assert result.executions > 0 and result.coverage > 0, result.output[-2000:]


def test_protocol_fuzzer_against_a_live_node(tmp_path: Path) -> None:
    node = node_for_fuzzing(tmp_path / "node").start()
    try:
        live = LiveNode(node, make_study(tmp_path / "study", slices=1, size=16)[0])
        run(live, tmp_path, examples=12, steps=12, derandomize=True)
        assert live.steps > 12 and live.acknowledged, "the sequences ran steps and stored instances between them"
    finally:
        node.stop()
