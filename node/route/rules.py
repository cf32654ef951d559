"""Routing rules: which studies go to which models, on which series, with results to where.

Semantics (also in the README's rule reference):
- A rule matches a study when at least one series satisfies its `match` condition (the AE
  and peer tests apply to the study's sender). No `match`: every study.
- The series a rule's models get are the series that satisfy both `match` and
  `series.where`; `series.prefer` picks one of them. A rule that runs models but finds no
  such series does not match, and its explanation says so.
- `mode: first_match` applies the first matching rule, `all_matches` every one; when none
  matches, the `fallback` rule (if any) applies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inference.repository import REF_PATTERN, ModelRef
from node.config import OutputKind
from node.route.conditions import Condition, Context
from node.route.study import SeriesView, StudyView
from common.yamlfile import ConfigError, Problem, YamlDocument, load_yaml, validate

SENDER = "@sender"  # destination that means: the peer configured for the study's calling AE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Deidentify(_Strict):
    """A de-identified copy of the chosen series for a service outside (README, "De-identification")."""

    project: str = Field(description="a project of node.yaml's deidentification: its profile, options and key")
    send_to: list[str] = Field(min_length=1, description="destinations for the de-identified copy")
    results_to: list[str] = Field(default_factory=list, description=(
        "destinations of the results that come back, re-identified (@sender: the study's caller); none: the copy"
        " is sent one way"))
    results_within_minutes: float = Field(60.0, gt=0, description=(
        "the round trip's deadline: past it the console shows it timed out and an 'AI ran: failed' notice goes to"
        " results_to"))


class Actions(_Strict):
    run: list[Annotated[str, Field(pattern=REF_PATTERN)]] = Field(default_factory=list, description=(
        "models: a name runs its latest version, name@version pins one"))
    shadow: list[Annotated[str, Field(pattern=REF_PATTERN)]] = Field(default_factory=list, description=(
        "candidate versions (name@version of a model in run): run on the same series, results kept, never sent,"
        " compared with the live version"))
    outputs: list[OutputKind] = Field(default_factory=lambda: ["SEG", "SR"])
    send_to: list[str] = Field(default_factory=list, description="destinations for results; @sender = back to the caller")
    forward_to: list[str] = Field(default_factory=list, description="destinations that get the original study unchanged")
    discard: bool = False
    notices: bool = Field(True, description="send an SR saying the AI ran when the job fails or finds nothing")
    deidentify: Deidentify | None = None

    @model_validator(mode="after")
    def _something(self) -> "Actions":
        if self.discard and (self.run or self.forward_to or self.deidentify):
            raise ValueError("discard cannot be combined with run, forward_to or deidentify")
        if not (self.run or self.forward_to or self.discard or self.deidentify):
            raise ValueError("a rule needs an action: run, forward_to, deidentify or discard")
        if self.run and not self.send_to:
            raise ValueError("run needs send_to (where the results go)")
        live = {ModelRef.parse(m).name for m in self.run}
        for candidate in map(ModelRef.parse, self.shadow):
            if candidate.name not in live or candidate.version is None:
                raise ValueError(f"shadow {candidate}: a shadow run is a pinned version (name@version) of a model"
                                 " this rule runs")
            if str(candidate) in self.run:
                raise ValueError(f"shadow {candidate}: this rule runs it live already")
        return self


class SeriesSelector(_Strict):
    where: Condition | None = None
    prefer: Literal["most_instances", "thinnest_slices", "lowest_series_number", "highest_series_number"] = "most_instances"

    def pick(self, candidates: list[SeriesView]) -> SeriesView:
        def number(s: SeriesView) -> float:
            value = s.tags.get("SeriesNumber")
            return float(value) if value is not None else float("inf")

        def thickness(s: SeriesView) -> float:
            value = s.tags.get("SliceThickness")
            return float(value) if value is not None else float("inf")

        keys = {
            "most_instances": lambda s: (-s.instance_count, number(s), s.series_uid),
            "thinnest_slices": lambda s: (thickness(s), -s.instance_count, s.series_uid),
            "lowest_series_number": lambda s: (number(s), s.series_uid),
            "highest_series_number": lambda s: (-number(s) if number(s) != float("inf") else float("inf"), s.series_uid),
        }
        return min(candidates, key=keys[self.prefer])


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=64)
    enabled: bool = True
    match: Condition | None = None
    series: SeriesSelector = Field(default_factory=SeriesSelector)
    actions: Actions
    priority: int = Field(0, description="higher runs first when studies queue up")
    quiet_period_s: float | None = Field(None, gt=0, description="overrides the study's quiet period")


class RoutingFile(_Strict):
    mode: Literal["first_match", "all_matches"] = "first_match"
    rules: list[Rule] = Field(default_factory=list)
    fallback: Rule | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> "RoutingFile":
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return self

    def model_uses(self, latest: Callable[[str], int | None]) -> dict[str, list[str]]:
        """{"model@version": ["rule (live)", "rule (shadow)", ...]}, a model named without a version
        counted for its latest (`latest(name)`, None when the repository has none)."""
        uses: dict[str, list[str]] = {}
        for rule in self.rules + ([self.fallback] if self.fallback else []):
            for kind, refs in (("live", rule.actions.run), ("shadow", rule.actions.shadow)):
                for ref in map(ModelRef.parse, refs):
                    version = ref.version or latest(ref.name)
                    if version is not None:
                        uses.setdefault(f"{ref.name}@{version}", []).append(
                            f"{rule.name} ({kind}{', latest' if ref.version is None else ''}"
                            f"{', disabled' if not rule.enabled else ''})")
        return uses


@dataclass
class Outcome:
    rule: str
    matched: bool
    reason: str
    series: SeriesView | None = None
    applied: bool = False
    evaluated: bool = True  # False: disabled, or not reached (first_match already applied)

    @property
    def mark(self) -> str:
        return "APPLIED" if self.applied else "matched" if self.matched else "no match" if self.evaluated else "skipped"


@dataclass
class Decision:
    version: str
    mode: str
    outcomes: list[Outcome]
    applied: list[tuple[Rule, SeriesView | None]] = field(default_factory=list)

    @property
    def priority(self) -> int:
        return max((rule.priority for rule, _ in self.applied), default=0)

    @property
    def sends_to_sender(self) -> bool:
        """Whether an applied rule sends results to @sender (explain warns when it names no one)."""
        return any(SENDER in rule.actions.send_to or (rule.actions.deidentify and SENDER in
                                                       rule.actions.deidentify.results_to)
                   for rule, _ in self.applied)

    def explain(self, sender_warning: str | None = None) -> str:
        """`sender_warning`: the configuration's word on @sender for this caller (NodeConfig.sender_warning)."""
        lines = [f"rules version {self.version} ({self.mode})"]
        for o in self.outcomes:
            lines.append(f"  [{o.mark:8}] {o.rule}: {o.reason}")
        if not self.applied:
            lines.append("  => no rule applies: the study is not processed")
        for rule, series in self.applied:
            actions = rule.actions
            if actions.discard:
                lines.append(f"  => {rule.name}: discard")
            if actions.run and series is not None:
                lines.append(f"  => {rule.name}: run {', '.join(actions.run)} on {series.label()}, "
                             f"{'+'.join(actions.outputs)} to {', '.join(actions.send_to)}")
            if actions.forward_to:
                lines.append(f"  => {rule.name}: forward the study to {', '.join(actions.forward_to)}")
            if actions.deidentify and series is not None:
                lines.append(f"  => {rule.name}: {series.label()} de-identified for project"
                             f" {actions.deidentify.project} to {', '.join(actions.deidentify.send_to)}")
        if sender_warning and self.sends_to_sender:
            lines.append(f"  {sender_warning}")
        return "\n".join(lines)


class RuleSet:
    def __init__(self, rules: RoutingFile, version: str):
        self.file = rules
        self.version = version

    def quiet_period_for(self, study: StudyView) -> float | None:
        """The quiet period of the rule that would apply now (None: the node's default)."""
        decision = self.evaluate(study)
        periods = [rule.quiet_period_s for rule, _ in decision.applied if rule.quiet_period_s]
        return max(periods) if periods else None

    def evaluate(self, study: StudyView) -> Decision:
        decision = Decision(self.version, self.file.mode, [])
        for rule in self.file.rules:
            if not rule.enabled:
                decision.outcomes.append(Outcome(rule.name, False, "disabled", evaluated=False))
                continue
            if decision.applied and self.file.mode == "first_match":
                decision.outcomes.append(Outcome(rule.name, False, "not evaluated (an earlier rule applied)",
                                                 evaluated=False))
                continue
            outcome = _evaluate(rule, study)
            decision.outcomes.append(outcome)
            if outcome.matched:
                outcome.applied = True
                decision.applied.append((rule, outcome.series))
        if not decision.applied and self.file.fallback is not None:
            outcome = _evaluate(self.file.fallback, study)
            outcome.rule = f"{self.file.fallback.name} (fallback)"
            decision.outcomes.append(outcome)
            if outcome.matched:
                outcome.applied = True
                decision.applied.append((self.file.fallback, outcome.series))
        return decision


def _evaluate(rule: Rule, study: StudyView) -> Outcome:
    if not study.series:
        return Outcome(rule.name, False, "the study has no series")
    matching, misses = [], []
    for series in study.series:
        ok, why = rule.match.test(Context(study, series)) if rule.match else (True, "no match condition")
        (matching if ok else misses).append((series, why))
    if not matching:
        detail = "; ".join(f"{s.label()}: {why}" for s, why in misses[:4])
        return Outcome(rule.name, False, f"no series matches ({detail})")
    reason = f"{matching[0][0].label()} matches: {matching[0][1]}"
    if not (rule.actions.run or rule.actions.deidentify):  # no series to choose
        return Outcome(rule.name, True, reason)
    candidates, rejected = [], []
    for series, _ in matching:
        ok, why = rule.series.where.test(Context(study, series)) if rule.series.where else (True, "")
        (candidates if ok else rejected).append((series, why))
    if not candidates:
        detail = "; ".join(f"{s.label()}: {why}" for s, why in rejected[:4])
        return Outcome(rule.name, False, f"study matches but no series qualifies for the models ({detail})")
    chosen = rule.series.pick([s for s, _ in candidates])
    others = len(candidates) - 1
    reason += f"; models get {chosen.label()}" + (f" (prefer {rule.series.prefer} over {others} other)" if others else "")
    return Outcome(rule.name, True, reason, chosen)


def load_rules(path: Path, models: dict[str, list[int]] | None = None, destinations: set[str] | None = None,
               projects: set[str] | None = None) -> RuleSet:
    """Load and check a rule file against the models, destinations and de-identification
    projects there are; every problem is reported with file, line and key path."""
    doc = load_yaml(path)
    rules = validate(doc, RoutingFile)
    problems = _check_references(doc, rules, models, destinations, projects)
    if problems:
        raise ConfigError(problems)
    version = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return RuleSet(rules, version)


def _check_references(doc: YamlDocument, rules: RoutingFile, models: dict[str, list[int]] | None,
                      destinations: set[str] | None, projects: set[str] | None) -> list[Problem]:
    problems = []
    entries = [(("rules", i), rule) for i, rule in enumerate(rules.rules)]
    if rules.fallback:
        entries.append((("fallback",), rules.fallback))
    for prefix, rule in entries:
        actions = rule.actions
        if models is not None:
            named_models = [("run", j, m) for j, m in enumerate(actions.run)]
            named_models += [("shadow", j, m) for j, m in enumerate(actions.shadow)]
            for key, j, text in named_models:
                ref = ModelRef.parse(text)
                if ref.name not in models:
                    problems.append(doc.problem(prefix + ("actions", key, j),
                                                f"unknown model {ref.name!r} (repository has: {', '.join(sorted(models)) or 'none'})"))
                elif ref.version is not None and ref.version not in models[ref.name]:
                    problems.append(doc.problem(prefix + ("actions", key, j), f"model {ref.name} has no version"
                                                f" {ref.version} (it has {', '.join(map(str, models[ref.name]))})"))
        if destinations is not None:
            named = [(("send_to", j), n) for j, n in enumerate(actions.send_to)]
            named += [(("forward_to", j), n) for j, n in enumerate(actions.forward_to)]
            if actions.deidentify is not None:  # the copy never back to the sender: it has the source
                named += [(("deidentify", "send_to", j), n) for j, n in enumerate(actions.deidentify.send_to)]
                named += [(("deidentify", "results_to", j), n) for j, n in enumerate(actions.deidentify.results_to)]
            for where, name in named:
                if (name != SENDER or where[:2] == ("deidentify", "send_to")) and name not in destinations:
                    problems.append(doc.problem(prefix + ("actions", *where),
                                                f"unknown destination {name!r} (configured: {', '.join(sorted(destinations)) or 'none'})"))
        if projects is not None and actions.deidentify is not None and actions.deidentify.project not in projects:
            problems.append(doc.problem(prefix + ("actions", "deidentify", "project"),
                                        f"unknown de-identification project {actions.deidentify.project!r}"
                                        f" (configured: {', '.join(sorted(projects)) or 'none'})"))
    return problems
