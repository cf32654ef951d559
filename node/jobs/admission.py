"""A completed study becomes a job: routed in the transaction that completes it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common import logs
from node.jobs.failures import describe
from node.jobs.store import JobStore
from node.route.decision import RoutingDecision, record
from node.route.live import LiveRules
from node.route.study import StudyView, study_from_index
from node.store.index import Db, Index

log = logging.getLogger("node.jobs")


class Admission:
    """Evaluates the rules in force for a completing study and stores the decision as its job."""

    def __init__(self, index: Index, rules: LiveRules, data_dir: Path):
        self.index = index
        self.rules = rules
        self.data_dir = Path(data_dir)

    def quiet_period_for(self, study_uid: str) -> float | None:
        view = study_from_index(self.index, study_uid, self.data_dir)
        return self.rules.current.quiet_period_for(view) if view else None

    def decide(self, study_uid: str) -> RoutingDecision:
        """The rules in force, evaluated for the study as it is stored now."""
        view = study_from_index(self.index, study_uid, self.data_dir) or StudyView(study_uid, "", "", "", [])
        return record(self.rules.current.evaluate(view))

    def admit(self, db: Db, study_uid: str, now: float) -> None:
        """Called inside the completing transaction (`db` is this thread's connection, so the study
        view read by `decide` is the same snapshot). A study whose routing fails still completes,
        with a failed job that says why: it is never left receiving without a job."""
        started = time.time()
        try:
            decision = self.decide(study_uid)
        except Exception as exc:  # a defect in a rule or condition must not hold the study open
            reason = describe(exc, "route")
            job_id = JobStore.create_unrouted(db, study_uid, reason, now)
            logs.event(log, "study_routing_failed", logging.ERROR, study_uid=study_uid, job=job_id, reason=reason)
            return
        job_id, state = JobStore.create(db, study_uid, decision, now, route_started=started)
        logs.event(log, "study_routed", study_uid=study_uid, job=job_id, state=state.value,
                   rules_version=decision.rules_version, rules=[a.rule for a in decision.applied])
