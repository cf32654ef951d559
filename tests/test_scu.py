"""The tests' own SCU tooling (tests/scu.py): the reactor pause it makes honest."""

from __future__ import annotations

import threading

from pynetdicom.association import Association

from tests.scu import HonestCheckpoint


def test_a_pause_asked_during_a_reactor_turn_is_answered_only_once_the_turn_has_ended():
    """The race of pydicom/pynetdicom#875: a sender that clears the checkpoint while the reactor
    is inside a turn must not go on until that turn has ended (the reactor back at its wait, now
    closed). Held mid-turn here; a plain threading.Event lets `clear` return first."""
    checkpoint = HonestCheckpoint()
    order: list[str] = []
    mid_turn, end_turn = threading.Event(), threading.Event()

    def reactor() -> None:
        checkpoint.wait()  # open: a turn begins
        mid_turn.set()
        end_turn.wait(10)
        order.append("turn ended")
        checkpoint.wait(timeout=10)  # closed: the next turn only once the sender resumes it
        order.append("next turn")

    def sender() -> None:
        checkpoint.clear()
        order.append("paused")

    turning = threading.Thread(target=reactor)
    turning.start()
    assert mid_turn.wait(10)
    pausing = threading.Thread(target=sender)
    pausing.start()
    pausing.join(0.5)  # a broken pause returns now, before the turn ends
    end_turn.set()
    pausing.join(10)
    checkpoint.set()
    turning.join(10)
    assert order == ["turn ended", "paused", "next turn"]


def test_pynetdicom_pauses_its_reactor_as_the_honest_checkpoint_expects():
    """What tests/scu.py relies on in pynetdicom: the reactor waits on `_reactor_checkpoint` once
    a turn (looked up each time) with `_is_paused` set before the wait, and the send_* methods
    clear it, spin on `_is_paused` and set it again."""
    import inspect

    reactor = inspect.getsource(Association._run_reactor)
    assert "self._is_paused = True\n            self._reactor_checkpoint.wait()\n            self._is_paused = False" in reactor
    sender = inspect.getsource(Association.send_c_store)
    assert "self._reactor_checkpoint.clear()\n        while not self._is_paused:" in sender
    assert "self._reactor_checkpoint.set()" in sender
