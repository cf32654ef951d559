"""The stateful protocol fuzzer: a hypothesis state machine against a live `dicom-node serve`.

Each example opens raw TCP connections to the node and drives them through random sequences:
A-ASSOCIATE-RQ PDUs mutated from a valid one, P-DATA with random or real C-STORE fragments (cut,
reordered, over their presentation context, with lying lengths), A-RELEASE and A-ABORT at any
moment, raw bytes and an HTTP request on the DICOM port, closes and resets, while good C-STOREs
go on over pynetdicom on other associations. The invariants (README, "Fuzzing"):
- after every step the node answers a C-ECHO on a new association within 2 s;
- everything the node sends on a raw connection is a sequence of whole PDUs of the types an
  acceptor sends (A-ASSOCIATE-AC/RJ, P-DATA-TF, A-RELEASE-RP, A-ABORT);
- at the end of each example every instance acknowledged on a good association is indexed and
  stored byte for byte as sent;
- no receiver process has died, and none uses more than RECEIVER_RSS_LIMIT of memory.
"""

from __future__ import annotations

import io
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from tests.peers import NodeProcess, dataset_bytes

ECHO_TIMEOUT_S = 2.0
RECEIVER_RSS_LIMIT = 1 << 30
CALLED = "TESTNODE"
ACCEPTOR_PDU_TYPES = {0x02, 0x03, 0x04, 0x06, 0x07}
STORE_CONTEXT, ECHO_CONTEXT = 1, 3
# Raw connections open at once, well under scp.max_associations (16): the echo and the good
# stores must find a slot (a refusal for too many connections is the node keeping its limit).
MAX_LINKS = 6


def associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ (CT Image Storage in explicit and implicit VR little endian as
    context 1, Verification as 3), as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZER"
    primitive.called_ae_title = CALLED
    store = build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    store.context_id = STORE_CONTEXT
    echo = build_context(Verification)
    echo.context_id = ECHO_CONTEXT
    primitive.presentation_context_definition_list = [store, echo]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.1"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def c_store_fragments(data_set: bytes, sop_instance_uid: str, max_pdu: int = 16384) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE request carrying `data_set` (explicit VR little endian),
    as pynetdicom cuts them."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    fragments = []
    for primitive in message.encode_msg(STORE_CONTEXT, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        fragments.append(bytes(pdu.encode()))
    return fragments


def pdu(pdu_type: int, body: bytes, announced: int | None = None) -> bytes:
    """A PDU (PS3.8 9.3: type, reserved, 4-byte big-endian length, body), written by hand so that
    its length can lie."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if announced is None else announced) + body


def pdv(context_id: int, control: int, data: bytes, announced: int | None = None) -> bytes:
    """A presentation data value item (PS3.8 9.3.5.1: length, context ID, message control header)."""
    return struct.pack(">LBB", len(data) + 2 if announced is None else announced, context_id, control) + data


RELEASE_RQ = pdu(0x05, b"\x00" * 4)
RELEASE_RP = pdu(0x06, b"\x00" * 4)
ABORT = pdu(0x07, b"\x00\x00\x00\x00")
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1400000000\r\n\r\n"


@dataclass
class Link:
    """A raw connection to the node and what it sent back."""

    sock: socket.socket
    answers: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:  # the node ended it: its right
            self.closed = True
        self.drain(0.05)

    def drain(self, wait: float) -> None:
        """Take what the node sent, waiting at most `wait` seconds for the first bytes."""
        if self.closed:
            return
        self.sock.settimeout(wait)
        try:
            while chunk := self.sock.recv(65536):
                self.answers += chunk
                self.sock.settimeout(0.01)
            self.closed = True  # end of stream
        except (TimeoutError, BlockingIOError):
            pass
        except OSError:
            self.closed = True

    def close(self, reset: bool) -> None:
        if reset:  # RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.closed = True


def answered_pdus(answers: bytes) -> list[int]:
    """The PDU types in what the node sent; an AssertionError when it is not whole PDUs of the
    types an acceptor sends (a connection the node cut may end inside one: never half a header)."""
    types, pos = [], 0
    while pos < len(answers):
        assert pos + 6 <= len(answers), f"half a PDU header at offset {pos} of the node's answer"
        pdu_type, length = answers[pos], int.from_bytes(answers[pos + 2:pos + 6], "big")
        assert pdu_type in ACCEPTOR_PDU_TYPES, f"the node sent PDU type 0x{pdu_type:02X}"
        types.append(pdu_type)
        pos += 6 + length
    return types


class LiveNode:
    """The node under test and what the machine learned of it: its receivers, and the instances
    it acknowledged (SOP Instance UID to the data set bytes sent)."""

    def __init__(self, node: NodeProcess, instance: Path):
        self.node = node
        self.instance = pydicom.dcmread(instance)
        self.acknowledged: dict[str, bytes] = {}
        self.steps = 0  # steps checked (an echo after each)
        self.rq = associate_rq()

    def new_instance(self, path: Path) -> tuple[str, bytes]:
        """A new instance (a new SOP Instance UID) written to `path`: its UID and data set bytes."""
        ds = self.instance.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
        return ds.SOPInstanceUID, dataset_bytes(path)

    def echo(self) -> int | None:
        ae = AE(ae_title="FUZZ-ECHO")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_S
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.node.port, ae_title=CALLED)
        if not assoc.is_established:
            return None
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status) if status else None

    def store(self, path: Path) -> None:
        """A good C-STORE of a new instance over pynetdicom (which sends a file's data set as its
        bytes); remembered when acknowledged."""
        uid, data = self.new_instance(path)
        ae = AE(ae_title="FUZZ-GOOD")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", self.node.port, ae_title=CALLED)
        if not assoc.is_established:
            return
        status = assoc.send_c_store(path)
        assoc.release()
        if status and int(status.Status) == 0:
            self.acknowledged[uid] = data

    def check_stored(self) -> None:
        for uid, data in self.acknowledged.items():
            rows = self.node.query("SELECT path FROM instances WHERE sop_instance_uid=?", (uid,))
            assert rows, f"acknowledged instance {uid} is not indexed"
            stored = dataset_bytes(self.node.data_dir / rows[0]["path"])
            assert stored == data, f"acknowledged instance {uid} is not stored as sent"

    def check_receivers(self) -> None:
        """No receiver died, and none has held more than RECEIVER_RSS_LIMIT at its peak."""
        exited = self.node.events("receiver_exited")
        assert not exited, f"a receiver died: {exited[-1]}"
        for pid in {e["pid"] for e in self.node.events("receiver_started")}:
            peak = _peak_rss(pid)
            assert peak is not None, f"receiver {pid} is gone without a logged reason"
            assert peak <= RECEIVER_RSS_LIMIT, f"receiver {pid} held {peak >> 20} MiB at its peak"


def _peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    return None


def control_headers() -> st.SearchStrategy[int]:
    return st.sampled_from([0x00, 0x01, 0x02, 0x03]) | st.integers(0, 255)


def machine(live: LiveNode, workdir: Path) -> type[RuleBasedStateMachine]:
    """The state machine class for `live` (hypothesis runs a class; the node is shared by all
    its examples)."""

    class ProtocolMachine(RuleBasedStateMachine):
        links = Bundle("links")

        def __init__(self) -> None:
            super().__init__()
            self.open: list[Link] = []

        @precondition(lambda self: sum(not link.closed for link in self.open) < MAX_LINKS)
        @rule(target=links)
        def connect(self) -> Link:
            link = Link(socket.create_connection(("127.0.0.1", live.node.port), timeout=2))
            self.open.append(link)
            return link

        @rule(link=links, flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
              cut=st.none() | st.integers(0, 400), tail=st.binary(max_size=64))
        def associate(self, link: Link, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> None:
            rq = bytearray(live.rq)
            for offset, value in flips:
                rq[offset % len(rq)] = value
            link.send(bytes(rq[:cut] if cut is not None else rq) + tail)

        @rule(link=links, context=st.sampled_from([STORE_CONTEXT, ECHO_CONTEXT, 0, 255]), control=control_headers(),
              data=st.binary(max_size=512), lie=st.none() | st.integers(0, 2**32 - 1),
              pdu_lie=st.none() | st.integers(0, 2**32 - 1))
        def p_data(self, link: Link, context: int, control: int, data: bytes, lie: int | None,
                   pdu_lie: int | None) -> None:
            body = pdv(context, control, data, lie)
            link.send(pdu(0x04, body, pdu_lie))

        @rule(link=links, order=st.permutations(range(4)), keep=st.integers(1, 4),
              ending=st.sampled_from(["as is", "release", "cut"]))
        def store_fragments(self, link: Link, order: list[int], keep: int, ending: str) -> None:
            """A real C-STORE's PDUs on a raw connection: reordered, some left out, or whole."""
            uid, data = live.new_instance(workdir / "raw.dcm")
            fragments = c_store_fragments(data[:3000], uid, max_pdu=1024)
            chosen = [fragments[i] for i in order if i < len(fragments)][:keep]
            if ending == "release":
                chosen.append(RELEASE_RQ)
            elif ending == "cut" and chosen:  # the last one cut short
                chosen[-1] = chosen[-1][:len(chosen[-1]) // 2]
            for fragment in chosen:
                link.send(fragment)

        @rule(link=links, what=st.sampled_from([RELEASE_RQ, RELEASE_RP, ABORT, HTTP_REQUEST, pdu(0x01, b""),
                                                pdu(0x02, b"\x00" * 8), pdu(0x09, b"x"), pdu(0x04, b"", 2**31)]))
        def control(self, link: Link, what: bytes) -> None:
            link.send(what)

        @rule(link=links, data=st.binary(min_size=1, max_size=2048))
        def raw(self, link: Link, data: bytes) -> None:
            link.send(data)

        @rule(link=consumes(links), reset=st.booleans())
        def close(self, link: Link, reset: bool) -> None:
            link.drain(0.05)
            answered_pdus(bytes(link.answers))
            link.close(reset)

        @rule()
        def good_store(self) -> None:
            live.store(workdir / "good.dcm")

        @invariant()
        def answers_echo(self) -> None:
            live.steps += 1
            status = live.echo()
            assert status == 0, f"C-ECHO not answered with success within {ECHO_TIMEOUT_S} s (status {status})"

        def teardown(self) -> None:
            try:
                for link in self.open:
                    if not link.closed:
                        link.drain(0.05)
                    answered_pdus(bytes(link.answers))
            finally:
                for link in self.open:
                    link.close(reset=False)
            live.check_stored()
            live.check_receivers()

    return ProtocolMachine


def node_for_fuzzing(workdir: Path) -> NodeProcess:
    """A node with short timeouts, so that the connections an example leaves half-open end soon."""
    return NodeProcess(workdir, scp={"max_instance_mb": 1, "timeouts": {"network": 5, "acse": 5, "dimse": 10, "pdu": 10}})



def run(live: LiveNode, workdir: Path, examples: int, steps: int, derandomize: bool = False) -> None:
    """Run `examples` sequences of up to `steps` steps (hypothesis shrinks a failing one and
    raises it). `derandomize`: the same sequences every time (CI), else new ones (a campaign)."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    chosen = settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                      derandomize=derandomize, suppress_health_check=list(HealthCheck))
    run_state_machine_as_test(machine(live, workdir), settings=chosen)
