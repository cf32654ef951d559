"""MPPS requests the node passes on to other AEs (table `signal_forwards`).

A RIS or PACS that tracks procedure steps keeps getting them when the modality sends its MPPS to
the node: each N-CREATE and N-SET the node accepts is queued here, per destination, in the
transaction that stores the step (node.store.signals), so an acknowledged step is forwarded even
after a SIGKILL. node.send.signal_forward sends them, in the order they came, per step and
destination: an N-SET never overtakes the N-CREATE of its step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from node.store.index import Db, Index
from node.store.lease import process_owner

CLAIM_BATCH = 50
_DUE = ("SELECT id FROM signal_forwards WHERE (state=? OR (state=? AND lease_until < ?))"
        " AND COALESCE(next_attempt, 0) <= ? LIMIT ?")


class ForwardState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # claimed (leased) by a forwarder
    DELIVERED = "delivered"
    DEAD = "dead"  # refused by the destination, or not delivered before the deadline


@dataclass(frozen=True)
class Forward:
    id: int
    sop_instance_uid: str
    operation: str  # n_create, n_set
    destination: str
    dataset: bytes
    created_at: float
    attempts: int  # claims before this one (> 0: the peer may have had it already)


class SignalForwards:
    """The one module that writes `signal_forwards`."""

    def __init__(self, index: Index, lease_s: float = 30.0):
        """`lease_s`: how long a claimed forward stays with this process without a renewal
        (`renew_leases`, from the service's heartbeat)."""
        self.index = index
        self.lease_s = lease_s
        self.owner = process_owner()

    @staticmethod
    def queue(db: Db, sop_instance_uid: str, operation: str, destinations: list[str], dataset: bytes,
              now: float) -> None:
        """In the transaction that stores the step: one forward per destination."""
        for destination in dict.fromkeys(destinations):
            db.execute(
                "INSERT INTO signal_forwards (sop_instance_uid, operation, destination, dataset, state, created_at,"
                " updated_at, attempts) VALUES (?,?,?,?,?,?,?,0)",
                (sop_instance_uid, operation, destination, dataset, ForwardState.PENDING.value, now, now))

    def claim(self, now: float) -> list[Forward]:
        """Forwards due now whose earlier forwards (same step, same destination) are all finished,
        leased to this process; a lease that ran out (a dead forwarder) is taken over."""
        # leases on the index's clock (replicas' wall clocks may disagree), retries on this host's
        if not self.index.query(_DUE, (ForwardState.PENDING.value, ForwardState.SENDING.value,
                                       self.index.lease_clock(), now, 1)):
            return []  # the common case: nothing queued, no write lock taken
        with self.index.transaction() as db:
            lease_now = db.lease_clock()
            rows = db.execute(
                "SELECT f.id, f.sop_instance_uid, f.operation, f.destination, f.dataset, f.created_at, f.attempts"
                " FROM signal_forwards f WHERE (f.state=? OR (f.state=? AND f.lease_until < ?))"
                " AND COALESCE(f.next_attempt, 0) <= ? AND NOT EXISTS (SELECT 1 FROM signal_forwards e"
                "  WHERE e.destination = f.destination AND e.sop_instance_uid = f.sop_instance_uid AND e.id < f.id"
                "  AND e.state IN (?, ?)) ORDER BY f.id LIMIT ?",
                (ForwardState.PENDING.value, ForwardState.SENDING.value, lease_now, now, ForwardState.PENDING.value,
                 ForwardState.SENDING.value, CLAIM_BATCH)).fetchall()
            for row in rows:  # a claim counts as an attempt: after a crash the peer may have it already
                db.execute("UPDATE signal_forwards SET state=?, lease_owner=?, lease_until=?, updated_at=?,"
                           " attempts=attempts+1 WHERE id=?",
                           (ForwardState.SENDING.value, self.owner, lease_now + self.lease_s, now, row["id"]))
        return [Forward(int(r["id"]), r["sop_instance_uid"], r["operation"], r["destination"], bytes(r["dataset"]),
                        float(r["created_at"]), int(r["attempts"])) for r in rows]  # attempts as before the claim

    def finish(self, forward_id: int, state: ForwardState, now: float, reason: str | None = None) -> None:
        """Delivered, or dead with the reason (while this process holds the forward)."""
        with self.index.transaction() as db:
            db.execute("UPDATE signal_forwards SET state=?, updated_at=?, lease_owner=NULL, lease_until=NULL,"
                       " reason=? WHERE id=? AND state=? AND lease_owner=?",
                       (state.value, now, reason, forward_id, ForwardState.SENDING.value, self.owner))

    def retry(self, forward_id: int, now: float, next_attempt: float, reason: str) -> None:
        """Not delivered this time (the destination is unreachable): again at `next_attempt`."""
        with self.index.transaction() as db:
            db.execute("UPDATE signal_forwards SET state=?, updated_at=?, lease_owner=NULL, lease_until=NULL,"
                       " next_attempt=?, reason=? WHERE id=? AND state=? AND lease_owner=?",
                       (ForwardState.PENDING.value, now, next_attempt, reason, forward_id,
                        ForwardState.SENDING.value, self.owner))

    def renew_leases(self) -> int:
        """Keep this process's forwards while it sends them (a batch to a slow peer may outlast a lease)."""
        with self.index.transaction() as db:
            return db.execute("UPDATE signal_forwards SET lease_until=? WHERE state=? AND lease_owner=?",
                              (db.lease_clock() + self.lease_s, ForwardState.SENDING.value, self.owner)).rowcount

    def counts(self) -> dict[tuple[str, str], int]:
        """Forwards by (state, destination), for /metrics."""
        return {(r["state"], r["destination"]): int(r["n"]) for r in self.index.query(
            "SELECT state, destination, COUNT(*) AS n FROM signal_forwards GROUP BY state, destination")}


def encoded(ds: Dataset) -> bytes:
    """An attribute list as it is kept: Explicit VR Little Endian, whatever syntax it came in."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def decoded(data: bytes) -> Dataset:
    return read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
