"""The console's HTTP server: FastAPI on uvicorn, in a thread of the service process.

A thread, not a process: the pages show the service's own objects (the configuration and rules
in force, the receivers' health, the model backends) without another channel to keep in sync.
The handlers only read the index (SQLite WAL: readers never block the receivers) or call the
same functions the CLI calls. No torch or MONAI import is reachable from here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common import logs
from node.console import api, dicomweb, pages, summary, wado
from node.console.auth import require_view
from node.console.context import ConsoleContext
from node.console.health import Health
from node.console.limits import MB, BodyLimit, BodyTooLarge
from node.console.metrics import registry_for

log = logging.getLogger("node.console")


def create_app(ctx: ConsoleContext) -> FastAPI:
    # No /docs: Swagger UI loads from a CDN. The schema itself is at /openapi.json.
    app = FastAPI(title="dicom-node console", version="1", docs_url=None, redoc_url=None,
                  description="Operator console of the DICOM analysis node: studies, jobs, outbox, "
                              "destinations, rules, health and metrics. Calls need a role (viewer, operator, "
                              "admin): an API token of an account or the identity provider's JWT as "
                              "`Authorization: Bearer`, or a session (X-CSRF-Token on writes).")
    health = Health(ctx)
    registry = registry_for(ctx)
    app.state.ctx = ctx
    app.state.health = health

    def live_summary() -> dict[str, Any]:
        # read once: a reload the file watcher decides meanwhile shows in both places or in neither
        last_reload = ctx.live.last_reload
        data = summary.dashboard(ctx.index, ctx.jobs, ctx.retention, ctx.config)
        data["attention"] = summary.attention(ctx.index, ctx.data_dir, last_reload,
                                              monitoring=ctx.config.inference.monitoring)
        readiness = health.ready()
        data["live"] = {
            "ready": readiness.as_dict(), "rules_version": ctx.rules.version, "rules": len(ctx.rules.file.rules),
            "restart_pending": ctx.live.restart_pending, "last_reload": last_reload,
            "models": health.models(), "uptime_s": round(time.time() - ctx.started_at, 1),
            "scp_port": ctx.scp_port,
        }
        return data

    app.state.live_summary = live_summary

    @app.get("/health/live", tags=["health"], summary="The HTTP server answers (the process is up)")
    def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/health/ready", tags=["health"],
             summary="200 when the node can take and process studies; 503 with the reasons otherwise")
    def ready() -> JSONResponse:
        readiness = health.ready()
        return JSONResponse(readiness.as_dict(), status_code=200 if readiness.ready else 503)

    @app.get("/health/receiving", tags=["health"],
             summary="200 when the node can take studies (receivers, index, disk; models not asked): "
                     "for load balancers in front of replicas; 503 with the reasons otherwise")
    def receiving() -> JSONResponse:
        readiness = health.ready(models=False)
        return JSONResponse(readiness.as_dict(), status_code=200 if readiness.ready else 503)

    @app.get("/metrics", tags=["metrics"], dependencies=[Depends(require_view)],
             summary="Prometheus metrics (text exposition format); a viewer's API token once accounts exist")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router, tags=["api"])
    app.include_router(dicomweb.router)
    app.include_router(wado.router)
    app.include_router(pages.router, include_in_schema=False)
    app.include_router(pages.login_router, include_in_schema=False)
    app.exception_handler(pages.PageError)(pages.page_error)
    app.exception_handler(BodyTooLarge)(too_large)
    def body_limit(path: str) -> tuple[int, str]:
        if path.startswith("/dicomweb/"):
            return int(ctx.config.http.max_stow_mb * MB), "http.max_stow_mb"
        return int(ctx.config.http.max_upload_mb * MB), "http.max_upload_mb"

    app.add_middleware(BodyLimit, limit=body_limit, refuse=too_large)
    return app


_JSON_PATHS = ("/api/", "/health/", "/metrics", "/openapi.json", "/dicomweb/")


async def too_large(request: Request, exc: Exception) -> Response:
    """413 for a body past http.max_upload_mb: JSON for the API, the error page for the pages."""
    assert isinstance(exc, BodyTooLarge)
    if request.url.path.startswith(_JSON_PATHS):
        return JSONResponse({"detail": exc.detail}, 413, headers=exc.headers)
    response = pages.render(request, "error.html", {"status": 413, "message": exc.detail}, 413)
    response.headers.update(exc.headers or {})
    return response


class HttpServer:
    """uvicorn in a daemon thread on a bound socket; `start` returns once it serves (or raises)."""

    def __init__(self, ctx: ConsoleContext, bound: socket.socket):
        self._socket = bound
        http = ctx.config.http
        self.app = create_app(ctx)
        tls = {"ssl_certfile": str(http.tls.certificate), "ssl_keyfile": str(http.tls.private_key)} \
            if http.tls.certificate else {}
        self.config = uvicorn.Config(self.app, host=http.bind, port=http.port, log_config=None,
                                     access_log=False, lifespan="off", **tls)
        self.server = uvicorn.Server(self.config)
        self.scheme = "https" if tls else "http"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise OSError(f"the console could not listen on {self.config.host}:{self.config.port}"
                              + (f": {self._error}" if self._error else ""))
            if time.monotonic() > deadline:
                raise OSError("the console did not start in time")
            time.sleep(0.02)
        http = self.app.state.ctx.config.http
        logs.event(log, "http_started", url=f"{self.scheme}://{self.config.host}:{self.config.port}",
                   token=bool(http.effective_token()), oidc=http.oidc is not None)
        if http.effective_token():
            logs.event(log, "http_token_deprecated", logging.WARNING,
                       message="http.token is a shared admin credential, removed in the next release: use accounts "
                               "(dicom-node users add) and their API tokens (dicom-node users token)")

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._socket]))
        except BaseException as exc:  # SystemExit when uvicorn cannot bind
            self._error = exc

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
