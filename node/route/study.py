"""What routing rules look at: a study's series with their routing tags, and who sent it."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from common.orientation import plane_of_orientation
from node.deflate import inflate
from node.routing_tags import ROUTING_KEYWORDS, routing_values
from node.store.index import Index

# Routing-tag keyword -> column of the series table
SERIES_COLUMNS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "SeriesDescription": "description",
    "SeriesNumber": "number",
    "SOPClassUID": "sop_class_uid",
    "ImageType": "image_type",
    "ImageOrientationPatient": "orientation",
    "Rows": "rows",
    "Columns": "columns",
    "SliceThickness": "slice_thickness",
}
PSEUDO_TAGS = {"InstanceCount": "number of instances in the series"}
ROUTABLE = set(SERIES_COLUMNS) | set(PSEUDO_TAGS)


def orientation_class(iop: list[float] | None) -> str | None:
    """axial, coronal, sagittal or oblique, from ImageOrientationPatient (common.orientation:
    30 degrees or more off every patient axis is oblique, a gantry-tilted CT is axial)."""
    return plane_of_orientation(iop)


@dataclass
class SeriesView:
    series_uid: str
    tags: dict[str, Any]
    instance_count: int
    files: list[Path] = field(default_factory=list)
    missing: int = 0  # indexed instances whose file is gone (found by start-up reconciliation)

    @property
    def orientation(self) -> str | None:
        return orientation_class(self.tags.get("ImageOrientationPatient"))

    def value(self, keyword: str) -> Any:
        return self.instance_count if keyword == "InstanceCount" else self.tags.get(keyword)

    def label(self) -> str:
        number = self.tags.get("SeriesNumber")
        description = self.tags.get("SeriesDescription") or ""
        return f"series {number if number is not None else '?'} {description!r} ({self.series_uid})"


@dataclass
class StudyView:
    study_uid: str
    calling_ae: str
    called_ae: str
    peer: str
    series: list[SeriesView]

    @property
    def missing(self) -> int:
        """Indexed instances of the study whose file is gone."""
        return sum(s.missing for s in self.series)


def _series_tags(row: Any) -> dict[str, Any]:
    tags = {keyword: row[column] for keyword, column in SERIES_COLUMNS.items()}
    if tags["ImageOrientationPatient"]:
        tags["ImageOrientationPatient"] = json.loads(tags["ImageOrientationPatient"])
    if tags["ImageType"]:
        tags["ImageType"] = tags["ImageType"].split("\\")
    return tags


def study_from_index(index: Index, study_uid: str, data_dir: Path) -> StudyView | None:
    """The study as routing and the job see it: its series and the files still on disk (an
    instance whose file reconciliation found gone is left out and counted in its series' `missing`)."""
    rows = index.study_series(study_uid)
    origin = index.study_origin(study_uid)
    if not rows or origin is None:
        return None
    files: dict[str, list[Path]] = {}
    missing: dict[str, int] = {}
    for instance in index.study_instances(study_uid):
        if instance["missing"]:
            missing[instance["series_uid"]] = missing.get(instance["series_uid"], 0) + 1
        else:
            files.setdefault(instance["series_uid"], []).append(data_dir / instance["path"])
    series = [SeriesView(row["series_uid"], _series_tags(row), len(files.get(row["series_uid"], [])),
                         files.get(row["series_uid"], []), missing.get(row["series_uid"], 0)) for row in rows]
    return StudyView(study_uid, origin["calling_ae"] or "", origin["called_ae"] or "", origin["peer"] or "", series)


def _routing_dataset(path: Path) -> pydicom.Dataset:
    """A part-10 file's routing tags. A deflated one is inflated within the node's bound first
    (node/deflate.py): pydicom would inflate a deflate bomb uploaded to be explained whole. The
    data set starts where the file meta group ends, as pydicom reads it (a group length that is
    absent or wrong is only logged by pydicom: such files are read here too)."""
    with path.open("rb") as fp:
        read_preamble(fp, False)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag >> 16 != 2)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(ROUTING_KEYWORDS))
        deflated = fp.read()
    return read_dataset(io.BytesIO(inflate(deflated)), is_implicit_VR=False, is_little_endian=True,
                        specific_tags=[Tag(k) for k in ROUTING_KEYWORDS])


def study_from_folder(folder: Path, calling_ae: str = "", called_ae: str = "", peer: str = "") -> list[StudyView]:
    """Studies in a folder of DICOM files (for `route explain` before anything is sent)."""
    studies: dict[str, dict[str, SeriesView]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = _routing_dataset(path)
        except Exception:  # noqa: BLE001 - not DICOM, or damaged (a deflated stream that does not inflate whole)
            continue
        values = routing_values(ds)
        if not values["StudyInstanceUID"] or not values["SeriesInstanceUID"]:
            continue
        series = studies.setdefault(str(values["StudyInstanceUID"]), {})
        uid = str(values["SeriesInstanceUID"])
        if uid not in series:
            tags = {k: values.get(k) for k in SERIES_COLUMNS}
            tags["ImageOrientationPatient"] = [float(v) for v in tags["ImageOrientationPatient"] or []] or None
            tags["ImageType"] = list(tags["ImageType"]) if tags["ImageType"] else None
            series[uid] = SeriesView(uid, tags, 0)
        series[uid].instance_count += 1
        series[uid].files.append(path)
    return [StudyView(uid, calling_ae, called_ae, peer, list(s.values())) for uid, s in studies.items()]
