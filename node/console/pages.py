"""Server-rendered pages (Jinja2, autoescaped; inline CSS, no scripts from anywhere else).

Actions are plain HTML forms that POST (with the session's CSRF token) and redirect back with a
one-line message, so every page works without JavaScript. Logging in (/login: a local account,
or the site's identity provider) starts a session kept in the index (node.console.sessions).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import yaml
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from node.console import actions, summary, trail
from node.console.api import patient_view, rules_report
from node.console.auth import (AUTO_REFRESH, LOGIN_COOKIE, SESSION_COOKIE, Refused, allowed, csrf_ok, principal,
                               sees_patients)
from node.console.context import ConsoleContext
from node.console.limits import FORM_LIMITS, one_at_a_time
from node.console.modelview import models_overview
from node.console.oidc import OidcError
from node.console.sessions import SHARED_TOKEN_SESSION
from node.store.accounts import AccountError, Role
from node.store.audit import AuditEvent, AuditEventType, Outcome, since_time

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["when"] = summary.when
templates.env.filters["mb"] = summary.megabytes
templates.env.filters["seconds"] = lambda v: f"{v:.2f} s" if v is not None else "-"

PAGE_ROWS = 500  # newest first; the API lists everything
AUDIT_ROWS = 1000  # the audit page's newest records; the export has them all


class PageError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _allowed(request: Request, needed: Role, open_read: bool = False) -> None:
    try:
        allowed(request, needed, open_read)
    except Refused as exc:
        raise PageError(exc.status_code, str(exc.detail)) from None


def viewing(request: Request) -> None:
    _allowed(request, Role.VIEWER, open_read=True)


def acting(needed: Role, open_read: bool = False) -> Any:
    """A form's dependency: the role, and the session's CSRF token in the form's `csrf` field."""
    def check(request: Request, csrf: str = Form("")) -> None:
        _allowed(request, needed, open_read)
        if not csrf_ok(request, csrf):
            raise PageError(403, "This form is not from this console's page, or its page is from an older login:"
                                 " open the page again and retry.")
    return check


def admin_view(request: Request) -> None:
    _allowed(request, Role.ADMIN)


router = APIRouter(dependencies=[Depends(viewing)])
login_router = APIRouter()  # the login pages: open to all


async def page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    if exc.status == 401:
        return back(request, "/login?" + urlencode({"next": request.url.path}), exc.message, False)
    return render(request, "error.html", {"status": exc.status, "message": exc.message}, exc.status)


def ctx_of(request: Request) -> ConsoleContext:
    return request.app.state.ctx


def render(request: Request, template: str, values: dict[str, Any], status: int = 200) -> HTMLResponse:
    ctx = ctx_of(request)
    try:
        who = principal(request)
    except Refused:
        who = None
    message = read_flash(request)
    values = {"request": request, "ae_title": ctx.config.scp.ae_title, "msg": message[0] if message else None,
              "ok": bool(message and message[1]), "who": who,
              "can_act": who is not None and who.may(Role.OPERATOR), "can_admin": who is not None and who.may(Role.ADMIN),
              "csrf": getattr(request.state, "csrf", ""), "sso": ctx.oidc is not None, **values}
    response = templates.TemplateResponse(request, template, values, status_code=status)
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/")  # shown once (or not at all): a reload does not repeat it
    return response


FLASH_COOKIE = "dicom_node_flash"
FLASH_S = 60.0  # a message not shown within this is dropped
DASHBOARD_REFRESH_S = 10  # the dashboard reloads itself (no script): a failure shows within this


def back(request: Request, path: str, message: str, ok: bool) -> RedirectResponse:
    """Back to `path` with a message shown once: a cookie signed with this process's key, so no
    link can make the console show a text of its choosing (a `?msg=` in the URL shows nothing)."""
    response = RedirectResponse(path, 303)
    # at most ~2.4 kB of cookie whatever the script (browsers drop cookies over 4 kB)
    payload = base64.urlsafe_b64encode(json.dumps([message[:600], ok, time.time()], ensure_ascii=False).encode()).decode()
    signature = hmac.new(ctx_of(request).flash_key, payload.encode(), hashlib.sha256).hexdigest()
    response.set_cookie(FLASH_COOKIE, f"{payload}.{signature}", max_age=60, path="/", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


def read_flash(request: Request) -> tuple[str, bool] | None:
    """The message `back` left, if its signature holds and it is fresh (FLASH_S); a forged,
    damaged or old cookie shows nothing (and is deleted with the page)."""
    payload, _, signature = request.cookies.get(FLASH_COOKIE, "").partition(".")
    if not payload:
        return None
    try:
        expected = hmac.new(ctx_of(request).flash_key, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        message, ok, issued = json.loads(base64.urlsafe_b64decode(payload.encode()))
        if not 0 <= time.time() - float(issued) <= FLASH_S:
            return None
    except (ValueError, TypeError, UnicodeError):
        return None
    return str(message), bool(ok)


def act(request: Request, path: str, call: Any, *args: Any) -> RedirectResponse:
    """An operator's action, recorded in the audit trail whether it worked or not."""
    try:
        message, ok = call(*args), True
    except actions.ActionError as exc:
        message, ok = exc.message, False
    trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, message, ok)
    return back(request, path, message, ok)


# -- pages -------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    ctx = ctx_of(request)
    data = request.app.state.live_summary()
    recent = summary.studies(ctx.index, ctx.config.http.show_descriptions, limit=15)
    return render(request, "dashboard.html", {"s": data, "recent": recent, "page": "dashboard",
                                              "refresh_s": DASHBOARD_REFRESH_S, "refresh_flag": AUTO_REFRESH})


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
    if sees_patients(request):
        found["patient"] = patient_view(request, study_uid)
    return render(request, "study.html", {"d": found, "page": "studies"})


@router.get("/jobs", response_class=HTMLResponse)
def jobs(request: Request) -> HTMLResponse:
    rows = [summary.job_row(j) for j in reversed(ctx_of(request).jobs.all_jobs())]
    return render(request, "jobs.html", {"jobs": rows[:PAGE_ROWS], "more": max(0, len(rows) - PAGE_ROWS),
                                         "page": "jobs"})


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(acting(Role.OPERATOR))])
def retry_job(request: Request, job_id: int) -> RedirectResponse:
    return act(request, "/jobs", actions.retry_job, ctx_of(request), job_id)


@router.get("/outbox", response_class=HTMLResponse)
def outbox(request: Request) -> HTMLResponse:
    rows = list(reversed(summary.deliveries(ctx_of(request).index)))
    return render(request, "outbox.html", {"items": rows[:PAGE_ROWS], "more": max(0, len(rows) - PAGE_ROWS),
                                           "page": "outbox"})


@router.post("/outbox/{item_id}/retry", dependencies=[Depends(acting(Role.OPERATOR))])
def retry_delivery(request: Request, item_id: int) -> RedirectResponse:
    return act(request, "/outbox", actions.retry_delivery, ctx_of(request), item_id)


@router.post("/outbox/{item_id}/resend", dependencies=[Depends(acting(Role.OPERATOR))])
def resend_delivery(request: Request, item_id: int) -> RedirectResponse:
    return act(request, "/outbox", actions.resend_delivery, ctx_of(request), item_id)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request) -> HTMLResponse:
    return render(request, "models.html", {"o": models_overview(ctx_of(request)), "page": "models"})


@router.get("/destinations", response_class=HTMLResponse)
def destinations(request: Request) -> HTMLResponse:
    ctx = ctx_of(request)
    return render(request, "destinations.html",
                  {"destinations": sorted(ctx.config.destinations.items()), "page": "destinations"})


@router.post("/destinations/{name}/echo", dependencies=[Depends(acting(Role.OPERATOR))])
def echo(request: Request, name: str) -> RedirectResponse:
    try:
        result = actions.echo_destination(ctx_of(request), name)
    except actions.ActionError as exc:
        trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, exc.message, ok=False)
        return back(request, "/destinations", exc.message, False)
    trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, f"C-ECHO {name}: {result.message}", result.ok)
    return back(request, "/destinations", f"C-ECHO {name}: {result.message} ({result.seconds:.2f} s)", result.ok)


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


@router.post("/rules/explain", response_class=HTMLResponse, form_limits=FORM_LIMITS,
             dependencies=[Depends(acting(Role.OPERATOR, open_read=True))])
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
            trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, f"explain: {exc.message}", ok=False)
            return _rules_page(request, None, exc.message)
        trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION,
                     f"explain: {len(chosen)} uploaded files" if chosen else f"explain: study {study_uid.strip()}")
        return _rules_page(request, result)

    return await run_in_threadpool(explain_now)


@router.post("/config/reload", dependencies=[Depends(acting(Role.ADMIN))])
def reload(request: Request) -> RedirectResponse:
    outcome = ctx_of(request).live.reload()
    trail.action(request, AuditEventType.SOFTWARE_CONFIGURATION,
                 "reload applied" if outcome.applied else "reload refused", outcome.applied)
    if not outcome.applied:
        return back(request, "/rules", "reload refused: " + "; ".join(outcome.problems), False)
    pending = f"; needs a restart: {', '.join(outcome.restart_needed)}" if outcome.restart_needed else ""
    return back(request, "/rules", "configuration reloaded" + pending, True)


@router.get("/retention", response_class=HTMLResponse, dependencies=[Depends(admin_view)])
def retention_preview(request: Request) -> HTMLResponse:
    """What a retention run would delete now: each study with its size and reason, and the result
    files; the run itself needs the confirmation that names the count (a POST from this page)."""
    ctx = ctx_of(request)
    policy = ctx.config.storage.retention
    plan = ctx.retention.plan(policy)
    return render(request, "retention.html", {
        "plan": plan, "has_policy": _has_policy(policy), "page": "dashboard",
        "total_bytes": sum(s.bytes for s in plan.studies),
        "result_files": sum(len(r.files) for r in plan.results)})


def _has_policy(policy: Any) -> bool:
    return bool(policy.instances_days or policy.results_days or policy.max_store_gb)


@router.post("/retention/run", dependencies=[Depends(acting(Role.ADMIN))])
def retention_run(request: Request, plan_digest: str = Form(...)) -> RedirectResponse:
    """Deletes exactly the plan the admin saw (its digest), or nothing: look again."""
    ctx = ctx_of(request)
    policy = ctx.config.storage.retention
    if not _has_policy(policy):
        return back(request, "/retention", "retention: no storage.retention policy is set; nothing is deleted", False)
    plan = ctx.retention.plan(policy)
    if plan.digest() != plan_digest:
        return back(request, "/retention", f"retention not run: what it would delete changed since the preview"
                                           f" ({len(plan.studies)} studies now); look again", False)
    done = ctx.retention.carry_out(plan)
    trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, f"retention run: {done['studies']} studies deleted")
    return back(request, "/", f"retention: {done['studies']} studies ({done['bytes'] / 1e6:.1f} MB), "
                              f"{done['result_files']} result files deleted", True)


# -- login -------------------------------------------------------------------------------------


LOGIN_FORM_COOKIE = "dicom_node_login_form"


def _login_page(request: Request, next: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    """The login form, with a token its POST must echo (double submit: another site cannot log
    a browser into an account of its choosing, login CSRF)."""
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", {"next": _local(next), "page": "login", "error": error,
                                              "login_csrf": token}, status)
    response.set_cookie(LOGIN_FORM_COOKIE, token, httponly=True, samesite="strict", path="/login",
                        secure=request.url.scheme == "https")
    return response


@login_router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return _login_page(request, next)


def _login_refused(request: Request, name: str, next: str, message: str, status: int, reason: str) -> HTMLResponse:
    trail.record(request, AuditEvent.USER_AUTHENTICATION, AuditEventType.LOGIN, actor=name[:64] or "-",
                 outcome=Outcome.MINOR_FAILURE, reason=reason)
    return _login_page(request, next, message, status)


def _logged_in(request: Request, name: str, role: Role, next: str, via: str) -> RedirectResponse:
    """Start the session: a new cookie value at every login (no session fixation)."""
    ctx = ctx_of(request)
    cookie, _ = ctx.sessions.start(name, role)
    if name != SHARED_TOKEN_SESSION:
        ctx.accounts.logged_in(name)
    trail.record(request, AuditEvent.USER_AUTHENTICATION, AuditEventType.LOGIN, actor=name, reason=f"{via}, {role.value}")
    response = RedirectResponse(_local(next), 303)
    response.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="lax", secure=request.url.scheme == "https",
                        max_age=int(ctx.config.http.session_max_hours * 3600))
    return response


@login_router.post("/login")
def login(request: Request, username: str = Form(""), password: str = Form(...), next: str = Form("/"),
          login_csrf: str = Form("")) -> Response:
    ctx = ctx_of(request)
    expected = request.cookies.get(LOGIN_FORM_COOKIE, "")
    if not (expected and hmac.compare_digest(expected.encode(), login_csrf.encode())):
        return _login_page(request, next, "This login form is not from this console, or too old: log in again.", 403)
    http = ctx.config.http
    peer = trail.peer_of(request)
    name = username.strip()
    if ctx.accounts.throttled(name, peer, http.login_failures, http.login_window_minutes * 60):
        return _login_refused(request, name, next, f"Too many failed logins: try again in {http.login_window_minutes:g}"
                              " minutes.", 429, "throttled")
    shared = http.effective_token()
    if name in ("", SHARED_TOKEN_SESSION) and shared and hmac.compare_digest(shared.encode(), password.encode()):
        return _logged_in(request, SHARED_TOKEN_SESSION, Role.ADMIN, next, "shared token (deprecated)")
    account = ctx.accounts.check_password(name, password) if name else None
    if account is None:
        ctx.accounts.failed_login(name, peer)
        return _login_refused(request, name, next, "Wrong name or password, or the account is disabled.", 401,
                              "wrong name or password, or disabled")
    return _logged_in(request, account.name, account.role, next, "password")


@login_router.get("/login/oidc")
def oidc_start(request: Request, next: str = "/") -> Response:
    """To the identity provider (authorization code flow with PKCE; state, nonce and the code
    verifier kept in the index, bound to this browser by a short-lived cookie)."""
    ctx = ctx_of(request)
    if ctx.oidc is None:
        raise PageError(404, "No identity provider is configured (http.oidc).")
    browser, state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(4))
    try:
        url = ctx.oidc.authorization_url(_callback_url(request), state, nonce, verifier)
    except OidcError as exc:
        raise PageError(502, f"Single sign-on is unavailable: {exc}.") from None
    ctx.sessions.begin_login(browser, state, nonce, verifier, _local(next))
    response = RedirectResponse(url, 303)
    response.set_cookie(LOGIN_COOKIE, browser, httponly=True, samesite="lax", secure=request.url.scheme == "https",
                        max_age=600, path="/login/oidc")
    return response


def _callback_url(request: Request) -> str:
    oidc = ctx_of(request).config.http.oidc
    return oidc.redirect_url if oidc and oidc.redirect_url else str(request.url_for("oidc_callback"))


@login_router.get("/login/oidc/callback", name="oidc_callback")
def oidc_callback(request: Request, state: str = "", code: str = "", error: str = "") -> Response:
    ctx = ctx_of(request)
    if ctx.oidc is None:
        raise PageError(404, "No identity provider is configured (http.oidc).")
    pending = ctx.sessions.finish_login(request.cookies.get(LOGIN_COOKIE, ""), state)
    if pending is None:
        return _login_refused(request, "", "/", "This sign-in was not started in this browser, or it took more than"
                              " 10 minutes: sign in again.", 400, "OIDC: unknown or expired state")
    if error or not code:
        return _login_refused(request, "", pending.next_path, "The identity provider did not sign you in.", 401,
                              "OIDC: the provider returned an error")
    try:
        claims = ctx.oidc.redeem(_callback_url(request), code, pending.code_verifier, pending.nonce)
    except OidcError as exc:
        return _login_refused(request, "", pending.next_path, f"Single sign-on failed: {exc}.", 401, f"OIDC: {exc}")
    name, role = ctx.oidc.name_of(claims), ctx.oidc.role_of(claims)
    if role is None:
        return _login_refused(request, name, pending.next_path, "Your account has no role on this node: ask an"
                              " administrator (http.oidc.role_map).", 403, "OIDC: no mapped role")
    try:
        account = ctx.accounts.oidc_login(name, role)
    except AccountError as exc:
        account, role_error = None, str(exc)
    else:
        role_error = "disabled on this node, or the name of a local account"
    if account is None:
        return _login_refused(request, name, pending.next_path, f"This account cannot sign in here ({role_error}).",
                              403, f"OIDC: {role_error}")
    response = _logged_in(request, name, role, pending.next_path, "OIDC")
    response.delete_cookie(LOGIN_COOKIE, path="/login/oidc")
    return response


@login_router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> RedirectResponse:
    ctx = ctx_of(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    who = principal(request) if cookie else None
    if who is not None and csrf_ok(request, csrf):
        ctx.sessions.end(cookie)
        trail.record(request, AuditEvent.USER_AUTHENTICATION, AuditEventType.LOGOUT)
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- administration ----------------------------------------------------------------------------


@router.get("/admin/accounts", response_class=HTMLResponse, dependencies=[Depends(admin_view)])
def accounts_page(request: Request) -> HTMLResponse:
    accounts = ctx_of(request).accounts
    rows = [{**a.as_json(), "tokens": accounts.tokens(a.name)} for a in accounts.all()]
    return render(request, "accounts.html", {"accounts": rows, "roles": [r.value for r in Role], "page": "accounts",
                                             "new_token": None})


def _account_action(request: Request, call: Any, *args: Any, reason: str) -> Any:
    try:
        result = call(*args)
    except AccountError as exc:
        trail.action(request, AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED, f"{reason}: {exc}", ok=False)
        raise PageError(400, str(exc)) from None
    trail.action(request, AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED, reason)
    return result


@router.post("/admin/accounts", dependencies=[Depends(acting(Role.ADMIN))])
def add_account(request: Request, name: str = Form(...), role: Role = Form(...),
                password: str = Form(...)) -> RedirectResponse:
    _account_action(request, ctx_of(request).accounts.add, name, role, password, reason=f"account {name} added as {role.value}")
    return back(request, "/admin/accounts", f"account {name} added ({role.value})", True)


@router.post("/admin/accounts/{name:path}/disabled", dependencies=[Depends(acting(Role.ADMIN))])
def set_disabled(request: Request, name: str, disabled: bool = Form(...)) -> RedirectResponse:
    ctx = ctx_of(request)
    _account_action(request, ctx.accounts.set_disabled, name, disabled,
                    reason=f"account {name} {'disabled' if disabled else 'enabled'}")
    ctx.sessions.end_all(name)
    return back(request, "/admin/accounts", f"account {name} {'disabled' if disabled else 'enabled'}", True)


@router.post("/admin/accounts/{name:path}/tokens", response_class=HTMLResponse, dependencies=[Depends(acting(Role.ADMIN))])
def add_token(request: Request, name: str, label: str = Form("")) -> HTMLResponse:
    token_id, token = _account_action(request, ctx_of(request).accounts.issue_token, name, label,
                                      reason=f"API token issued to {name}")
    return render(request, "token.html", {"account": name, "token_id": token_id, "token": token, "page": "accounts"})


@router.post("/admin/tokens/{token_id}/revoke", dependencies=[Depends(acting(Role.ADMIN))])
def revoke_token(request: Request, token_id: int) -> RedirectResponse:
    name = _account_action(request, ctx_of(request).accounts.revoke_token, token_id, reason=f"API token {token_id} revoked")
    return back(request, "/admin/accounts", f"token {token_id} of {name} revoked", True)


@router.get("/admin/audit", response_class=HTMLResponse, dependencies=[Depends(admin_view)])
def audit_page(request: Request, since: str = "1d") -> HTMLResponse:
    ctx = ctx_of(request)
    try:
        start = since_time(since)
    except ValueError:
        raise PageError(400, f"since: not a date or an age: {since}") from None
    records = ctx.trail.since(start)
    trail.record(request, AuditEvent.AUDIT_LOG_USED, action="R", reason=str(request.url.path))
    return render(request, "audit.html", {"records": list(reversed(records))[:AUDIT_ROWS], "total": len(records),
                                          "since": since, "page": "audit"})


def _local(path: str) -> str:
    """Only redirect within the console (no open redirect via ?next=)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def study_link(study_uid: str) -> str:
    return "/studies/" + quote(study_uid)


templates.env.globals["study_link"] = study_link
templates.env.filters["segment"] = lambda value: quote(str(value), safe="")  # one path segment, / included
