"""What an operator can do from the console (pages and API share these): retry a job or a
delivery, test a destination with C-ECHO, explain routing for files or a received study,
reload the configuration, run retention now."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from node.console.context import ConsoleContext
from node.jobs.store import IllegalTransition, UnknownJob
from node.route.study import StudyView, study_from_folder, study_from_index
from node.send.echo import EchoResult, echo_destination as echo_peer
from node.send.outbox import delivery_state, resend as resend_outbox, retry as retry_outbox

MAX_UPLOAD_FILES = 2000


class ActionError(Exception):
    """Refused, with an HTTP status and a message for the operator."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def retry_job(ctx: ConsoleContext, job_id: int) -> str:
    try:
        ctx.jobs.retry(job_id)
    except UnknownJob:
        raise ActionError(404, f"no job {job_id}") from None
    except IllegalTransition as exc:
        raise ActionError(409, str(exc)) from None
    ctx.wake_jobs()
    return f"job {job_id} queued"


def retry_delivery(ctx: ConsoleContext, item_id: int) -> str:
    state = delivery_state(ctx.index, item_id)
    if state is None:
        raise ActionError(404, f"no outbox item {item_id}")
    if not retry_outbox(ctx.index, item_id, ctx.config.sending.deadline_s):
        raise ActionError(409, f"outbox item {item_id} is {state}: only dead or pending items are retried")
    ctx.wake_outbox()
    return f"outbox item {item_id} queued for delivery"


def resend_delivery(ctx: ConsoleContext, item_id: int) -> str:
    refused = resend_outbox(ctx.index, item_id, ctx.config.sending.deadline_s, ctx.jobs.newer_job)
    if refused is not None:
        raise ActionError(404 if refused.startswith("no outbox item") else 409, refused)
    ctx.wake_outbox()
    return f"outbox item {item_id} queued to be sent again (the same files and UIDs)"


def echo_destination(ctx: ConsoleContext, name: str) -> EchoResult:
    config = ctx.config
    peer = config.destinations.get(name)
    if peer is None:
        raise ActionError(404, f"no destination {name!r}")
    return echo_peer(config.scp.ae_title, peer, timeout=min(config.sending.timeout_s, 10.0))


@dataclass
class Explained:
    study_uid: str
    series: list[dict[str, Any]]
    calling_ae: str
    peer: str
    explanation: str


def _explain(ctx: ConsoleContext, view: StudyView) -> Explained:
    series = [{"series_uid": s.series_uid, "modality": s.tags.get("Modality"), "number": s.tags.get("SeriesNumber"),
               "instances": s.instance_count} for s in view.series]
    return Explained(view.study_uid, series, view.calling_ae, view.peer,
                     ctx.rules.evaluate(view).explain(ctx.config.sender_warning(view.calling_ae)))


def explain_study(ctx: ConsoleContext, study_uid: str) -> Explained:
    view = study_from_index(ctx.index, study_uid, ctx.data_dir)
    if view is None:
        raise ActionError(404, f"no stored instances for study {study_uid}")
    return _explain(ctx, view)


def explain_files(ctx: ConsoleContext, files: Iterable[tuple[str, bytes]], calling_ae: str = "",
                  called_ae: str = "", peer: str = "") -> list[Explained]:
    """Routing for uploaded files, as if `calling_ae` at `peer` had sent them now."""
    folder = Path(tempfile.mkdtemp(prefix="explain-"))
    try:
        count = 0
        for count, (_, content) in enumerate(files, start=1):
            if count > MAX_UPLOAD_FILES:
                raise ActionError(413, f"at most {MAX_UPLOAD_FILES} files at once")
            (folder / f"{count:05d}.dcm").write_bytes(content)  # never the client's file name
        views = study_from_folder(folder, calling_ae, called_ae, peer)
        if not views:
            raise ActionError(422, f"none of the {count} files is a DICOM file with study and series UIDs")
        return [_explain(ctx, view) for view in views]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
