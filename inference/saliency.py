"""Where a classifier looked: occlusion sensitivity through the model's own backend.

Why occlusion and not Grad-CAM: it needs only forward passes of the deployed model, so it
explains exactly what ran (the ONNX file, in-process or on Triton), with no torch checkpoint or
network code on the node and no gradients through a server. Why not MONAI's
``OcclusionSensitivity``: it fills the occluded box with a constant, the box mean or a scaled-down
copy, which on a normalised radiograph paints a new bright or dark blob into the lung, and the
model reacts to that blob rather than to what was hidden (its maximum missed the nodule on most
phantoms). Here the box is replaced by the same box of a median-filtered copy of the input (a
median wider than the box removes small findings and keeps edges), the neutral baseline the
perturbation literature uses, and the passes go to the backend in batches. The saliency of a
class at a voxel is the mean drop of its log-odds over the boxes that hide it, each weighted
towards its centre (positive: evidence for the class). The map is brought back onto the source
grid from the model-space affine (``inference.resample``), as segmentation probabilities are, so
it overlays the image.
"""

from __future__ import annotations

import functools
import itertools
import time

import numpy as np
import torch
from scipy import ndimage

from inference.backends.base import Backend
from inference.pipeline import _LPS_TO_RAS, ClassificationResult, classification_input
from inference.resample import resample

BATCH = 8  # the exported Triton entries take batches of up to 8


def occluder(patch_size: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Box (an eighth of the patch; 1 along a singleton axis) and stride: a quarter box in 2D
    (29 x 29 passes at any image size), a whole box in 3D (512 passes), to bound the cost."""
    box = tuple(max(1, int(np.ceil(s / 8))) if s > 1 else 1 for s in patch_size)
    planar = sum(s > 1 for s in patch_size) <= 2
    return box, tuple(max(1, b // 4) if planar else b for b in box)


def _starts(size: int, box: int, stride: int) -> list[int]:
    starts = list(range(0, size - box + 1, stride))
    return starts if starts[-1] == size - box else starts + [size - box]


def occlusion_map(image: np.ndarray, predict, probabilities: np.ndarray, box: tuple[int, ...],
                  stride: tuple[int, ...]) -> np.ndarray:
    """(labels, *spatial) mean probability drop when each voxel is hidden; `image` is (1, *spatial)."""
    spatial = image.shape[1:]
    baseline = ndimage.median_filter(image, size=(1, *(2 * b + 1 if b > 1 else 1 for b in box)), mode="nearest")
    corners = list(itertools.product(*(_starts(n, b, s) for n, b, s in zip(spatial, box, stride))))
    drop = np.zeros((len(probabilities), *spatial), np.float64)
    count = np.zeros(spatial, np.float64)
    weight = _centre_weight(box)
    for i in range(0, len(corners), BATCH):
        chunk = corners[i:i + BATCH]
        batch = np.repeat(image[None], len(chunk), axis=0)
        boxes = [tuple(slice(c, c + b) for c, b in zip(corner, box)) for corner in chunk]
        for j, where in enumerate(boxes):
            batch[(j, slice(None), *where)] = baseline[(slice(None), *where)]
        hidden = predict(batch)
        for j, where in enumerate(boxes):
            drop[(slice(None), *where)] += (probabilities - hidden[j])[(slice(None), *[None] * len(spatial))] * weight
            count[where] += weight
    return (drop / np.maximum(count, 1e-12)).astype(np.float32)


def _centre_weight(box: tuple[int, ...]) -> np.ndarray:
    """Each box's drop counts most at its centre (a Gaussian, sigma a quarter box, as MONAI's
    occlusion weighs its boxes): the map then peaks where the hidden finding was, not anywhere
    on the plateau of boxes that each hide all of it."""
    axes = [np.exp(-0.5 * ((np.arange(b) - (b - 1) / 2) / max(b / 4, 0.5)) ** 2) for b in box]
    return functools.reduce(np.multiply, np.ix_(*axes))


def log_odds(logits: np.ndarray, activation: str) -> np.ndarray:
    """The evidence for each class in log-odds, which a confident model does not saturate (a
    probability of 0.99999 barely moves when a finding is hidden; its log-odds fall by several
    units): sigmoid and no activation, the logits; softmax, the log-probabilities."""
    if activation == "softmax":
        return torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    return logits


def occlusion_saliency(result: ClassificationResult, backend: Backend) -> dict[int, np.ndarray]:
    """Saliency per label on the source grid (slice, row, column), float32; also stored on `result`."""
    spec = result.spec
    start = time.perf_counter()
    image = classification_input(result.volume, spec)
    box, stride = occluder(spec.preprocessing.patch_size)

    def predict(batch: np.ndarray) -> np.ndarray:
        return log_odds(backend.infer(batch), spec.output_activation)

    pixels = np.ascontiguousarray(image.as_tensor().numpy(), dtype=np.float32)
    drop = occlusion_map(pixels, predict, predict(pixels[None])[0], box, stride)
    source = _LPS_TO_RAS @ result.volume.affine
    maps = {label.value: resample(drop[i], np.asarray(image.affine, dtype=float), source, result.volume.array.shape)
            for i, label in enumerate(spec.labels)}
    result.saliency = maps
    result.seconds["saliency"] = time.perf_counter() - start
    return maps
