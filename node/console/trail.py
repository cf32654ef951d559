"""The console's entries in the audit trail: logins, views of patient attributes, actions.

One call per security-relevant request, written to the index (node.store.audit) and from there
sent to the site's ATNA repository; the user is the actor, their address the access point.
"""

from __future__ import annotations

import time

from fastapi import Request

from node.console.auth import principal
from node.store.audit import AuditEvent, AuditEventType, AuditRecord, Outcome


def peer_of(request: Request) -> str:
    return request.client.host if request.client else ""


def record(request: Request, event: AuditEvent, event_type: AuditEventType | None = None, *, action: str = "E",
           outcome: Outcome = Outcome.SUCCESS, actor: str | None = None, target: str | None = None,
           reason: str | None = None, studies: dict[str, int] | None = None,
           patients: dict[str, str] | None = None) -> None:
    """`actor`: who, when the request has no principal yet (a login); else the request's user."""
    if actor is None:
        who = principal(request)
        actor = who.name if who is not None else "anonymous"
    request.app.state.ctx.trail.record(AuditRecord(
        event, action, outcome, actor=actor, peer=peer_of(request), event_type=event_type, studies=studies or {},
        patients=patients or {}, reason=reason, person=True, target=target), time.time())


def action(request: Request, event_type: AuditEventType, reason: str, ok: bool = True) -> None:
    """A console action (retry, echo, explain, reload, retention, account change): a Security
    Alert of its kind (PS3.15 A.5.3.11), on the request's path."""
    record(request, AuditEvent.SECURITY_ALERT, event_type, target=request.url.path, reason=reason,
           outcome=Outcome.SUCCESS if ok else Outcome.MINOR_FAILURE)
