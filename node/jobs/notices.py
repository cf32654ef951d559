"""Send the 'AI ran' notice of a job that failed for good (see node.encode.notice).

Called by the runner after it fails a job; per applied rule that runs models and keeps
`notices: true`, one SR goes to the rule's `send_to` destinations through the outbox, so it is
retried like any result. A failed job that re-identified results from outside fails its round
trip, whose notice goes to the round trip's `results_to` (node/jobs/returns.py). Never raises: a notice must not hide the failure it reports.
"""

from __future__ import annotations

import logging
from io import BytesIO
from typing import TYPE_CHECKING

import pydicom

from common import logs
from node.encode.notice import build_failure_notice
from node.encode.uids import ResultUIDs, SourceIdentity
from node.jobs.failures import JobError, Superseded
from node.route.study import SeriesView, StudyView, study_from_index

if TYPE_CHECKING:
    from node.jobs.runner import JobRunner
    from node.jobs.store import Job

log = logging.getLogger("node.jobs")


def send_failure_notices(runner: JobRunner, job: Job, reason: str) -> int:
    """Queue the notice for each rule of a failed job; returns how many deliveries were queued."""
    try:
        return _send(runner, job, reason)
    except Superseded:
        return 0  # the study completed again: its newer job speaks for it
    except Exception as exc:  # noqa: BLE001 - logged without its message (it may quote source data)
        logs.event(log, "notice_failed", logging.WARNING, job=job.id, error=type(exc).__name__)
        return 0


def _send(runner: JobRunner, job: Job, reason: str) -> int:
    if job.decision is not None and job.decision.returned is not None:  # results from outside, re-identified
        from node.jobs.returns import returned_failed

        returned_failed(runner, job.decision.returned, reason)
        return 0
    view = study_from_index(runner.index, job.study_uid, runner.data_dir) if job.decision else None
    if view is None or not view.series:
        return 0
    queued = 0
    for applied in job.decision.applied:
        if not applied.actions.run or not getattr(applied.actions, "notices", True):
            continue
        series = next((s for s in view.series if s.series_uid == applied.series_uid), view.series[0])
        queued += queue_notice(runner, job, view, series, rule=applied.rule, models=list(applied.actions.run),
                               destinations=list(applied.actions.send_to), reason=reason, kind="notice")
    return queued


def queue_notice(runner: JobRunner, job: Job, view: StudyView, series: SeriesView, *, rule: str, models: list[str],
                 destinations: list[str], reason: str, kind: str) -> int:
    """One notice in `series`' study, for `destinations` (@sender resolved): written, then queued
    under the job key `<job>:<rule>:<kind>`. Raises like the runner's stages (the callers catch)."""
    source = pydicom.dcmread(str(series.files[0]), stop_before_pixels=True)
    identity = SourceIdentity.of(view.study_uid, series.series_uid, [f.stem for f in series.files])
    uids = ResultUIDs(installation_uid=runner.installation_uid, job_id=job.id, source=identity,
                      model="+".join(models), model_version=kind, rule=rule, root=runner.config.output.uid_root)
    notice = build_failure_notice(source, rule, models, reason, runner.config.output, uids)
    target = runner.data_dir / "results" / f"{job.id}_{rule}_{kind}" / f"{notice.SOPInstanceUID}.dcm"
    buffer = BytesIO()
    notice.save_as(buffer, enforce_file_format=True)
    runner.spool.store(target, [buffer.getvalue()])
    queued = 0
    for name in destinations:
        try:
            destination = runner.destination(name, view)
        except JobError as exc:  # @sender names no one (and no fallback): the other destinations still get it
            logs.event(log, "notice_destination_unresolved", logging.WARNING, job=job.id, rule=rule,
                       reason=str(exc))
            continue
        runner.outbox.enqueue(f"{job.id}:{rule}:{kind}", view.study_uid, destination, [target],
                              guard=runner.still_current(job, running=False))
        queued += 1
    logs.event(log, "notice_queued", job=job.id, rule=rule, kind=kind, destinations=queued)
    return queued
