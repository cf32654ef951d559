"""Server-rendered pages (Jinja2, autoescaped; inline CSS, no scripts from anywhere else).

Actions are plain HTML forms that POST and redirect back with a one-line message, so every page
works without JavaScript. The token for actions is asked once (/login) and kept in a cookie.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from node.console import actions, summary
from node.console.api import rules_report
from node.console.auth import COOKIE, require_read, token_ok
from node.console.context import ConsoleContext
from node.console.limits import FORM_LIMITS, one_at_a_time

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["when"] = summary.when
templates.env.filters["mb"] = summary.megabytes
templates.env.filters["seconds"] = lambda v: f"{v:.2f} s" if v is not None else "-"

router = APIRouter(dependencies=[Depends(require_read)])
PAGE_ROWS = 500  # newest first; the API lists everything


class PageError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    if exc.status == 401:
        return RedirectResponse("/login?" + urlencode({"next": request.url.path, "msg": exc.message}), 303)
    return render(request, "error.html", {"status": exc.status, "message": exc.message}, exc.status)


def ctx_of(request: Request) -> ConsoleContext:
    return request.app.state.ctx


def render(request: Request, template: str, values: dict[str, Any], status: int = 200) -> HTMLResponse:
    ctx = ctx_of(request)
    values = {"request": request, "ae_title": ctx.config.scp.ae_title, "msg": request.query_params.get("msg"),
              "ok": request.query_params.get("ok") == "1", "can_act": token_ok(request),
              "writable": bool(ctx.config.http.effective_token()), **values}
    return templates.TemplateResponse(request, template, values, status_code=status)


def back(path: str, message: str, ok: bool) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({'msg': message, 'ok': '1' if ok else '0'})}", 303)


def writer(request: Request) -> None:
    """Pages' version of require_write: a login page instead of a bare 401."""
    if not ctx_of(request).config.http.effective_token():
        raise PageError(403, "The console is read-only: set http.token or DICOM_NODE_HTTP_TOKEN to allow actions.")
    if not token_ok(request):
        raise PageError(401, "This action needs the console token.")


def act(path: str, call: Any, *args: Any) -> RedirectResponse:
    try:
        return back(path, call(*args), True)
    except actions.ActionError as exc:
        return back(path, exc.message, False)


# -- pages -------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    ctx = ctx_of(request)
    data = request.app.state.live_summary()
    recent = summary.studies(ctx.index, ctx.config.http.show_descriptions, limit=15)
    return render(request, "dashboard.html", {"s": data, "recent": recent, "page": "dashboard"})


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request) -> HTMLResponse:
    ctx = ctx_of(request)
    rows = summary.studies(ctx.index, ctx.config.http.show_descriptions)
    return render(request, "studies.html", {"studies": rows, "page": "studies"})


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(request: Request, study_uid: str) -> HTMLResponse:
    ctx = ctx_of(request)
    found = summary.study(ctx.index, ctx.jobs, ctx.retention, study_uid, ctx.config.http.show_descriptions)
    if found is None:
        raise PageError(404, f"No study {study_uid} here.")
    if found["explanation"] is None and found["series"]:
        found["explanation"] = actions.explain_study(ctx, study_uid).explanation
        found["explanation_live"] = True
    return render(request, "study.html", {"d": found, "page": "studies"})


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    rows = [summary.job_row(j) for j in reversed(ctx_of(request).jobs.all_jobs())]
    return render(request, "jobs.html", {"jobs": rows[:PAGE_ROWS], "more": max(0, len(rows) - PAGE_ROWS),
                                         "page": "jobs"})


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(writer)])
def retry_job(request: Request, job_id: int) -> RedirectResponse:
    return act("/jobs", actions.retry_job, ctx_of(request), job_id)


@router.get("/outbox", response_class=HTMLResponse)
def outbox(request: Request) -> HTMLResponse:
    rows = list(reversed(summary.deliveries(ctx_of(request).index)))
    return render(request, "outbox.html", {"items": rows[:PAGE_ROWS], "more": max(0, len(rows) - PAGE_ROWS),
                                           "page": "outbox"})


@router.post("/outbox/{item_id}/retry", dependencies=[Depends(writer)])
def retry_delivery(request: Request, item_id: int) -> RedirectResponse:
    return act("/outbox", actions.retry_delivery, ctx_of(request), item_id)


@router.get("/destinations", response_class=HTMLResponse)
def destinations(request: Request) -> HTMLResponse:
    ctx = ctx_of(request)
    return render(request, "destinations.html",
                  {"destinations": sorted(ctx.config.destinations.items()), "page": "destinations"})


@router.post("/destinations/{name}/echo", dependencies=[Depends(writer)])
def echo(request: Request, name: str) -> RedirectResponse:
    try:
        result = actions.echo_destination(ctx_of(request), name)
    except actions.ActionError as exc:
        return back("/destinations", exc.message, False)
    return back("/destinations", f"C-ECHO {name}: {result.message} ({result.seconds:.2f} s)", result.ok)


@router.get("/rules", response_class=HTMLResponse)
def rules(request: Request) -> HTMLResponse:
    return _rules_page(request, None)


def _rules_page(request: Request, explained: list[actions.Explained] | None, error: str | None = None) -> HTMLResponse:
    ctx = ctx_of(request)
    report = rules_report(ctx)
    text = yaml.safe_dump({"mode": report["mode"], "rules": report["rules"],
                           **({"fallback": report["fallback"]} if report["fallback"] else {})}, sort_keys=False)
    recent = summary.studies(ctx.index, limit=50)
    return render(request, "rules.html", {"r": report, "rules_text": text, "explained": explained,
                                          "error": error, "recent": recent, "page": "rules"})


@router.post("/rules/explain", response_class=HTMLResponse, form_limits=FORM_LIMITS)
async def explain(request: Request, files: list[UploadFile] = File(default=[]), study_uid: str = Form(""),
                  calling_ae: str = Form(""), peer: str = Form("")) -> HTMLResponse:
    ctx = ctx_of(request)
    chosen = [f for f in files if f.filename]  # spooled temporary files (the body is bounded: node.console.limits)
    uploads = one_at_a_time(chosen)  # read one at a time in the worker thread below

    def explain_now() -> HTMLResponse:  # in a worker thread: reading DICOM files must not stall the server
        try:
            if chosen:
                result = actions.explain_files(ctx, uploads, calling_ae.strip(), "", peer.strip())
            elif study_uid.strip():
                result = [actions.explain_study(ctx, study_uid.strip())]
            else:
                raise actions.ActionError(422, "choose DICOM files or a received study")
        except actions.ActionError as exc:
            return _rules_page(request, None, exc.message)
        return _rules_page(request, result)

    return await run_in_threadpool(explain_now)


@router.post("/config/reload", dependencies=[Depends(writer)])
def reload(request: Request) -> RedirectResponse:
    outcome = ctx_of(request).live.reload()
    if not outcome.applied:
        return back("/rules", "reload refused: " + "; ".join(outcome.problems), False)
    pending = f"; needs a restart: {', '.join(outcome.restart_needed)}" if outcome.restart_needed else ""
    return back("/rules", "configuration reloaded" + pending, True)


@router.post("/retention/run", dependencies=[Depends(writer)])
def retention_run(request: Request) -> RedirectResponse:
    ctx = ctx_of(request)
    done = ctx.retention.run(ctx.config.storage.retention)
    return back("/", f"retention: {done['studies']} studies ({done['bytes'] / 1e6:.1f} MB), "
                     f"{done['result_files']} result files deleted", True)


# -- login -------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", {"next": _local(next), "page": "login"})


@router.post("/login")
def login(request: Request, token: str = Form(...), next: str = Form("/")) -> Response:
    expected = ctx_of(request).config.http.effective_token()
    if not expected or not hmac.compare_digest(expected.encode(), token.encode()):
        return render(request, "login.html", {"next": _local(next), "page": "login",
                                              "error": "wrong token" if expected else "no token is configured"}, 401)
    response = RedirectResponse(_local(next), 303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.get("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/", 303)
    response.delete_cookie(COOKIE)
    return response


def _local(path: str) -> str:
    """Only redirect within the console (no open redirect via ?next=)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def study_link(study_uid: str) -> str:
    return "/studies/" + quote(study_uid)


templates.env.globals["study_link"] = study_link
