"""Export a trained network to ONNX and write its Triton model-repository entry.

Entry layout (the format shared by training and inference)::

    <repo>/<model>/config.pbtxt          production: onnxruntime backend, GPU, dynamic batching
    <repo>/<model>/configs/cpu.pbtxt     CPU variant: python backend (tritonserver --model-config-name=cpu)
    <repo>/<model>/<version>/model.onnx  the model, one file
    <repo>/<model>/<version>/model.py    python-backend runner of model.onnx (CPU variant)
    <repo>/<model>/node.yaml             node-side spec (inference.spec.ModelSpec)
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml

from inference.spec import ModelSpec

_ONNX_DTYPE = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "UINT8": "TYPE_UINT8"}


class ExportMismatch(RuntimeError):
    pass


def export_onnx(
    network: torch.nn.Module,
    path: Path,
    spec: ModelSpec,
    example_shape: tuple[int, int, int] | None = None,
    divisor: int = 1,
    tolerance: float = 1e-4,
    dynamic_spatial: bool = True,
) -> float:
    """Export with dynamic batch and spatial sizes (multiples of `divisor`); check against torch.
    `dynamic_spatial=False` (classifiers: the node resizes every input to the patch size) keeps
    only the batch dynamic.

    Returns the largest absolute difference between ONNX Runtime and PyTorch on random input.
    """
    from torch.export import Dim

    network = network.eval()
    shape = example_shape or spec.preprocessing.patch_size
    example = torch.rand(1, 1, *shape)
    batch = Dim("batch", min=1, max=1024)
    spatial = [Dim(f"s{i}", min=1, max=4096) for i in range(3)]
    dims = {0: batch, **{i + 2: (divisor * d if divisor > 1 else d) for i, d in enumerate(spatial)}}
    if not dynamic_spatial:
        dims = {0: batch}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network, (example,), str(path), input_names=[spec.input.name], output_names=[spec.output.name],
            dynamic_shapes=(dims,), external_data=False, verbose=False,
        )
    # Check on a different batch and size than the example, so dynamic axes are exercised.
    other = tuple(int(s) + divisor for s in shape) if dynamic_spatial else tuple(shape)
    probe = torch.rand(2, 1, *other)
    with torch.no_grad():
        expected = network(probe).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([spec.output.name], {spec.input.name: probe.numpy()})[0]
    error = float(np.max(np.abs(got - expected)))
    if got.shape != expected.shape or error > tolerance:
        raise ExportMismatch(f"ONNX output differs from PyTorch: shape {got.shape} vs {expected.shape}, max error {error:.2e}")
    return error


def _config(spec: ModelSpec, backend: str, kind: str, max_batch: int) -> str:
    lines = [
        f'name: "{spec.name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch}",
        "input [",
        f'  {{ name: "{spec.input.name}", data_type: {_ONNX_DTYPE[spec.input.dtype]}, dims: [ 1, -1, -1, -1 ] }}',
        "]",
        "output [",
        f'  {{ name: "{spec.output.name}", data_type: {_ONNX_DTYPE[spec.output.dtype]}, dims: [ {spec.output_channels}, -1, -1, -1 ] }}'
        if spec.task == "segmentation"
        else f'  {{ name: "{spec.output.name}", data_type: {_ONNX_DTYPE[spec.output.dtype]}, dims: [ {spec.output_channels} ] }}',
        "]",
        f"instance_group [ {{ count: 1, kind: {kind} }} ]",
        "dynamic_batching { max_queue_delay_microseconds: 2000 }",
        f"version_policy: {{ specific: {{ versions: [ {spec.version} ] }} }}",
    ]
    return "\n".join(lines) + "\n"


def write_entry(repository: Path, spec: ModelSpec, onnx_file: Path, max_batch: int = 8) -> Path:
    """Write (or replace) the model-repository entry for `spec` around an exported ONNX file."""
    entry = Path(repository) / spec.name
    version_dir = entry / str(spec.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (entry / "configs").mkdir(exist_ok=True)
    if Path(onnx_file).resolve() != (version_dir / "model.onnx").resolve():
        shutil.copyfile(onnx_file, version_dir / "model.onnx")
    shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), version_dir / "model.py")
    (entry / "config.pbtxt").write_text(
        "# Production: ONNX Runtime backend on GPU (NVIDIA tritonserver image).\n"
        + _config(spec, "onnxruntime", "KIND_GPU", max_batch)
    )
    (entry / "configs" / "cpu.pbtxt").write_text(
        "# CPU variant: python backend running the same model.onnx (tritonserver --model-config-name=cpu).\n"
        + _config(spec, "python", "KIND_CPU", max_batch)
    )
    (entry / "node.yaml").write_text(
        "# Node-side spec: see README, 'Model spec'.\n"
        + yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
    )
    return entry
