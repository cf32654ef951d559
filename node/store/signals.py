"""Completion signals as the node keeps them (tables `completion_signals`, `completion_signal_studies`).

Two DICOM services tell the node which instances make a study, so it need not guess with a timer:
- MPPS (PS3.4 Annex F): a modality creates a step IN PROGRESS with N-CREATE and ends it
  COMPLETED or DISCONTINUED with N-SET, listing the instances it made;
- IAN (PS3.4 Annex R): a PACS notifies with N-CREATE which instances of a study it holds.
Each is committed before the N-CREATE/N-SET response, so an acknowledged signal survives a
SIGKILL. Completion (node.jobs.admission) asks `signal_for` what a study's signals say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from node.store.index import Db, Index

SQL_BATCH = 500  # UIDs per IN (...) statement


class SignalKind(StrEnum):
    MPPS = "mpps"
    IAN = "ian"


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
class StudySignal:
    """What a study's ended signals say: every instance they list (`listed`), how many of those
    are not indexed yet (`missing`), when the last of them ended and of which kind it was."""

    listed: int
    missing: int
    ended_at: float
    kind: SignalKind


class CompletionSignals:
    """The one module that writes the completion-signal tables."""

    def __init__(self, index: Index):
        self.index = index

    def create(self, kind: SignalKind, sop_instance_uid: str, study_uids: list[str], calling_ae: str,
               now: float, instances: list[str] | None = None) -> None:
        """A new signal: an MPPS step IN PROGRESS, or an IAN, which has ended as it arrives
        (`instances`: what it lists, None: nothing yet)."""
        ended = kind is SignalKind.IAN
        with self.index.transaction() as db:
            if db.execute("SELECT 1 FROM completion_signals WHERE sop_instance_uid=?",
                          (sop_instance_uid,)).fetchone():
                raise DuplicateSignal(sop_instance_uid)
            db.execute(
                "INSERT INTO completion_signals (sop_instance_uid, kind, state, calling_ae, created_at, updated_at,"
                " ended_at, instances, used_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (sop_instance_uid, kind.value, (StepState.COMPLETED if ended else StepState.IN_PROGRESS).value,
                 calling_ae, now, now, now if ended else None,
                 json.dumps(instances) if instances is not None else None,
                 now if ended and self._all_complete(db, study_uids) else None))
            for study_uid in dict.fromkeys(study_uids):
                db.execute("INSERT INTO completion_signal_studies (sop_instance_uid, study_uid) VALUES (?,?)",
                           (sop_instance_uid, study_uid))

    @staticmethod
    def _all_complete(db: Db, study_uids: list[str]) -> bool:
        """A signal that ends while its studies are complete describes a completion that
        already happened: it must not complete them again when they reopen."""
        return bool(study_uids) and all(
            (row := db.execute("SELECT state FROM studies WHERE study_uid=?", (uid,)).fetchone()) is not None
            and row["state"] == "complete" for uid in study_uids)

    @staticmethod
    def mark_used(db: Db, study_uid: str, now: float) -> None:
        """Inside the transaction that completes the study: its ended signals are taken into
        account now and never complete it again (it may reopen with instances they do not list)."""
        db.execute(
            "UPDATE completion_signals SET used_at=? WHERE used_at IS NULL AND ended_at IS NOT NULL AND"
            " sop_instance_uid IN (SELECT sop_instance_uid FROM completion_signal_studies WHERE study_uid=?)",
            (now, study_uid))

    def update_step(self, sop_instance_uid: str, state: StepState | None, instances: list[str] | None,
                    now: float) -> list[str]:
        """An MPPS N-SET: the new state (None: unchanged) and the instances its Performed Series
        Sequence lists (None: not in this N-SET). Returns the step's studies."""
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
                "UPDATE completion_signals SET state=?, updated_at=?, ended_at=?, instances=COALESCE(?, instances),"
                " used_at=? WHERE sop_instance_uid=?",
                ((state or StepState.IN_PROGRESS).value, now, now if ended else None,
                 json.dumps(instances) if instances is not None else None,
                 now if ended and self._all_complete(db, studies) else None, sop_instance_uid))
            return studies

    @staticmethod
    def forget_study(db: Db, study_uid: str) -> None:
        """Retention deleted the study (inside its transaction): its signals go with it, unless
        they name another study the node still holds."""
        signals = [r["sop_instance_uid"] for r in db.execute(
            "SELECT sop_instance_uid FROM completion_signal_studies WHERE study_uid=?", (study_uid,))]
        db.execute("DELETE FROM completion_signal_studies WHERE study_uid=?", (study_uid,))
        for uid in signals:
            named = db.execute("SELECT 1 FROM completion_signal_studies WHERE sop_instance_uid=?", (uid,)).fetchone()
            if named is None:
                db.execute("DELETE FROM completion_signals WHERE sop_instance_uid=?", (uid,))

    def has_signals(self, study_uid: str) -> bool:
        return bool(self.index.query("SELECT 1 FROM completion_signal_studies WHERE study_uid=? LIMIT 1",
                                     (study_uid,)))

    def signal_for(self, study_uid: str) -> StudySignal | None:
        """What the study's signals say, or None: it has none not yet used by a completion, one
        of them is a step still IN PROGRESS (more is coming: the quiet period decides), or they
        list no instance (nothing to wait for: the quiet period decides)."""
        rows = self.index.query(
            "SELECT s.kind, s.instances, s.ended_at FROM completion_signals s JOIN completion_signal_studies m"
            " ON m.sop_instance_uid = s.sop_instance_uid WHERE m.study_uid=? AND s.used_at IS NULL"
            " ORDER BY s.ended_at", (study_uid,))
        if not rows or any(r["ended_at"] is None for r in rows):
            return None
        listed = sorted({uid for r in rows for uid in json.loads(r["instances"] or "[]")})
        if not listed:
            return None
        indexed = 0
        for start in range(0, len(listed), SQL_BATCH):  # bounded statements, however long the list
            chunk = listed[start:start + SQL_BATCH]
            indexed += int(self.index.query(
                f"SELECT COUNT(*) AS n FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(chunk))})",
                tuple(chunk))[0]["n"])
        return StudySignal(len(listed), len(listed) - indexed, rows[-1]["ended_at"], SignalKind(rows[-1]["kind"]))
