"""Read models for the console, the REST API and `dicom-node status`: one place, one meaning.

Listings are patient-free by default: UIDs, modality, dates the node saw, series and instance
counts. Series descriptions appear only when the site sets `http.show_descriptions` (they are
free text and sometimes carry names).
"""

from __future__ import annotations

import heapq
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors

from node.config import MonitoringConfig, NodeConfig
from node.jobs.store import Job, JobStore
from node.retention import Retention
from node.route.study import orientation_class
from node.send.outbox import list_items
from node.store.index import Index
from node.store.audit import AuditEvent, AuditEventType
from node.store.modelruns import ModelRuns
from node.store.roundtrips import RoundTrips, TripState

RECENT_ASSOCIATIONS = 20
OUTBOX_STATES = ("pending", "sending", "delivered", "dead")


def job_row(job: Job) -> dict[str, Any]:
    """A job as the CLI, the pages and the API show it."""
    decision = job.decision
    return {
        "id": job.id, "study_uid": job.study_uid, "state": job.state.value, "stage": job.stage,
        "attempts": job.attempts, "next_attempt": job.next_attempt, "retry_deadline": job.retry_deadline,
        "created_at": job.created_at, "updated_at": job.updated_at, "reason": job.reason,
        "priority": job.priority, "rules_version": decision.rules_version if decision else None,
        "rules": [a.rule for a in decision.applied] if decision else [],
        "models": sorted({m for a in decision.applied for m in a.actions.run}) if decision else [],
        "stage_seconds": job.stage_seconds(),
        "stages": {name: {"started": start, "ended": end} for name, (start, end) in job.stages.items()},
        "outputs": job.outputs,
        "explanation": decision.explanation if decision else None,
        "completed_by": job.completed_by,
    }


def studies(index: Index, show_descriptions: bool = False, limit: int = 500,
            state: str | None = None) -> list[dict[str, Any]]:
    """Newest first: UID, state, modalities, counts, when received, calling AE."""
    rows = index.query(
        """SELECT s.study_uid, s.state, s.calling_ae, s.first_received, s.last_received, s.completed_at,
                  s.completions,
                  (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS instances,
                  (SELECT COUNT(*) FROM series r WHERE r.study_uid=s.study_uid) AS series,
                  (SELECT w.state FROM work_items w WHERE w.study_uid=s.study_uid ORDER BY w.id DESC LIMIT 1)
                      AS job_state,
                  (SELECT COUNT(*) FROM outbox o WHERE o.study_uid=s.study_uid AND o.state='dead'
                      AND o.job_key LIKE (SELECT CAST(MAX(w.id) AS TEXT) FROM work_items w
                                          WHERE w.study_uid=s.study_uid) || ':%') AS dead,
                  (SELECT COUNT(*) FROM outbox o WHERE o.study_uid=s.study_uid AND o.state IN ('pending', 'sending'))
                      AS sending
           FROM (SELECT * FROM studies""" + (" WHERE state=?" if state else "") +
        """ ORDER BY last_received DESC LIMIT ?) s ORDER BY s.last_received DESC""",
        (state, limit) if state else (limit,))  # the page first: the counts only for the studies shown
    series: dict[str, list[Any]] = {}
    uids = [r["study_uid"] for r in rows]
    for r in index.query("SELECT study_uid, modality, description FROM series WHERE study_uid IN"
                         f" ({','.join('?' * len(uids))}) ORDER BY number, series_uid", uids) if uids else []:
        series.setdefault(r["study_uid"], []).append(r)
    out = []
    for r in rows:
        row = dict(r)
        mine = series.get(row["study_uid"], [])
        row["modalities"] = sorted({s["modality"] for s in mine if s["modality"]})
        row["outcome"] = outcome(row)
        if show_descriptions:
            row["descriptions"] = " | ".join(s["description"] for s in mine if s["description"]) or None
        out.append(row)
    return out


def outcome(row: dict[str, Any]) -> str:
    """A study as an operator needs it at a glance: the worst of its receiving, its latest job
    and its deliveries (failed, dead, then work still to do, then done)."""
    if row["state"] == "receiving":
        return "receiving"
    if row["job_state"] == "failed":
        return "failed"
    if row["dead"]:
        return "dead"
    if row["job_state"] in ("queued", "running", "waiting"):
        return str(row["job_state"])
    if row["sending"]:
        return "sending"
    return str(row["job_state"] or row["state"])


ATTENTION_LIMIT = 20
REFUSED_ASSOCIATIONS_S = 86400.0  # refused callers are listed for a day


def attention(index: Index, data_dir: Path, last_reload: dict[str, Any] | None,
              now: float | None = None, monitoring: MonitoringConfig | None = None) -> list[dict[str, Any]]:
    """What needs an operator, newest first, each with its reason and where to look: failed jobs
    (the study's latest), dead deliveries, round trips that failed or timed out, refused
    associations (the audit trail's node-authentication alerts of the last day), quarantined
    instances and a refused configuration reload."""
    now = time.time() if now is None else now
    items: list[dict[str, Any]] = []
    for r in index.query("SELECT w.id, w.study_uid, w.reason, w.updated_at FROM work_items w WHERE w.state='failed'"
                         " AND NOT EXISTS (SELECT 1 FROM work_items v WHERE v.study_uid=w.study_uid AND v.id>w.id)"
                         " ORDER BY w.updated_at DESC LIMIT ?", (ATTENTION_LIMIT,)):
        items.append({"kind": "job failed", "at": r["updated_at"], "study_uid": r["study_uid"],
                      "what": f"job {r['id']}", "reason": r["reason"] or ""})
    # the study's latest job's only (an earlier job's results are superseded: the study outcome ignores them too)
    for r in index.query("SELECT o.id, o.study_uid, o.destination, o.last_error, o.updated_at FROM outbox o"
                         " WHERE o.state='dead' AND o.job_key LIKE CAST((SELECT MAX(v.id) FROM work_items v"
                         " WHERE v.study_uid=o.study_uid) AS TEXT) || ':%' ORDER BY o.updated_at DESC LIMIT ?",
                         (ATTENTION_LIMIT,)):
        items.append({"kind": "delivery dead", "at": r["updated_at"], "study_uid": r["study_uid"],
                      "what": f"delivery {r['id']} to {r['destination']}", "reason": r["last_error"] or "",
                      "link": "/outbox"})
    for trip in RoundTrips(index).in_states((TripState.FAILED, TripState.TIMED_OUT), ATTENTION_LIMIT):
        items.append({"kind": f"round trip {trip.state.value.replace('_', ' ')}", "at": trip.finished_at,
                      "study_uid": trip.study_uid, "what": f"round trip {trip.id} ({trip.project})",
                      "reason": trip.reason or ""})
    for r in index.query("SELECT recorded_at, actor, peer, detail FROM audit_events WHERE event_id=? AND"
                         " event_type=? AND recorded_at>=? ORDER BY id DESC LIMIT ?",
                         (AuditEvent.SECURITY_ALERT.value, AuditEventType.NODE_AUTHENTICATION.value,
                          now - REFUSED_ASSOCIATIONS_S, ATTENTION_LIMIT)):
        items.append({"kind": "association refused", "at": r["recorded_at"],
                      "what": f"{r['actor'] or '?'} from {r['peer'] or '?'}",
                      "reason": str(json.loads(r["detail"] or "{}").get("reason", "")), "link": "/admin/audit"})
    total, newest = _quarantined(data_dir / "quarantine", ATTENTION_LIMIT)
    for path in newest:
        try:
            at = path.stat().st_mtime
            reason = path.read_text(encoding="utf-8", errors="replace").strip()[:500]
        except OSError:  # removed by an operator meanwhile
            continue
        more = f" (the newest; {total} in quarantine)" if total > len(newest) else ""
        items.append({"kind": "instance quarantined", "at": at,
                      "what": f"quarantine/{path.name.removesuffix('.reason.txt')}.dcm{more}", "reason": reason})
    if monitoring is not None:
        for d in ModelRuns(index).drift(monitoring.baseline_runs, monitoring.window_runs, monitoring.tolerance):
            items.append({"kind": "model drift", "at": now, "what": f"{d.model} version {d.version}",
                          "reason": d.describe(), "link": "/models"})
    if last_reload and not last_reload.get("applied", True):
        items.append({"kind": "reload refused", "at": last_reload.get("at"), "what": "node.yaml / routing file",
                      "reason": "; ".join(last_reload.get("problems") or []), "link": "/rules"})
    return sorted(items, key=lambda i: i["at"] or 0.0, reverse=True)


def _quarantined(folder: Path, limit: int) -> tuple[int, list[Path]]:
    """(how many, the newest `limit` reason files) in quarantine: by name, which begins with the
    time (node/store/spool.py), so a quarantine of 100 000 files costs one directory read, not a
    stat each (the dashboard asks every 10 s)."""
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".reason.txt")]
    except OSError:  # no quarantine yet
        return 0, []
    return len(names), [folder / n for n in heapq.nlargest(limit, names)]


def series_of(index: Index, study_uid: str, show_descriptions: bool = False) -> list[dict[str, Any]]:
    rows = index.query(
        """SELECT r.series_uid, r.modality, r.number, r.description, r.sop_class_uid, r.orientation, r.rows,
                  r.columns, r.slice_thickness,
                  (SELECT COUNT(*) FROM instances i WHERE i.series_uid=r.series_uid) AS instances,
                  (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM instances i WHERE i.series_uid=r.series_uid) AS bytes
           FROM series r WHERE r.study_uid=? ORDER BY r.number, r.series_uid""", (study_uid,))
    out = []
    for r in rows:
        row = dict(r)
        row["orientation"] = orientation_class(json.loads(row["orientation"])) if row["orientation"] else None
        if not show_descriptions:
            row.pop("description")
        out.append(row)
    return out


def deliveries(index: Index, study_uid: str | None = None) -> list[dict[str, Any]]:
    """Outbox items; `superseded`: results of a job the study's later job replaced (not re-sent)."""
    latest = {r["study_uid"]: r["id"] for r in index.query(
        "SELECT study_uid, MAX(id) AS id FROM work_items GROUP BY study_uid")}
    rows = [r for r in list_items(index) if study_uid is None or r["study_uid"] == study_uid]
    for r in rows:
        job = r["job_key"].partition(":")[0]
        r["superseded"] = job.isdigit() and latest.get(r["study_uid"], 0) > int(job)
    return rows


def study(index: Index, jobs: JobStore, retention: Retention, study_uid: str,
          show_descriptions: bool = False) -> dict[str, Any] | None:
    """Everything about one study: series, routing explanation, jobs with stages, deliveries."""
    found = index.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
    job_rows = [job_row(j) for j in jobs.all_jobs(study_uid)]
    deleted = retention.deleted_study(study_uid)
    if not found and not job_rows and deleted is None:
        return None
    row = dict(found[0]) if found else {"study_uid": study_uid, "state": "deleted" if deleted else "unknown"}
    row.pop("patient_id", None)
    return {
        "study": row,
        "series": series_of(index, study_uid, show_descriptions),
        "missing_instances": index.missing_instances(study_uid),
        "jobs": job_rows,
        "explanation": next((j["explanation"] for j in reversed(job_rows) if j["explanation"]), None),
        "deliveries": deliveries(index, study_uid),
        "round_trips": round_trips(index, study_uid),
        "retention": deleted if not found else None,  # received again since: that is what counts
    }


def round_trips(index: Index, study_uid: str) -> list[dict[str, Any]]:
    """The study's de-identified round trips (node/store/roundtrips.py), each with its phase:
    `sent` while the copy is on its way (the outbox has not delivered it everywhere), then
    `waiting` for results until its deadline, `returned`, `delivered`, `failed`, `timed_out`
    (its "AI ran: failed" notice sent) or `superseded`."""
    out = []
    for trip in RoundTrips(index).of_study(study_uid):
        phase = trip.state.value
        if trip.state is TripState.WAITING:
            copies = [r for r in list_items(index) if r["job_key"] == f"{trip.job_id}:{trip.rule}:deidentify"]
            if not copies or any(r["state"] != "delivered" for r in copies):
                phase = "sent"
        out.append({"id": trip.id, "project": trip.project, "rule": trip.rule, "job": trip.job_id, "phase": phase,
                    "sent_at": trip.sent_at, "deadline": trip.deadline, "returned_at": trip.returned_at,
                    "finished_at": trip.finished_at, "return_job": trip.return_job, "results_to": list(trip.results_to),
                    "reason": trip.reason, "ai_ran_failed": trip.state is TripState.TIMED_OUT})
    return out


def associations(index: Index, limit: int = RECENT_ASSOCIATIONS) -> list[dict[str, Any]]:
    return [dict(r) for r in index.query(
        "SELECT id, calling_ae, called_ae, peer, started_at, ended_at, instances, failures"
        " FROM associations ORDER BY id DESC LIMIT ?", (limit,))]


def disk(data_dir: Path, min_free_mb: float) -> dict[str, Any]:
    st = os.statvfs(data_dir)
    free = st.f_bavail * st.f_frsize
    return {"free_bytes": free, "total_bytes": st.f_blocks * st.f_frsize,
            "watermark_bytes": int(min_free_mb * 1024 * 1024), "below_watermark": free < min_free_mb * 1024 * 1024}


def dashboard(index: Index, jobs: JobStore, retention: Retention, config: NodeConfig) -> dict[str, Any]:
    """The dashboard's figures that come from the index (the running node adds live state)."""
    job_states = {state.value: n for state, n in jobs.counts().items()}
    outbox_states = {r["state"]: r["n"] for r in index.query("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")}
    totals = index.query(
        "SELECT COUNT(*) AS associations, CAST(COALESCE(SUM(instances), 0) AS BIGINT) AS instances,"
        " CAST(COALESCE(SUM(failures), 0) AS BIGINT) AS failures FROM associations")[0]
    stored = index.query("SELECT COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes FROM instances")[0]
    receiving = studies(index, state="receiving")
    return {
        "generated_at": time.time(),
        "ae_title": config.scp.ae_title,
        "receiving": receiving,
        "studies": index.query("SELECT COUNT(*) AS n FROM studies")[0]["n"],
        "jobs_by_state": job_states,
        "queue_depth": job_states.get("queued", 0) + job_states.get("waiting", 0),
        "outbox_by_state": {s: outbox_states.get(s, 0) for s in OUTBOX_STATES},
        "round_trips_by_state": RoundTrips(index).counts(),
        "associations": associations(index),
        "totals": {"associations": totals["associations"], "instances": totals["instances"],
                   "failures": totals["failures"], "stored_instances": stored["n"], "stored_bytes": stored["bytes"]},
        "disk": disk(Path(config.storage.data_dir), config.storage.min_free_mb),
        "retention": {"policy": config.storage.retention.model_dump(), "last_run": retention.last_run(),
                      "deleted": retention.deleted_totals()},
    }


def when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def megabytes(value: float | None) -> str:
    return f"{(value or 0) / 1e6:,.1f} MB"


def format_status(summary: dict[str, Any]) -> str:
    """The dashboard as text for `dicom-node status`."""
    live = summary.get("live")
    lines = []
    if live:
        ready = live["ready"]
        lines.append(f"node {summary['ae_title']}: {'ready' if ready['ready'] else 'NOT READY'}"
                     + ("" if ready["ready"] else f" ({'; '.join(ready['reasons'])})")
                     + ("; ON THE PREVIOUS CONFIGURATION: the last reload was refused"
                        if (live.get("last_reload") or {}).get("applied") is False else ""))
        lines.append(f"rules version {live['rules_version']} ({live['rules']} rules)"
                     + (f"; needs a restart for: {', '.join(live['restart_pending'])}" if live["restart_pending"] else ""))
        lines.append("models: " + (", ".join(f"{m['name']} ({m['status']})" for m in live["models"]) or "none"))
    else:
        lines.append(f"node {summary['ae_title']}: not answering over HTTP (figures from the index)")
    attention = summary.get("attention")
    if attention:
        lines.append(f"NEEDS ATTENTION ({len(attention)}):")
        for a in attention[:10]:
            lines.append(f"  {when(a['at'])}  {a['kind']}: {a['what']}"
                         + (f" (study {a['study_uid']})" if a.get("study_uid") else "")
                         + (f" - {a['reason'][:200]}" if a.get("reason") else ""))
    d = summary["disk"]
    lines.append(f"disk: {megabytes(d['free_bytes'])} free, watermark {megabytes(d['watermark_bytes'])}"
                 + (" - BELOW THE WATERMARK" if d["below_watermark"] else ""))
    t = summary["totals"]
    lines.append(f"received: {t['instances']} instances over {t['associations']} associations, "
                 f"{t['failures']} failed C-STOREs; stored {t['stored_instances']} instances "
                 f"({megabytes(t['stored_bytes'])}) in {summary['studies']} studies")
    lines.append("jobs: " + ", ".join(f"{k} {v}" for k, v in summary["jobs_by_state"].items()))
    lines.append("outbox: " + ", ".join(f"{k} {v}" for k, v in summary["outbox_by_state"].items()))
    if summary.get("round_trips_by_state"):
        lines.append("round trips: " + ", ".join(f"{k} {v}" for k, v in summary["round_trips_by_state"].items()))
    run = summary["retention"]["last_run"]
    lines.append("retention: " + (f"last run {when(run['at'])}: {run['studies']} studies, "
                                  f"{megabytes(run['bytes'])}, {run['result_files']} result files"
                                  if run else "never run"))
    lines.append(f"receiving ({len(summary['receiving'])}):")
    for s in summary["receiving"]:
        lines.append(f"  {s['study_uid']}  {','.join(s['modalities']) or '-':8} {s['series']:>3} series "
                     f"{s['instances']:>6} instances  from {s['calling_ae'] or '?'}  last {when(s['last_received'])}")
    lines.append("recent associations:")
    for a in summary["associations"][:10]:
        lines.append(f"  #{a['id']:<5} {a['calling_ae'] or '?':16} -> {a['called_ae'] or '?':16} {a['peer'] or '':15} "
                     f"{a['instances']:>6} instances {a['failures']:>4} failures  {when(a['started_at'])}")
    return "\n".join(lines)


PATIENT_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")


def patient(index: Index, data_dir: Path, study_uid: str) -> dict[str, str] | None:
    """The study's patient attributes (operators and admins only: the caller records the view in
    the audit trail), from the index and the header of one stored instance."""
    rows = index.query("SELECT patient_id FROM studies WHERE study_uid=?", (study_uid,))
    if not rows:
        return None
    found = {"PatientID": rows[0]["patient_id"] or ""}
    for row in index.query("SELECT path FROM instances WHERE study_uid=? LIMIT 1", (study_uid,)):
        try:
            header = pydicom.dcmread(data_dir / row["path"], stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
        except (OSError, pydicom.errors.InvalidDicomError):
            break  # the file is gone (retention, missing): the index's Patient ID is what there is
        found.update({key: str(header.get(key, "") or "") for key in PATIENT_TAGS if key != "PatientID"})
    return found
