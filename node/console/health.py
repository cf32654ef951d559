"""Liveness and readiness: can this node take studies and process them right now?

Ready means: the receiver processes are up, the index takes writes, the data folder's disk is
above `storage.min_free_mb` (below it every C-STORE is answered 0xA700), and every model the
rules in force run is loadable (its file, or Triton says the model is ready). Each failing
check gives a reason; the HTTP answer is 503 with those reasons.

The models' status is cached: probe results are reused for `MODEL_CACHE_S`, so scrapes, probes
and dashboards in between never reach the servers. After that, an answer still uses the last
result (up to `MODEL_STALE_S` old) while one background probe refreshes it, so a server that
hangs never slows `/health/ready` down; only the first call (or one after a long quiet spell)
waits for a probe. A probe asks every Triton server at once, one thread per server, each call
bounded by `PROBE_TIMEOUT_S`: one server down costs at most that, never its sum over the pool.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from typing import Any

from node.console.context import ConsoleContext

MODEL_CACHE_S = 3.0  # a probe's result is fresh this long: callers in between reuse it
MODEL_STALE_S = 30.0  # up to this old it is still answered at once (while a background probe runs)
PROBE_TIMEOUT_S = 1.0  # per Triton call (connection included); the servers are probed in parallel


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: list[str]
    checks: dict[str, bool]

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "reasons": self.reasons, "checks": self.checks}


class Health:
    def __init__(self, ctx: ConsoleContext):
        self.ctx = ctx
        self._models: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()  # guards _models and _refreshing
        self._probing = threading.Lock()  # one probe at a time; callers without a usable result wait for it
        self._refreshing = False

    def ready(self, models: bool = True) -> Readiness:
        """Whether the node can take and process studies; without `models`, whether it can take
        them (a load balancer's question: receiving must not stop while Triton is down, the jobs
        wait for it)."""
        reasons: list[str] = []
        checks: dict[str, bool] = {}

        def check(name: str, ok: bool, reason: str) -> None:
            checks[name] = ok
            if not ok:
                reasons.append(reason)

        check("receiver", self.ctx.receivers_alive(), "receiver down: no receiver process is running")
        index_error = self._index_writable()
        check("index", index_error is None, f"index not writable: {index_error}")
        free = self._free_bytes()
        watermark = self.ctx.spool.min_free_bytes
        check("disk", free >= watermark,
              f"disk under the watermark: {free / 1e6:.0f} MB free, storage.min_free_mb is {watermark / 1048576:g}")
        used = self._models_in_rules() if models else set()
        for model in self.models() if used else ():
            if model["name"] in used:  # a reference as the rules write it: name (latest) or name@version
                check(f"model:{model['name']}", model["status"] == "ready",
                      f"model {model['name']} unavailable ({model['backend']}): {model['status']}")
        return Readiness(not reasons, reasons, checks)

    def _free_bytes(self) -> int:
        st = os.statvfs(self.ctx.data_dir)
        return st.f_bavail * st.f_frsize

    def _index_writable(self) -> str | None:
        """Take the write lock for a moment (a stuck writer or a lost database shows here)."""
        path = self.ctx.index.path
        if path is not None and not os.access(path, os.W_OK):
            return "the file is read-only"
        return self.ctx.index.check_writable()

    def _models_in_rules(self, shadow: bool = False) -> set[str]:
        """The models enabled rules run; `shadow`: their candidate versions, shown with a status but
        never a reason for the node not to be ready (a failed shadow run fails nothing)."""
        rules = self.ctx.rules.file
        entries = list(rules.rules) + ([rules.fallback] if rules.fallback else [])
        return {m for rule in entries if rule.enabled for m in (rule.actions.shadow if shadow else rule.actions.run)}

    def models(self) -> list[dict[str, Any]]:
        """Every model in the repository with its backend's status (cached, see the module's doc)."""
        with self._lock:
            if self._models is not None:
                age = time.monotonic() - self._models[0]
                if age < MODEL_CACHE_S:
                    return self._models[1]
                if age < MODEL_STALE_S:
                    if not self._refreshing:
                        self._refreshing = True
                        threading.Thread(target=self._refresh_in_background, name="health-probe",
                                         daemon=True).start()
                    return self._models[1]
        with self._probing:  # no usable result: probe now (concurrent callers share this probe)
            with self._lock:
                if self._models and time.monotonic() - self._models[0] < MODEL_CACHE_S:
                    return self._models[1]
            return self._refresh()

    def _refresh_in_background(self) -> None:
        try:
            with self._probing:
                self._refresh()
        finally:
            with self._lock:
                self._refreshing = False

    def _refresh(self) -> list[dict[str, Any]]:
        out = self._probe()
        with self._lock:
            self._models = (time.monotonic(), out)
        return out

    def _probe(self) -> list[dict[str, Any]]:
        used = self._models_in_rules() | self._models_in_rules(shadow=True)
        refs = sorted(self.ctx.models.names() | used)  # each model's latest, and the versions rules pin
        versions: dict[str, tuple[str, str]] = {}  # ref -> (name, version) on Triton
        problems: dict[str, str] = {}
        for ref in refs:
            try:
                spec = self.ctx.models.spec(ref)
                versions[ref] = (spec.name, str(spec.version))
            except Exception as exc:  # a broken spec: say what, not a traceback
                problems[ref] = _problem(exc)
        triton = self.ctx.config.inference.triton
        servers = triton.servers
        by_server = _probe_servers(servers, triton.protocol, versions) if servers and versions else {}
        out = []
        for ref in refs:
            version = versions[ref][1] if ref in versions else None
            if ref in problems:
                status = problems[ref]
            elif servers:
                status = _pool_status([by_server[url][ref] for url in servers])
            else:
                status = self._local_status(ref)
            out.append({"name": ref, "version": version, "status": status, "used_by_rules": ref in used,
                        "backend": f"triton {', '.join(servers)}" if servers else "local (ONNX Runtime)"})
        return out

    def _local_status(self, ref: str) -> str:
        try:
            self.ctx.models.verified_file(self.ctx.models.spec(ref))
        except Exception as exc:
            return _problem(exc)
        return "ready"


def _problem(exc: Exception) -> str:
    from common.yamlfile import ConfigError

    if isinstance(exc, ConfigError):
        return "; ".join(p.message for p in exc.problems)
    return f"spec not usable: {type(exc).__name__}"


def _pool_status(statuses: list[str]) -> str:
    """'ready' when one server is (the pool runs on it; /metrics shows which servers are down)."""
    if "ready" in statuses:
        return "ready"
    return statuses[0] if len(statuses) == 1 else f"not ready on any of {len(statuses)} Triton servers ({statuses[0]})"


def _probe_servers(servers: list[str], protocol: str, names: dict[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """{server: {model reference: status}} for {reference: (name, version)}, every server asked at
    the same time (one thread each)."""
    pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="triton-probe")
    try:
        futures = {url: pool.submit(_server_status, url, protocol, names) for url in servers}
        # each call is bounded by PROBE_TIMEOUT_S; this bound is the backstop for a stuck client
        wait_all(futures.values(), timeout=PROBE_TIMEOUT_S * (len(names) + 2))
        return {url: future.result() if future.done() else dict.fromkeys(names, "Triton not reachable (probe "
                                                                          "timed out)")
                for url, future in futures.items()}
    finally:
        pool.shutdown(wait=False)


_GONE = ("unavailable", "deadline", "timed out", "timeout", "failed to connect", "connection refused",
         "connection reset", "socket closed", "broken pipe")


def _gone(exc: Exception) -> bool:
    """The server, not the model: no answer, refused, or the time is up."""
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket.timeout
        return True
    status = getattr(exc, "status", None)
    text = f"{status() if callable(status) else ''} {exc}".lower()
    return any(marker in text for marker in _GONE)


def _server_status(url: str, protocol: str, names: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Each model's readiness on one server, over one connection; a server that cannot be reached
    is asked once, not once per model."""
    try:
        if protocol == "http":
            import tritonclient.http as client

            triton: Any = client.InferenceServerClient(url, connection_timeout=PROBE_TIMEOUT_S,
                                                       network_timeout=PROBE_TIMEOUT_S)
            ask = triton.is_model_ready
        else:
            import tritonclient.grpc as client  # type: ignore[no-redef]

            triton = client.InferenceServerClient(url)
            ask = lambda name, version: triton.is_model_ready(name, version,  # noqa: E731
                                                              client_timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # a malformed address
        return dict.fromkeys(names, f"Triton not reachable ({type(exc).__name__})")
    out: dict[str, str] = {}
    try:
        for name in names:
            try:
                out[name] = "ready" if ask(*names[name]) else "not ready on Triton"
            except Exception as exc:  # unreachable, refused, timed out: the node will wait and retry jobs
                out[name] = f"Triton not reachable ({type(exc).__name__})"
                if _gone(exc):  # the others would only wait for the same timeout
                    return {**out, **{n: out[name] for n in names if n not in out}}
        return out
    finally:
        try:
            triton.close()
        except Exception:  # closing a connection to a server that is gone
            pass
