"""What happened on the wire that the instance and association rows do not say: C-STORE failures
by status, associations rejected by reason, associations aborted; STOW-RS requests by HTTP status,
their instances stored and refused by reason.

The receiver processes count here, in the shared index, at the moment they answer; the console's
`/metrics` reads the totals at scrape time (no counters shared between processes). Counters only
go up; a restart keeps them.
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping

from node.store.index import Index

class Counted(str, Enum):
    CSTORE_FAILURE = "cstore_failure"  # detail: the status, "0xA700"
    ASSOCIATION_REJECTED = "association_rejected"  # detail: the reason, "calling AE not allowed"
    ASSOCIATION_ABORTED = "association_aborted"  # detail: "" (by the peer or by the node)
    STOW_REQUEST = "stow_request"  # detail: the HTTP status answered, "200"; "none" when no answer went out
    STOW_STORED = "stow_stored"  # detail: ""
    STOW_FAILURE = "stow_failure"  # detail: the Failure Reason, "0xC212"


class ReceiveCounts:
    def __init__(self, index: Index):
        self.index = index

    def add(self, kind: Counted, detail: str = "") -> None:
        self.add_all({(kind, detail): 1})

    def add_all(self, counts: Mapping[tuple[Counted, str], int]) -> None:
        """Several counts in one transaction (a STOW-RS request's)."""
        with self.index.transaction() as db:
            for (kind, detail), n in counts.items():
                if n:
                    db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES (?,?,?) ON CONFLICT(kind, detail)"
                               " DO UPDATE SET n = receive_counts.n + excluded.n", (kind.value, detail, n))

    def totals(self, kind: Counted) -> dict[str, int]:
        """detail -> count, for one kind."""
        rows = self.index.query("SELECT detail, n FROM receive_counts WHERE kind=?", (kind.value,))
        return {row["detail"]: int(row["n"]) for row in rows}
