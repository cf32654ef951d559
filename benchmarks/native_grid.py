"""A segmentation model at the CT's own resolution (no spacing step, RAS): the node's own work
around the model for an organ-sized region and for three lesions, on a 300x512x512 CT.

    python -m benchmarks.native_grid [--slices 300] [--size 512] [--repeat 2]

The test threshold model (one 1x1x1 convolution: its calls are nearly all ONNX Runtime's
overhead) in 96^3 windows, 4 a batch, overlap 0.25, through `segment` with the in-process
backend. Its stages: preprocessing, the sliding window's own work (gathering the windows into
batches, blending their outputs), the model's calls (not counted), labels back on the source
grid, measuring. Against, in the same run, the reference: ONNX Runtime's default of threads that
spin after each call, the model's input as a transposed view of the source-ordered copy, and
MONAI's sliding window (the node before 2026-11-28; it shares that day's changes to the way back).
Series to volume and the SEG and SR are not in it (benchmarks.end_to_end, benchmarks.results). Best
of --repeat runs each, in turns.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
from monai.inferers import sliding_window_inference

from benchmarks.common import benchmark_run
from inference import pipeline, resample
from inference.backends.local import LocalBackend
from inference.pipeline import segment
from inference.spec import ModelSpec
from inference.volume import SeriesVolume
from phantom.dicom import SeriesGeometry
from tests.models import build_test_repository, threshold_spec

OWN = ("preprocess", "windows", "postprocess", "measure")
STAGES = {"preprocess": "preprocessing", "windows": "windows gathered and blended",
          "model": "the model's calls (not counted)", "postprocess": "back to the source grid",
          "measure": "measurements", "own": "the node's own work"}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=2)


def regions(shape: tuple[int, int, int], organ: bool) -> np.ndarray:
    """HU -50 with one organ-sized ellipsoid, or three lesions, at 400."""
    k, r, c = np.ogrid[:shape[0], :shape[1], :shape[2]]
    hu = np.full(shape, -50, np.int16)
    blobs = [((0.5, 0.49, 0.39), (0.3, 0.27, 0.33))] if organ else [
        ((z, y, x), (8 / shape[0], 11 / shape[1], 11 / shape[2]))
        for z, y, x in ((0.2, 0.2, 0.2), (0.5, 0.59, 0.62), (0.8, 0.78, 0.29))]
    for (z, y, x), (a, b, d) in blobs:
        inside = (((k / shape[0] - z) / a) ** 2 + ((r / shape[1] - y) / b) ** 2 + ((c / shape[2] - x) / d) ** 2) <= 1
        hu[inside] = 400
    return hu


@contextmanager
def _reference(backend: LocalBackend, model: Path) -> Iterator[None]:
    """The node as it was: spinning threads, the input copied in the source's axis order, and
    MONAI's sliding window (its sum of weights in a map of the output's size)."""
    relaid, session, windows = resample._relaid, backend.session, pipeline.sliding_window
    resample._relaid = lambda source, order: source.astype(np.float32).transpose(order)  # type: ignore[assignment]
    pipeline.sliding_window = lambda image, roi, batch, predictor, overlap, blend: sliding_window_inference(
        image, roi, batch, predictor, overlap, mode=blend)
    options = backend.session.get_session_options()  # the same threads as the node's
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # ONNX Runtime's default
    backend.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    try:
        yield
    finally:
        resample._relaid, backend.session, pipeline.sliding_window = relaid, session, windows


def _run(hu: np.ndarray, spec: ModelSpec, backend: LocalBackend) -> dict[str, float]:
    return stages(SeriesVolume(hu.copy(), SeriesGeometry(spacing=(1.0, 0.7, 0.7)).affine(), [], "1.2.3"), spec,
                  backend)


def stages(volume: SeriesVolume, spec: ModelSpec, backend: LocalBackend) -> dict[str, float]:
    """`segment`'s seconds by stage (STAGES), with the node's own work ("own": those of OWN)."""
    seconds = segment(volume, spec, backend).seconds
    stages = {"preprocess": seconds["preprocess"], "windows": seconds["inference"] - seconds["model"],
              "model": seconds["model"], "postprocess": seconds["postprocess"], "measure": seconds["measure"]}
    stages["own"] = sum(stages[key] for key in OWN)
    return stages


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        model = build_test_repository(work / "models") / "threshold" / "1" / "model.onnx"
        spec = threshold_spec(preprocessing={"orientation": "RAS", "intensity": {"window": [-1000.0, 1000.0]},
                                             "patch_size": [96, 96, 96], "overlap": 0.25, "batch_size": 4})
        backend = LocalBackend(model, spec)
        shape = (args.slices, args.size, args.size)
        print(f"{'region':8} {'stage':32} {'node':>8} {'reference':>10} {'ratio':>6}")
        for organ in (True, False):
            hu = regions(shape, organ)
            node: list[dict[str, float]] = []
            before: list[dict[str, float]] = []
            for _ in range(args.repeat):
                node.append(_run(hu, spec, backend))
                with _reference(backend, model):
                    before.append(_run(hu, spec, backend))
            best, ref = min(node, key=lambda s: s["own"]), min(before, key=lambda s: s["own"])
            for key, label in STAGES.items():
                print(f"{'organ' if organ else 'lesions':8} {label:32} {best[key]:7.2f}s {ref[key]:9.2f}s"
                      f" {best[key] / ref[key]:6.2f}")
            print(f"{'organ' if organ else 'lesions'}: the node's own work {best['own']:.2f} s against "
                  f"{ref['own']:.2f} s (ratio {best['own'] / ref['own']:.2f}); the issue's target for the "
                  f"demo model, 1.5 s, with series to volume and the SEG and SR besides")


if __name__ == "__main__":
    main()
