"""Completion signals as the node keeps them (tables `completion_signals`, `completion_signal_studies`,
`completion_accessions`, `completion_instance_counts`).

Services and messages that tell the node which instances make a study, so it need not guess
with a timer:
- MPPS (PS3.4 Annex F): a modality creates a step IN PROGRESS with N-CREATE and ends it
  COMPLETED or DISCONTINUED with N-SET, listing the instances it made;
- IAN (PS3.4 Annex R): a PACS notifies with N-CREATE which instances of a study it holds;
- HL7 v2 (node.receive.hl7): an order-complete or final-result message names the exam by its
  accession number; it waits here for a study with that accession if none has come yet;
- expected counts the images carry (ImagesInAcquisition, InConcatenationTotalNumber), noted
  with each instance in the receiver's index transaction.
Each is committed before it is acknowledged, so an acknowledged signal survives a SIGKILL. A
signal is used once per study: the transaction that completes a study marks its links used.
Completion (node.jobs.admission) reads what a study's signals say and decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable

from node.store.index import Db, Index

SQL_BATCH = 500  # UIDs per IN (...) statement


class SignalKind(StrEnum):
    MPPS = "mpps"
    IAN = "ian"
    HL7 = "hl7"


class StepState(StrEnum):
    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class DuplicateSignal(Exception):
    """N-CREATE for a SOP Instance UID the node already holds (0x0111)."""


class UnknownStep(Exception):
    """N-SET for a step the node never saw created (0x0112)."""


class StepEnded(Exception):
    """N-SET on a step already COMPLETED or DISCONTINUED (0x0110, PS3.4 F.7.2.2.4)."""


@dataclass(frozen=True)
class Signal:
    """One signal linked to a study and not yet used by a completion of it."""

    kind: SignalKind
    state: StepState
    calling_ae: str  # who sent it (an HL7 signal: the sending application)
    ended_at: float | None  # None: a step still IN PROGRESS
    instances: tuple[str, ...]  # the SOP Instance UIDs it lists (HL7: none)


@dataclass(frozen=True)
class CountGroup:
    """An expected count an instance carries: how many instances its group (an acquisition of a
    series, a concatenation) has in all."""

    key: str
    expected: int


@dataclass(frozen=True)
class StudyCounts:
    """The study's instances that carry a count (`counted`, of `instances`) and whether every
    group they make has reached its expected count."""

    instances: int
    counted: int
    reached: bool


class CompletionSignals:
    """The one module that writes the completion-signal tables."""

    def __init__(self, index: Index):
        self.index = index

    def create(self, kind: SignalKind, sop_instance_uid: str, study_uids: list[str], calling_ae: str,
               now: float, instances: list[str] | None = None, also: Callable[[Db], None] | None = None) -> None:
        """A new signal: an MPPS step IN PROGRESS, or an IAN, which has ended as it arrives
        (`instances`: what it lists, None: nothing yet). `also(db)` runs in the same transaction
        (queue its forwards)."""
        ended = kind is SignalKind.IAN
        with self.index.transaction() as db:
            if db.execute("SELECT 1 FROM completion_signals WHERE sop_instance_uid=?",
                          (sop_instance_uid,)).fetchone():
                raise DuplicateSignal(sop_instance_uid)
            db.execute(
                "INSERT INTO completion_signals (sop_instance_uid, kind, state, calling_ae, created_at, updated_at,"
                " ended_at, instances) VALUES (?,?,?,?,?,?,?,?)",
                (sop_instance_uid, kind.value, (StepState.COMPLETED if ended else StepState.IN_PROGRESS).value,
                 calling_ae, now, now, now if ended else None,
                 json.dumps(instances) if instances is not None else None))
            for study_uid in dict.fromkeys(study_uids):
                db.execute("INSERT INTO completion_signal_studies (sop_instance_uid, study_uid) VALUES (?,?)",
                           (sop_instance_uid, study_uid))
            if ended:
                self._used_where_complete(db, sop_instance_uid, now)
            if also is not None:
                also(db)

    def create_hl7(self, key: str, accession_number: str, source: str, now: float) -> list[str] | None:
        """An HL7 message saying the exam with this accession number is complete (`key`: the
        sender and its message control id). Returns the studies it names now (it waits for a
        study with the accession if there is none yet), or None for a resend of a message the
        node holds already (acknowledged again, nothing changes)."""
        with self.index.transaction() as db:
            if db.execute("SELECT 1 FROM completion_signals WHERE sop_instance_uid=?", (key,)).fetchone():
                return None
            db.execute(
                "INSERT INTO completion_signals (sop_instance_uid, kind, state, calling_ae, created_at, updated_at,"
                " ended_at, instances, accession_number) VALUES (?,?,?,?,?,?,?,?,?)",
                (key, SignalKind.HL7.value, StepState.COMPLETED.value, source, now, now, now, "[]",
                 accession_number))
            studies = [r["study_uid"] for r in db.execute(
                "SELECT study_uid FROM completion_accessions WHERE accession_number=?", (accession_number,))]
            for study_uid in studies:
                db.execute("INSERT INTO completion_signal_studies (sop_instance_uid, study_uid) VALUES (?,?)",
                           (key, study_uid))
            self._used_where_complete(db, key, now)
            return studies

    @staticmethod
    def note_instance(db: Db, study_uid: str, sop_instance_uid: str, accession_number: str | None,
                      count: CountGroup | None) -> None:
        """In the receiver's transaction that indexes the instance: its study's accession number
        (an HL7 signal that came first, and completed no study yet, is linked to the study now)
        and the count it carries."""
        if accession_number:
            added = db.execute(
                "INSERT INTO completion_accessions (study_uid, accession_number) VALUES (?,?) ON CONFLICT DO NOTHING",
                (study_uid, accession_number)).rowcount
            if added:
                db.execute(
                    "INSERT INTO completion_signal_studies (sop_instance_uid, study_uid)"
                    " SELECT s.sop_instance_uid, ? FROM completion_signals s WHERE s.kind=? AND s.accession_number=?"
                    " AND NOT EXISTS (SELECT 1 FROM completion_signal_studies u"
                    "  WHERE u.sop_instance_uid = s.sop_instance_uid AND u.used_at IS NOT NULL)"
                    " ON CONFLICT DO NOTHING", (study_uid, SignalKind.HL7.value, accession_number))
        if count is not None:
            db.execute(
                "INSERT INTO completion_instance_counts (sop_instance_uid, study_uid, count_group, expected)"
                " VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (sop_instance_uid, study_uid, count.key, count.expected))

    @staticmethod
    def _used_where_complete(db: Db, sop_instance_uid: str, now: float) -> None:
        """A signal that ends while a study it names is complete describes a completion that
        already happened: it must not complete that study again when it reopens."""
        used = db.execute(
            "UPDATE completion_signal_studies SET used_at=? WHERE sop_instance_uid=? AND used_at IS NULL"
            " AND study_uid IN (SELECT study_uid FROM studies WHERE state='complete')",
            (now, sop_instance_uid)).rowcount
        if used:
            CompletionSignals._used_by_a_study(db, now, "sop_instance_uid", sop_instance_uid)

    @staticmethod
    def mark_used(db: Db, study_uid: str, now: float) -> None:
        """Inside the transaction that completes the study: its ended signals are taken into
        account now and never complete it again (it may reopen with instances they do not list)."""
        used = db.execute(
            "UPDATE completion_signal_studies SET used_at=? WHERE study_uid=? AND used_at IS NULL AND"
            " sop_instance_uid IN (SELECT sop_instance_uid FROM completion_signals WHERE ended_at IS NOT NULL)",
            (now, study_uid)).rowcount
        if used:
            CompletionSignals._used_by_a_study(db, now, "study_uid", study_uid)

    @staticmethod
    def _used_by_a_study(db: Db, now: float, column: str, value: str) -> None:
        """The previous release reads `completion_signals.used_at` (one mark per signal): keep it
        set for every signal a study just used (`column` = `value`, the marks made at `now`), so
        its replicas agree during a rolling upgrade."""
        db.execute(
            "UPDATE completion_signals SET used_at=? WHERE used_at IS NULL AND sop_instance_uid IN"
            f" (SELECT sop_instance_uid FROM completion_signal_studies WHERE {column}=? AND used_at=?)",
            (now, value, now))

    def update_step(self, sop_instance_uid: str, state: StepState | None, instances: list[str] | None,
                    now: float, also: Callable[[Db], None] | None = None) -> list[str]:
        """An MPPS N-SET: the new state (None: unchanged) and the instances its Performed Series
        Sequence lists (None: not in this N-SET). Returns the step's studies. `also(db)` runs in
        the same transaction."""
        with self.index.transaction() as db:
            row = db.execute("SELECT state FROM completion_signals WHERE sop_instance_uid=? AND kind=?",
                             (sop_instance_uid, SignalKind.MPPS.value)).fetchone()
            if row is None:
                raise UnknownStep(sop_instance_uid)
            if row["state"] != StepState.IN_PROGRESS.value:
                raise StepEnded(sop_instance_uid)
            ended = state is not None and state is not StepState.IN_PROGRESS
            studies = [r["study_uid"] for r in db.execute(
                "SELECT study_uid FROM completion_signal_studies WHERE sop_instance_uid=?", (sop_instance_uid,))]
            db.execute(
                "UPDATE completion_signals SET state=?, updated_at=?, ended_at=?, instances=COALESCE(?, instances)"
                " WHERE sop_instance_uid=?",
                ((state or StepState.IN_PROGRESS).value, now, now if ended else None,
                 json.dumps(instances) if instances is not None else None, sop_instance_uid))
            if ended:
                self._used_where_complete(db, sop_instance_uid, now)
            if also is not None:
                also(db)
            return studies

    @staticmethod
    def forget_study(db: Db, study_uid: str) -> None:
        """Retention deleted the study (inside its transaction): its signals go with it, unless
        they name another study the node still holds."""
        signals = [r["sop_instance_uid"] for r in db.execute(
            "SELECT sop_instance_uid FROM completion_signal_studies WHERE study_uid=?", (study_uid,))]
        db.execute("DELETE FROM completion_signal_studies WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM completion_accessions WHERE study_uid=?", (study_uid,))
        db.execute("DELETE FROM completion_instance_counts WHERE study_uid=?", (study_uid,))
        for uid in signals:
            named = db.execute("SELECT 1 FROM completion_signal_studies WHERE sop_instance_uid=?", (uid,)).fetchone()
            if named is None:
                db.execute("DELETE FROM completion_signals WHERE sop_instance_uid=?", (uid,))

    def prune(self, now: float, keep_s: float) -> int:
        """Forget signals older than `keep_s` that never found a study (an HL7 message for an
        accession never received), and steps left IN PROGRESS that long (a modality that never
        ended them). Returns how many went."""
        with self.index.transaction() as db:
            stale = [r["sop_instance_uid"] for r in db.execute(
                "SELECT sop_instance_uid FROM completion_signals s WHERE created_at < ? AND (state=? OR NOT EXISTS"
                " (SELECT 1 FROM completion_signal_studies m JOIN studies t ON t.study_uid = m.study_uid"
                "  WHERE m.sop_instance_uid = s.sop_instance_uid))",
                (now - keep_s, StepState.IN_PROGRESS.value))]
            for start in range(0, len(stale), SQL_BATCH):
                chunk = stale[start:start + SQL_BATCH]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM completion_signal_studies WHERE sop_instance_uid IN ({marks})", tuple(chunk))
                db.execute(f"DELETE FROM completion_signals WHERE sop_instance_uid IN ({marks})", tuple(chunk))
            return len(stale)

    def has_signals(self, study_uid: str) -> bool:
        return bool(self.index.query("SELECT 1 FROM completion_signal_studies WHERE study_uid=? LIMIT 1",
                                     (study_uid,)))

    def signals_of(self, study_uid: str) -> list[Signal]:
        """The study's signals not yet used by a completion of it, oldest end first (steps still
        IN PROGRESS last)."""
        rows = self.index.query(
            "SELECT s.kind, s.state, s.calling_ae, s.instances, s.ended_at FROM completion_signals s"
            " JOIN completion_signal_studies m ON m.sop_instance_uid = s.sop_instance_uid"
            " WHERE m.study_uid=? AND m.used_at IS NULL AND (s.used_at IS NULL OR EXISTS"
            "  (SELECT 1 FROM completion_signal_studies u WHERE u.sop_instance_uid = s.sop_instance_uid"
            "   AND u.used_at IS NOT NULL))", (study_uid,))
        # (a signal marked used with no per-study mark was used by a replica of the previous
        # release, which marks only the signal, during a rolling upgrade: used)
        signals = [Signal(SignalKind(r["kind"]), StepState(r["state"]), r["calling_ae"] or "", r["ended_at"],
                          tuple(json.loads(r["instances"] or "[]"))) for r in rows]
        return sorted(signals, key=lambda s: (s.ended_at is None, s.ended_at or 0.0))

    def missing(self, listed: list[str]) -> int:
        """How many of these SOP Instance UIDs are not indexed."""
        listed = sorted(set(listed))
        indexed = 0
        for start in range(0, len(listed), SQL_BATCH):  # bounded statements, however long the list
            chunk = listed[start:start + SQL_BATCH]
            indexed += int(self.index.query(
                f"SELECT COUNT(*) AS n FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(chunk))})",
                tuple(chunk))[0]["n"])
        return len(listed) - indexed

    def counts_of(self, study_uid: str) -> StudyCounts:
        """What the counts the study's instances carry say (node.receive.tags reads them)."""
        groups = self.index.query(
            "SELECT count_group, MAX(expected) AS expected, COUNT(*) AS n FROM completion_instance_counts"
            " WHERE study_uid=? GROUP BY count_group", (study_uid,))
        instances = int(self.index.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?",
                                         (study_uid,))[0]["n"])
        counted = sum(int(g["n"]) for g in groups)
        return StudyCounts(instances, counted, bool(groups) and all(int(g["n"]) >= int(g["expected"]) for g in groups))
