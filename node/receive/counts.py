"""What happened on the wire that the instance and association rows do not say: C-STORE failures
by status, associations rejected by reason, associations aborted.

The receiver processes count here, in the shared index, at the moment they answer; the console's
`/metrics` reads the totals at scrape time (no counters shared between processes). Counters only
go up; a restart keeps them.
"""

from __future__ import annotations

from enum import Enum

from node.store.index import Index

class Counted(str, Enum):
    CSTORE_FAILURE = "cstore_failure"  # detail: the status, "0xA700"
    ASSOCIATION_REJECTED = "association_rejected"  # detail: the reason, "calling AE not allowed"
    ASSOCIATION_ABORTED = "association_aborted"  # detail: "" (by the peer or by the node)


class ReceiveCounts:
    def __init__(self, index: Index):
        self.index = index

    def add(self, kind: Counted, detail: str = "") -> None:
        with self.index.transaction() as db:
            db.execute("INSERT INTO receive_counts (kind, detail, n) VALUES (?,?,1)"
                       " ON CONFLICT(kind, detail) DO UPDATE SET n = receive_counts.n + 1", (kind.value, detail))

    def totals(self, kind: Counted) -> dict[str, int]:
        """detail -> count, for one kind."""
        rows = self.index.query("SELECT detail, n FROM receive_counts WHERE kind=?", (kind.value,))
        return {row["detail"]: int(row["n"]) for row in rows}
