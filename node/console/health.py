"""Liveness and readiness: can this node take studies and process them right now?

Ready means: the receiver processes are up, the index takes writes, the data folder's disk is
above `storage.min_free_mb` (below it every C-STORE is answered 0xA700), and every model the
rules in force run is loadable (its file, or Triton says the model is ready). Each failing
check gives a reason; the HTTP answer is 503 with those reasons.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from node.console.context import ConsoleContext

MODEL_CACHE_S = 10.0
PROBE_TIMEOUT_S = 3.0


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
        self._lock = threading.Lock()

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
            if model["name"] in used:
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

    def _models_in_rules(self) -> set[str]:
        rules = self.ctx.rules.file
        entries = list(rules.rules) + ([rules.fallback] if rules.fallback else [])
        return {m for rule in entries if rule.enabled for m in rule.actions.run}

    def models(self) -> list[dict[str, Any]]:
        """Every model in the repository with its backend's status (cached for a few seconds)."""
        with self._lock:
            if self._models and time.monotonic() - self._models[0] < MODEL_CACHE_S:
                return self._models[1]
        used = self._models_in_rules()
        triton = self.ctx.config.inference.triton
        out = []
        for name in sorted(self.ctx.models.names()):
            if triton.servers:
                status = _pool_status([_triton_status(url, triton.protocol, name) for url in triton.servers])
                backend = f"triton {', '.join(triton.servers)}"
            else:
                status, backend = self._local_status(name), "local (ONNX Runtime)"
            out.append({"name": name, "backend": backend, "status": status, "used_by_rules": name in used})
        with self._lock:
            self._models = (time.monotonic(), out)
        return out

    def _local_status(self, name: str) -> str:
        from inference.spec import model_file
        from common.yamlfile import ConfigError

        try:
            model_file(self.ctx.models.root, self.ctx.models.spec(name))
        except ConfigError as exc:
            return "; ".join(p.message for p in exc.problems)
        except Exception as exc:  # a broken spec: say which kind of problem, not a traceback
            return f"spec not usable: {type(exc).__name__}"
        return "ready"


def _pool_status(statuses: list[str]) -> str:
    """'ready' when one server is (the pool runs on it; /metrics shows which servers are down)."""
    if "ready" in statuses:
        return "ready"
    return statuses[0] if len(statuses) == 1 else f"not ready on any of {len(statuses)} Triton servers ({statuses[0]})"


def _triton_status(url: str, protocol: str, name: str) -> str:
    try:
        if protocol == "http":
            import tritonclient.http as client

            triton = client.InferenceServerClient(url, connection_timeout=PROBE_TIMEOUT_S,
                                                  network_timeout=PROBE_TIMEOUT_S)
            ready = triton.is_model_ready(name)
        else:
            import tritonclient.grpc as client  # type: ignore[no-redef]

            triton = client.InferenceServerClient(url)
            try:
                ready = triton.is_model_ready(name, client_timeout=PROBE_TIMEOUT_S)
            finally:
                triton.close()
    except Exception as exc:  # unreachable, refused, timed out: the node will wait and retry jobs
        return f"Triton not reachable ({type(exc).__name__})"
    return "ready" if ready else "not ready on Triton"
