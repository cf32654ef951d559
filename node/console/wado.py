"""DICOMweb reads on the console's HTTP server: QIDO-RS (PS3.18 10.6) and WADO-RS (10.4) of what
the node holds (node/console/holdings.py), enough for OHIF to open a study and its results
straight from the node.

- QIDO-RS: `/dicomweb/studies`, `/studies/{study}/series`, `.../series/{series}/instances`, with
  matching on StudyInstanceUID, PatientID, AccessionNumber, StudyDate (a range), PatientName and
  ModalitiesInStudy (* and ? wildcards), `limit` and `offset`. Every attribute of the level is
  returned, so `includefield` is satisfied; other keys are ignored with a 299 Warning (10.6.1.2).
- WADO-RS: whole instances (of a study, a series, or one) as `multipart/related;
  type="application/dicom"` Part 10 files in the syntax they are stored in; metadata as
  `application/dicom+json` with pixel data as a BulkDataURI; frames as `multipart/related;
  type="application/octet-stream"` parts, each with its transfer-syntax.

Patient data: operators and admins only (the role that sees the console's patient block). A
search is recorded as a Patient Record read, a metadata or instance retrieve as DICOM Instances
Transferred (R); frames and bulk data, which a viewer asks for by the hundred after the
metadata, are not recorded one by one.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
from typing import Any, Iterator

import numpy as np
import pydicom
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from starlette.concurrency import run_in_threadpool

from node.console.auth import require_operator
from node.console.holdings import INSTANCE_KEYS, SERIES_KEYS, STUDY_KEYS, Held, Holdings, read_header
from node.console.trail import record
from node.send.stow import Instance, MultipartBody
from node.store.audit import AuditEvent

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require_operator)])
DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000
MATCH_KEYS = {"StudyInstanceUID": "0020000D", "PatientID": "00100020", "AccessionNumber": "00080050",
              "StudyDate": "00080020", "PatientName": "00100010", "ModalitiesInStudy": "00080061"}
IGNORED_PARAMS = {"limit", "offset", "includefield", "fuzzymatching"}
PIXEL_DATA = "7FE00010"


class NotHeld(Exception):
    pass


def _holdings(request: Request) -> Holdings:
    ctx = request.app.state.ctx
    return Holdings(ctx.index, ctx.jobs, ctx.data_dir)


def _json(body: list[dict[str, Any]], warning: str | None = None) -> Response:
    headers = {"Warning": f'299 dicom-node: "{warning}"'} if warning else {}
    if not body:
        return Response(status_code=204, headers=headers)  # PS3.18 10.6.3.2: no match
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


def _filters(request: Request) -> tuple[dict[str, str], list[str]]:
    """Matching keys by keyword (a tag in hex is taken too), and the parameters ignored."""
    by_tag = {tag: key for key, tag in MATCH_KEYS.items()}
    filters: dict[str, str] = {}
    ignored = []
    for name, value in request.query_params.items():
        key = by_tag.get(name.upper(), name)
        if key in MATCH_KEYS:
            filters[key] = value
        elif name not in IGNORED_PARAMS:
            ignored.append(name)
    return filters, ignored


def _page(request: Request) -> tuple[int, int]:
    try:
        limit = min(int(request.query_params.get("limit", 100)), MAX_LIMIT)
        offset = max(int(request.query_params.get("offset", 0)), 0)
    except ValueError:
        limit, offset = -1, 0
    return limit, offset


def _matches(value: Any, pattern: str, key: str) -> bool:
    text = str(value or "")
    if key == "StudyDate" and "-" in pattern:
        low, _, high = pattern.partition("-")
        return bool(text) and (not low or text >= low) and (not high or text <= high)
    if key == "ModalitiesInStudy":
        return any(_matches(m, p, "") for m in value for p in pattern.split(","))
    if "*" in pattern or "?" in pattern:
        regex = fnmatch.translate(pattern.replace("[", "[[]"))
        return re.match(regex, text, re.IGNORECASE if key == "PatientName" else 0) is not None
    return text.lower() == pattern.lower() if key == "PatientName" else text == pattern


def _series_headers(held: list[Held]) -> dict[str, tuple[Dataset, int]]:
    """Per series: the header of its first instance and how many it has."""
    counts: dict[str, int] = {}
    first: dict[str, Held] = {}
    for h in held:
        counts[h.series_uid] = counts.get(h.series_uid, 0) + 1
        first.setdefault(h.series_uid, h)
    out = {}
    for uid, h in first.items():
        header = read_header(h.path)
        if header is not None:
            out[uid] = (header, counts[uid])
    return out


def _subset(header: Dataset, keys: tuple[str, ...]) -> Dataset:
    ds = Dataset()
    for key in keys:
        if key in header:
            setattr(ds, key, header[key].value)
    return ds


def _study(holdings: Holdings, study_uid: str, base: str) -> Dataset | None:
    series = _series_headers(holdings.instances(study_uid))
    if not series:
        return None
    header = next(iter(series.values()))[0]
    ds = _subset(header, STUDY_KEYS)
    ds.ModalitiesInStudy = sorted({str(h.get("Modality", "")) for h, _ in series.values()} - {""})
    ds.NumberOfStudyRelatedSeries = len(series)
    ds.NumberOfStudyRelatedInstances = sum(n for _, n in series.values())
    ds.RetrieveURL = f"{base}/studies/{study_uid}"
    return ds


def search_studies(holdings: Holdings, filters: dict[str, str], limit: int, offset: int, base: str) -> list[Dataset]:
    uids = re.split(r"[,\\]", filters["StudyInstanceUID"]) if "StudyInstanceUID" in filters else None
    found: list[Dataset] = []
    skipped = 0
    patient = filters.get("PatientID")
    exact_patient = patient if patient and not set(patient) & {"*", "?"} else None  # a wildcard is matched below
    for study_uid in holdings.studies(uids, exact_patient):
        ds = _study(holdings, study_uid, base)
        if ds is None or not all(_matches(ds.get(k, ""), v, k) for k, v in filters.items() if k != "StudyInstanceUID"):
            continue
        if skipped < offset:
            skipped += 1
            continue
        found.append(ds)
        if len(found) >= limit:
            break
    return found


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _patients(holdings: Holdings, study_uids: list[str]) -> dict[str, str]:
    return {r["study_uid"]: r["patient_id"] or "" for uid in study_uids
            for r in holdings.index.query("SELECT study_uid, patient_id FROM studies WHERE study_uid=?", (uid,))}


@router.get("/studies", summary="QIDO-RS: search for studies")
async def get_studies(request: Request) -> Response:
    filters, ignored = _filters(request)
    limit, offset = _page(request)
    if limit < 0:
        return JSONResponse({"detail": "limit and offset are whole numbers"}, 400)
    holdings, base = _holdings(request), _base(request)
    found = await run_in_threadpool(search_studies, holdings, filters, limit, offset, base)
    uids = [str(ds.StudyInstanceUID) for ds in found]
    record(request, AuditEvent.PATIENT_RECORD, action="R", reason="QIDO-RS", studies={u: 0 for u in uids},
           patients=await run_in_threadpool(_patients, holdings, uids))
    return _json([ds.to_json_dict() for ds in found],
                 f"The following parameters are not supported: {', '.join(ignored)}" if ignored else None)


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: the series of a study")
async def get_series(request: Request, study_uid: str) -> Response:
    holdings, base = _holdings(request), _base(request)

    def series() -> list[dict[str, Any]]:
        out = []
        for uid, (header, count) in _series_headers(holdings.instances(study_uid)).items():
            ds = _subset(header, SERIES_KEYS)
            ds.NumberOfSeriesRelatedInstances = count
            ds.RetrieveURL = f"{base}/studies/{study_uid}/series/{uid}"
            out.append(ds)
        return [ds.to_json_dict() for ds in sorted(out, key=lambda d: (int(d.get("SeriesNumber") or 0),
                                                                       str(d.SeriesInstanceUID)))]
    return _json(await run_in_threadpool(series))


@router.get("/studies/{study_uid}/series/{series_uid}/instances", summary="QIDO-RS: the instances of a series")
async def get_instances(request: Request, study_uid: str, series_uid: str) -> Response:
    holdings, base = _holdings(request), _base(request)

    def instances() -> list[dict[str, Any]]:
        out = []
        for h in holdings.instances(study_uid, series_uid):
            header = read_header(h.path, INSTANCE_KEYS)
            if header is not None:
                ds = _subset(header, INSTANCE_KEYS)
                ds.RetrieveURL = f"{base}/studies/{study_uid}/series/{series_uid}/instances/{h.sop_instance_uid}"
                out.append(ds.to_json_dict())
        return out
    return _json(await run_in_threadpool(instances))


def _metadata(h: Held, base: str) -> dict[str, Any] | None:
    header = read_header(h.path)
    if header is None:
        return None
    body = header.to_json_dict()
    if "Rows" in header:  # an image: its pixel data by reference (PS3.18 F.2.6)
        native_words = int(header.get("BitsAllocated", 8) or 8) > 8 and not header.file_meta.TransferSyntaxUID.is_compressed
        body[PIXEL_DATA] = {"vr": "OW" if native_words else "OB", "BulkDataURI":
                            f"{base}/studies/{h.study_uid}/series/{h.series_uid}/instances/{h.sop_instance_uid}/bulk/{PIXEL_DATA}"}
    return body


async def _retrieve_audited(request: Request, study_uid: str, held: list[Held]) -> None:
    holdings = _holdings(request)
    record(request, AuditEvent.INSTANCES_TRANSFERRED, action="R", reason="WADO-RS", studies={study_uid: len(held)},
           patients=await run_in_threadpool(_patients, holdings, [study_uid]))


@router.get("/studies/{study_uid}/metadata", summary="WADO-RS: the metadata of a study's instances")
@router.get("/studies/{study_uid}/series/{series_uid}/metadata", summary="WADO-RS: the metadata of a series")
@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata",
            summary="WADO-RS: the metadata of an instance")
async def get_metadata(request: Request, study_uid: str, series_uid: str | None = None,
                       sop_uid: str | None = None) -> Response:
    holdings, base = _holdings(request), _base(request)
    held = await run_in_threadpool(_selected, holdings, study_uid, series_uid, sop_uid)
    if not held:
        return JSONResponse({"detail": "not held here (never received, or removed by retention)"}, 404)
    body = [m for m in await run_in_threadpool(lambda: [_metadata(h, base) for h in held]) if m is not None]
    await _retrieve_audited(request, study_uid, held)
    return JSONResponse(body, media_type=DICOM_JSON)


def _selected(holdings: Holdings, study_uid: str, series_uid: str | None, sop_uid: str | None) -> list[Held]:
    held = holdings.instances(study_uid, series_uid)
    return [h for h in held if sop_uid is None or h.sop_instance_uid == sop_uid]


@router.get("/studies/{study_uid}", summary="WADO-RS: a study's instances (multipart/related; application/dicom)")
@router.get("/studies/{study_uid}/series/{series_uid}", summary="WADO-RS: a series' instances")
@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", summary="WADO-RS: one instance")
async def get_instances_files(request: Request, study_uid: str, series_uid: str | None = None,
                              sop_uid: str | None = None) -> Response:
    accept = request.headers.get("accept", "")
    if accept and not any(a in accept for a in ("application/dicom", "*/*", "multipart/related;")) \
            or re.search(r"type=\"?application/(?!dicom)", accept):
        return JSONResponse({"detail": 'instances are served as multipart/related; type="application/dicom"'}, 406)
    holdings = _holdings(request)
    held = await run_in_threadpool(_selected, holdings, study_uid, series_uid, sop_uid)
    files = [Instance(h.path, h.sop_instance_uid, h.path.stat().st_size) for h in held if h.path.exists()]
    if not files:
        return JSONResponse({"detail": "not held here (never received, or removed by retention)"}, 404)
    await _retrieve_audited(request, study_uid, held)
    body = MultipartBody(files)
    return StreamingResponse(iter(body), media_type=body.content_type, headers={"Content-Length": str(len(body))})


def _frames(h: Held, numbers: list[int]) -> tuple[list[bytes], str]:
    ds = pydicom.dcmread(h.path)
    if "PixelData" not in ds:
        raise NotHeld("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if any(not 1 <= n <= count for n in numbers):
        raise NotHeld(f"the instance has frames 1 to {count}")
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        return [get_frame(ds.PixelData, n - 1, number_of_frames=count) for n in numbers], str(syntax)
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated)
    data = ds.PixelData
    if bits % 8 == 0:
        size = bits // 8
        return [bytes(data[(n - 1) * size:n * size]) for n in numbers], str(syntax)
    # 1-bit frames (a binary SEG) are packed across byte boundaries: each one repacked on its own
    unpacked = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    return [np.packbits(unpacked[(n - 1) * bits:n * bits], bitorder="little").tobytes() for n in numbers], str(syntax)


def _multipart(parts: list[bytes], part_type: str) -> tuple[Iterator[bytes], str, int]:
    boundary = secrets.token_hex(16)
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
    chunks = [c for part in parts for c in (head, part, b"\r\n")] + [f"--{boundary}--\r\n".encode()]
    return iter(chunks), boundary, sum(len(c) for c in chunks)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}",
            summary="WADO-RS: frames (1-based, comma-separated) as multipart/related; application/octet-stream")
async def get_frames(request: Request, study_uid: str, series_uid: str, sop_uid: str, frame_list: str) -> Response:
    try:
        numbers = [int(n) for n in frame_list.split(",")]
    except ValueError:
        return JSONResponse({"detail": "frames are numbers from 1, separated by commas"}, 400)
    return await _pixels(request, study_uid, series_uid, sop_uid, numbers)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulk/{tag}",
            summary="WADO-RS: an instance's pixel data (the BulkDataURI of its metadata)")
async def get_bulk(request: Request, study_uid: str, series_uid: str, sop_uid: str, tag: str) -> Response:
    if tag.upper() != PIXEL_DATA:
        return JSONResponse({"detail": "only the pixel data is served as bulk data"}, 404)
    return await _pixels(request, study_uid, series_uid, sop_uid, None)


async def _pixels(request: Request, study_uid: str, series_uid: str, sop_uid: str, numbers: list[int] | None) -> Response:
    held = (await run_in_threadpool(_selected, _holdings(request), study_uid, series_uid, sop_uid))
    if not held:
        return JSONResponse({"detail": "not held here (never received, or removed by retention)"}, 404)

    def read() -> tuple[list[bytes], str]:
        if numbers is not None:
            return _frames(held[0], numbers)
        ds = pydicom.dcmread(held[0].path)
        if "PixelData" not in ds:
            raise NotHeld("the instance has no pixel data")
        return [bytes(ds.PixelData)], str(ds.file_meta.TransferSyntaxUID)
    try:
        parts, syntax = await run_in_threadpool(read)
    except NotHeld as exc:
        return JSONResponse({"detail": str(exc)}, 404)
    chunks, boundary, size = _multipart(parts, f"application/octet-stream; transfer-syntax={syntax}")
    return StreamingResponse(chunks, headers={"Content-Length": str(size)}, media_type=(
        f'multipart/related; type="application/octet-stream"; transfer-syntax={syntax}; boundary={boundary}'))
