"""A completed study becomes a job: routed just before, admitted in the transaction that completes it."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy.exc import SQLAlchemyError

from common import logs
from node.config import CompletionConfig, DestinationConfig, NodeConfig
from node.jobs.failures import describe
from node.jobs.returns import returned_decision
from node.jobs.store import JobStore
from node.route.decision import RoutingDecision, record
from node.route.live import LiveRules
from node.route.rules import RuleSet
from node.route.study import StudyView, study_from_index
from node.send.source_count import study_instance_count
from node.store.index import Db, Index
from node.store.roundtrips import RoundTrips, TripMoved, TripState
from node.store.signals import CompletionSignals, Signal, SignalKind, StepState

log = logging.getLogger("node.jobs")
# How often a study with a completion signal or an expected count is checked while its instances arrive.
SIGNAL_POLL_S = 1.0
# The source is asked again (its count confirmed after the last arrival) at most this often;
# after a failed C-FIND, after SOURCE_RETRY_S.
SOURCE_ASK_S = 2.0
SOURCE_RETRY_S = 30.0
SOURCE_ANSWERS_KEPT = 10_000
SOURCE_ASKERS = 2  # C-FINDs at once


@dataclass(frozen=True)
class Due:
    """When a receiving study completes, by what, and whether its job is cancelled (why)."""

    at: float
    by: str  # quiet_period, mpps, ian, hl7, count
    cancelled: str | None = None


@dataclass(frozen=True)
class _SourceAnswer:
    count: int | None  # None: the C-FIND failed
    asked_at: float


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
    completed_by: str = "quiet_period"  # or a completion signal (mpps, ian, hl7, count): due before the quiet period
    cancelled: str | None = None  # why the job is ignored although the rules would run it


class Admission:
    """Routes a completing study (outside the write lock every C-STORE needs) and stores the
    decision as its job (inside the transaction that completes it)."""

    def __init__(self, index: Index, rules: LiveRules, data_dir: Path,
                 config: Callable[[], NodeConfig] = NodeConfig):
        """`config()`: the configuration in force (completion settings and destinations reload live)."""
        self.index = index
        self.rules = rules
        self.data_dir = Path(data_dir)
        self.config = config
        self.signals = CompletionSignals(index)
        self._answers: OrderedDict[str, _SourceAnswer] = OrderedDict()  # study -> the source's count
        self._asking: set[str] = set()  # studies whose source is being asked now
        self._source_down: dict[str, float] = {}  # source AE title -> not asked again before
        self._answers_lock = threading.Lock()
        self._stopped = False
        self._executor = ThreadPoolExecutor(max_workers=SOURCE_ASKERS, thread_name_prefix="source-count")

    def polls(self, study_uid: str, calling_ae: str) -> bool:
        """Whether the study is checked every SIGNAL_POLL_S while it receives (a signal or an
        expected count may make it due before its quiet period)."""
        settings = self.config().completion.signals_for(calling_ae)
        return settings.image_counts or bool(settings.source_count) or self.signals.has_signals(study_uid)

    def decide(self, study_uid: str) -> RoutingDecision:
        """The rules in force, evaluated for the study as it is stored now."""
        view = study_from_index(self.index, study_uid, self.data_dir) or StudyView(study_uid, "", "", "", [])
        return self._decision(view, self.rules.current)

    def _decision(self, view: StudyView, rules: RuleSet) -> RoutingDecision:
        """What a project sent back goes back to its round trip (node/jobs/returns.py); any other
        study goes by the rules."""
        return returned_decision(view, self.config(), self.index, rules.version) or \
            record(rules.evaluate(view), self.rules.models())

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
        completion = self.config().completion
        calling_ae = study["calling_ae"] or ""
        quiet = by_rule or completion.quiet_period_for(calling_ae)
        due = self._due(study_uid, calling_ae, study["last_received"], Due(study["last_received"] + quiet,
                                                                          "quiet_period"), now)
        if due.at <= now and view is not None:
            try:
                decision = self._decision(view, rules)
            except Exception as exc:  # a defect in a rule or condition must not hold the study open
                failure = describe(exc, "route")
        return Routed(study_uid, study["last_received"], quiet, due.at, decision, failure,
                      sum(s.instance_count for s in view.series) if view else 0, started, due.by, due.cancelled)

    def _due(self, study_uid: str, calling_ae: str, last_received: float, quiet: Due, now: float) -> Due:
        """When the study completes, and by what: the earliest of its quiet period and what its
        signals say (README, "Completion signals"), each counted only where
        completion.signals[_by_calling_ae] allows it.
        - MPPS steps that ended and IANs list instances: due once every listed one is here.
          While some are missing nothing else completes the study (the signal says more is
          coming) until `mpps_grace_s` after it; then it completes with a warning counting what
          never came. A step still IN PROGRESS: they say nothing yet.
        - HL7: due once the message is here and no instance arrived for `hl7_settle_s`.
        - Expected counts (the images', or the source's by C-FIND): due when they are reached.
        A completion marks the study's signals used (`admit`): one that completed it before does
        not complete it again when it reopens. While a signal or count may make it due, the
        study is checked every SIGNAL_POLL_S."""
        completion = self.config().completion
        settings = completion.signals_for(calling_ae)
        signals = [s for s in self.signals.signals_of(study_uid) if self._counts(s, settings.hl7, completion)]
        listed = [s for s in signals if s.kind is not SignalKind.HL7]
        if listed and all(s.ended_at is not None for s in listed) and any(s.instances for s in listed):
            last = listed[-1]
            cancelled = None
            if all(s.state is StepState.DISCONTINUED for s in listed) and \
                    completion.signals_for(last.calling_ae).discontinued == "cancel":
                cancelled = "the modality discontinued the procedure step (completion.signals.discontinued: cancel)"
            missing = self.signals.missing([uid for s in listed for uid in s.instances])
            grace_end = float(last.ended_at or now) + completion.mpps_grace_s
            if missing and now < grace_end:
                return Due(min(now + SIGNAL_POLL_S, grace_end), last.kind.value)
            if missing:
                logs.event(log, "signal_instances_never_arrived", logging.WARNING, study_uid=study_uid,
                           kind=last.kind.value, missing=missing,
                           listed=len({uid for s in listed for uid in s.instances}))
            return Due(now, last.kind.value, cancelled)
        candidates = [quiet]
        hl7 = [s for s in signals if s.kind is SignalKind.HL7]
        if hl7:
            candidates.append(Due(max(float(hl7[-1].ended_at or now), last_received + completion.hl7_settle_s), "hl7"))
        if settings.image_counts:
            counts = self.signals.counts_of(study_uid)
            if counts.reached and counts.counted == counts.instances:
                candidates.append(Due(last_received + completion.count_settle_s, "count"))
        if settings.source_count and (source := self.config().destinations.get(settings.source_count)):
            if self._source_reached(study_uid, source, last_received, now):
                candidates.append(Due(now, "count"))
        due = min(candidates, key=lambda d: d.at)
        if due.at > now and (settings.image_counts or settings.source_count or signals):
            return Due(min(due.at, now + SIGNAL_POLL_S), due.by)
        return due

    @staticmethod
    def _counts(signal: Signal, hl7_allowed: bool, completion: CompletionConfig) -> bool:
        """Whether the settings let this signal complete the study: an MPPS step or IAN by its
        sender's settings, an HL7 message by the study's caller's."""
        if signal.kind is SignalKind.HL7:
            return hl7_allowed
        sender = completion.signals_for(signal.calling_ae)
        return sender.mpps if signal.kind is SignalKind.MPPS else sender.ian

    def _source_reached(self, study_uid: str, source: DestinationConfig, last_received: float, now: float) -> bool:
        """Whether the source's NumberOfStudyRelatedInstances, asked after the last arrival, is here.
        The source is asked when the study is first checked, and again once the count it gave
        is reached (to confirm it has no more), at most every SOURCE_ASK_S. The C-FIND runs on
        an executor of its own, never in the completion check (a silent PACS must not hold the
        scheduler's threads): the check polls and sees the answer when it is in. A source that
        failed is not asked again, for any study, for SOURCE_RETRY_S; one that does not hold
        the study (0) is asked again for it after SOURCE_RETRY_S."""
        indexed = self.index.study_instance_count(study_uid)
        with self._answers_lock:
            answer = self._answers.get(study_uid)
            stale = answer is None or (
                not answer.count and now - answer.asked_at >= SOURCE_RETRY_S) or (
                answer.count and indexed >= answer.count and answer.asked_at < last_received
                and now - answer.asked_at >= SOURCE_ASK_S)
            down = self._source_down.get(source.ae_title, 0.0) > now
            if stale and not down and not self._stopped and study_uid not in self._asking:
                self._asking.add(study_uid)
                self._executor.submit(self._ask, study_uid, source)
        return answer is not None and bool(answer.count) and answer.asked_at >= last_received and \
            indexed >= int(answer.count or 0)

    def _ask(self, study_uid: str, source: DestinationConfig) -> None:
        asked_at = time.time()
        answer = _SourceAnswer(None, asked_at)
        try:
            with self._answers_lock:
                down = self._source_down.get(source.ae_title, 0.0) > asked_at
            if down:  # it failed for another study since this one was queued: not asked now
                return
            config = self.config()
            answer = _SourceAnswer(study_instance_count(source, config.scp.ae_title, study_uid,
                                                        timeout=min(10.0, config.sending.timeout_s)), asked_at)
            logs.event(log, "source_count", study_uid=study_uid, source=source.ae_title, count=answer.count)
        except Exception as exc:  # noqa: BLE001 - any failure of the peer or the library: the quiet period decides
            with self._answers_lock:
                self._source_down[source.ae_title] = time.time() + SOURCE_RETRY_S
            logs.event(log, "source_count_failed", logging.WARNING, study_uid=study_uid, source=source.ae_title,
                       reason=str(exc) or type(exc).__name__)
        finally:
            with self._answers_lock:
                self._asking.discard(study_uid)
                self._answers[study_uid] = answer
                self._answers.move_to_end(study_uid)
                while len(self._answers) > SOURCE_ANSWERS_KEPT:
                    self._answers.popitem(last=False)

    def stop(self) -> None:
        """No C-FIND is started after this (checks still running see no new answers)."""
        with self._answers_lock:
            self._stopped = True
            self._executor.shutdown(wait=False, cancel_futures=True)

    def admit(self, db: Db, routed: Routed, now: float) -> None:
        """Called inside the completing transaction. A study whose routing failed still
        completes, with a failed job that says why: it is never left receiving without a job."""
        CompletionSignals.mark_used(db, routed.study_uid, now)
        with self._answers_lock:
            self._answers.pop(routed.study_uid, None)  # a reopened study is asked again
        if routed.decision is None:
            reason = routed.failure or "route: the study was not routed"
            job_id = JobStore.create_unrouted(db, routed.study_uid, reason, now, completed_by=routed.completed_by)
            logs.event(log, "study_routing_failed", logging.ERROR, study_uid=routed.study_uid, job=job_id,
                       reason=reason)
            return
        decision = routed.decision
        job_id, state = JobStore.create(db, routed.study_uid, decision, now, route_started=routed.started,
                                        completed_by=routed.completed_by, cancelled=routed.cancelled)
        if decision.returned is not None and decision.returned.round_trip is not None:
            try:  # results are in: the round trip's deadline no longer runs while they wait for a worker
                RoundTrips.move_in(db, decision.returned.round_trip, TripState.RETURNED, now, return_job=job_id)
            except TripMoved:
                pass  # superseded meanwhile: its job finds the newer round trip
        logs.event(log, "study_routed", study_uid=routed.study_uid, job=job_id, state=state.value,
                   rules_version=decision.rules_version, rules=[a.rule for a in decision.applied])
