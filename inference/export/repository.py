"""Export a trained network to ONNX and write its Triton model-repository entry.

Entry layout (the format shared by training and inference)::

    <repo>/<model>/config.pbtxt          production: onnxruntime backend, GPU, dynamic batching
    <repo>/<model>/configs/cpu.pbtxt     CPU variant: python backend (tritonserver --model-config-name=cpu)
    <repo>/<model>/<version>/model.onnx  the model, one file
    <repo>/<model>/<version>/model.py    python-backend runner of model.onnx (CPU variant)
    <repo>/<model>/node.yaml             node-side spec (inference.spec.ModelSpec)
"""

from __future__ import annotations

import os
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
    # written beside `path` and put there only once checked: `path` may be a version being served
    # (`dicom-node-train export` writes into the repository), which a refused export leaves alone
    candidate = path.with_name(f".{path.name}.{os.getpid()}.exporting")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network, (example,), str(candidate), input_names=[spec.input.name], output_names=[spec.output.name],
                dynamic_shapes=(dims,), external_data=False, verbose=False,
            )
        # Check on a different batch and size than the example, so dynamic axes are exercised.
        other = tuple(int(s) + divisor for s in shape) if dynamic_spatial else tuple(shape)
        probe = torch.rand(2, 1, *other)
        with torch.no_grad():
            expected = network(probe).numpy()
        session = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
        got = session.run([spec.output.name], {spec.input.name: probe.numpy()})[0]
        error = float(np.max(np.abs(got - expected)))
        if got.shape != expected.shape or error > tolerance:
            raise ExportMismatch(f"ONNX output differs from PyTorch: shape {got.shape} vs {expected.shape},"
                                 f" max error {error:.2e}")
        _check_channels(got, tuple(probe.shape), spec)
        os.replace(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)
    return error


def _check_channels(output: np.ndarray, input_shape: tuple[int, ...], spec: ModelSpec) -> None:
    """Refuse a network whose channels are not those its spec's labels imply: found at the job
    otherwise (inference.pipeline), on the first study routed to it."""
    axis = 2 if spec.task == "detection" else 1  # detection: (batch, anchors, box + scores)
    if output.ndim <= axis or output.shape[axis] != spec.output_channels:
        says = " declares" if spec.output.channels else "'s labels imply"
        raise ExportMismatch(f"the network's output has shape {output.shape} for an input of {input_shape}: its"
                             f" spec{says} {spec.output_channels} values on axis {axis}")


def _config(spec: ModelSpec, backend: str, kind: str, max_batch: int, versions: list[int] | None = None,
            spatial: tuple[int, int, int] | None = None, anchors: int = 0) -> str:
    """Triton's config for the model (every version in `versions`; spatial dims fixed when the
    ONNX file has them fixed; a detector's, its patch, and its output per anchor)."""
    if spec.task == "detection":
        spatial = spec.preprocessing.patch_size
    dims = ", ".join(str(d) for d in spatial) if spatial else "-1, -1, -1"
    output_dims = {"segmentation": f"{spec.output_channels}, {dims}",
                   "detection": f"{anchors}, {spec.output_channels}"}.get(spec.task, str(spec.output_channels))
    lines = [
        f'name: "{spec.name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch}",
        "input [",
        f'  {{ name: "{spec.input.name}", data_type: {_ONNX_DTYPE[spec.input.dtype]}, dims: [ 1, {dims} ] }}',
        "]",
        "output [",
        f'  {{ name: "{spec.output.name}", data_type: {_ONNX_DTYPE[spec.output.dtype]}, dims: [ {output_dims} ] }}',
        "]",
        f"instance_group [ {{ count: 1, kind: {kind} }} ]",
        "dynamic_batching { max_queue_delay_microseconds: 2000 }",
        f"version_policy: {{ specific: {{ versions: [ {', '.join(map(str, versions or [spec.version]))} ] }} }}",
    ]
    return "\n".join(lines) + "\n"


def _anchors(onnx_file: Path, spec: ModelSpec) -> int:
    """A detector's anchors per patch, from its file (they are the model's; 0 for other tasks)."""
    if spec.task != "detection":
        return 0
    outputs = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).get_outputs()
    shape = next(o.shape for o in outputs if o.name == spec.output.name)
    if len(shape) != 3 or not isinstance(shape[1], int):
        raise ExportMismatch(f"a detector's output {spec.output.name!r} is (N, anchors, values), fixed anchors;"
                             f" the file's is {shape}")
    return int(shape[1])


def write_entry(repository: Path, spec: ModelSpec, onnx_file: Path, max_batch: int = 8) -> Path:
    """Write (or replace) the model-repository entry for `spec` around an exported ONNX file."""
    entry = Path(repository) / spec.name
    version_dir = entry / str(spec.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (entry / "configs").mkdir(exist_ok=True)
    if Path(onnx_file).resolve() != (version_dir / "model.onnx").resolve():
        shutil.copyfile(onnx_file, version_dir / "model.onnx")
    shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), version_dir / "model.py")
    anchors = _anchors(version_dir / "model.onnx", spec)
    (entry / "config.pbtxt").write_text(
        "# Production: ONNX Runtime backend on GPU (NVIDIA tritonserver image).\n"
        + _config(spec, "onnxruntime", "KIND_GPU", max_batch, anchors=anchors)
    )
    (entry / "configs" / "cpu.pbtxt").write_text(
        "# CPU variant: python backend running the same model.onnx (tritonserver --model-config-name=cpu).\n"
        + _config(spec, "python", "KIND_CPU", max_batch, anchors=anchors)
    )
    (entry / "node.yaml").write_text("# Node-side spec: see README, 'Model spec'.\n" + _spec_yaml(spec))
    return entry


def _spec_yaml(spec: ModelSpec) -> str:
    """The spec as node.yaml holds it; `output.channels` only where declared, so that a node of
    before them, sharing the repository (a rollback), still reads the file."""
    undeclared = {"output": {"channels"}} if spec.output.channels is None else None
    return yaml.safe_dump(spec.model_dump(mode="json", exclude=undeclared), sort_keys=False)


class VersionRefused(ValueError):
    pass


def add_version(repository: Path, spec: ModelSpec, network: torch.nn.Module | torch.jit.ScriptModule,
                max_batch: int = 8) -> Path:
    """Export an imported network as a new version of its model, side by side with the others:
    `<repo>/<name>/<version>/` gets model.onnx (checked against PyTorch), its own node.yaml (with
    the provenance and the file's SHA-256) and the python-backend runner; the model's Triton
    configs list every version. A version keeps the model's inputs and outputs (Triton has one
    config per model): a new signature is a new model name."""
    from inference.repository import ModelRepository, sha256_of

    entry = Path(repository) / spec.name
    version_dir = entry / str(spec.version)
    if version_dir.exists():
        raise VersionRefused(f"{spec.name} version {spec.version} exists: import with another --version")
    models = ModelRepository(Path(repository))
    versions = models.versions(spec.name)
    if versions:
        latest = models.spec(f"{spec.name}@{versions[-1]}")
        changed = [k for k in ("task", "input") if getattr(latest, k) != getattr(spec, k)]
        if latest.output.model_dump(exclude={"channels"}) != spec.output.model_dump(exclude={"channels"}):
            changed.append("output")  # (its channels declared or implied alike: what Triton's config holds)
        if latest.output_channels != spec.output_channels:
            changed.append("output channels")
        if latest.preprocessing.patch_size != spec.preprocessing.patch_size:
            changed.append("patch size (Triton's config fixes it)")
        if changed:
            raise VersionRefused(f"{spec.name} version {spec.version} changes the model's {', '.join(changed)}"
                                 f" (version {latest.version} has other ones): import it under another name")
    staging = entry / f".importing-{spec.version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        onnx_file = staging / "model.onnx"
        if isinstance(network, torch.jit.ScriptModule):
            _export_script(network, onnx_file, spec)
        else:
            export_onnx(network, onnx_file, spec, dynamic_spatial=False)
        final = spec.model_copy(update={"provenance": spec.provenance.model_copy(
            update={"sha256": sha256_of(onnx_file)})}) if spec.provenance else spec
        shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), staging / "model.py")
        (staging / "node.yaml").write_text(
            f"# {spec.name} version {spec.version}: node-side spec written by the import (README, 'Bring your own"
            " model').\n" + _spec_yaml(final))
        staging.rename(version_dir)  # the version appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    all_versions = sorted({*versions, spec.version})
    spatial = tuple(spec.preprocessing.patch_size)
    max_batch = max(max_batch, spec.preprocessing.batch_size)  # Triton refuses a batch over it
    anchors = _anchors(version_dir / "model.onnx", spec)
    (entry / "configs").mkdir(exist_ok=True)
    (entry / "config.pbtxt").write_text(
        "# Production: ONNX Runtime backend on GPU (NVIDIA tritonserver image).\n"
        + _config(spec, "onnxruntime", "KIND_GPU", max_batch, all_versions, spatial, anchors))
    (entry / "configs" / "cpu.pbtxt").write_text(
        "# CPU variant: python backend running the same model.onnx (tritonserver --model-config-name=cpu).\n"
        + _config(spec, "python", "KIND_CPU", max_batch, all_versions, spatial, anchors))
    return version_dir


def _export_script(network: torch.jit.ScriptModule, path: Path, spec: ModelSpec, tolerance: float = 1e-4) -> None:
    """TorchScript has no torch.export program: the TorchScript exporter, batch dynamic."""
    example = torch.rand(1, 1, *spec.preprocessing.patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), str(path), input_names=[spec.input.name],
                          output_names=[spec.output.name], dynamo=False,
                          dynamic_axes={spec.input.name: {0: "batch"}, spec.output.name: {0: "batch"}})
    probe = torch.rand(2, 1, *spec.preprocessing.patch_size)
    with torch.no_grad():
        expected = network(probe).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        [spec.output.name], {spec.input.name: probe.numpy()})[0]
    error = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if error > tolerance:
        raise ExportMismatch(f"ONNX output differs from TorchScript: shape {got.shape} vs {expected.shape},"
                             f" max error {error:.2e}")
    _check_channels(got, tuple(probe.shape), spec)
