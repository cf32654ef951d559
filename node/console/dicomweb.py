"""DICOMweb on the console's HTTP server: STOW-RS (PS3.18 10.5) into the node (reads: wado.py).

The instances are stored as they stream in, each with C-STORE's checks and statuses and
acknowledged only once durable (node/receive/store.py); the request is an association in the
index (calling AE: the account's name, called AE `STOW-RS`), so routing rules, the quiet
period by calling AE, metrics and the audit trail see it like one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from common import logs
from node.console.auth import principal, require_operator
from node.console.context import ConsoleContext
from node.console.limits import MB
from node.console.trail import peer_of
from node.receive.counts import Counted, ReceiveCounts
from node.receive.store import CANNOT_UNDERSTAND, SUCCESS, InstanceStore
from node.store.index import IndexFailure
from node.store.spool import checked_uid
from node.receive.stow import CALLED, Outcome, Part, Response as StowResponse, StowError, StowRequest, boundary_of, incoming
from node.store.audit import AuditEvent, AuditRecord, Outcome as AuditOutcome

log = logging.getLogger("node.console")
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
READ_AHEAD_BYTES = 64 * MB  # a part up to this size is stored while the next one is read
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
        await run_in_threadpool(_count_quietly, ctx, Counter({(Counted.STOW_REQUEST, "503"): 1}))
        return JSONResponse({"detail": "too many STOW-RS requests at once: try again"}, 503,
                            headers={"Retry-After": "5"})
    who = principal(request)
    calling, peer = who.name if who else "", peer_of(request)
    try:
        association = await run_in_threadpool(ctx.index.open_association, calling, CALLED, peer, time.time())
    except BaseException:
        slots.release()
        raise
    intake = _Intake(ctx, calling, peer, association, study_uid)
    answered: int | None = None  # the HTTP status, for /metrics
    try:
        answer = await _read(request, StowRequest(boundary, int(ctx.config.scp.max_instance_mb * MB)), intake)
        answered = answer.status_code
        return answer
    except BaseException as exc:
        # a 413 as the body streams past http.max_stow_mb is an HTTPException; a client that went
        # away gets no answer; anything else is answered 500
        answered = (exc.status_code if isinstance(exc, HTTPException)
                    else None if isinstance(exc, (ClientDisconnect, asyncio.CancelledError)) else 500)
        raise
    finally:
        try:
            await intake.settle()
            await run_in_threadpool(intake.finish, answered)
        finally:
            slots.release()


async def _read(request: Request, parser: StowRequest, intake: _Intake) -> Response:
    """Store the body's parts as they arrive; the STOW-RS response."""
    try:
        async for chunk in request.stream():
            await intake.take_all(parser.feed(chunk))
        await intake.drain()
        if not parser.ended:  # the last part never closed: it is not stored
            raise StowError(400, "the body ended before its closing boundary")
    except StowError as exc:
        await intake.take_all(exc.completed)
        await intake.drain()
        if not intake.result.outcomes:
            return JSONResponse({"detail": str(exc)}, exc.status)
        # what was stored stays stored: the response says so, and what the rest was
        intake.result.outcomes.append(Outcome("", "", CANNOT_UNDERSTAND, str(exc)))
    if not intake.result.outcomes:
        return JSONResponse({"detail": "no instance in the request"}, 400)
    body = await run_in_threadpool(_response, intake.ctx, intake.association, intake.result,
                                   str(request.base_url).rstrip("/"))
    return JSONResponse(body, intake.result.http_status, media_type=DICOM_JSON)


class _Intake:
    """One STOW-RS request's parts, stored as they arrive. One part is stored (fsync, index) in a
    worker thread while the next is read and parsed, as a C-STORE receiver's reader thread reads
    ahead of its store: at most two parts in memory, one when the part being stored is large."""

    def __init__(self, ctx: ConsoleContext, calling: str, peer: str, association: int, study_uid: str | None):
        self.ctx, self.calling, self.peer, self.association, self.study_uid = ctx, calling, peer, association, study_uid
        self.store = InstanceStore(ctx.config, ctx.index, ctx.spool, ctx.on_study_opened)
        self.result = StowResponse()
        self.studies: dict[str, int] = {}  # touched by one store at a time, and read once none is under way
        self.patients: dict[str, str] = {}
        self._storing: asyncio.Future[Outcome] | None = None

    async def take_all(self, parts: list[Part]) -> None:
        for part in parts:
            await self.drain()  # outcomes in the order of the parts
            if part.problem is not None:
                self.result.outcomes.append(Outcome("", "", part.problem, part.reason))
                continue
            self._storing = asyncio.ensure_future(run_in_threadpool(self._store, part))
            if len(part.data) > READ_AHEAD_BYTES:
                await self.drain()

    async def drain(self) -> None:
        """The part under way stored, its outcome recorded. Shielded: a cancelled request's store
        still ends (its thread cannot be stopped), and `settle` waits for it."""
        storing = self._storing
        if storing is None:
            return
        try:
            outcome = await asyncio.shield(storing)
        except asyncio.CancelledError:
            raise  # still under way, or done at the same moment: settle() takes its outcome
        except BaseException:
            self._storing = None
            raise
        self._storing = None
        self.result.outcomes.append(outcome)

    async def settle(self) -> None:
        """The request is ending: a store still under way ends (and counts) before the row closes."""
        try:
            await self.drain()
        except Exception as exc:  # noqa: BLE001 - the request is failing already with its own error
            logs.event(log, "stow_store_failed", logging.ERROR, error=type(exc).__name__)

    def _store(self, part: Part) -> Outcome:  # in a worker thread: the store fsyncs and writes the index
        found = incoming(part, self.calling, self.peer, self.association, self.study_uid)
        if isinstance(found, Outcome):
            return found
        stored = self.store.store(found)
        if stored.status == SUCCESS and stored.study_uid is not None:
            self.studies[stored.study_uid] = self.studies.get(stored.study_uid, 0) + 1
            self.patients[stored.study_uid] = stored.patient_id or ""
        return Outcome(found.sop_class_uid, found.sop_instance_uid, stored.status)

    def finish(self, answered: int | None) -> None:
        """The request's association row closed with its counts; its transfer in the audit trail;
        the request, its instances and failure reasons counted for /metrics (`answered`: the HTTP
        status, None when the request ended without one). Bookkeeping that fails is logged: the
        instances are stored, and the answer says so."""
        ctx, result = self.ctx, self.result
        failures = len(result.outcomes) - len(result.stored)
        try:
            ctx.index.close_association(self.association, len(result.stored), failures, time.time())
        except IndexFailure as exc:
            logs.event(log, "stow_bookkeeping_failed", logging.ERROR, what="association", error=type(exc).__name__)
        counted = Counter({(Counted.STOW_REQUEST, str(answered) if answered else "none"): 1,
                           (Counted.STOW_STORED, ""): len(result.stored)})
        counted.update((Counted.STOW_FAILURE, f"0x{o.status:04X}") for o in result.outcomes if o.status != SUCCESS)
        _count_quietly(ctx, counted)
        if self.studies or failures:
            try:
                ctx.trail.record(AuditRecord(
                    AuditEvent.INSTANCES_TRANSFERRED, "C",
                    AuditOutcome.SUCCESS if not failures else AuditOutcome.MINOR_FAILURE, self.calling, self.peer,
                    studies=self.studies, patients=self.patients, person=True, reason="STOW-RS"), time.time())
            except IndexFailure as exc:
                logs.event(log, "stow_bookkeeping_failed", logging.ERROR, what="audit", error=type(exc).__name__)


def _count_quietly(ctx: ConsoleContext, counted: Counter[tuple[Counted, str]]) -> None:
    """For /metrics; a busy index must not change the answer."""
    try:
        ReceiveCounts(ctx.index).add_all(counted)
    except IndexFailure as exc:
        logs.event(log, "count_failed", logging.WARNING, kind="stow", error=type(exc).__name__)


def _response(ctx: ConsoleContext, association: int, result: StowResponse, base: str) -> dict:
    """The response data set, with the WADO-RS URL of each instance stored (node/console/wado.py)."""
    rows = ctx.index.query("SELECT sop_instance_uid, study_uid, series_uid FROM instances WHERE association_id=?",
                           (association,))
    urls = {r["sop_instance_uid"]: f"{base}/dicomweb/studies/{r['study_uid']}/series/{r['series_uid']}/instances/"
                                   f"{r['sop_instance_uid']}" for r in rows}
    studies = {r["study_uid"] for r in rows}
    study_url = f"{base}/dicomweb/studies/{next(iter(studies))}" if len(studies) == 1 else None
    return result.dataset(urls, study_url).to_json_dict()
