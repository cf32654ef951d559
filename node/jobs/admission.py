"""A completed study becomes a job: routed just before, admitted in the transaction that completes it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from common import logs
from node.jobs.failures import describe
from node.jobs.store import JobStore
from node.route.decision import RoutingDecision, record
from node.route.live import LiveRules
from node.route.study import StudyView, study_from_index
from node.store.index import Db, Index
from node.store.signals import CompletionSignals

log = logging.getLogger("node.jobs")
# How often a study with a completion signal is checked while the instances it lists arrive.
SIGNAL_POLL_S = 1.0


@dataclass(frozen=True)
class Routed:
    """A receiving study as routed outside the index's write lock, ready to be admitted.

    `last_received` is the arrival the decision saw: the completing transaction admits it only
    if no instance arrived since (else the study is checked again later, routed anew)."""

    study_uid: str
    last_received: float
    quiet_period_s: float  # the rule's quiet period, else the completion settings' for the caller
    due: float  # last_received + quiet_period_s
    decision: RoutingDecision | None  # None: routing failed (`failure`), or not routed (not due)
    failure: str | None
    instances: int
    started: float
    completed_by: str = "quiet_period"  # or a completion signal's kind (mpps, ian): due before the quiet period


class Admission:
    """Routes a completing study (outside the write lock every C-STORE needs) and stores the
    decision as its job (inside the transaction that completes it)."""

    def __init__(self, index: Index, rules: LiveRules, data_dir: Path,
                 quiet_period_for: Callable[[str], float] = lambda calling_ae: 60.0,
                 mpps_grace_s: Callable[[], float] = lambda: 120.0):
        """`quiet_period_for(calling_ae)`, `mpps_grace_s()`: the completion settings in force
        (live reloads)."""
        self.index = index
        self.rules = rules
        self.data_dir = Path(data_dir)
        self.quiet_period_for = quiet_period_for
        self.mpps_grace_s = mpps_grace_s
        self.signals = CompletionSignals(index)

    def decide(self, study_uid: str) -> RoutingDecision:
        """The rules in force, evaluated for the study as it is stored now."""
        view = study_from_index(self.index, study_uid, self.data_dir) or StudyView(study_uid, "", "", "", [])
        return record(self.rules.current.evaluate(view))

    def route(self, study_uid: str, now: float) -> Routed | None:
        """The study routed as it is stored now, if it is receiving and its quiet period (the
        rule's, else the completion settings') has passed; None if it is not receiving."""
        study = self.index.study_state(study_uid)
        if study is None or study["state"] != "receiving":
            return None
        started = time.time()
        rules = self.rules.current
        decision, failure, by_rule, view = None, None, None, None
        try:
            view = study_from_index(self.index, study_uid, self.data_dir) or StudyView(study_uid, "", "", "", [])
            by_rule = rules.quiet_period_for(view)
        except SQLAlchemyError:
            raise  # the index is unreachable: the completion sweep checks the study again
        except Exception as exc:  # noqa: BLE001 - a stored value or rule the view cannot take
            failure = describe(exc, "route")
        quiet = by_rule or self.quiet_period_for(study["calling_ae"] or "")
        due, completed_by = self._due(study_uid, study["last_received"] + quiet, now)
        if due <= now and view is not None:
            try:
                decision = record(rules.evaluate(view))
            except Exception as exc:  # a defect in a rule or condition must not hold the study open
                failure = describe(exc, "route")
        return Routed(study_uid, study["last_received"], quiet, due, decision, failure,
                      sum(s.instance_count for s in view.series) if view else 0, started, completed_by)

    def _due(self, study_uid: str, quiet_due: float, now: float) -> tuple[float, str]:
        """When the study completes, and by what. A completion signal (an MPPS step that ended,
        an IAN; node.store.signals) completes it once every instance it lists is here; while
        some are missing, the quiet period does not complete it (the signal says more is
        coming) until `mpps_grace_s` after the signal, and then with a warning counting what
        never came. A completion marks the study's signals used (`admit`): one that completed it
        before does not complete it again when it reopens."""
        signal = self.signals.signal_for(study_uid)
        if signal is None:
            return quiet_due, "quiet_period"
        if signal.missing == 0:
            return now, signal.kind.value
        if now >= signal.ended_at + self.mpps_grace_s():
            logs.event(log, "signal_instances_never_arrived", logging.WARNING, study_uid=study_uid,
                       kind=signal.kind.value, missing=signal.missing, listed=signal.listed)
            return now, signal.kind.value
        return min(now + SIGNAL_POLL_S, signal.ended_at + self.mpps_grace_s()), signal.kind.value

    def admit(self, db: Db, routed: Routed, now: float) -> None:
        """Called inside the completing transaction. A study whose routing failed still
        completes, with a failed job that says why: it is never left receiving without a job."""
        CompletionSignals.mark_used(db, routed.study_uid, now)
        if routed.decision is None:
            reason = routed.failure or "route: the study was not routed"
            job_id = JobStore.create_unrouted(db, routed.study_uid, reason, now, completed_by=routed.completed_by)
            logs.event(log, "study_routing_failed", logging.ERROR, study_uid=routed.study_uid, job=job_id,
                       reason=reason)
            return
        decision = routed.decision
        job_id, state = JobStore.create(db, routed.study_uid, decision, now, route_started=routed.started,
                                        completed_by=routed.completed_by)
        logs.event(log, "study_routed", study_uid=routed.study_uid, job=job_id, state=state.value,
                   rules_version=decision.rules_version, rules=[a.rule for a in decision.applied])
