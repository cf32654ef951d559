"""The round trips of de-identified copies (owner of the `round_trips` table and its states).

A rule's `deidentify` action with `results_to` sends a de-identified copy out and opens a round
trip: the node then awaits results for that pseudonymous study until the rule's deadline.

States and the only transitions between them (TRANSITIONS below):
- `waiting`: the copy is handed to the outbox; results are awaited until `deadline`;
- `returned`: results for the pseudonymous study arrived; a job re-identifies them;
- `delivered`: the re-identified results are handed to the outbox for `results_to`;
- `failed`: what came back could not be re-identified (the reason says why);
- `timed_out`: nothing came back by the deadline (an "AI ran: failed" notice went out);
  results that come later are still re-identified and delivered;
- `superseded`: the study was sent again (a newer round trip awaits its results).
Results may come in parts (a SEG, then later an SR): `delivered` and `failed` go back to
`returned` when more arrive. A transition is one UPDATE guarded by the states it may leave.

The pseudonymous study is stored only as a keyed digest, and the source's patient and study
attributes (restored on what comes back) sealed under the project's key (node/store/pseudonyms.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from node.store.index import Db, Index


class TripState(StrEnum):
    WAITING = "waiting"
    RETURNED = "returned"
    DELIVERED = "delivered"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SUPERSEDED = "superseded"


TRANSITIONS: dict[TripState, frozenset[TripState]] = {
    TripState.WAITING: frozenset({TripState.RETURNED, TripState.TIMED_OUT, TripState.SUPERSEDED}),
    TripState.RETURNED: frozenset({TripState.RETURNED, TripState.DELIVERED, TripState.FAILED}),
    TripState.DELIVERED: frozenset({TripState.RETURNED}),
    TripState.FAILED: frozenset({TripState.RETURNED}),
    TripState.TIMED_OUT: frozenset({TripState.RETURNED, TripState.SUPERSEDED}),
    TripState.SUPERSEDED: frozenset(),
}


class TripMoved(RuntimeError):
    """The round trip was not in a state that may make this transition (someone else moved it)."""


@dataclass(frozen=True)
class RoundTrip:
    id: int
    project: str
    study_digest: str
    job_id: int
    rule: str
    study_uid: str
    results_to: tuple[str, ...]
    sealed_study: str
    state: TripState
    sent_at: float
    deadline: float
    returned_at: float | None
    finished_at: float | None
    return_job: int | None
    reason: str | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> RoundTrip:
        return cls(row["id"], row["project"], row["study_digest"], row["job_id"], row["rule"], row["study_uid"],
                   tuple(json.loads(row["results_to"])), row["sealed_study"], TripState(row["state"]),
                   row["sent_at"], row["deadline"], row["returned_at"], row["finished_at"], row["return_job"],
                   row["reason"])


class RoundTrips:
    def __init__(self, index: Index):
        self.index = index

    @staticmethod
    def open(db: Db, *, project: str, study_digest: str, job_id: int, rule: str, study_uid: str,
             results_to: list[str], sealed_study: str, now: float, deadline: float, keep_s: float) -> int:
        """The round trip of a job's rule (the same one when the job runs again after a crash);
        earlier jobs' round trips of the same pseudonymous study that still await results are
        superseded. (Two rules of one job sending one study to one project share its results:
        the later round trip is the one found.)"""
        row = db.execute("SELECT id FROM round_trips WHERE job_id=? AND rule=?", (job_id, rule)).fetchone()
        if row is not None:
            return int(row["id"])
        trip_id = int(db.execute(
            "INSERT INTO round_trips (project, study_digest, job_id, rule, study_uid, results_to, sealed_study,"
            " state, sent_at, deadline, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (project, study_digest, job_id, rule, study_uid, json.dumps(results_to), sealed_study,
             TripState.WAITING.value, now, deadline, now + keep_s)).fetchone()["id"])
        db.execute("UPDATE round_trips SET state=?, finished_at=?, reason=? WHERE project=? AND study_digest=?"
                   " AND id<? AND job_id<>? AND state IN (?,?)",
                   (TripState.SUPERSEDED.value, now, f"the study was sent again (round trip {trip_id})", project,
                    study_digest, trip_id, job_id, TripState.WAITING.value, TripState.TIMED_OUT.value))
        return trip_id

    def find(self, project: str, study_digest: str) -> RoundTrip | None:
        """The latest round trip of the pseudonymous study with this digest."""
        rows = self.index.query("SELECT * FROM round_trips WHERE project=? AND study_digest=? ORDER BY id DESC"
                                " LIMIT 1", (project, study_digest))
        return RoundTrip.of(rows[0]) if rows else None

    def get(self, trip_id: int) -> RoundTrip | None:
        rows = self.index.query("SELECT * FROM round_trips WHERE id=?", (trip_id,))
        return RoundTrip.of(rows[0]) if rows else None

    def of_study(self, study_uid: str) -> list[RoundTrip]:
        """The round trips of a source study, oldest first."""
        return [RoundTrip.of(r) for r in self.index.query(
            "SELECT * FROM round_trips WHERE study_uid=? ORDER BY id", (study_uid,))]

    def in_states(self, states: tuple[TripState, ...], limit: int) -> list[RoundTrip]:
        """The latest round trips in these states (the console's needs-attention list)."""
        return [RoundTrip.of(r) for r in self.index.query(
            f"SELECT * FROM round_trips WHERE state IN ({','.join('?' * len(states))}) ORDER BY id DESC LIMIT ?",
            (*(s.value for s in states), limit))]

    def overdue(self, now: float) -> list[RoundTrip]:
        """Round trips still waiting past their deadline."""
        return [RoundTrip.of(r) for r in self.index.query(
            "SELECT * FROM round_trips WHERE state=? AND deadline<? ORDER BY id", (TripState.WAITING.value, now))]

    def counts(self) -> dict[str, int]:
        return {r["state"]: int(r["n"]) for r in self.index.query(
            "SELECT state, COUNT(*) AS n FROM round_trips GROUP BY state")}

    def move(self, trip_id: int, target: TripState, now: float, **columns: object) -> None:
        """One guarded transition (TripMoved when the round trip is in no state that may go there)."""
        with self.index.transaction() as db:
            self.move_in(db, trip_id, target, now, **columns)

    @staticmethod
    def move_in(db: Db, trip_id: int, target: TripState, now: float, **columns: object) -> None:
        sources = [s.value for s, targets in TRANSITIONS.items() if target in targets]
        if target is TripState.RETURNED:
            columns = {"returned_at": now, "finished_at": None, "reason": None, **columns}
        elif target is not TripState.WAITING:
            columns = {"finished_at": now, **columns}
        sets = "".join(f", {name}=?" for name in columns)
        updated = db.execute(f"UPDATE round_trips SET state=?{sets} WHERE id=? AND state IN"
                             f" ({','.join('?' * len(sources))})",
                             (target.value, *columns.values(), trip_id, *sources)).rowcount
        if updated != 1:
            row = db.execute("SELECT state FROM round_trips WHERE id=?", (trip_id,)).fetchone()
            state = row["state"] if row else "gone"
            raise TripMoved(f"round trip {trip_id} is {state}: it cannot become {target.value}")

    def prune(self, now: float) -> int:
        """Round trips past their mapping's time (their results can no longer be re-identified)."""
        with self.index.transaction() as db:
            return db.execute("DELETE FROM round_trips WHERE expires_at < ?", (now,)).rowcount
