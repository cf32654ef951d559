"""Who is asking, and may they: every page and API call names the role it needs.

A request's principal comes from, in this order: an `Authorization: Bearer` header (an API token
of an account, a JWT of the site's OpenID Connect provider, or the deprecated shared
`http.token`, which is an admin), else the session cookie set at login. Roles: viewer <
operator < admin (node.store.accounts.Role).

Open mode: while no account exists and no OIDC provider is configured, a console on loopback
answers reads without a login, as before accounts existed (writes still need a credential).
Once an account exists, every call needs one, on loopback too; beyond loopback always.

Pages and API calls authenticated by the session cookie must prove they come from the console's
own forms (CSRF, synchronizer token): a form field `csrf`, or the header X-CSRF-Token for the API.
A bearer token is never sent by a browser on its own, so it needs none.
"""

from __future__ import annotations

import hmac
from typing import Callable

from fastapi import HTTPException, Request

from node.console.oidc import OidcError
from node.console.sessions import SHARED_TOKEN_SESSION
from node.store.accounts import TOKEN_PREFIX, Principal, Role

AUTO_REFRESH = "refreshed"  # a page's own reload (the dashboard's): not a user's activity
SESSION_COOKIE = "dicom_node_session"
LOGIN_COOKIE = "dicom_node_login"  # binds an OIDC login to the browser that began it
CSRF_HEADER = "x-csrf-token"


class Refused(HTTPException):
    """401 (who are you?) or 403 (not with your role); pages turn a 401 into the login page."""


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def open_mode(request: Request) -> bool:
    ctx = request.app.state.ctx
    return ctx.config.http.oidc is None and ctx.config.http.on_loopback() and not ctx.accounts.exist()


def principal(request: Request) -> Principal | None:
    """Who the request comes from (cached on the request); raises Refused for a bad credential."""
    if hasattr(request.state, "principal"):
        return request.state.principal
    ctx = request.app.state.ctx
    found: Principal | None = None
    bearer = _bearer(request)
    shared = ctx.config.http.effective_token()
    if bearer is not None:
        if shared and hmac.compare_digest(shared.encode(), bearer.encode()):
            found = Principal(SHARED_TOKEN_SESSION, Role.ADMIN, "http.token")
        elif bearer.startswith(TOKEN_PREFIX):
            found = ctx.accounts.token_principal(bearer)
        elif ctx.oidc is not None and bearer.count(".") == 2:
            found = _jwt_principal(request, bearer)
        if found is None:
            raise Refused(401, "the bearer token is not valid (revoked, expired, or not this node's)",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = ctx.sessions.find(cookie, ctx.config.http.session_idle_minutes * 60,
                                    ctx.config.http.session_max_hours * 3600,
                                    activity=request.query_params.get(AUTO_REFRESH) != "1") if cookie else None
        if session is not None and (session.principal.name != SHARED_TOKEN_SESSION or shared):
            found = session.principal
            request.state.csrf = session.csrf
    request.state.principal = found
    return found


def _jwt_principal(request: Request, token: str) -> Principal | None:
    ctx = request.app.state.ctx
    try:
        claims = ctx.oidc.verify(token)
    except OidcError as exc:
        raise Refused(401, str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    role = ctx.oidc.role_of(claims)
    name = ctx.oidc.name_of(claims)
    if role is None:
        raise Refused(403, "the token's claims map to no role on this node")
    account = ctx.accounts.get(name)
    if account is not None and (account.disabled_at is not None or account.source != "oidc"):
        return None  # disabled here, or a local account's name
    return Principal(name, role, "jwt")


def csrf_ok(request: Request, form_value: str | None) -> bool:
    """A cookie-authenticated write must carry the session's CSRF token."""
    who = principal(request)
    if who is None or who.via != "session":
        return True
    expected = getattr(request.state, "csrf", "")
    given = form_value if form_value is not None else request.headers.get(CSRF_HEADER, "")
    return bool(expected and given and hmac.compare_digest(expected.encode(), given.encode()))


def allowed(request: Request, needed: Role, open_read: bool = False) -> Principal | None:
    """The principal if it may act as `needed`; None for an anonymous call that open mode allows
    (`open_read`); raises Refused otherwise."""
    who = principal(request)
    if who is None:
        if open_read and open_mode(request):
            return None
        raise Refused(401, "log in first (an account, an API token, or the identity provider's JWT)",
                      headers={"WWW-Authenticate": "Bearer"})
    if not who.may(needed):
        raise Refused(403, f"this needs the {needed.value} role; {who.name} has {who.role.value}")
    return who


def require(needed: Role, open_read: bool = False) -> Callable[[Request], None]:
    """An API dependency: the role `needed`; a write sent with the session cookie carries its
    CSRF token in X-CSRF-Token."""
    def check(request: Request) -> None:
        allowed(request, needed, open_read)
        if request.method not in ("GET", "HEAD") and not csrf_ok(request, None):
            raise Refused(403, "missing or wrong CSRF token (X-CSRF-Token)")
    return check


require_view = require(Role.VIEWER, open_read=True)  # dashboards, lists, metrics
require_explain = require(Role.OPERATOR, open_read=True)  # the rule tester: open in open mode, as before
require_operator = require(Role.OPERATOR)
require_admin = require(Role.ADMIN)


def sees_patients(request: Request) -> bool:
    """Whether patient attributes may be shown (operator and admin)."""
    who = principal(request)
    return who is not None and who.may(Role.OPERATOR)
