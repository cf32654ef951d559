"""A job's stages as small typed steps: load -> infer -> encode -> enqueue for delivery.

Each takes the previous stage's output and returns its own; only `encode` writes anything that
outlives the process (result files, recorded with the job), which is what lets a re-run after a
crash start at `enqueue` when its files are already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from inference.backends.base import Backend
from inference.pipeline import ClassificationResult, SegmentationResult, classify, segment
from inference.spec import ModelSpec
from inference.volume import SeriesVolume, load_volumes, read_series
from node.encode.demographics import tolerate_demographics
from node.encode.options import OutputOptions
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from node.encode.uids import ResultUIDs
from node.store.spool import Spool

Result = SegmentationResult | ClassificationResult


@dataclass(frozen=True)
class ModelTask:
    """One model of one applied rule, on the series the rule chose, for its destinations."""

    job_id: int
    study_uid: str
    rule: str
    model: str
    series_uid: str
    files: tuple[Path, ...]
    outputs: tuple[str, ...]
    destinations: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.job_id}:{self.rule}:{self.model}"

    def output_key(self, options: OutputOptions) -> str:
        """Names one encoded variant of the results (and its outbox row, with the destination)."""
        return f"{self.key}:{options.variant}"

    @property
    def instance_uids(self) -> list[str]:
        # The spool names every stored instance `<SOP Instance UID>.dcm` (node.store.spool).
        return [f.stem for f in self.files]


def load(task: ModelTask) -> list[SeriesVolume]:
    """The series' volumes: one, or one per echo, b-value or time point when it holds several."""
    return load_volumes(read_series(list(task.files)))


def infer(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> Result:
    return segment(volume, spec, backend) if spec.task == "segmentation" else classify(volume, spec, backend)


def encode(result: Result, options: OutputOptions, uids: ResultUIDs, outputs: tuple[str, ...], folder: Path,
           spool: Spool) -> list[Path]:
    """Write the requested result objects durably; the same inputs write the same objects."""
    tolerate_demographics(result.volume.datasets)
    seg = build_seg(result, options, uids) if isinstance(result, SegmentationResult) else None
    objects: list[Any] = []
    if seg is not None and "SEG" in outputs:
        objects.append(seg)
    if "SR" in outputs:
        objects.append(build_sr(result, options, uids, seg))
    files = []
    for obj in objects:
        target = folder / f"{obj.SOPInstanceUID}.dcm"
        buffer = BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        spool.store(target, [buffer.getvalue()])
        files.append(target)
    return files
