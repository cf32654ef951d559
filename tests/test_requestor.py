"""The node's requestor associations (node/send/scu.py, node/send/pynetdicom_internals.py): a
reactor pause that holds, and no delayed-ACK stall against a peer with Nagle on."""

from __future__ import annotations

import inspect
import os
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
from node.send.pynetdicom_internals import HonestCheckpoint, RequestorSocket, steady
from node.send.scu import associate, storage_contexts
from tests.peers import free_port, make_ca, make_study, port_open, wait_for
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
    same time adds some (about 20 a second, measured), far from one per C-STORE."""
    port, received = nagle_pacs
    files = make_study(tmp_path / "ct", slices=60, size=16)
    peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": port})
    before = _delayed_acks()
    delivery = send_cstore("TESTNODE", peer, files, timeout=10)
    delayed = _delayed_acks() - before
    assert delivery.warnings == []
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    arrived = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in received.iterdir()]
    assert sorted(arrived) == sorted(sent)
    assert delayed < len(files) // 2, f"{delayed} delayed ACKs for {len(files)} C-STOREs"


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
    assert _open_descriptors() == opened
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
    assert _open_descriptors() == opened


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
