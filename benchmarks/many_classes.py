"""A network of many classes (105, as TotalSegmentator-style whole-body models have) on a 300x512x512
CT at 1.5 mm: the node's own work around the model and the job's peak memory.

    python -m benchmarks.many_classes [--slices 300] [--size 512] [--classes 105] [--repeat 1]

The network stands in for a real one (a 1x1x1 layer, so its calls are little more than ONNX
Runtime's output): class k wins the input intensities next to k / (classes - 1) of its window,
softmax over sharp bumps, so that each voxel has one or two probable classes. On the benchmark's
organ-sized region (HU -50 inside 400) the edge's intensities give 25 classes in thin shells, two
of them organ-sized. 96^3 windows, 2 a batch, overlap 0.25, argmax, findings per label, through
`segment` with the in-process backend, after a run not counted (ONNX Runtime's arena grown: the
peak is the job's own). Against, in the same run, the reference: the way back as
the node took it before 2026-11-28 afternoon (the softmax over the whole output, then scipy
interpolating every channel at the boundaries, and each label compared over the box of all to
measure it), switched in through the two thresholds that choose it. Best of --repeat runs each.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from benchmarks.common import benchmark_run
from benchmarks.memory import rss_mb
from benchmarks.native_grid import regions
from inference import findings, pipeline, resample
from inference.backends.local import LocalBackend
from inference.export.repository import export_onnx
from inference.pipeline import segment
from inference.spec import ModelSpec
from inference.volume import SeriesVolume
from phantom.dicom import SeriesGeometry

OWN = ("preprocess", "windows", "postprocess", "measure")
STAGES = {"preprocess": "preprocessing", "windows": "windows gathered and blended",
          "model": "the model's calls (not counted)", "postprocess": "back to the source grid",
          "measure": "measurements", "own": "the node's own work", "peak": "peak RSS over the start (MiB)"}
CODE = {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"}


class _Bumps(torch.nn.Module):
    """Logits of `classes` classes from a windowed [0, 1] input: class k is largest next to k / (classes - 1)."""

    def __init__(self, classes: int):
        super().__init__()
        self.centres = torch.linspace(0.0, 1.0, classes).view(1, classes, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.centres) * 200.0) ** 2


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--repeat", type=int, default=1)


def _spec(classes: int) -> ModelSpec:
    return ModelSpec.model_validate({
        "name": "many-classes", "task": "segmentation", "description": "a stand-in for a whole-body network",
        "output": {"name": "logits", "channels": classes},
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                          "intensity": {"window": [-1000.0, 1000.0]}, "patch_size": [96, 96, 96],
                          "overlap": 0.25, "batch_size": 2},
        "postprocessing": {"findings": "per_label"},
        "labels": [{"value": k, "name": f"Structure {k}", "category": CODE, "type": CODE} for k in range(1, classes)]})


@contextmanager
def _reference() -> Iterator[None]:
    """The way back as before: the activation whole, scipy channel by channel, each label compared over all."""
    before = pipeline.MANY_CHANNELS, resample.MANY_CHANNELS, findings.MANY_VALUES
    pipeline.MANY_CHANNELS = resample.MANY_CHANNELS = findings.MANY_VALUES = 256
    try:
        yield
    finally:
        pipeline.MANY_CHANNELS, resample.MANY_CHANNELS, findings.MANY_VALUES = before


def _run(hu: np.ndarray, spec: ModelSpec, backend: LocalBackend) -> tuple[dict[str, float], np.ndarray]:
    volume = SeriesVolume(hu.copy(), SeriesGeometry(spacing=(1.0, 0.7, 0.7)).affine(), [], "1.2.3")
    me = os.getpid()
    start, peak, done = rss_mb(me), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(me))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = segment(volume, spec, backend)
    finally:
        done.set()
        sampler.join()
    seconds = result.seconds
    stages = {"preprocess": seconds["preprocess"], "windows": seconds["inference"] - seconds["model"],
              "model": seconds["model"], "postprocess": seconds["postprocess"], "measure": seconds["measure"]}
    stages["own"] = sum(stages[key] for key in OWN)
    stages["peak"] = peak[0] - start
    return stages, result.labels


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        spec = _spec(args.classes)
        model = Path(work) / "many-classes.onnx"
        export_onnx(_Bumps(args.classes), model, spec, (16, 16, 16))
        backend = LocalBackend(model, spec)
        hu = regions((args.slices, args.size, args.size), organ=True)
        _run(hu, spec, backend)  # not counted: ONNX Runtime's arena grown, the process's first pages touched
        node: list[dict[str, float]] = []
        before: list[dict[str, float]] = []
        for _ in range(args.repeat):
            stages, labels = _run(hu, spec, backend)
            node.append(stages)
            with _reference():
                stages, reference = _run(hu, spec, backend)
                before.append(stages)
            differ = int(np.count_nonzero(labels != reference))  # (two classes equal to float32 rounding)
        best, ref = min(node, key=lambda s: s["own"]), min(before, key=lambda s: s["own"])
        found = sorted(int(v) for v in np.unique(labels) if v)
        print(f"{args.classes} classes; {len(found)} found ({found[0]}-{found[-1]}); labels differing from the"
              f" reference's: {differ} of {labels.size}")
        print(f"{'stage':32} {'node':>9} {'reference':>10} {'ratio':>6}")
        for key, label in STAGES.items():
            unit = "" if key == "peak" else "s"
            print(f"{label:32} {best[key]:8.2f}{unit} {ref[key]:9.2f}{unit} {best[key] / ref[key]:6.2f}")
        print(f"the node's own work {best['own']:.2f} s against {ref['own']:.2f} s"
              f" (ratio {best['own'] / ref['own']:.2f})")


if __name__ == "__main__":
    main()
