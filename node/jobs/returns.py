"""The return path of de-identification (README, "De-identification"): what a project's service
sends back is recognised, re-identified and delivered as if the node had made it.

- Recognised when its study completes (`returned_decision`): a study whose UID is the
  pseudonymous study of a round trip (node/store/roundtrips.py) is its results, whatever AE
  title or STOW-RS request brought it; a study that came in at a project's `return_ae_title`
  and matches none is quarantined. Neither is ever routed by the rules: a pseudonymous study
  must not reach the PACS as it is.
- Re-identified by its job (`receive_results`): each instance through node/deid/reidentify.py
  with the project's mapping and the source's sealed patient and study attributes, then parsed
  by highdicom as its class (a SEG as a Segmentation, an SR as its SR class: the checks the
  node's own results pass at construction), written and queued for the round trip's
  `results_to`. An instance that cannot be re-identified or does not parse is quarantined with
  its reason (spool quarantine/); the others go.
- Timed out (`time_out_overdue`, every TIMEOUT_SWEEP_S): a round trip still waiting past its
  deadline becomes `timed_out`, and an "AI ran: failed" notice goes to its `results_to`.
"""

from __future__ import annotations

import logging
import time
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset

from common import logs
from node.config import NodeConfig
from node.deid.pseudonyms import Pseudonyms
from node.deid.reidentify import Refused, reidentify
from node.encode.uids import returned_result_uid
from node.jobs.failures import JobError
from node.route.decision import ReturnedResults, RoutingDecision
from node.route.study import StudyView, study_from_index
from node.store.index import Index
from node.store.pseudonyms import MappingError, PseudonymMap, unseal
from node.store.roundtrips import RoundTrip, RoundTrips, TripMoved, TripState

if TYPE_CHECKING:
    from node.jobs.runner import JobRunner, Progress
    from node.jobs.store import Job

log = logging.getLogger("node.jobs")
TIMEOUT_SWEEP_S = 30.0
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.22": "EnhancedSR", "1.2.840.10008.5.1.4.1.1.88.33": "ComprehensiveSR",
              "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive3DSR"}


def returned_decision(view: StudyView, config: NodeConfig, index: Index, rules_version: str) -> RoutingDecision | None:
    """The decision for a study that a project sent back; None for any other study."""
    trips = RoundTrips(index)
    for name, project in config.deidentification.items():
        try:
            digest = Pseudonyms(project.key(), name).lookup(view.study_uid)
        except ValueError:  # its key is unreadable: its results wait in the return AE title's quarantine
            logs.event(log, "deidentification_key_unreadable", logging.WARNING, project=name)
            continue
        trip = trips.find(name, digest)
        if trip is not None:
            return _decision(ReturnedResults(project=name, round_trip=trip.id), rules_version,
                             f"results of project {name} for round trip {trip.id} (rule {trip.rule}, job"
                             f" {trip.job_id}): re-identified for {', '.join(trip.results_to) or 'no destination'}")
    name = config.project_returning_to(view.called_ae)
    if name is not None:
        return _decision(ReturnedResults(project=name, round_trip=None), rules_version,
                         f"came in at project {name}'s return AE title {view.called_ae} and matches none of its"
                         " round trips: quarantined")
    return None


def _decision(returned: ReturnedResults, rules_version: str, explanation: str) -> RoutingDecision:
    return RoutingDecision(rules_version=rules_version, mode="returned", priority=0, applied=(), outcomes=(),
                           explanation=explanation, returned=returned)


def receive_results(runner: JobRunner, job: Job, returned: ReturnedResults, view: StudyView,
                    progress: Progress) -> None:
    """Re-identify the returned study and queue it for its round trip's destinations."""
    files = [f for series in view.series for f in series.files]
    if returned.round_trip is None:
        reason = (f"results at project {returned.project}'s return AE title match none of its round trips"
                  f" (study {view.study_uid}): quarantined")
        _quarantine(runner, files, reason)
        raise JobError(reason)
    trips = RoundTrips(runner.index)
    trip = trips.get(returned.round_trip)
    project = runner.config.deidentification.get(returned.project)
    if trip is None or project is None:
        reason = (f"round trip {returned.round_trip} of project {returned.project} is no longer kept"
                  " (mapping_days passed, or the project was removed): quarantined")
        _quarantine(runner, files, reason)
        raise JobError(reason)
    key = f"{job.id}:returned"
    made = [Path(f) for f in job.outputs.get(key, [])]
    if not made or not all(f.is_file() for f in made):  # else a re-run: re-identified already
        _move(trips, trip, TripState.RETURNED, return_job=job.id)
        with runner.stage(job, "reidentify", progress):
            made, refused = _reidentified(runner, job, trip, project.key(), view, files)
        if not made:
            reason = f"nothing that came back could be re-identified: {refused[0]}"
            _move(trips, trip, TripState.FAILED, reason=reason[:1000])
            raise JobError(reason)
        runner.jobs.record_outputs(job.id, key, made)
        note = f"{len(refused)} instance(s) quarantined: {refused[0]}"[:1000] if refused else None
    else:
        note = trip.reason
    source = study_from_index(runner.index, trip.study_uid, runner.data_dir) or StudyView(trip.study_uid, "", "", "",
                                                                                        [])
    with runner.stage(job, "enqueue", progress):
        for name in trip.results_to:
            runner.outbox.enqueue(key, job.study_uid, runner.destination(name, source), made,
                                  guard=runner.still_current(job))
    _move(trips, trip, TripState.DELIVERED, reason=note)
    logs.event(log, "round_trip_delivered", job=job.id, round_trip=trip.id, project=trip.project,
               source_job=trip.job_id, instances=len(made), quarantined=note is not None)


def _reidentified(runner: JobRunner, job: Job, trip: RoundTrip, key: bytes, view: StudyView,
                  files: list[Path]) -> tuple[list[Path], list[str]]:
    pseudonyms = Pseudonyms(key, trip.project)
    mapping_key = pseudonyms.mapping_key()
    mapping = PseudonymMap(runner.index)
    try:
        study = Dataset.from_json(unseal(mapping_key, (trip.project, "study", trip.study_digest), trip.sealed_study))
    except MappingError as exc:  # the project's key changed since the copy went
        raise JobError(f"round trip {trip.id}: {exc}") from None
    known: dict[str, str | None] = {}

    def source_of(uid: str) -> str | None:
        if uid not in known:
            known[uid] = mapping.source_of(trip.project, mapping_key, pseudonyms.lookup(uid))
        return known[uid]

    def mint(uid: str) -> str:
        return returned_result_uid(runner.installation_uid, trip.project, uid, runner.config.output.uid_root)

    returned = {instance.stem for instance in files}
    folder = runner.data_dir / "results" / f"{job.id}_returned"
    made: list[Path] = []
    refused: list[str] = []
    for path in files:
        try:
            result = reidentify(pydicom.dcmread(path), source_of=source_of, study=study, mint=mint, returned=returned)
            _validate(result)
        except (Refused, ValueError, AttributeError, KeyError, TypeError) as exc:
            reason = f"round trip {trip.id} of project {trip.project}: {exc}"[:1000] if isinstance(exc, Refused) \
                else f"round trip {trip.id} of project {trip.project}: instance {path.stem} is not a valid" \
                     f" {_kind(path)} ({type(exc).__name__})"
            _quarantine(runner, [path], reason)
            refused.append(reason)
            continue
        buffer = BytesIO()
        result.save_as(buffer, enforce_file_format=True)
        target = folder / f"{result.SOPInstanceUID}.dcm"
        runner.spool.store(target, [buffer.getvalue()])
        made.append(target)
    return made, refused


def _validate(result: Dataset) -> None:
    """A SEG or an SR must parse as its highdicom class (ValueError, AttributeError... if not);
    any instance needs the identity the PACS files it by."""
    import highdicom as hd

    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        if not result.get(keyword):
            raise ValueError(f"it has no {keyword}")
    sop_class = str(result.SOPClassUID)
    if sop_class == SEG_CLASS:
        hd.seg.Segmentation.from_dataset(result, copy=True)
    elif sop_class in SR_CLASSES:
        getattr(hd.sr, SR_CLASSES[sop_class]).from_dataset(result, copy=True)


def _kind(path: Path) -> str:
    try:
        sop_class = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
    except Exception:  # noqa: BLE001 - only for the reason's wording
        return "DICOM instance"
    return "SEG" if sop_class == SEG_CLASS else "SR" if sop_class in SR_CLASSES else "DICOM instance"


def _quarantine(runner: JobRunner, files: list[Path], reason: str) -> None:
    """A copy of each file in the spool's quarantine with the reason (the stored study stays
    until retention removes it; the copy is what an operator inspects)."""
    for path in files:
        if path.is_file():
            where = runner.spool.quarantine([path.read_bytes()], reason)
            logs.event(log, "returned_quarantined", logging.WARNING, instance=path.stem, file=where.name,
                       reason=reason[:500])


def _move(trips: RoundTrips, trip: RoundTrip, target: TripState, **columns: object) -> None:
    try:
        trips.move(trip.id, target, time.time(), **columns)
    except TripMoved as exc:  # e.g. superseded: the newer round trip's results will say it
        raise JobError(str(exc)) from None


def time_out_overdue(runner: JobRunner) -> int:
    """Round trips past their deadline become timed out, each with its notice; never raises."""
    trips = RoundTrips(runner.index)
    timed_out = 0
    try:
        overdue = trips.overdue(time.time())
    except Exception as exc:  # noqa: BLE001 - the index busy: the next sweep
        logs.event(log, "round_trip_sweep_failed", logging.WARNING, error=type(exc).__name__)
        return 0
    for trip in overdue:
        reason = (f"the external AI service of project {trip.project} sent no results within the rule's"
                  f" {(trip.deadline - trip.sent_at) / 60:.3g} minutes")
        try:
            trips.move(trip.id, TripState.TIMED_OUT, time.time(), reason=reason)
        except TripMoved:
            continue  # results came, or another replica timed it out
        timed_out += 1
        logs.event(log, "round_trip_timed_out", logging.WARNING, round_trip=trip.id, project=trip.project,
                   job=trip.job_id, rule=trip.rule)
        _notify_timeout(runner, trip, reason)
    return timed_out


def _notify_timeout(runner: JobRunner, trip: RoundTrip, reason: str) -> None:
    from node.jobs.notices import queue_notice

    try:
        job = runner.jobs.get(trip.job_id)
        view = study_from_index(runner.index, trip.study_uid, runner.data_dir)
        if view is None or not view.series or not trip.results_to:
            return
        applied = next((a for a in job.decision.applied if a.rule == trip.rule), None) if job.decision else None
        series = next((s for s in view.series if applied and s.series_uid == applied.series_uid), view.series[0])
        queue_notice(runner, job, view, series, rule=trip.rule, models=[f"external AI ({trip.project})"],
                     destinations=list(trip.results_to), reason=reason, kind="timeout")
    except Exception as exc:  # noqa: BLE001 - a notice must not stop the sweep (no message: it may quote data)
        logs.event(log, "notice_failed", logging.WARNING, job=trip.job_id, error=type(exc).__name__)
