"""Inference transport and volume loading for a 300x512x512 CT, side by side in one run.

1. Transport of the whole volume through the real Triton server (nvidia-pytriton wheel, CPU)
   over HTTP, gRPC and system shared memory, against LocalBackend (ONNX Runtime in-process),
   with an identity model so that the model's own compute is negligible.
2. Series-to-volume (read, decode, sort, rescale, affine) against the raw read of the same files.
3. The node's own overhead for the volume with shared memory: load + transforms + transport.

    python -m benchmarks.inference [--slices 300] [--size 512]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inference.backends.local import LocalBackend
from inference.backends.triton import TritonBackend
from inference.pipeline import to_model_space
from inference.spec import ModelSpec
from tests.triton_server import TritonCpuServer
from inference.volume import read_volumes
from inference.export.repository import export_onnx, write_entry
from phantom.dicom import SeriesGeometry, write_ct_series
from benchmarks.common import benchmark_run, timed


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


SPEC = ModelSpec.model_validate({
    "name": "identity", "task": "segmentation",
    "preprocessing": {"orientation": "LPS", "intensity": {"window": [-1000, 1000]}},
    "labels": [{"value": 1, "name": "x", "category": {"scheme": "SCT", "value": "1", "meaning": "x"},
                "type": {"scheme": "SCT", "value": "1", "meaning": "x"}}],
})


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        rng = np.random.default_rng(0)
        hu = rng.integers(-1000, 1500, size=(args.slices, args.size, args.size)).astype(np.float32)
        files = write_ct_series(hu, work / "ct", SeriesGeometry(spacing=(1.0, 0.7, 0.7)))
        del hu
        onnx = work / "identity.onnx"
        export_onnx(Identity(), onnx, SPEC, (8, 8, 8))
        write_entry(work / "models", SPEC, onnx)

        raw_s, _ = timed(lambda: [Path(f).read_bytes() for f in files])
        load_s, volume = timed(lambda: read_volumes(files)[0])  # as a job loads it
        transform_s, image = timed(lambda: to_model_space(volume, SPEC))
        batch = np.ascontiguousarray(image[None].as_tensor().numpy())  # the transport, not the layout
        mb = batch.nbytes / 1e6
        print(f"volume {args.slices}x{args.size}x{args.size}: {mb:.0f} MB float32 in, {2 * mb:.0f} MB out")
        print(f"\n{'series to volume':32} {load_s:7.2f} s   (raw read of the files {raw_s:.2f} s, ratio {load_s / raw_s:.1f}x)")
        print(f"{'transforms (orientation, window)':32} {transform_s:7.2f} s")

        local = LocalBackend(work / "models" / "identity" / "1" / "model.onnx", SPEC)
        local_s, expected = timed(lambda: local.infer(batch))
        rows = [("LocalBackend (ONNX Runtime)", local_s)]
        server = TritonCpuServer(work / "models", work / "triton.log").start(timeout=120, ready_models=("identity",))
        try:
            for label, url, protocol, shm in (
                ("Triton HTTP", server.http_url, "http", "none"),
                ("Triton gRPC", server.grpc_url, "grpc", "none"),
                ("Triton shared memory", server.grpc_url, "grpc", "system"),
            ):
                backend = TritonBackend(url, SPEC, protocol=protocol, shared_memory=shm, timeout=600)
                seconds, got = timed(lambda: backend.infer(batch))
                assert np.array_equal(got, expected), f"{label}: output differs from LocalBackend"
                backend.close()
                rows.append((label, seconds))
        finally:
            server.cleanup()
        print(f"\n{'transport of the whole volume':32} {'seconds':>8} {'vs local':>9}")
        for label, seconds in rows:
            print(f"{label:32} {seconds:8.2f} {seconds / local_s:8.1f}x")
        shm_s = rows[-1][1]
        overhead = load_s + transform_s + shm_s
        print(f"\nnode overhead with shared memory (load + transforms + transport): {overhead:.2f} s (target < 1 s)")


if __name__ == "__main__":
    main()
