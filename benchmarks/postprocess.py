"""A segmentation's labels back on the source grid, and its findings measured, for outputs from a few
lesions to organs that span the body.

    python -m benchmarks.postprocess [--slices 300] [--size 512] [--repeat 3]

The demo model's probabilities are replaced by smooth made-up ones on its own grid (the demo spec's
2 mm, RAS), for three lesions, one organ-sized region and three organs (4 channels). Back on the
source grid: `resample_argmax` (interpolating only where the label can change) against every
channel interpolated at every voxel (`resample`, then `first_argmax`), in the same run; the labels
of the two are compared (the voxels where they differ: two channels equal to float32 rounding).
Measuring: `measure` per label and per component, its seconds and the larger peak allocation
(tracemalloc) against the label grid's bytes. Best of --repeat runs.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import benchmark_run, timed
from inference.findings import measure
from inference.pipeline import _LPS_TO_RAS, to_model_space
from inference.resample import first_argmax, resample, resample_argmax
from inference.spec import ModelSpec, load_spec
from inference.volume import SeriesVolume
from phantom.dicom import SeriesGeometry
from tests.fuzz.targets import traced_peak
from tests.models import REPO_MODELS


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3)


def _regions(shape: tuple[int, ...], centres_and_radii: list[tuple[tuple[float, ...], tuple[float, ...]]]
             ) -> list[np.ndarray]:
    """One smooth probability per ellipsoid (in fractions of the grid), about 0.5 on its surface."""
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    out = []
    for centre, radii in centres_and_radii:
        distance = sum(((a - c * n) / (r * n)) ** 2 for a, c, r, n in zip(axes, centre, radii, shape))
        with np.errstate(over="ignore"):  # far out: exp overflows to inf, the probability to 0
            out.append((1 / (1 + np.exp((distance - 1) * 8))).astype(np.float32))
    return out


def _with_labels(spec: ModelSpec, count: int, findings: str) -> ModelSpec:
    fields = spec.model_dump()
    fields["labels"] = [dict(fields["labels"][0], value=v, name=f"Region {v}") for v in range(1, count + 1)]
    fields["postprocessing"]["findings"] = findings
    return ModelSpec.model_validate(fields)


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, _):
        shape = (args.slices, args.size, args.size)
        volume = SeriesVolume(np.zeros(shape, np.int16), SeriesGeometry(spacing=(1.0, 0.7, 0.7)).affine(), [],
                              "1.2.3")
        demo = load_spec(REPO_MODELS / "lesion-seg")
        image = to_model_space(volume, demo)
        model_shape, model_affine = tuple(image.shape[1:]), np.asarray(image.affine, dtype=float)
        source_ras = _LPS_TO_RAS @ volume.affine
        del image
        cases = [
            ("three lesions", [np.maximum.reduce(_regions(model_shape, [
                ((0.3, 0.3, 0.3), (0.03,) * 3), ((0.5, 0.6, 0.4), (0.03,) * 3), ((0.7, 0.4, 0.7), (0.03,) * 3)]))]),
            ("one organ-sized region", _regions(model_shape, [((0.5, 0.5, 0.45), (0.3, 0.27, 0.33))])),
            ("three organs", _regions(model_shape, [((0.5, 0.5, 0.45), (0.3, 0.27, 0.33)),
                                                   ((0.3, 0.3, 0.7), (0.15, 0.12, 0.12)),
                                                   ((0.7, 0.6, 0.3), (0.12, 0.15, 0.12))])),
        ]
        print(f"model grid {model_shape} (2 mm) onto a {shape[0]}x{shape[1]}x{shape[2]} source grid, best of "
              f"{args.repeat}")
        print(f"{'output':24} {'channels':>8} {'labelled':>10} {'every voxel':>12} {'resample_argmax':>16} {'ratio':>6}"
              f" {'differ':>7} {'measure':>8} {'per comp.':>10} {'peak/grid':>10}")
        for name, regions in cases:
            channels = np.stack([np.clip(1 - sum(regions), 0, 1), *regions])  # background first
            whole, reference = timed(lambda: first_argmax(
                resample(c, model_affine, source_ras, shape, padding="constant") for c in channels), args.repeat)
            quick, labels = timed(lambda: resample_argmax(channels, model_affine, source_ras, shape), args.repeat)
            labels = np.ascontiguousarray(labels)
            differ = int(np.count_nonzero(labels != reference))  # where two channels tie to float32 rounding
            specs = [_with_labels(demo, len(regions), findings) for findings in ("per_label", "per_component")]
            measuring, by_component = (timed(lambda: measure(labels, volume, spec), args.repeat)[0] for spec in specs)
            peaks = []
            for spec in specs:
                with traced_peak() as peak:
                    measure(labels, volume, spec)
                peaks += peak
            print(f"{name:24} {len(channels):>8} {int(np.count_nonzero(labels)):>10} {whole:>11.3f}s {quick:>15.3f}s "
                  f"{quick / whole:>6.2f} {differ:>7} {measuring:>7.3f}s {by_component:>9.3f}s "
                  f"{max(peaks) / labels.nbytes:>10.2f}")


if __name__ == "__main__":
    main()
