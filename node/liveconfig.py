"""The configuration in force: node.yaml and its routing rules, checked and reloaded together.

Rules name destinations, so a rule file is only valid against a node.yaml. Both files are read
and checked by one function (`check`), used by `dicom-node config check` and by the running
node, so the two never disagree: a node.yaml change that adds a destination and a rule file
change that uses it are accepted together, and a bad change to either keeps both as they were.

Some keys apply at once (LIVE_KEYS); the others are read once at start (by the receiver
processes, the HTTP server, the model backends) and are reported as "needs a restart" by the
reload and by `config check`, which compares the file with the snapshot the node writes to
`<data_dir>/config-in-force.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import logs
from node.config import DEFAULT_CONFIG, NodeConfig, load_config
from node.route.live import LiveRules
from node.route.rules import RuleSet, load_rules
from common.yamlfile import ConfigError, Problem

log = logging.getLogger("node.config")

# Receiver settings: a reload starts new receiver processes with them, and the old ones finish
# their associations first (ReceiverPool.reconfigure). The listening socket (scp.bind,
# scp.port) and the number of receivers (scp.workers) need a restart.
RECEIVER_KEYS = tuple(f"scp.{key}" for key in (
    "ae_title", "ae_titles", "max_associations", "max_pdu", "max_pdu_cap", "max_instance_mb",
    "require_called_ae_title", "allowed_callers", "timeouts", "tls"))
# The completion settings receivers apply (the deadline, reopening, MPPS forwards); the others
# are read by the service when it checks a study.
RECEIVER_COMPLETION_KEYS = {"quiet_period_s", "quiet_period_by_calling_ae", "after_complete", "mpps_forward"}
# Key paths (and everything below them) that a reload applies without a restart.
LIVE_KEYS = (
    "destinations",
    "completion.quiet_period_s",
    "completion.quiet_period_by_calling_ae",
    "completion.after_complete",
    *(f"completion.{key}" for key in ("mpps_grace_s", "signals", "signals_by_calling_ae", "hl7_settle_s",
                                      "count_settle_s", "signal_keep_s", "mpps_forward")),
    "sending",
    "output",
    "inference.retry_initial_s",
    "inference.retry_max_s",
    "inference.retry_deadline_s",
    "pipeline.read_ahead_headers",
    "pipeline.interrupted_runs",
    "storage.retention",
    "storage.min_free_mb",
    "http.max_upload_mb",
    "audit.keep_days",
    "deidentification",
    *RECEIVER_KEYS,
)
SNAPSHOT = "config-in-force.json"
_SECRET = "http.token"


@dataclass
class Checked:
    """A node.yaml and the rules it names, as checked together."""

    config: NodeConfig | None
    rules: RuleSet | None
    rules_path: Path | None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(path: Path | None, overrides: dict[str, object] | None = None, rules_path: Path | None = None) -> Checked:
    """Load node.yaml (with command-line overrides) and check its rules against its destinations
    and the model repository it names. `rules_path` replaces the configured rule file."""
    from inference.repository import ModelRepository

    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        return Checked(None, None, None, list(exc.problems))
    rules_path = rules_path or config.pipeline.routing_file
    tls = _tls_problem(config, path)
    if tls is not None:  # a node.yaml problem, like a validation error
        return Checked(None, None, None, [tls])
    try:
        rules = load_rules(rules_path, ModelRepository(config.inference.model_repository).catalog(),
                           set(config.destinations), set(config.deidentification))
    except ConfigError as exc:
        return Checked(config, None, rules_path, list(exc.problems))
    return Checked(config, rules, rules_path)


def _tls_problem(config: NodeConfig, path: Path | None) -> Problem | None:
    """The receivers' certificate and key must load: a reload with ones that do not would leave
    no receiver able to start (and `config check` would have said OK)."""
    import ssl

    from node.receive.tls import server_ssl_context

    try:
        server_ssl_context(config)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Problem(str(path or DEFAULT_CONFIG), None, "scp.tls", f"the certificate or key cannot be loaded: {exc}")
    return None


def is_live(key: str) -> bool:
    return any(key == live or key.startswith(live + ".") for live in LIVE_KEYS)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two configuration dumps."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not path.startswith("destinations."):
            out += changed_keys(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out


def dump(config: NodeConfig) -> dict[str, Any]:
    """The configuration as JSON data, without its secrets (the HTTP token, the OIDC client secret,
    the index database's password)."""
    data = config.model_dump(mode="json")
    for section, key in (("http", "token"), ("oidc", "client_secret")):  # a change is still seen, the secret is not shown
        holder = data.get("http", {}) if section == "http" else (data.get("http", {}).get("oidc") or {})
        if holder.get(key):
            holder[key] = "sha256:" + hashlib.sha256(holder[key].encode()).hexdigest()[:12]
    storage = data.get("storage") or {}
    if storage.get("index_url"):
        from sqlalchemy.engine import make_url

        try:
            storage["index_url"] = make_url(storage["index_url"]).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: nothing of it is shown
            storage["index_url"] = "(hidden)"
    return data


def restart_needed(in_force: dict[str, Any], new: NodeConfig) -> list[str]:
    return [key for key in changed_keys(in_force, dump(new)) if not is_live(key)]


def apply_live(old: NodeConfig, new: NodeConfig) -> NodeConfig:
    """`old` with the live keys taken from `new`; everything else stays as started."""
    completion = old.completion.model_copy(update={
        key: getattr(new.completion, key) for key in (
            "quiet_period_s", "quiet_period_by_calling_ae", "after_complete", "mpps_grace_s", "signals",
            "signals_by_calling_ae", "hl7_settle_s", "count_settle_s", "signal_keep_s", "mpps_forward")})
    inference = old.inference.model_copy(update={
        key: getattr(new.inference, key) for key in ("retry_initial_s", "retry_max_s", "retry_deadline_s")})
    storage = old.storage.model_copy(update={"retention": new.storage.retention,
                                             "min_free_mb": new.storage.min_free_mb})
    scp = old.scp.model_copy(update={key.split(".", 1)[1]: getattr(new.scp, key.split(".", 1)[1])
                                     for key in RECEIVER_KEYS})
    return old.model_copy(update={"destinations": new.destinations, "deidentification": new.deidentification,
                                  "completion": completion, "audit": new.audit,
                                  "sending": new.sending, "output": new.output, "inference": inference,
                                  "storage": storage, "scp": scp})


def receivers_affected(old: NodeConfig, new: NodeConfig) -> bool:
    """Whether a change of the configuration in force needs new receiver processes."""
    return (old.scp != new.scp or old.storage.min_free_mb != new.storage.min_free_mb
            or old.completion.model_dump(include=RECEIVER_COMPLETION_KEYS)
            != new.completion.model_dump(include=RECEIVER_COMPLETION_KEYS))


def read_snapshot(data_dir: Path) -> dict[str, Any] | None:
    """What the running (or last) node wrote as its configuration in force."""
    try:
        return json.loads((Path(data_dir) / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ReloadOutcome:
    applied: bool
    problems: list[str]
    restart_needed: list[str]


class LiveConfig:
    """The node's configuration in force; `reload()` on file change (polled) or SIGHUP."""

    def __init__(self, config: NodeConfig, rules: LiveRules, path: Path | None = None,
                 overrides: dict[str, object] | None = None):
        self.path = Path(path) if path else DEFAULT_CONFIG
        self.watch_file = path is not None
        self.overrides = dict(overrides or {})
        self.rules = rules
        self._config = config
        self._started = dump(config)
        self._lock = threading.Lock()
        self._reloading = threading.Lock()
        self._listeners: list[Callable[[NodeConfig, NodeConfig], None]] = []
        self._digest = self._files_digest()
        self.restart_pending: list[str] = []
        self.last_reload: dict[str, Any] | None = None

    @property
    def current(self) -> NodeConfig:
        with self._lock:
            return self._config

    def on_change(self, listener: Callable[[NodeConfig, NodeConfig], None]) -> None:
        """`listener(old, new)` after a reload changed the configuration in force."""
        self._listeners.append(listener)

    def _files_digest(self) -> str:
        digest = hashlib.sha256()
        for path in ([self.path] if self.watch_file else []) + [self.rules.path]:
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"-")
        return digest.hexdigest()

    def check_for_changes(self) -> None:
        """Reload if node.yaml or the rule file changed (called every 2 s)."""
        if self._files_digest() != self._digest:
            self.reload()

    def reload(self) -> ReloadOutcome:
        with self._reloading:  # the 2 s poll and SIGHUP may ask at the same moment
            return self._reload()

    def _reload(self) -> ReloadOutcome:
        digest = self._files_digest()
        checked = check(self.path, self.overrides, self.rules.path) if self.watch_file else Checked(
            self.current, None, self.rules.path)
        if checked.ok and not self.watch_file:
            try:
                checked.rules = load_rules(self.rules.path, self.rules.models(), set(self.current.destinations),
                                           set(self.current.deidentification))
            except ConfigError as exc:
                checked.problems = list(exc.problems)
        self._digest = digest  # a bad file is reported once, not every poll
        if not checked.ok:
            problems = [str(p) for p in checked.problems]
            if checked.config is None:
                logs.event(log, "config_reload_refused", logging.ERROR, file=str(self.path), problems=problems,
                           version_in_force=self.rules.current.version)
            else:  # node.yaml is fine, its rules are not
                logs.event(log, "routing_reload_refused", logging.ERROR, file=str(self.rules.path),
                           problems=problems, version_in_force=self.rules.current.version)
            self.last_reload = {"at": time.time(), "applied": False, "problems": problems}
            return ReloadOutcome(False, problems, self.restart_pending)
        assert checked.config is not None and checked.rules is not None
        with self._lock:
            old = self._config
            self._config = apply_live(old, checked.config)
            new = self._config
        self.restart_pending = restart_needed(self._started, checked.config)
        previous = self.rules.current.version
        self.rules.install(checked.rules, set(new.destinations))
        for listener in self._listeners:
            listener(old, new)
        changed = changed_keys(dump(old), dump(new))
        logs.event(log, "config_reloaded", file=str(self.path), changed=changed,
                   restart_needed=self.restart_pending, previous_rules_version=previous,
                   rules_version=checked.rules.version, rules=len(checked.rules.file.rules))
        self.last_reload = {"at": time.time(), "applied": True, "changed": changed,
                            "restart_needed": self.restart_pending}
        self.write_snapshot()
        return ReloadOutcome(True, [], self.restart_pending)

    def write_snapshot(self) -> None:
        """The configuration as started (restart keys) for `config check` to compare with."""
        data_dir = Path(self.current.storage.data_dir)
        snapshot = {"file": str(self.path), "overrides": self.overrides, "started": self._started,
                    "in_force": dump(self.current), "rules_version": self.rules.current.version,
                    "restart_pending": self.restart_pending, "written_at": time.time()}
        target = data_dir / SNAPSHOT
        tmp = target.with_suffix(f".{os.getpid()}.tmp")  # replicas sharing data_dir write it too
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the node's account only
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(snapshot, indent=1))
        tmp.replace(target)
