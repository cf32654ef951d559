"""A rule's deidentify action: the chosen series de-identified for a project (node/deid), written
durably next to the job's results, its mapping recorded (node/store/pseudonyms.py), for the
outbox to send; with `results_to`, a round trip opened that awaits the results
(node/store/roundtrips.py, node/jobs/returns.py). The same study de-identified again gives the
same files (keyed pseudonyms), so a job re-run after a crash sends what it sent before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom

from common import logs
from node.config import DeidProject
from node.deid.engine import BurnedInAnnotation, deidentify
from node.deid.profile import Option, Profile
from node.deid.pseudonyms import Pseudonyms
from node.deid.reidentify import patient_and_study
from node.jobs.failures import JobError
from node.route.rules import Deidentify
from node.store.index import Index
from node.store.pseudonyms import PseudonymMap, seal
from node.store.roundtrips import RoundTrips
from node.store.spool import Spool

log = logging.getLogger("node.jobs")
# The UIDs of a sent instance that results refer to, mapped even where the profile keeps them
# (retain_uids): the return path knows what was sent only from the mapping.
SENT_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def profile_of(project: DeidProject) -> Profile:
    return Profile(frozenset(Option(o) for o in project.options),
                   frozenset((e.creator, e.element) for e in project.safe_private))


def pseudonyms_of(rule: str, name: str, project: DeidProject) -> Pseudonyms:
    try:
        return Pseudonyms(project.key(), name)
    except ValueError as exc:
        raise JobError(f"rule {rule}: project {name}: {exc}") from None


@dataclass(frozen=True)
class Sent:
    files: list[Path]
    study_pseudonym: str


def deidentified_series(job_id: int, rule: str, files: list[Path], name: str, project: DeidProject, folder: Path,
                        spool: Spool, index: Index) -> Sent:
    """The series' files de-identified into `folder`; JobError when one may not go (burned-in
    annotation the project does not allow: none goes, since part of a series would mislead)."""
    pseudonyms = pseudonyms_of(rule, name, project)
    profile = profile_of(project)
    written: list[Path] = []
    uids: dict[str, str] = {}
    study = ""
    for path in files:
        source = pydicom.dcmread(path)
        try:
            made = deidentify(source, profile, pseudonyms, project.allow_burned_in)
        except BurnedInAnnotation as exc:
            raise JobError(f"rule {rule}: instance {source.SOPInstanceUID} may not go to project {name}: {exc}"
                           " (allow_burned_in: true sends such instances)") from None
        buffer = BytesIO()
        made.dataset.save_as(buffer, enforce_file_format=True)
        target = folder / f"{made.dataset.SOPInstanceUID}.dcm"
        spool.store(target, [buffer.getvalue()])
        written.append(target)
        uids.update(made.uids)
        uids.update({str(source[k].value): str(made.dataset[k].value) for k in SENT_UIDS
                     if source.get(k) and made.dataset.get(k)})
        study, source_study = str(made.dataset.StudyInstanceUID), str(source.StudyInstanceUID)
    now = time.time()
    with index.transaction() as db:
        PseudonymMap.record(db, name, pseudonyms.mapping_key(),
                            {pseudonyms.lookup(pseudonym): mapped(source_study, source)
                             for source, pseudonym in uids.items()},
                            now, project.mapping_days * 86400)
    # (no pseudonym in the log: with the job it would link the copy to the source study)
    logs.event(log, "deidentified", job=job_id, rule=rule, project=name, instances=len(written))
    return Sent(written, study)


def mapped(source_study: str, source_uid: str) -> str:
    """What the mapping seals for a pseudonym: its source UID with the source study it came with,
    so a result can refer only to what was sent with its own study (node/jobs/returns.py)."""
    return f"{source_study}\n{source_uid}"


def study_pseudonym_of(files: list[Path]) -> str:
    """The pseudonymous study of files written before (a job run again after a crash)."""
    return str(pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def open_round_trip(index: Index, *, job_id: int, rule: str, study_uid: str, action: Deidentify,
                    project: DeidProject, source: Path, study_pseudonym: str) -> int:
    """The round trip awaiting the results of this copy, with the source's patient and study
    attributes sealed in it (what the results get back: node/jobs/returns.py)."""
    if Option.RETAIN_UIDS.value in project.options:
        raise JobError(f"rule {rule}: project {action.project} keeps the source UIDs (retain_uids), so results that"
                       " come back cannot be told from the source study: results_to needs a project without it")
    pseudonyms = pseudonyms_of(rule, action.project, project)
    digest = pseudonyms.lookup(study_pseudonym)
    attributes = patient_and_study(pydicom.dcmread(source, stop_before_pixels=True)).to_json()
    now = time.time()
    with index.transaction() as db:
        trip = RoundTrips.open(db, project=action.project, study_digest=digest, job_id=job_id, rule=rule,
                               study_uid=study_uid, results_to=list(action.results_to),
                               sealed_study=seal(pseudonyms.mapping_key(), (action.project, "study", digest),
                                                 attributes),
                               now=now, deadline=now + action.results_within_minutes * 60,
                               keep_s=project.mapping_days * 86400)
    logs.event(log, "round_trip_open", job=job_id, rule=rule, project=action.project, round_trip=trip,
               within_minutes=action.results_within_minutes)
    return trip
