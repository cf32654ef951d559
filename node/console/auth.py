"""Who may do what: reads are open on loopback, writes always need the token.

The token comes from `http.token` or DICOM_NODE_HTTP_TOKEN. API clients send it as
`Authorization: Bearer <token>`; the pages' login form puts it in an HttpOnly, SameSite=Strict
cookie (so another site cannot make the browser post a retry). Without a configured token the
console is read-only. A console bound beyond loopback requires the token for reads too
(node.config refuses to start one without a token).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

COOKIE = "dicom_node_token"


def presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


def token_ok(request: Request) -> bool:
    expected = request.app.state.ctx.config.http.effective_token()
    given = presented_token(request)
    return bool(expected and given and hmac.compare_digest(expected.encode(), given.encode()))


def require_write(request: Request) -> None:
    if not request.app.state.ctx.config.http.effective_token():
        raise HTTPException(403, "the console is read-only: set http.token (or DICOM_NODE_HTTP_TOKEN) to allow actions")
    if not token_ok(request):
        raise HTTPException(401, "this action needs the console token", headers={"WWW-Authenticate": "Bearer"})


def require_read(request: Request) -> None:
    if not request.app.state.ctx.config.http.on_loopback() and not token_ok(request):
        raise HTTPException(401, "this console needs the token", headers={"WWW-Authenticate": "Bearer"})
