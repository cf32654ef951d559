"""The rules in force: reloaded when the file changes (or on SIGHUP); a bad file changes nothing."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

from node import logs
from node.route.rules import RuleSet, load_rules
from node.yamlfile import ConfigError

log = logging.getLogger("node.route")


class LiveRules:
    def __init__(self, path: Path, models: Callable[[], set[str]], destinations: set[str]):
        self.path = Path(path)
        self.models = models
        self.destinations = destinations
        self._lock = threading.Lock()
        self._digest = ""
        self._rules = load_rules(self.path, models(), destinations)  # start-up: a bad file is fatal
        self._digest = self._file_digest()
        logs.event(log, "routing_loaded", version=self._rules.version, rules=len(self._rules.file.rules))

    @property
    def current(self) -> RuleSet:
        with self._lock:
            return self._rules

    def _file_digest(self) -> str:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def check_for_changes(self) -> None:
        """Reload if the file's content changed (called periodically)."""
        if self._file_digest() != self._digest:
            self.reload()

    def install(self, rules: RuleSet, destinations: set[str]) -> None:
        """Put rules checked elsewhere in force, with the destinations they were checked against
        (node.liveconfig reloads node.yaml and the rules together)."""
        with self._lock:
            previous, self._rules, self.destinations = self._rules.version, rules, destinations
            self._digest = self._file_digest()
        if previous != rules.version:
            logs.event(log, "routing_reloaded", previous_version=previous, version=rules.version,
                       rules=len(rules.file.rules))

    def reload(self) -> bool:
        digest = self._file_digest()
        try:
            rules = load_rules(self.path, self.models(), self.destinations)
        except ConfigError as exc:
            self._digest = digest  # do not retry the same bad content every few seconds
            logs.event(log, "routing_reload_refused", logging.ERROR, file=str(self.path),
                       problems=[str(p) for p in exc.problems], version_in_force=self.current.version)
            return False
        with self._lock:
            previous, self._rules, self._digest = self._rules.version, rules, digest
        logs.event(log, "routing_reloaded", previous_version=previous, version=rules.version,
                   rules=len(rules.file.rules))
        return True
