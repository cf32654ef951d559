"""A rule's deidentify action: the chosen series de-identified for a project (node/deid), written
durably next to the job's results, its mapping recorded (node/store/pseudonyms.py), for the
outbox to send. The same study de-identified again gives the same files (keyed pseudonyms), so
a job re-run after a crash sends what it sent before.
"""

from __future__ import annotations

import logging
import time
from io import BytesIO
from pathlib import Path

import pydicom

from common import logs
from node.config import DeidProject
from node.deid.engine import BurnedInAnnotation, deidentify
from node.deid.profile import Option, Profile
from node.deid.pseudonyms import Pseudonyms
from node.jobs.failures import JobError
from node.store.index import Index
from node.store.pseudonyms import PseudonymMap
from node.store.spool import Spool

log = logging.getLogger("node.jobs")


def profile_of(project: DeidProject) -> Profile:
    return Profile(frozenset(Option(o) for o in project.options),
                   frozenset((e.creator, e.element) for e in project.safe_private))


def deidentified_series(job_id: int, rule: str, files: list[Path], name: str, project: DeidProject, folder: Path,
                        spool: Spool, index: Index) -> list[Path]:
    """The series' files de-identified into `folder`; JobError when one may not go (burned-in
    annotation the project does not allow: none goes, since part of a series would mislead)."""
    try:
        pseudonyms = Pseudonyms(project.key(), name)
    except ValueError as exc:
        raise JobError(f"rule {rule}: project {name}: {exc}") from None
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
        study = str(made.dataset.StudyInstanceUID)
    now = time.time()
    with index.transaction() as db:
        PseudonymMap.record(db, name, pseudonyms.mapping_key(), uids, study, job_id, now, project.mapping_days * 86400)
    logs.event(log, "deidentified", job=job_id, rule=rule, project=name, instances=len(written),
               study_pseudonym=study)
    return written
