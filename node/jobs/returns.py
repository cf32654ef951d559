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
        if "retain_uids" in project.options:  # its copies keep the source UIDs: no return path (deidentify.py)
            continue
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
    """Re-identify the returned study and queue it for its round trip's destinations. A failure
    for good fails the round trip too (`returned_failed`, from the runner's failure notices); a
    transient one leaves it `returned` while the job is retried."""
    files = [f for series in view.series for f in series.files]
    if returned.round_trip is None:
        reason = (f"results at project {returned.project}'s return AE title match none of its round trips"
                  f" (study {view.study_uid}): quarantined")
        _quarantine(runner, files, reason)
        raise JobError(reason)
    trip = _current_trip(RoundTrips(runner.index), returned.round_trip)
    project = runner.config.deidentification.get(returned.project)
    if trip is None or project is None:
        reason = (f"round trip {returned.round_trip} of project {returned.project} is no longer kept"
                  " (mapping_days passed, or the project was removed): quarantined")
        _quarantine(runner, files, reason)
        raise JobError(reason)
    _receive(runner, job, trip, project.key(), view, files, progress)


def _current_trip(trips: RoundTrips, trip_id: int) -> RoundTrip | None:
    """The round trip a return was decided for, or the newer one that superseded it (the study
    was sent again since: that one awaits the results)."""
    trip = trips.get(trip_id)
    if trip is not None and trip.state is TripState.SUPERSEDED:
        trip = trips.find(trip.project, trip.study_digest)
    return trip


def returned_failed(runner: JobRunner, returned: ReturnedResults, reason: str) -> None:
    """The return job failed for good (at once, or past its retry deadline): its round trip
    fails with the reason, and the "AI ran: failed" notice goes to its results_to."""
    if returned.round_trip is None:  # quarantined: no round trip awaited it
        return
    trips = RoundTrips(runner.index)
    trip = _current_trip(trips, returned.round_trip)
    if trip is None:
        return
    try:
        trips.move(trip.id, TripState.FAILED, time.time(), reason=reason[:1000])
    except TripMoved:
        return  # delivered meanwhile, or another replica said it
    _notify(runner, trip, f"results came back but could not be delivered: {reason}", "returned-failed")


def _receive(runner: JobRunner, job: Job, trip: RoundTrip, key: bytes, view: StudyView, files: list[Path],
             progress: Progress) -> None:
    trips = RoundTrips(runner.index)
    outputs = f"{job.id}:returned"
    made = [Path(f) for f in job.outputs.get(outputs, [])]
    if not made or not all(f.is_file() for f in made):  # else a re-run: re-identified already
        _move(trips, trip, TripState.RETURNED, return_job=job.id)
        with runner.stage(job, "reidentify", progress):
            made, refused = _reidentified(runner, trip, key, view)
        if not made:
            raise JobError(f"nothing that came back could be re-identified: {refused[0] if refused else 'no instance'}")
        runner.jobs.record_outputs(job.id, outputs, made)
        note = f"{len(refused)} instance(s) quarantined: {refused[0]}"[:1000] if refused else None
        trip = trips.get(trip.id) or trip
    else:
        trip = trips.get(trip.id) or trip
        note = trip.reason
    source = study_from_index(runner.index, trip.study_uid, runner.data_dir) or StudyView(trip.study_uid, "", "", "",
                                                                                        [])
    with runner.stage(job, "enqueue", progress):
        for name in trip.results_to:  # filed under the source study: its audit trail and retention see them
            runner.outbox.enqueue(outputs, trip.study_uid, runner.destination(name, source), made,
                                  guard=runner.still_current(job))
    if trip.state is not TripState.DELIVERED:  # (a re-run after the move: delivered already)
        _move(trips, trip, TripState.DELIVERED, reason=note)
    logs.event(log, "round_trip_delivered", job=job.id, round_trip=trip.id, project=trip.project,
               source_job=trip.job_id, instances=len(made), quarantined=note is not None)


def _reidentified(runner: JobRunner, trip: RoundTrip, key: bytes, view: StudyView) -> tuple[list[Path], list[str]]:
    """Each returned instance re-identified and written, or quarantined with its reason. Done
    again without the quarantined ones while a refusal takes away what another refers to (an SR
    must not be delivered pointing at a SEG that was not)."""
    # here, not at the top: the de-identification modules bring pydicom's SR code dictionary,
    # 0.16 s of every node's start where no project sends studies out
    from node.deid.reidentify import Refused, reidentify

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
            sealed = mapping.source_of(trip.project, mapping_key, pseudonyms.lookup(uid))
            known[uid] = sealed
        if known[uid] is None:
            return None
        source_study, source_uid = str(known[uid]).split("\n", 1)
        if source_study != trip.study_uid:
            raise Refused(f"it refers to {uid}, which was sent with another study")
        return source_uid

    def mint(uid: str) -> str:
        return returned_result_uid(runner.installation_uid, trip.project, trip.study_digest, uid,
                                   runner.config.output.uid_root)

    candidates = {f: series.series_uid for series in view.series for f in series.files}
    folder = runner.data_dir / "results" / f"{trip.id}_returned"
    refused: list[str] = []
    while True:
        ids = {f.stem for f in candidates} | set(candidates.values())
        made: list[Path] = []
        dropped: dict[Path, str] = {}
        for path in candidates:
            try:
                result = reidentify(pydicom.dcmread(path), source_of=source_of, study=study, mint=mint, returned=ids)
                _validate(result)
                buffer = BytesIO()
                result.save_as(buffer, enforce_file_format=True)
            except MappingError as exc:  # a row altered, or the key changed: nothing of it can be trusted
                raise JobError(f"round trip {trip.id}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - whatever the service sent, the rest goes on
                dropped[path] = (f"round trip {trip.id} of project {trip.project}: {exc}" if isinstance(exc, Refused)
                                 else f"round trip {trip.id} of project {trip.project}: instance {path.stem} is not a"
                                      f" valid {_kind(path)} ({type(exc).__name__})")[:1000]
                continue
            target = folder / f"{result.SOPInstanceUID}.dcm"
            runner.spool.store(target, [buffer.getvalue()])
            made.append(target)
        if not dropped:
            return made, refused
        for path, reason in dropped.items():
            _quarantine(runner, [path], reason)
            refused.append(reason)
            del candidates[path]
        for stale in made:  # written in this pass; the next pass writes what still stands
            stale.unlink(missing_ok=True)


def _validate(result: Dataset) -> None:
    """Any instance needs the identity the PACS files it by; a SEG must parse as highdicom's
    Segmentation, with a type, frames and pixels that agree, and an SR as its highdicom class
    (parsing alone does not run the checks highdicom's constructors do, hence the SEG's here)."""
    import highdicom as hd

    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"):
        if not result.get(keyword):
            raise ValueError(f"it has no {keyword}")
    sop_class = str(result.SOPClassUID)
    if sop_class == SEG_CLASS:
        hd.seg.Segmentation.from_dataset(result, copy=True)
        frames = int(result.get("NumberOfFrames") or 0)
        if result.get("SegmentationType") not in ("BINARY", "FRACTIONAL", "LABELMAP") or not result.get(
                "SegmentSequence") or not result.get("ReferencedSeriesSequence") or frames < 1 or \
                len(result.get("PerFrameFunctionalGroupsSequence") or []) != frames:
            raise ValueError("its segments, frames or references are missing or disagree")
        if result.pixel_array.size < frames * int(result.Rows) * int(result.Columns) or not result.Rows:
            raise ValueError("its pixel data is shorter than its frames")
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
    """Round trips past their deadline become timed out, each with its notice; never raises. One
    whose results are arriving now (their study is still receiving) is left to them."""
    trips = RoundTrips(runner.index)
    timed_out = 0
    try:
        overdue = trips.overdue(time.time())
        arriving = _arriving(runner, {trip.project for trip in overdue}) if overdue else set()
    except Exception as exc:  # noqa: BLE001 - the index busy: the next sweep
        logs.event(log, "round_trip_sweep_failed", logging.WARNING, error=type(exc).__name__)
        return 0
    for trip in overdue:
        if (trip.project, trip.study_digest) in arriving:
            continue
        reason = (f"the external AI service of project {trip.project} sent no results within the rule's"
                  f" {(trip.deadline - trip.sent_at) / 60:.3g} minutes")
        try:
            trips.move(trip.id, TripState.TIMED_OUT, time.time(), reason=reason)
        except TripMoved:
            continue  # results came, or another replica timed it out
        except Exception as exc:  # noqa: BLE001 - the index busy: the next sweep
            logs.event(log, "round_trip_sweep_failed", logging.WARNING, error=type(exc).__name__)
            return timed_out
        timed_out += 1
        logs.event(log, "round_trip_timed_out", logging.WARNING, round_trip=trip.id, project=trip.project,
                   job=trip.job_id, rule=trip.rule)
        _notify(runner, trip, reason, "timeout")
    return timed_out


def _arriving(runner: JobRunner, projects: set[str]) -> set[tuple[str, str]]:
    """(project, study digest) of every study still receiving, for these projects."""
    out = set()
    for name in projects:
        project = runner.config.deidentification.get(name)
        try:
            pseudonyms = Pseudonyms(project.key(), name) if project else None
        except ValueError:
            continue
        if pseudonyms is not None:
            out |= {(name, pseudonyms.lookup(study_uid)) for study_uid, _ in runner.index.receiving_studies()}
    return out


def _notify(runner: JobRunner, trip: RoundTrip, reason: str, kind: str) -> None:
    """The "AI ran: failed" notice of a round trip, in the source study, to its results_to."""
    from node.jobs.notices import queue_notice

    try:
        job = runner.jobs.get(trip.job_id)
        view = study_from_index(runner.index, trip.study_uid, runner.data_dir)
        if view is None or not view.series or not trip.results_to:
            return
        applied = next((a for a in job.decision.applied if a.rule == trip.rule), None) if job.decision else None
        series = next((s for s in view.series if applied and s.series_uid == applied.series_uid), view.series[0])
        queue_notice(runner, job, view, series, rule=trip.rule, models=[f"external AI ({trip.project})"],
                     destinations=list(trip.results_to), reason=reason, kind=kind)
    except Exception as exc:  # noqa: BLE001 - a notice must not stop the sweep (no message: it may quote data)
        logs.event(log, "notice_failed", logging.WARNING, job=trip.job_id, error=type(exc).__name__)
