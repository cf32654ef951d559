"""Model runs (owner of the `model_runs` table): what each model version was given and gave, the
shadow comparisons, the drift alarm and the radiologists' verdicts.

One row per (job, rule, model, version, role): a job run again after a crash writes its row
again, it does not add one. `role` is `live` (its results went out) or `shadow` (kept, never
sent; the row holds its comparison with the live run of the same job and rule).

Drift (per model version, live runs only): the first `baseline_runs` runs are the baseline; each
input and output figure of the latest `window_runs` runs is checked against the baseline's range,
widened by `tolerance` of the range's magnitude. A figure drifts when most of the window lies
outside: one odd study does not raise the alarm, a change of protocol does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset

from node.store.index import Index

# Key Object Selection document titles (PS3.16 CID 7010) that reject what they reference:
# Rejected for Quality Reasons, Rejected for Patient Safety Reasons, Quality Issue.
REJECTING_TITLES = {("DCM", "113001"), ("DCM", "113037"), ("DCM", "113010")}

COUNTS = ("slices", "findings")  # whole numbers: the range is widened by at least one
FIGURES = ("slices", "spacing_slice", "spacing_row", "spacing_column", "intensity_mean", "intensity_std",
           "findings", "volume_mm3", "probability")


@dataclass(frozen=True)
class RunFigures:
    """What went in (the series) and what came out (the result) of one model run."""

    modality: str | None = None
    slices: int | None = None
    spacing_slice: float | None = None
    spacing_row: float | None = None
    spacing_column: float | None = None
    intensity_mean: float | None = None
    intensity_std: float | None = None
    findings: int | None = None
    volume_mm3: float | None = None
    probability: float | None = None
    predicted: str | None = None


@dataclass(frozen=True)
class Comparison:
    """A shadow run against the live one: segmentation overlap and volume, or class agreement."""

    dice: float | None = None
    volume_difference: float | None = None
    agreement: bool | None = None


@dataclass(frozen=True)
class Drift:
    model: str
    version: int
    figure: str
    baseline: tuple[float, float]  # the baseline's range
    outside: int  # of the window's runs
    window: int

    def describe(self) -> str:
        lo, hi = self.baseline
        return (f"{self.figure}: {self.outside} of the last {self.window} runs outside the first runs' range"
                f" {lo:g} to {hi:g}")


class ModelRuns:
    def __init__(self, index: Index):
        self.index = index

    def record(self, *, job_id: int, study_uid: str, rule: str, model: str, version: int, role: str, now: float,
               figures: RunFigures, result_uids: list[str] = (), comparison: Comparison | None = None,  # type: ignore[assignment]
               error: str | None = None) -> None:
        columns: dict[str, Any] = {
            "at": now, "job_id": job_id, "study_uid": study_uid, "rule": rule, "model": model, "version": version,
            "role": role, **asdict(figures), "error": error,
            "dice": comparison.dice if comparison else None,
            "volume_difference": comparison.volume_difference if comparison else None,
            "agreement": None if comparison is None or comparison.agreement is None else int(comparison.agreement),
        }
        names = list(columns)
        updates = ", ".join(f"{n}=excluded.{n}" for n in names if n not in ("job_id", "rule", "model", "version", "role"))
        with self.index.transaction() as db:
            run_id = db.execute(f"INSERT INTO model_runs ({', '.join(names)}) VALUES ({','.join('?' * len(names))})"
                                f" ON CONFLICT (job_id, rule, model, version, role) DO UPDATE SET {updates}"
                                " RETURNING id", [columns[n] for n in names]).fetchone()["id"]
            for uid in dict.fromkeys(result_uids):
                db.execute("INSERT INTO model_run_results (sop_instance_uid, run_id) VALUES (?,?)"
                           " ON CONFLICT (sop_instance_uid) DO UPDATE SET run_id=excluded.run_id", (uid, run_id))

    def of_job(self, job_id: int) -> list[dict[str, Any]]:
        return self.index.query("SELECT * FROM model_runs WHERE job_id=? ORDER BY id", (job_id,))

    def of_study(self, study_uid: str) -> list[dict[str, Any]]:
        return self.index.query("SELECT * FROM model_runs WHERE study_uid=? ORDER BY id", (study_uid,))

    def summary(self) -> list[dict[str, Any]]:
        """Per model version and role: runs, the latest, and (shadow) the comparisons' means;
        verdicts counted."""
        # COUNT(CASE ...) and float(): plain numbers on SQLite and PostgreSQL alike (AVG is numeric there)
        rows = self.index.query(
            "SELECT model, version, role, COUNT(*) AS runs, MAX(at) AS last_at,"
            " COUNT(CASE WHEN error IS NOT NULL THEN 1 END) AS failed,"
            " AVG(dice) AS mean_dice, MIN(dice) AS min_dice, AVG(volume_difference) AS mean_volume_difference,"
            " AVG(agreement) AS agreement, AVG(findings) AS mean_findings, AVG(volume_mm3) AS mean_volume_mm3,"
            " COUNT(CASE WHEN verdict='rejected' THEN 1 END) AS rejected,"
            " COUNT(CASE WHEN verdict='accepted' THEN 1 END) AS accepted"
            " FROM model_runs GROUP BY model, version, role ORDER BY model, version, role")
        return [{k: float(v) if k.startswith(("mean_", "min_", "agreement")) and v is not None else v
                 for k, v in r.items()} for r in rows]

    def recent(self, window_runs: int) -> dict[tuple[str, int], dict[str, tuple[float, float, float]]]:
        """{(model, version): {figure: (mean, min, max)}} over each version's latest live runs."""
        out: dict[tuple[str, int], dict[str, tuple[float, float, float]]] = {}
        versions = self.index.query("SELECT DISTINCT model, version FROM model_runs WHERE role='live'")
        for v in versions:
            rows = self.index.query(f"SELECT {', '.join(FIGURES)} FROM model_runs WHERE model=? AND version=?"
                                    " AND role='live' AND error IS NULL ORDER BY id DESC LIMIT ?",
                                    (v["model"], v["version"], window_runs))
            figures = {}
            for figure in FIGURES:
                values = [float(r[figure]) for r in rows if r[figure] is not None]
                if values:
                    figures[figure] = (sum(values) / len(values), min(values), max(values))
            out[(v["model"], int(v["version"]))] = figures
        return out

    def comparisons(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest shadow runs, newest first, with the live version they were compared with."""
        return self.index.query(
            "SELECT s.id, s.at, s.study_uid, s.rule, s.model, s.version AS shadow_version, l.version AS live_version,"
            " s.dice, s.volume_difference, s.agreement, s.findings AS shadow_findings, l.findings AS live_findings,"
            " s.error FROM model_runs s LEFT JOIN model_runs l ON l.job_id=s.job_id AND l.rule=s.rule"
            " AND l.model=s.model AND l.role='live' WHERE s.role='shadow' ORDER BY s.id DESC LIMIT ?", (limit,))

    def drift(self, baseline_runs: int, window_runs: int, tolerance: float) -> list[Drift]:
        """Every figure of every model version that drifted (see the module's doc)."""
        alarms = []
        versions = self.index.query("SELECT model, version, COUNT(*) AS n FROM model_runs WHERE role='live'"
                                    " AND error IS NULL GROUP BY model, version")
        for v in versions:
            if v["n"] < baseline_runs + window_runs:
                continue
            columns = ", ".join(FIGURES)
            where = "model=? AND version=? AND role='live' AND error IS NULL"
            baseline = self.index.query(f"SELECT {columns} FROM model_runs WHERE {where} ORDER BY id LIMIT ?",
                                        (v["model"], v["version"], baseline_runs))
            window = self.index.query(f"SELECT {columns} FROM model_runs WHERE {where} ORDER BY id DESC LIMIT ?",
                                      (v["model"], v["version"], window_runs))
            for figure in FIGURES:
                seen = [float(r[figure]) for r in baseline if r[figure] is not None]
                recent = [float(r[figure]) for r in window if r[figure] is not None]
                if not seen or not recent:
                    continue
                lo, hi = min(seen), max(seen)
                # counts move in whole steps: a baseline of 0 findings is not broken by one finding
                margin = max(tolerance * max(abs(lo), abs(hi), hi - lo), 1.0 if figure in COUNTS else 1e-9)
                outside = sum(1 for x in recent if x < lo - margin or x > hi + margin)
                if outside * 2 > len(recent):
                    alarms.append(Drift(v["model"], int(v["version"]), figure, (lo, hi), outside, len(recent)))
        return alarms

    def record_verdict(self, result_uids: list[str], verdict: str, now: float) -> list[int]:
        """Mark the runs whose results are among `result_uids` (a KOS's references; an IOCM
        rejection may list hundreds of images: looked up by key, 500 at a time); their ids."""
        uids = list(dict.fromkeys(result_uids))
        runs: set[int] = set()
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            runs |= {int(r["run_id"]) for r in self.index.query(
                f"SELECT run_id FROM model_run_results WHERE sop_instance_uid IN ({','.join('?' * len(chunk))})",
                chunk)}
        if runs:
            with self.index.transaction() as db:
                for run_id in runs:
                    db.execute("UPDATE model_runs SET verdict=?, verdict_at=? WHERE id=?", (verdict, now, run_id))
        return sorted(runs)


def verdict_of(kos: Dataset) -> tuple[str, list[str]] | None:
    """("rejected", the SOP Instance UIDs it references) for a Key Object Selection whose title
    rejects; None for any other document or one without usable references."""
    try:
        title = kos.ConceptNameCodeSequence[0]
        if (str(title.CodingSchemeDesignator), str(title.CodeValue)) not in REJECTING_TITLES:
            return None
        referenced = [str(i.ReferencedSOPInstanceUID) for study in kos.CurrentRequestedProcedureEvidenceSequence
                      for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return ("rejected", referenced) if referenced else None
