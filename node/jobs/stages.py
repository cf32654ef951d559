"""A job's stages as small typed steps: load -> infer -> encode -> enqueue for delivery.

Each takes the previous stage's output and returns its own; only `encode` writes anything that
outlives the process (result files, recorded with the job), which is what lets a re-run after a
crash start at `enqueue` when its files are already there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pydicom.dataset import Dataset

from inference.backends.base import Backend
from inference.detection import detect
from inference.pipeline import ClassificationResult, SegmentationResult, classify, segment
from inference.room import ARRAYS
from inference.spec import ModelSpec
from inference.volume import SeriesVolume, read_volumes
from node.encode.demographics import tolerate_demographics
from node.encode.keyimages import build_key_images
from node.encode.kos import build_key_object_selection
from node.config import OutputOptions
from node.encode.rtstruct import build_rtstruct
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from node.encode.uids import ResultUIDs
from node.encode.writing import dataset_bytes
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
    notices: bool = True  # the rule's `notices`: an SR even when nothing was found

    @property
    def key(self) -> str:
        return f"{self.job_id}:{self.rule}:{self.model}"

    def output_key(self, options: OutputOptions) -> str:
        """Names one encoded variant of the results (and its outbox row, with the destination)."""
        return f"{self.key}:{options.variant}" + (f":{'+'.join(options.outputs)}" if options.outputs else "")

    @property
    def instance_uids(self) -> list[str]:
        # The spool names every stored instance `<SOP Instance UID>.dcm` (node.store.spool).
        return [f.stem for f in self.files]


def load(task: ModelTask, ahead: Mapping[Path, Dataset] | None = None) -> list[SeriesVolume]:
    """The series' volumes: one, or one per echo, b-value or time point when it holds several.
    `ahead`: headers of its files parsed already (inference.headers). Its memory is checked
    first (inference.room): a series too big for the node fails saying so."""
    with ARRAYS.loading("the series' volume", "give the node more memory") as fits:
        return read_volumes(list(task.files), ahead, room=fits)


def infer(volume: SeriesVolume, spec: ModelSpec, backend: Backend, explain: bool = False) -> Result:
    """`explain`: a classification also gets its saliency maps (for the SALIENCY output), made
    here because they need the backend (occlusion sensitivity, inference.saliency)."""
    if spec.task == "segmentation":
        return segment(volume, spec, backend)
    if spec.task == "detection":
        return detect(volume, spec, backend)
    result = classify(volume, spec, backend)
    if explain:
        from inference.saliency import occlusion_saliency

        occlusion_saliency(result, backend)
    return result


def encode(result: Result, options: OutputOptions, uids: ResultUIDs, outputs: tuple[str, ...], folder: Path,
           spool: Spool, notices: bool = False) -> list[Path]:
    """Write the requested result objects durably; the same inputs write the same objects."""
    tolerate_demographics(result.volume.datasets)
    seg = build_seg(result, options, uids) if isinstance(result, SegmentationResult) else None
    objects: list[Any] = []
    if seg is not None and "SEG" in outputs:
        objects.append(seg)
    nothing_found = isinstance(result, SegmentationResult) and not result.findings
    if "SR" in outputs or (notices and nothing_found):  # the report says "Absent": the AI ran
        objects.append(build_sr(result, options, uids, seg))
    if isinstance(result, SegmentationResult) and "RTSTRUCT" in outputs:
        objects += [s for s in [build_rtstruct(result, options, uids)] if s is not None]
    if isinstance(result, SegmentationResult) and "SC" in outputs:
        objects += build_key_images(result, options, uids)
    if isinstance(result, SegmentationResult) and "KOS" in outputs:
        objects += [k for k in [build_key_object_selection(result, options, uids)] if k is not None]
    if isinstance(result, ClassificationResult) and "SALIENCY" in outputs:
        from node.encode.saliency import build_saliency_maps

        objects += build_saliency_maps(result, options, uids)
    files = []
    for obj in objects:
        target = folder / f"{obj.SOPInstanceUID}.dcm"
        spool.store(target, [dataset_bytes(obj)])
        files.append(target)
    return files
