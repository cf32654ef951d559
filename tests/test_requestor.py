"""The node's requestor associations (node/send/scu.py, node/send/pynetdicom_internals.py): a
reactor pause that holds, and no delayed-ACK stall against a peer with Nagle on."""

from __future__ import annotations

import gc
import inspect
import os
import resource
import socket
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from node.config import DestinationConfig
from node.send.cstore import send_cstore
from node.send.delivery import Permanent, Transient
from node.send.pynetdicom_internals import HonestCheckpoint, RequestorSocket, steady
from node.send.scu import associate, storage_contexts
from tests.peers import StallingLink, free_port, make_ca, make_study, port_open, wait_for
from tests.processes import stop_process_group


class _Reactor(threading.Thread):
    """A stand-in for a requestor Association: its thread runs `turns` (callables) one after
    another; `dimse.get_msg` gives what `messages` holds, then (None, None)."""

    def __init__(self, *turns: Any, messages: tuple[Any, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.turns = turns
        self._is_paused = False
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()
        queued = list(messages)
        self.dimse = SimpleNamespace(get_msg=lambda block=False: queued.pop(0) if queued else (None, None))

    def run(self) -> None:
        for turn in self.turns:
            turn()


def _pause_from_another_thread(checkpoint: HonestCheckpoint, order: list[str]) -> threading.Thread:
    def pause() -> None:
        checkpoint.clear()
        order.append("paused")

    pausing = threading.Thread(target=pause, daemon=True)
    pausing.start()
    return pausing


@pytest.mark.parametrize("took", [False, True], ids=["found-none", "took-one"])
def test_a_pause_waits_while_the_reactor_may_still_take_a_message(took):
    """The race of pydicom/pynetdicom#875, on an association given `steady`: a sender that
    pauses the reactor while it is woken but has not yet looked for a message must not go on
    before it has looked; if it took one (a request from the peer it serves, and may answer),
    not before its next wait."""
    order: list[str] = []
    woken, look, turn_end = threading.Event(), threading.Event(), threading.Event()

    def first_turn() -> None:
        reactor._reactor_checkpoint.wait()  # open: a turn begins
        woken.set()
        look.wait(10)
        order.append("took" if reactor.dimse.get_msg(block=False)[1] is not None else "found none")
        turn_end.wait(10)
        order.append("turn ended")

    def next_turn() -> None:
        reactor._reactor_checkpoint.wait(timeout=10)  # closed: only once the sender resumes it
        order.append("next turn")

    reactor = _Reactor(first_turn, next_turn, messages=((1, "a C-ECHO-RQ from the peer"),) if took else ())
    steady(reactor)
    checkpoint = reactor._reactor_checkpoint
    assert isinstance(checkpoint, HonestCheckpoint)
    reactor.start()
    assert woken.wait(10)
    pausing = _pause_from_another_thread(checkpoint, order)
    pausing.join(0.3)  # a pause that does not wait returns now, before the reactor has looked
    look.set()
    pausing.join(0.3 if took else 10)  # having taken one, the pause waits for the turn's end
    turn_end.set()
    pausing.join(10)
    assert reactor._is_paused, "pynetdicom's send_* spin on _is_paused after the pause"
    checkpoint.set()
    reactor.join(10)
    if took:
        assert order == ["took", "turn ended", "paused", "next turn"]
    else:
        assert order == ["found none", "paused", "turn ended", "next turn"]


def test_steady_refuses_an_association_whose_reactor_is_paused():
    """Its reactor may be parked in the old checkpoint's wait, which the new one's set() would
    never end."""
    reactor = _Reactor()
    reactor._reactor_checkpoint.clear()
    with pytest.raises(RuntimeError, match="paused"):
        steady(reactor)


def test_a_pause_does_not_wait_for_a_reactor_that_has_ended():
    checkpoint = HonestCheckpoint(_Reactor())  # never started: its thread is not alive
    order: list[str] = []
    _pause_from_another_thread(checkpoint, order).join(2)
    assert order == ["paused"] and not checkpoint.is_set()


def test_pynetdicom_requestor_internals_pinned():
    """What node/send/pynetdicom_internals.py relies on in pynetdicom."""
    reactor = inspect.getsource(Association._run_reactor)
    assert ("self._is_paused = True\n            self._reactor_checkpoint.wait()\n            self._is_paused = False\n"
            "\n            # Check with the DIMSE provider to see if a completely decoded\n            #   message is"
            " available\n            context_id, msg = self.dimse.get_msg(block=False)\n            if msg:\n"
            "                self._serve_request(msg, cast(int, context_id))\n") in reactor
    assert reactor.count("get_msg") == 1 and reactor.count("receive_pdu") == 1  # the abort branch's, then it ends
    for sender in (Association.send_c_store, Association.send_c_echo, Association.send_c_find,
                   Association.send_n_create, Association.send_n_set, Association.release):
        source = inspect.getsource(sender)
        assert "self._reactor_checkpoint.clear()\n" in source and "while not self._is_paused:" in source
        resumes = inspect.getsource(Association._wrap_find_responses) if sender is Association.send_c_find else source
        assert "self._reactor_checkpoint.set()" in resumes
    assert "self._reactor_checkpoint.set()" in inspect.getsource(Association.kill)
    # PromptAE: the socket is made after the Association and before the DUL starts
    associate_source = inspect.getsource(AE.associate)
    made = associate_source.index("sock = self._create_socket(assoc, local_address, tls_args)")
    assert associate_source.index("assoc = Association(self, MODE_REQUESTOR)") < made < associate_source.index(
        "assoc.request()")
    assert list(inspect.signature(AE._create_socket).parameters) == ["self", "assoc", "address", "tls_args"]
    assert "self.dul.start()" in inspect.getsource(Association.request)
    assert 'self.socket: "AssociationSocket | None"' in inspect.getsource(DULServiceProvider.__init__)
    # RequestorSocket: every PDU goes out through socket.send, and comes in through socket.recv
    assert "self.socket.send(pdu.encode())" in inspect.getsource(DULServiceProvider._send)
    assert "self.socket.recv(" in inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket: socket.socket | None" in inspect.getsource(AssociationSocket.__init__)


def _delayed_acks() -> int:
    """The kernel's count of delayed ACKs sent (TcpExt DelayedACKs): each one a ~40 ms wait
    of a peer with Nagle on."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:])))["DelayedACKs"]
    raise AssertionError("no TcpExt counters")


@pytest.fixture
def nagle_pacs(tmp_path: Path):
    """dcmtk storescp as a PACS with Nagle on (no TCP_NODELAY=1 in its environment, as Debian's
    dcmtk and Orthanc run by default): yields its port and folder."""
    received = tmp_path / "pacs"
    received.mkdir()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    process = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        wait_for(lambda: port_open(port) or process.poll() is not None, timeout=30)
        assert process.poll() is None, "storescp did not start"
        yield port, received
    finally:
        stop_process_group(process, 10)


def test_delivery_to_a_pacs_with_nagle_on_waits_for_no_delayed_ack(tmp_path, nagle_pacs):
    """Every C-STORE to such a peer waited for one delayed ACK (~40 ms: 40 files, 40 delayed
    ACKs, 1.8 s instead of 0.1 s) before the requestor ACKed at once; all arrive, each once.
    The kernel's count is the network namespace's: another test's Nagle sender running at the
    same time adds some (about 20 a second, measured), so the delivery is measured up to three
    times; the regression adds one per C-STORE every time. (storescp overwrites a file it has.)"""
    port, received = nagle_pacs
    files = make_study(tmp_path / "ct", slices=60, size=16)
    peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": port})
    counts = []
    while len(counts) < 3 and (not counts or counts[-1] >= len(files) // 2):
        before = _delayed_acks()
        delivery = send_cstore("TESTNODE", peer, files, timeout=10)
        counts.append(_delayed_acks() - before)
        assert delivery.warnings == []
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    arrived = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in received.iterdir()]
    assert sorted(arrived) == sorted(sent)
    assert counts[-1] < len(files) // 2, f"{counts} delayed ACKs for {len(files)} C-STOREs"


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_nodes_associations_pause_honestly_wait_promptly_and_leave_no_descriptor(tmp_path, nagle_pacs):
    """Each association the node requests pauses its reactor honestly and has a DUL that waits
    on its connection and bell (node/transport.py) instead of sleeping; the bell goes with the
    DUL's thread: twenty associations later, as many descriptors are open as before."""
    port, received = nagle_pacs
    files = make_study(tmp_path / "ct", slices=2, size=8)
    opened = _open_descriptors()
    for _ in range(20):
        assoc = associate("127.0.0.1", port, "TESTNODE", "PACS", storage_contexts(files))
        try:
            assert assoc.is_established
            assert isinstance(assoc._reactor_checkpoint, HonestCheckpoint)
            assert isinstance(assoc.dul.socket, RequestorSocket) and assoc.dul._run_loop_delay == 0
            assert [assoc.send_c_store(f).Status for f in files] == [0, 0]
        finally:
            assoc.release()
        wait_for(lambda: not assoc.dul.is_alive() and not assoc.is_alive(), timeout=10)
        assert assoc.dul.socket._bell is None
    assert _open_descriptors() <= opened  # (garbage of earlier tests may close some meanwhile)
    assert len(list(received.iterdir())) == 2


def test_an_association_the_peer_refuses_leaves_no_descriptor(tmp_path):
    """No one listening: the request fails and its bell is closed all the same."""
    files = make_study(tmp_path / "ct", slices=1, size=8)
    port = free_port()
    opened = _open_descriptors()
    for _ in range(10):
        assoc = associate("127.0.0.1", port, "TESTNODE", "PACS", storage_contexts(files), timeout=2)
        assert not assoc.is_established
        wait_for(lambda: not assoc.dul.is_alive(), timeout=10)
    assert _open_descriptors() <= opened  # (garbage of earlier tests may close some meanwhile)


def test_delivery_over_tls_to_a_node_that_asks_for_our_certificate(start_node, tmp_path):
    """A requested association over mutual TLS (an SSLSocket under RequestorSocket's quick ACKs
    and the prompt DUL's poll, which cannot see what TLS has already decrypted: it checks
    `pending()` first, and waits 1 ms at most): twenty instances of 180 KB, two PDUs each, to
    the node's own SCP, each stored."""
    pki = make_ca(tmp_path / "pki")
    node = start_node(scp={"tls": {"enabled": True, "certificate": str(pki["server"]),
                                   "private_key": str(pki["server-key"]), "client_ca": str(pki["ca"])}})
    files = make_study(tmp_path / "ct", slices=20, size=300)
    peer = DestinationConfig.model_validate({
        "ae_title": "TESTNODE", "host": "127.0.0.1", "port": node.port,
        "tls": {"enabled": True, "ca": str(pki["ca"]), "certificate": str(pki["client"]),
                "private_key": str(pki["client-key"])}})
    delivery = send_cstore("MODALITY", peer, files, timeout=10)
    assert delivery.warnings == []
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: node.instance_count(uid) == 20, timeout=30)


def test_a_pacs_that_stops_in_the_middle_of_a_response_costs_the_network_timeout_not_the_sender(
        tmp_path, nagle_pacs):
    """pynetdicom leaves a requestor's socket without a timeout: a peer that sent three bytes
    of a C-STORE-RSP and went silent held the DUL's read, and with it the delivery, for ever.
    Now the read times out after the network timeout and the delivery fails as transient."""
    port, _ = nagle_pacs
    files = make_study(tmp_path / "ct", slices=3, size=8)
    link = StallingLink(port)
    peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": link.port})
    outcome: list[BaseException | None] = []

    def deliver() -> None:
        try:
            send_cstore("TESTNODE", peer, files, timeout=2)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    try:
        link.stall_mid_reply(3)  # the A-ASSOCIATE-AC's first three bytes
        sender = threading.Thread(target=deliver, daemon=True)
        sender.start()
        sender.join(60)
        assert not sender.is_alive(), "the delivery still waits on a peer that stopped mid-PDU"
    finally:
        link.close()
    [failure] = outcome
    assert isinstance(failure, Transient), failure


@pytest.fixture
def rejecting_peer():
    """A peer that answers every A-ASSOCIATE-RQ with a permanent A-ASSOCIATE-RJ at once and
    closes (PS3.8 9.3.4: result 1, source 1, reason 3: calling AE title not recognized)."""
    server = socket.create_server(("127.0.0.1", 0))
    rejection = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x01, 0x01, 0x03])

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.recv(65536)  # the A-ASSOCIATE-RQ (small enough for one read here)
                    conn.sendall(rejection)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


class _RequestEndedAsAborted:
    """What pynetdicom returns when a peer's A-ASSOCIATE-RJ and its closing of the connection
    are handled before the requesting thread looks (acse.py: `if not socket._is_connected:
    abort()`): aborted, not rejected. A race no peer can be made to win every time."""

    is_established = False
    is_rejected = False
    is_aborted = True


def test_a_rejection_decides_even_when_pynetdicom_calls_the_request_aborted(tmp_path, monkeypatch):
    import node.send.cstore as cstore
    from node.send.scu import Rejection, _rejections

    ended = _RequestEndedAsAborted()
    _rejections[ended] = Rejection(True, "rejected-permanent, service-user: calling AE title not recognised")  # type: ignore[index]
    monkeypatch.setattr(cstore, "associate", lambda *args, **kwargs: ended)
    peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": 104})
    with pytest.raises(Permanent, match="association rejected by .*calling AE title not recognised"):
        send_cstore("TESTNODE", peer, make_study(tmp_path / "ct", slices=1, size=8), timeout=5)
    _rejections[ended] = Rejection(True, "aborted by the peer (service user)", aborted=True)  # type: ignore[index]
    with pytest.raises(Transient, match="no association"):  # an abort in negotiation: tried again later
        send_cstore("TESTNODE", peer, make_study(tmp_path / "ct2", slices=1, size=8), timeout=5)


def test_a_quick_permanent_rejection_is_permanent(tmp_path, rejecting_peer):
    """A real peer that rejects and closes at once, twenty times: each a permanent refusal
    (before, pynetdicom's race above made some transient, retried for nothing)."""
    files = make_study(tmp_path / "ct", slices=1, size=8)
    peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": rejecting_peer})
    outcomes = []
    for _ in range(20):
        with pytest.raises((Permanent, Transient)) as raised:
            send_cstore("TESTNODE", peer, files, timeout=5)
        outcomes.append(type(raised.value).__name__ + ": " + str(raised.value))
    assert all(o.startswith("Permanent: association rejected by") for o in outcomes), outcomes


def _unix_sockets_open() -> int:
    """This process's AF_UNIX sockets (a bell is a socketpair of them), from /proc/net/unix."""
    unix = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:] if len(line.split()) > 6}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # listdir's own descriptor, closed since
            continue
        count += link.startswith("socket:[") and link[8:-1] in unix
    return count


def test_a_request_that_fails_before_its_dul_starts_leaves_no_descriptor(tmp_path):
    """pynetdicom makes the socket, then checks the contexts: no context, no DUL. Its bell is
    made by the DUL's thread, so none waits for the garbage collector (pynetdicom's own TCP
    socket does, in a reference cycle)."""
    gc.disable()
    try:
        bells = _unix_sockets_open()
        for _ in range(10):
            with pytest.raises(RuntimeError, match="presentation context"):
                associate("127.0.0.1", free_port(), "TESTNODE", "PACS", [])
        assert _unix_sockets_open() <= bells  # a bell made with the socket: 20 more
    finally:
        gc.enable()


def test_associations_work_with_descriptors_numbered_over_1024(tmp_path, nagle_pacs):
    """select() fails on a descriptor numbered 1024 or more, and the node's associations hold
    three each (the connection and the bell's two ends): the wait is poll() throughout."""
    port, received = nagle_pacs
    files = make_study(tmp_path / "ct", slices=3, size=8)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100 - _open_descriptors())]
    try:
        peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": port})
        delivery = send_cstore("TESTNODE", peer, files, timeout=10)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert delivery.warnings == [] and len(list(received.iterdir())) == 3
