"""A gantry-tilted CT (a head CT's usual acquisition): the node's own work around the model on a
sheared 300x512x512 stack, whose input goes onto a model grid laid on its regular grid.

    python -m benchmarks.tilted [--slices 300] [--size 512] [--tilt 20] [--repeat 2]

The test threshold model (one 1x1x1 convolution) on a 1.5 mm grid in 96^3 windows, through
`segment` with the in-process backend, on a stack of HU -50 with an organ-sized region of 400
whose slices are 1 mm apart along a step tilted --tilt degrees from their normal (0.45 mm
pixels). Its stages: preprocessing (the model's grid and the window), the sliding window's own
work, the model's calls (not counted), labels back on the tilted source grid, measuring. Against,
in the same run, the reference: the stack made whole on its regular grid first, then moved onto the
model's grid (the node of 596ef15; `inference.resample.resample_clamped`), and the same stack
untilted. Best of --repeat runs each, in turns.
"""

from __future__ import annotations

import argparse
import math
from unittest import mock

import numpy as np

from benchmarks.common import benchmark_run
from benchmarks.native_grid import STAGES, regions, stages
from inference import pipeline
from inference.backends.local import LocalBackend
from inference.resample import resample
from inference.volume import SeriesVolume
from tests.models import build_test_repository, threshold_spec


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tilt", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=2)


def _two_steps(array: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray, shape: tuple[int, ...],
               box_affine: np.ndarray, box_shape: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """The node as it was: the stack onto its regular grid whole, then that onto the model's grid."""
    regular = resample(array, source_affine, box_affine, box_shape, padding="constant", fill=fill)
    return resample(regular, box_affine, target_affine, shape)


def _tilted(hu: np.ndarray, tilt: float) -> SeriesVolume:
    """The stack with slices 1 mm apart along the normal, each moved along the rows by tan(tilt) mm."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([(0.0, math.tan(math.radians(tilt)), 1.0), (0.0, 0.45, 0.0), (0.45, 0.0, 0.0)]).T
    volume = SeriesVolume(hu.copy(), affine, [], "1.2.3")
    assert volume.sheared == (tilt != 0)
    return volume


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        model = build_test_repository(work / "models") / "threshold" / "1" / "model.onnx"
        spec = threshold_spec(preprocessing={"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                                             "intensity": {"window": [-1000.0, 1000.0]},
                                             "patch_size": [96, 96, 96], "overlap": 0.25, "batch_size": 4})
        backend = LocalBackend(model, spec)
        hu = regions((args.slices, args.size, args.size), organ=True)
        volume, untilted = _tilted(hu, args.tilt), _tilted(hu, 0.0)
        node: list[dict[str, float]] = []
        before: list[dict[str, float]] = []
        level: list[dict[str, float]] = []
        for _ in range(args.repeat):
            node.append(stages(volume, spec, backend))
            with mock.patch.object(pipeline, "resample_clamped", _two_steps):
                before.append(stages(volume, spec, backend))
            level.append(stages(untilted, spec, backend))
        best, ref, axial = (min(runs, key=lambda s: s["own"]) for runs in (node, before, level))
        print(f"tilted {volume.tilt_degrees:.1f} degrees, {'x'.join(map(str, volume.shape))}; untilted: the same"
              " stack's slices along their normal (the node)")
        print(f"{'stage':32} {'node':>8} {'reference':>10} {'ratio':>6} {'untilted':>9}")
        for key, label in STAGES.items():
            print(f"{label:32} {best[key]:7.2f}s {ref[key]:9.2f}s {best[key] / ref[key]:6.2f} {axial[key]:8.2f}s")
        print(f"the node's own work {best['own']:.2f} s against {ref['own']:.2f} s (ratio"
              f" {best['own'] / ref['own']:.2f}); untilted {axial['own']:.2f} s")


if __name__ == "__main__":
    main()
