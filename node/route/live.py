"""The rules in force, and what they are checked against (the models, the destinations).

Watching the rule file and reloading it is node.liveconfig's: it checks node.yaml and the
rules together (one watcher, one reload path, one outcome for the console, SIGHUP and the
poll) and puts checked rules in force here with `install`; a bad file changes nothing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from common import logs
from node.route.rules import RuleSet, load_rules

log = logging.getLogger("node.route")


class LiveRules:
    def __init__(self, path: Path, models: Callable[[], dict[str, list[int]]], destinations: set[str],
                 projects: set[str] | None = None):
        self.path = Path(path)
        self.models = models
        self.destinations = destinations
        self._lock = threading.Lock()
        self._rules = load_rules(self.path, models(), destinations, projects or set())  # start-up: a bad file is fatal
        logs.event(log, "routing_loaded", version=self._rules.version, rules=len(self._rules.file.rules))

    @property
    def current(self) -> RuleSet:
        with self._lock:
            return self._rules

    def install(self, rules: RuleSet, destinations: set[str]) -> None:
        """Put rules checked elsewhere in force, with the destinations they were checked against
        (node.liveconfig reloads node.yaml and the rules together)."""
        with self._lock:
            previous, self._rules, self.destinations = self._rules.version, rules, destinations
        if previous != rules.version:
            logs.event(log, "routing_reloaded", previous_version=previous, version=rules.version,
                       rules=len(rules.file.rules))
