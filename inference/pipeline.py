"""A series volume through a model and back onto the series' own voxel grid.

MONAI does the work: Orientation and Spacing bring the volume to the model's space,
sliding-window inference runs the backend patch by patch, and the same transforms' inverse
brings the class probabilities back to the source grid, where they are turned into labels.
So every label voxel lies on a source frame and pixel, and carries that frame's geometry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, NormalizeIntensity, Orientation, Resize, ScaleIntensityRange, Spacing

from inference.backends.base import Backend
from inference.findings import Finding, clean_components, measure
from inference.spec import Label, ModelSpec
from inference.volume import SeriesVolume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SegmentationResult:
    spec: ModelSpec
    volume: SeriesVolume
    labels: np.ndarray  # uint8 (slice, row, column) on the source grid
    findings: list[Finding]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ClassificationResult:
    spec: ModelSpec
    volume: SeriesVolume
    probabilities: dict[int, float]  # label value -> probability
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def predicted(self) -> Label:
        return self.spec.label(max(self.probabilities, key=self.probabilities.__getitem__))


def _spatial(spec: ModelSpec) -> Compose:
    steps: list = [Orientation(axcodes=spec.preprocessing.orientation, labels=None)]
    if spec.preprocessing.spacing is not None:
        steps.append(Spacing(pixdim=spec.preprocessing.spacing, mode="bilinear", dtype=np.float32))
    return Compose(steps)


def _intensity(spec: ModelSpec) -> Compose:
    settings = spec.preprocessing.intensity
    if settings.window is not None:
        lo, hi = settings.window
        b_lo, b_hi = settings.output_range
        return Compose([ScaleIntensityRange(a_min=lo, a_max=hi, b_min=b_lo, b_max=b_hi, clip=True)])
    if settings.normalize == "zscore":
        return Compose([NormalizeIntensity()])
    return Compose([])


def to_model_space(volume: SeriesVolume, spec: ModelSpec) -> tuple[MetaTensor, Compose]:
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array[None], dtype=np.float32)),
                       affine=torch.from_numpy(_LPS_TO_RAS @ volume.affine))
    spatial = _spatial(spec)
    moved = spatial(image)
    return _intensity(spec)(moved), spatial


def _activation(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    if spec.output_activation == "softmax":
        return torch.softmax(logits, dim=1)
    if spec.output_activation == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def segment(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> SegmentationResult:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    image, spatial = to_model_space(volume, spec)
    seconds["preprocess"] = time.perf_counter() - start

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(backend.infer(patches.numpy()))

    start = time.perf_counter()
    with torch.no_grad():
        logits = sliding_window_inference(
            image[None].as_tensor(), roi_size=spec.preprocessing.patch_size,
            sw_batch_size=spec.preprocessing.batch_size, predictor=predictor,
            overlap=spec.preprocessing.overlap, mode="gaussian",
        )
    seconds["inference"] = time.perf_counter() - start

    start = time.perf_counter()
    probabilities = MetaTensor(_activation(logits, spec)[0], affine=image.affine)
    probabilities.applied_operations = list(image.applied_operations)
    on_source = spatial.inverse(probabilities).as_tensor().numpy()
    labels = _labels(on_source, spec)
    seconds["postprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    findings = measure(labels, volume, spec)
    seconds["measure"] = time.perf_counter() - start
    return SegmentationResult(spec, volume, labels, findings, seconds)


def _labels(probabilities: np.ndarray, spec: ModelSpec) -> np.ndarray:
    post = spec.postprocessing
    if post.mode == "argmax":
        labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    else:  # threshold: channel c is label c (channel 0 background when softmax)
        labels = np.zeros(probabilities.shape[1:], dtype=np.uint8)
        for label in spec.labels:
            labels[probabilities[label.value] >= post.threshold] = label.value
    for label in spec.labels:
        mask = labels == label.value
        kept = clean_components(mask, post.keep_largest_component, post.min_component_voxels)
        labels[mask & ~kept] = 0
    return labels


def classify(volume: SeriesVolume, spec: ModelSpec, backend: Backend) -> ClassificationResult:
    start = time.perf_counter()
    image, _ = to_model_space(volume, spec)
    resized = Resize(spatial_size=spec.preprocessing.patch_size)(image)
    seconds = {"preprocess": time.perf_counter() - start}
    start = time.perf_counter()
    logits = torch.from_numpy(backend.infer(resized[None].as_tensor().numpy()))
    probabilities = _activation(logits, spec)[0].numpy()
    seconds["inference"] = time.perf_counter() - start
    return ClassificationResult(
        spec, volume, {label.value: float(probabilities[i]) for i, label in enumerate(spec.labels)}, seconds
    )
