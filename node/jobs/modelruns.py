"""What a model run is recorded as (node/store/modelruns.py): the figures of its input and output,
and for a shadow run its comparison with the live run.

A shadow run is a candidate version run on the same series as the live version of the same
rule: its SEG/SR are written under the job's results folder and never handed to the outbox; its
failure is recorded and logged, and never fails the job (the live results went out).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from common import logs
from inference.errors import SeriesChanged
from node.jobs.failures import Superseded, describe
from node.jobs.store import IllegalTransition
from node.store.modelruns import Comparison, ModelRuns, RunFigures

if TYPE_CHECKING:  # (not at run time: torch and MONAI load with the pipeline, after the receivers start)
    from inference.pipeline import ClassificationResult, SegmentationResult
    from inference.volume import SeriesVolume
    from node.jobs.runner import JobRunner, Progress
    from node.jobs.stages import ModelTask
    from node.jobs.store import Job

log = logging.getLogger("node.jobs")
Result = "SegmentationResult | ClassificationResult"


def figures_of(results: list[Result]) -> RunFigures:
    """The first volume's input figures (its intensity: SeriesVolume.intensity, which never reads
    the files again), and the outputs summed over the volumes."""
    if not results:
        return RunFigures()
    volume = results[0].volume
    mean, std = volume.intensity()
    steps = np.linalg.norm(volume.affine[:3, :3], axis=0)  # slice, row and column steps (mm)
    figures = RunFigures(
        modality=str(getattr(volume.datasets[0], "Modality", "") or "") or None if volume.datasets else None,
        slices=int(volume.shape[0]), spacing_slice=float(steps[0]), spacing_row=float(steps[1]),
        spacing_column=float(steps[2]), intensity_mean=mean, intensity_std=std)
    if _segmentation(results[0]):
        segmentations = [r for r in results if _segmentation(r)]
        return replace(figures, findings=sum(len(r.findings) for r in segmentations),
                       volume_mm3=sum(float(np.count_nonzero(r.labels)) * r.volume.voxel_volume for r in segmentations))
    first = results[0]
    return replace(figures, probability=float(first.probabilities[first.predicted.value]), predicted=first.predicted.name)


def _segmentation(result: Result) -> bool:
    """A segmentation's result has a label volume (a classification's has probabilities)."""
    return hasattr(result, "labels")


def compare(live: list[Result], shadow: list[Result]) -> Comparison:
    """Segmentation: Dice of the labelled voxels (any label) and the relative volume difference,
    over every volume; classification: whether the predicted classes agree."""
    if not live or not shadow:
        return Comparison()
    if _segmentation(live[0]):
        both = overlap = mine = theirs = 0
        for a, b in zip(live, shadow):
            fa, fb = a.labels > 0, b.labels > 0
            both += int(np.count_nonzero(fa & fb & (a.labels == b.labels)))
            mine, theirs = mine + int(np.count_nonzero(fa)), theirs + int(np.count_nonzero(fb))
        overlap = mine + theirs
        # Dice = 2|A∩B| / (|A| + |B|) with the same label in both; two empty results agree (1.0)
        dice = 2.0 * both / overlap if overlap else 1.0
        difference = (theirs - mine) / mine if mine else (0.0 if not theirs else float("inf"))
        return Comparison(dice=dice, volume_difference=difference if np.isfinite(difference) else None)
    agree = all(a.predicted.value == b.predicted.value for a, b in zip(live, shadow))
    return Comparison(agreement=agree)


def result_uids(files: list[Path]) -> list[str]:
    """The SOP Instance UIDs of the encoded results (a radiologist's KOS references these)."""
    uids = []
    for f in files:
        try:
            uids.append(str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        except (OSError, AttributeError, pydicom.errors.InvalidDicomError):
            continue  # written by this job a moment ago: only a failed disk gets here
    return uids


def record_live(runner: "JobRunner", job: "Job", task: "ModelTask", version: int, results: list[Result],
                files: list[Path]) -> None:
    ModelRuns(runner.index).record(job_id=job.id, study_uid=job.study_uid, rule=task.rule,
                                   model=task.model.partition("@")[0], version=version, role="live",
                                   now=time.time(), figures=figures_of(results), result_uids=result_uids(files))


def run_shadow(runner: "JobRunner", job: "Job", live_task: "ModelTask", candidate: str,
               live: tuple[list[SeriesVolume], list[Result]] | None, progress: "Progress") -> None:
    """Run `candidate` on the live task's series, keep its results, compare, record."""
    from node.jobs import stages

    runs = ModelRuns(runner.index)
    spec = runner.models.spec(candidate)
    if spec.version == runner.models.spec(live_task.model).version:  # `run: [x]` once x@N is the latest
        logs.event(log, "shadow_skipped", job=job.id, model=spec.name, version=spec.version,
                   reason="the live version is this version")
        return
    task = replace(live_task, model=candidate, destinations=())
    try:
        with runner.stage(job, "shadow", progress):
            volumes = live[0] if live else stages.load(task)
            with runner.backends.use(f"{spec.name}@{spec.version}") as backend:
                results = [stages.infer(volume, spec, backend) for volume in volumes]
            if live is None:  # a re-run after a crash: the live results were sent already, infer them again
                live_spec = runner.models.spec(live_task.model)
                with runner.backends.use(f"{live_spec.name}@{live_spec.version}") as backend:
                    live = (volumes, [stages.infer(volume, live_spec, backend) for volume in volumes])
            files = runner.encode_results(job, task, spec, results, runner.config.output,
                                          runner.data_dir / "results" / (task.key.replace(":", "_") + "_shadow"))
        comparison = compare(live[1], results)
        runs.record(job_id=job.id, study_uid=job.study_uid, rule=task.rule, model=spec.name, version=spec.version,
                    role="shadow", now=time.time(), figures=figures_of(results), result_uids=result_uids(files),
                    comparison=comparison)
        logs.event(log, "shadow_ran", job=job.id, model=spec.name, version=spec.version, dice=comparison.dice,
                   agreement=comparison.agreement)
    except (Superseded, IllegalTransition):  # (the job is no longer this process's: released, taken over)
        raise
    except SeriesChanged:  # a resend replaced a file since the live run read it: no like-for-like comparison
        logs.event(log, "shadow_skipped", job=job.id, model=spec.name, version=spec.version,
                   reason="a file of the series was replaced since the live run")
    except Exception as exc:  # the candidate failed: recorded, the job goes on (its live results went out)
        reason = describe(exc, "shadow")
        runs.record(job_id=job.id, study_uid=job.study_uid, rule=task.rule, model=spec.name, version=spec.version,
                    role="shadow", now=time.time(), figures=RunFigures(), error=reason)
        logs.event(log, "shadow_failed", logging.WARNING, job=job.id, model=spec.name, version=spec.version,
                   error=reason)

