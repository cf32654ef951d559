"""DICOMweb on the console's HTTP server: STOW-RS (PS3.18 10.5) into the node (reads: wado.py).

The instances are stored as they stream in, each with C-STORE's checks and statuses and
acknowledged only once durable (node/receive/store.py); the request is an association in the
index (calling AE: the account's name, called AE `STOW-RS`), so routing rules, the quiet
period by calling AE, metrics and the audit trail see it like one.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from node.console.auth import principal, require_operator
from node.console.context import ConsoleContext
from node.console.limits import MB
from node.console.trail import peer_of
from node.receive.store import CANNOT_UNDERSTAND, SUCCESS, InstanceStore
from node.store.spool import checked_uid
from node.receive.stow import CALLED, Outcome, Part, Response as StowResponse, StowError, StowRequest, boundary_of, incoming
from node.store.audit import AuditEvent, AuditRecord, Outcome as AuditOutcome

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"


def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return not accept or any(kind.split(";")[0].strip() in (DICOM_JSON, "application/json", "*/*", "application/*")
                             for kind in accept.split(","))


@router.post("/studies", dependencies=[Depends(require_operator)],
             summary="STOW-RS: store the instances of a multipart/related; type=\"application/dicom\" body")
@router.post("/studies/{study_uid}", dependencies=[Depends(require_operator)],
             summary="STOW-RS: store instances that must belong to this study (others fail, 0xC211)")
async def store_instances(request: Request, study_uid: str | None = None) -> Response:
    ctx = request.app.state.ctx
    if not _accepts_json(request):
        return JSONResponse({"detail": f"the response is {DICOM_JSON} only"}, 406)
    try:
        boundary = boundary_of(request.headers.get("content-type", ""))
    except StowError as exc:
        return JSONResponse({"detail": str(exc)}, exc.status)
    if study_uid is not None:
        try:
            checked_uid(study_uid, "StudyInstanceUID")
        except ValueError as exc:
            return JSONResponse({"detail": f"the study in the path: {exc}"}, 400)
    slots = ctx.stow_slots
    if not slots.acquire(blocking=False):  # as many STOW requests at once as associations
        return JSONResponse({"detail": "too many STOW-RS requests at once: try again"}, 503,
                            headers={"Retry-After": "5"})
    who = principal(request)
    calling, peer, config = who.name if who else "", peer_of(request), ctx.config
    store = InstanceStore(config, ctx.index, ctx.spool, ctx.on_study_opened)
    parser = StowRequest(boundary, int(config.scp.max_instance_mb * MB))
    result = StowResponse()
    studies: dict[str, int] = {}
    patients: dict[str, str] = {}
    try:
        association = await run_in_threadpool(ctx.index.open_association, calling, CALLED, peer, time.time())
    except BaseException:
        slots.release()
        raise

    def store_part(part: Part) -> Outcome:  # in a worker thread: the store fsyncs and writes the index
        found = incoming(part, calling, peer, association, study_uid)
        if isinstance(found, Outcome):
            return found
        stored = store.store(found)
        if stored.status == SUCCESS and stored.study_uid is not None:
            studies[stored.study_uid] = studies.get(stored.study_uid, 0) + 1
            patients[stored.study_uid] = stored.patient_id or ""
        return Outcome(found.sop_class_uid, found.sop_instance_uid, stored.status)

    try:
        try:
            async for chunk in request.stream():
                for part in parser.feed(chunk):
                    if part.problem is not None:
                        result.outcomes.append(Outcome("", "", part.problem, part.reason))
                    else:
                        result.outcomes.append(await run_in_threadpool(store_part, part))
            if not parser.ended:  # the last part never closed: it is not stored
                raise StowError(400, "the body ended before its closing boundary")
        except StowError as exc:
            if not result.outcomes:
                return JSONResponse({"detail": str(exc)}, exc.status)
            # what was stored stays stored: the response says so, and what the rest was
            result.outcomes.append(Outcome("", "", CANNOT_UNDERSTAND, str(exc)))
    finally:
        await run_in_threadpool(_finish, ctx, association, calling, peer, result, studies, patients)
        slots.release()
    if not result.outcomes:
        return JSONResponse({"detail": "no instance in the request"}, 400)
    body = await run_in_threadpool(_response, ctx, association, result, str(request.base_url).rstrip("/"))
    return JSONResponse(body, result.http_status, media_type=DICOM_JSON)


def _response(ctx: ConsoleContext, association: int, result: StowResponse, base: str) -> dict:
    """The response data set, with the WADO-RS URL of each instance stored (node/console/wado.py)."""
    rows = ctx.index.query("SELECT sop_instance_uid, study_uid, series_uid FROM instances WHERE association_id=?",
                           (association,))
    urls = {r["sop_instance_uid"]: f"{base}/dicomweb/studies/{r['study_uid']}/series/{r['series_uid']}/instances/"
                                   f"{r['sop_instance_uid']}" for r in rows}
    studies = {r["study_uid"] for r in rows}
    study_url = f"{base}/dicomweb/studies/{next(iter(studies))}" if len(studies) == 1 else None
    return result.dataset(urls, study_url).to_json_dict()


def _finish(ctx: ConsoleContext, association: int, calling: str, peer: str, result: StowResponse,
            studies: dict[str, int], patients: dict[str, str]) -> None:
    """The request's association row closed with its counts; its transfer in the audit trail."""
    failures = len(result.outcomes) - len(result.stored)
    ctx.index.close_association(association, len(result.stored), failures, time.time())
    if studies or failures:
        ctx.trail.record(AuditRecord(
            AuditEvent.INSTANCES_TRANSFERRED, "C", AuditOutcome.SUCCESS if not failures else AuditOutcome.MINOR_FAILURE,
            calling, peer, studies=studies, patients=patients, person=True, reason="STOW-RS"), time.time())
