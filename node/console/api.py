"""The REST API under /api: the same data and actions as the pages, as JSON (schema: /openapi.json)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from node.console import actions, summary, trail
from node.console.auth import principal, require_admin, require_explain, require_operator, require_view, sees_patients
from node.console.context import ConsoleContext
from node.console.modelview import models_overview
from node.console.limits import FORM_LIMITS, one_at_a_time
from node.liveconfig import check, read_snapshot, restart_needed
from node.store.accounts import AccountError, Role
from node.store.audit import AuditEvent, AuditEventType, since_time

AUDIT_CSV_COLUMNS = ("id", "recorded_at", "event_id", "event_type", "action", "outcome", "actor", "person", "peer",
                     "studies", "patients", "destination", "target", "reason")

router = APIRouter(prefix="/api", dependencies=[Depends(require_view)])


def ctx_of(request: Request) -> ConsoleContext:
    return request.app.state.ctx


def _run(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except actions.ActionError as exc:
        raise HTTPException(exc.status, exc.message) from None


def _audited(request: Request, call: Any, *args: Any, reason: str | None = None) -> Any:
    """An operator's action, recorded in the audit trail whether it worked or not (`reason`:
    what the record says when it worked; else what the action returned)."""
    try:
        result = call(*args)
    except actions.ActionError as exc:
        trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, exc.message, ok=False)
        raise HTTPException(exc.status, exc.message) from None
    if reason is not None or isinstance(result, str):
        trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, reason or result)
    return result


class StudyRow(BaseModel):
    study_uid: str
    state: str
    calling_ae: str | None
    first_received: float
    last_received: float
    completed_at: float | None
    completions: int
    instances: int
    series: int
    modalities: list[str]
    descriptions: str | None = None


class JobRow(BaseModel):
    id: int
    study_uid: str
    state: str
    stage: str | None
    attempts: int
    next_attempt: float | None
    retry_deadline: float | None
    created_at: float
    updated_at: float
    reason: str | None
    priority: int
    rules_version: str | None
    rules: list[str]
    models: list[str]
    stage_seconds: dict[str, float]
    stages: dict[str, dict[str, float]]
    outputs: dict[str, list[str]]
    explanation: str | None
    completed_by: str | None = None  # what completed the study: quiet_period, mpps, ian


class OutboxRow(BaseModel):
    id: int
    job_key: str
    study_uid: str
    destination: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    next_attempt: float
    last_error: str | None
    warnings: str | None


class AssociationRow(BaseModel):
    id: int
    calling_ae: str | None
    called_ae: str | None
    peer: str | None
    started_at: float
    ended_at: float | None
    instances: int
    failures: int


class Destination(BaseModel):
    name: str
    kind: Literal["dimse", "dicomweb"]
    ae_title: str | None
    host: str | None
    port: int | None
    url: str | None = Field(description="DICOMweb: the service root results are STOWed to")
    tls: bool


class EchoOut(BaseModel):
    destination: str
    ok: bool
    message: str
    seconds: float


class ExplainOut(BaseModel):
    study_uid: str
    calling_ae: str
    peer: str
    series: list[dict[str, Any]]
    explanation: str


class Done(BaseModel):
    message: str


@router.get("/summary", summary="Dashboard figures: receiving studies, queues, associations, disk, rules, models")
def get_summary(request: Request) -> dict[str, Any]:
    return request.app.state.live_summary()


@router.get("/studies", response_model=list[StudyRow], summary="Received studies, newest first (patient-free)")
def get_studies(request: Request, limit: int = 500) -> list[dict[str, Any]]:
    ctx = ctx_of(request)
    return summary.studies(ctx.index, ctx.config.http.show_descriptions, limit)


@router.get("/studies/{study_uid}", summary="One study: series, routing explanation, jobs with stages, deliveries;"
                                            " for operators and admins its patient attributes too (audited)")
def get_study(request: Request, study_uid: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    found = summary.study(ctx.index, ctx.jobs, ctx.retention, study_uid, ctx.config.http.show_descriptions)
    if found is None:
        raise HTTPException(404, f"no study {study_uid}")
    if sees_patients(request):
        found["patient"] = patient_view(request, study_uid)
    return found


def patient_view(request: Request, study_uid: str) -> dict[str, str] | None:
    """The study's patient attributes, the view recorded as a Patient Record read (PS3.15 A.5.3.14)."""
    ctx = ctx_of(request)
    found = summary.patient(ctx.index, ctx.data_dir, study_uid)
    if found is not None:
        trail.record(request, AuditEvent.PATIENT_RECORD, action="R", target=request.url.path,
                     studies={study_uid: int(ctx.index.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?",
                                                            (study_uid,))[0]["n"])},
                     patients={study_uid: found["PatientID"] or "-"})  # A.5.3.14: the patient object, always
    return found


@router.get("/studies/{study_uid}/explain", response_model=ExplainOut, dependencies=[Depends(require_explain)],
            summary="Which rules the study matches with the rules in force now")
def explain_study(request: Request, study_uid: str) -> Any:
    return vars(_audited(request, actions.explain_study, ctx_of(request), study_uid, reason="explain"))


@router.get("/models", summary="Every model version with its provenance and the rules running it; runs, shadow"
            " comparisons (newest first), verdicts and drift alarms")
def models(request: Request) -> dict[str, Any]:
    return models_overview(ctx_of(request))


@router.get("/jobs", response_model=list[JobRow], summary="Jobs (one per completed study), oldest first")
def get_jobs(request: Request) -> list[dict[str, Any]]:
    return [summary.job_row(j) for j in ctx_of(request).jobs.all_jobs()]


@router.post("/jobs/{job_id}/retry", response_model=Done, dependencies=[Depends(require_operator)],
             summary="Queue a failed, ignored or waiting job again (404 unknown, 409 not retryable)")
def retry_job(request: Request, job_id: int) -> Done:
    return Done(message=_audited(request, actions.retry_job, ctx_of(request), job_id))


@router.get("/outbox", response_model=list[OutboxRow], summary="Result deliveries per destination")
def get_outbox(request: Request) -> list[dict[str, Any]]:
    return summary.deliveries(ctx_of(request).index)


@router.post("/outbox/{item_id}/retry", response_model=Done, dependencies=[Depends(require_operator)],
             summary="Queue a dead (or pending) delivery again now with a fresh deadline")
def retry_delivery(request: Request, item_id: int) -> Done:
    return Done(message=_audited(request, actions.retry_delivery, ctx_of(request), item_id))


@router.post("/outbox/{item_id}/resend", response_model=Done, dependencies=[Depends(require_operator)],
             summary="Send a delivered result set again (same files, same UIDs), e.g. when the PACS lost it")
def resend_delivery(request: Request, item_id: int) -> Done:
    return Done(message=_audited(request, actions.resend_delivery, ctx_of(request), item_id))


@router.get("/associations", response_model=list[AssociationRow], summary="Recent associations, newest first")
def get_associations(request: Request, limit: int = 100) -> list[dict[str, Any]]:
    return summary.associations(ctx_of(request).index, limit)


@router.get("/destinations", response_model=list[Destination], summary="Configured destinations (in force)")
def get_destinations(request: Request) -> list[Destination]:
    return [Destination(name=n, kind=d.kind, ae_title=d.ae_title, host=d.host,
                        port=d.port, url=d.dicomweb.url if d.dicomweb else None,
                        tls=d.tls.enabled or bool(d.dicomweb and d.dicomweb.url.startswith("https:")))
            for n, d in sorted(ctx_of(request).config.destinations.items())]


@router.post("/destinations/{name}/echo", response_model=EchoOut, dependencies=[Depends(require_operator)],
             summary="C-ECHO the destination as this node's AE title (DICOMweb: a QIDO-RS search with its credentials)")
def echo_destination(request: Request, name: str) -> EchoOut:
    result = _audited(request, actions.echo_destination, ctx_of(request), name)
    trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, f"C-ECHO {name}: {result.message}", result.ok)
    return EchoOut(destination=name, ok=result.ok, message=result.message, seconds=result.seconds)


@router.post("/explain", response_model=list[ExplainOut], form_limits=FORM_LIMITS,
             dependencies=[Depends(require_explain)],
             summary="Routing explanation for uploaded DICOM files (not stored), with the rules in force; "
                     "413 past http.max_upload_mb per request, 400 past 2000 files")
async def explain_files(request: Request, files: list[UploadFile] = File(...), calling_ae: str = Form(""),
                        called_ae: str = Form(""), peer: str = Form("")) -> list[dict[str, Any]]:
    # The body was streamed into spooled temporary files (bounded by node.console.limits); they
    # are read one at a time in the worker thread: reading DICOM files must not stall the server.
    explained = await run_in_threadpool(_audited, request, actions.explain_files, ctx_of(request),
                                        one_at_a_time(files), calling_ae, called_ae, peer, reason="explain")
    return [vars(e) for e in explained]


@router.get("/rules", summary="Rules in force, their version, and the configuration check of the files on disk")
def get_rules(request: Request) -> dict[str, Any]:
    return rules_report(ctx_of(request))


@router.post("/config/reload", dependencies=[Depends(require_admin)],
             summary="Reload node.yaml and the rules now (as on SIGHUP)")
def reload_config(request: Request) -> dict[str, Any]:
    outcome = ctx_of(request).live.reload()
    trail.action(request, AuditEventType.SOFTWARE_CONFIGURATION,
                 "reload applied" if outcome.applied else "reload refused", outcome.applied)
    return {"applied": outcome.applied, "problems": outcome.problems, "restart_needed": outcome.restart_needed}


@router.get("/audit", dependencies=[Depends(require_admin)],
            summary="The audit trail since a time (an age like 7d, or an ISO date), as JSON or CSV (admins: it holds"
                    " Patient IDs); each read is itself recorded (Audit Log Used)")
def get_audit(request: Request, since: str = "1d", format: str = "json") -> Response:
    ctx = ctx_of(request)
    try:
        start = since_time(since)
    except ValueError:
        raise HTTPException(400, f"since: not a date or an age: {since!r}") from None
    if format not in ("json", "csv"):
        raise HTTPException(400, "format: json or csv")
    rows = [r.as_json() for r in ctx.trail.since(start)]
    trail.record(request, AuditEvent.AUDIT_LOG_USED, action="R", reason=str(request.url.path))
    if format == "json":
        return JSONResponse(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(AUDIT_CSV_COLUMNS))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(row[k]) if isinstance(row[k], dict) else row[k] for k in AUDIT_CSV_COLUMNS})
    return Response(out.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="audit.csv"'})


@router.get("/retention", summary="Retention policy, last run, and what would go now (dry run)")
def get_retention(request: Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    policy = ctx.config.storage.retention
    return {"policy": policy.model_dump(), "last_run": ctx.retention.last_run(),
            "would_delete": ctx.retention.plan(policy).as_dict()}


@router.post("/retention/run", dependencies=[Depends(require_admin)],
             summary="Delete exactly what GET /api/retention's would_delete listed (its plan_digest), or 409")
def run_retention(request: Request, plan_digest: str) -> dict[str, int]:
    ctx = ctx_of(request)
    plan = ctx.retention.plan(ctx.config.storage.retention)
    if plan.digest() != plan_digest:
        raise HTTPException(409, f"what retention would delete changed since that plan ({len(plan.studies)} studies"
                                 " now): GET /api/retention again")
    done = ctx.retention.carry_out(plan)
    trail.action(request, AuditEventType.USE_OF_RESTRICTED_FUNCTION, f"retention run: {done['studies']} studies deleted")
    return done


class Me(BaseModel):
    name: str | None
    role: str | None
    via: str | None
    csrf: str | None = None  # for a session's API writes: send it as X-CSRF-Token


class NewAccount(BaseModel):
    name: str
    role: Role
    password: str


class AccountChange(BaseModel):
    disabled: bool | None = None
    role: Role | None = None


class NewToken(BaseModel):
    label: str = ""


@router.get("/me", response_model=Me, summary="Who this request is (its account and role)")
def me(request: Request) -> Me:
    who = principal(request)
    if who is None:
        return Me(name=None, role=None, via=None)
    return Me(name=who.name, role=who.role.value, via=who.via, csrf=getattr(request.state, "csrf", None))


@router.get("/accounts", dependencies=[Depends(require_admin)], summary="Accounts (local and OIDC) with their tokens")
def get_accounts(request: Request) -> list[dict[str, Any]]:
    accounts = ctx_of(request).accounts
    return [{**a.as_json(), "tokens": accounts.tokens(a.name)} for a in accounts.all()]


def _account_change(request: Request, call: Any, *args: Any, reason: str) -> Any:
    """An account change (audited as User Security Attributes Changed, PS3.15 A.5.3.11)."""
    try:
        result = call(*args)
    except AccountError as exc:
        trail.action(request, AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED, f"{reason}: {exc}", ok=False)
        raise HTTPException(409 if "already" in str(exc) else 404 if str(exc).startswith("no ") else 400,
                            str(exc)) from None
    trail.action(request, AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED, reason)
    return result


@router.post("/accounts", dependencies=[Depends(require_admin)], status_code=201, summary="Add a local account")
def add_account(request: Request, new: NewAccount) -> dict[str, Any]:
    accounts = ctx_of(request).accounts
    return _account_change(request, accounts.add, new.name, new.role, new.password,
                           reason=f"account {new.name} added as {new.role.value}").as_json()


@router.patch("/accounts/{name:path}", dependencies=[Depends(require_admin)],
              summary="Disable or enable an account, or change a local account's role (its sessions end)")
def change_account(request: Request, name: str, change: AccountChange) -> dict[str, Any]:
    ctx = ctx_of(request)
    account = ctx.accounts.get(name)
    if account is None:
        raise HTTPException(404, f"no account {name!r}")
    if change.role is not None:
        account = _account_change(request, ctx.accounts.set_role, name, change.role,
                                  reason=f"account {name}: role {change.role.value}")
    if change.disabled is not None:
        account = _account_change(request, ctx.accounts.set_disabled, name, change.disabled,
                                  reason=f"account {name} {'disabled' if change.disabled else 'enabled'}")
    ctx.sessions.end_all(name)
    return account.as_json()


@router.post("/accounts/{name:path}/tokens", dependencies=[Depends(require_admin)], status_code=201,
             summary="A new API token for the account (shown once; stored hashed)")
def add_token(request: Request, name: str, new: NewToken) -> dict[str, Any]:
    token_id, token = _account_change(request, ctx_of(request).accounts.issue_token, name, new.label,
                                      reason=f"API token issued to {name}")
    return {"id": token_id, "token": token, "account": name}


@router.delete("/tokens/{token_id}", dependencies=[Depends(require_admin)], summary="Revoke an API token")
def revoke_token(request: Request, token_id: int) -> Done:
    name = _account_change(request, ctx_of(request).accounts.revoke_token, token_id,
                           reason=f"API token {token_id} revoked")
    return Done(message=f"token {token_id} of {name} revoked")


def rules_report(ctx: ConsoleContext) -> dict[str, Any]:
    """The rules in force and `config check` of the files as they are on disk now."""
    live = ctx.live
    checked = check(live.path if live.watch_file else None, live.overrides, live.rules.path)
    snapshot = read_snapshot(ctx.data_dir)
    pending = restart_needed(snapshot["started"], checked.config) if snapshot and checked.config else []
    rules = ctx.rules
    return {
        "version": rules.version, "mode": rules.file.mode, "file": str(live.rules.path),
        "rules": [r.model_dump(mode="json", exclude_none=True) for r in rules.file.rules],
        "fallback": rules.file.fallback.model_dump(mode="json", exclude_none=True) if rules.file.fallback else None,
        "check": {"ok": checked.ok, "problems": [str(p) for p in checked.problems],
                  "version_on_disk": checked.rules.version if checked.rules else None,
                  "restart_needed": pending},
        "last_reload": live.last_reload,
    }
