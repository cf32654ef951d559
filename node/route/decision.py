"""A routing decision as it is stored with its job: typed, so every stage reads the same thing."""

from __future__ import annotations

from typing import Mapping

from pydantic import BaseModel, ConfigDict

from inference.repository import ModelRef

from node.route.rules import Actions, Decision


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleOutcome(_Frozen):
    """One rule as evaluated for the study (for `jobs --json` and the explanation)."""

    rule: str
    matched: bool
    applied: bool
    reason: str
    series_uid: str | None = None


class AppliedRule(_Frozen):
    """A rule that applies: its actions, and the series its models get (None: no models)."""

    rule: str
    series_uid: str | None
    actions: Actions


class ReturnedResults(_Frozen):
    """The study is what a de-identification project sent back (README, "De-identification"):
    it is re-identified for its round trip, never routed by the rules."""

    project: str
    round_trip: int | None  # None: it came in at the project's return AE title and matches no round trip


class RoutingDecision(_Frozen):
    rules_version: str
    mode: str
    priority: int
    applied: tuple[AppliedRule, ...]
    outcomes: tuple[RuleOutcome, ...]
    explanation: str
    returned: ReturnedResults | None = None

    @property
    def processes(self) -> bool:
        """False when no rule applies or every applied rule discards: the study is not processed."""
        return self.returned is not None or any(
            a.actions.run or a.actions.forward_to or a.actions.deidentify for a in self.applied)


def record(decision: Decision, versions: Mapping[str, list[int]] | None = None) -> RoutingDecision:
    """The decision as stored with the study's job; a model named without a version is pinned to
    its latest in `versions` now, so the job (and a re-run after a crash) runs one version even
    if another is imported meanwhile."""
    return RoutingDecision(
        rules_version=decision.version, mode=decision.mode, priority=decision.priority,
        explanation=decision.explain(),
        applied=tuple(AppliedRule(rule=rule.name, series_uid=series.series_uid if series else None,
                                  actions=_pinned(rule.actions, versions or {})) for rule, series in decision.applied),
        outcomes=tuple(RuleOutcome(rule=o.rule, matched=o.matched, applied=o.applied, reason=o.reason,
                                   series_uid=o.series.series_uid if o.series else None)
                       for o in decision.outcomes),
    )


def _pinned(actions: Actions, versions: Mapping[str, list[int]]) -> Actions:
    """`run` with each unversioned model pinned to its latest; a shadow of that very version
    (`run: [x]`, `shadow: [x@2]` once 2 is the latest) is dropped: it would compare x@2 with itself."""
    refs = [ModelRef.parse(m) for m in actions.run]
    pinned = [str(r) if r.version is not None or not versions.get(r.name) else f"{r.name}@{versions[r.name][-1]}"
              for r in refs]
    if pinned == list(actions.run):
        return actions
    return Actions.model_validate({**actions.model_dump(), "run": pinned,
                                   "shadow": [m for m in actions.shadow if m not in pinned]})
