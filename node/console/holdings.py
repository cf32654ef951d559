"""What the node holds, as QIDO-RS and WADO-RS see it (PS3.18 10.6, 10.4): a study's received
instances while retention keeps them, and the results its jobs made (SEG, SR, ...), each a Part 10
file on disk. The index knows the received ones; results are found through their jobs' outputs
and their headers read (a handful per study)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.jobs.store import JobStore
from node.store.index import Index

STUDY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID",
              "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription")
SERIES_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "SeriesDate", "SeriesTime",
               "StudyInstanceUID")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                 "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class Held:
    """One instance the node can serve."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    path: Path


class Holdings:
    def __init__(self, index: Index, jobs: JobStore, data_dir: Path):
        self.index, self.jobs, self.data_dir = index, jobs, data_dir

    def studies(self, uids: list[str] | None = None, patient_id: str | None = None) -> Iterator[str]:
        """Study UIDs, newest first: received studies, by UID or Patient ID when given."""
        where, params = [], []
        if uids:
            where.append(f"study_uid IN ({','.join('?' * len(uids))})")
            params += uids
        if patient_id is not None:
            where.append("patient_id=?")
            params.append(patient_id)
        sql = "SELECT study_uid FROM studies" + (f" WHERE {' AND '.join(where)}" if where else "")
        for row in self.index.query(sql + " ORDER BY last_received DESC, study_uid", tuple(params)):
            yield row["study_uid"]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[Held]:
        """The study's instances on disk (received, then results), one per SOP Instance UID."""
        held: dict[str, Held] = {}
        sql = ("SELECT i.series_uid, i.sop_instance_uid, i.path FROM instances i LEFT JOIN missing_files m"
               " ON m.sop_instance_uid = i.sop_instance_uid WHERE i.study_uid=? AND m.sop_instance_uid IS NULL")
        params: tuple[str, ...] = (study_uid,)
        if series_uid is not None:
            sql, params = sql + " AND i.series_uid=?", (study_uid, series_uid)
        for row in self.index.query(sql + " ORDER BY i.path", params):
            held[row["sop_instance_uid"]] = Held(study_uid, row["series_uid"], row["sop_instance_uid"],
                                                 self.data_dir / row["path"])
        for result in self._results(study_uid):
            if series_uid is None or result.series_uid == series_uid:
                held.setdefault(result.sop_instance_uid, result)
        return list(held.values())

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Held | None:
        return next((h for h in self.instances(study_uid, series_uid) if h.sop_instance_uid == sop_uid), None)

    def _results(self, study_uid: str) -> Iterator[Held]:
        """Result files of the study's jobs that are still on disk (retention removes old ones)."""
        seen: set[str] = set()
        for job in self.jobs.all_jobs(study_uid):
            for files in job.outputs.values():
                for name in files:
                    if name in seen:
                        continue
                    seen.add(name)
                    header = read_header(Path(name), ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
                    if header is not None and str(header.get("StudyInstanceUID", "")) == study_uid:
                        yield Held(study_uid, str(header.SeriesInstanceUID), str(header.SOPInstanceUID), Path(name))


def read_header(path: Path, keys: tuple[str, ...] | None = None) -> Dataset | None:
    """The file's data set without pixel data (None: gone or not DICOM)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keys) if keys else None)
    except (OSError, InvalidDicomError, AttributeError):
        return None
