"""Sliding-window inference: a volume's windows through a predictor, blended into one output.

The same windows, weights and arithmetic as MONAI's ``sliding_window_inference`` (its window
grid from ``dense_patch_slices``, its weights from ``compute_importance_map``, each window's
output weighted and added in MONAI's order, then divided by the sum of the weights): the output
is MONAI's to the bit (tests/test_inference.py compares them). Written here for one thing MONAI
does not do: its sum of weights is a second array of the output's spatial size (315 MB at a
300x512x512 CT's own resolution, twice its pixels) built window by window; here it is summed
slab by slab just before the division, in the same order per voxel, and the output is the only
volume-sized array. A model at a 300x512x512 CT's own resolution, against MONAI's in turns in one
process: the windows' own work 0.57-0.60 -> 0.49-0.51 s (gaussian), 0.56-0.62 -> 0.41-0.50 s
(constant); the job's peak 1941-2066 -> 1699-1708 MiB.

Only what the node runs: one image (batch of 1), a predictor answering a tensor of the windows'
own size (a segmentation model's logits), no buffering across devices.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.utils import fall_back_tuple

SIGMA_SCALE = 0.125  # of the window, for gaussian blending: MONAI's default, the node's since it began
# Planes along the first spatial axis whose sum of weights is held at once (a 300x512x512 CT's own
# grid: 9.8 MB). Slabs of a window's depth (96 planes, 59 MB) took the organ's windows back to
# MONAI's time: the division then reads its sums from memory, not the cache. Many small windows
# cost more here than in MONAI's map, each added to every slab it crosses (35,937 of 32^3 in a 128^3
# image at overlap 0.9: 0.94 s against 0.44 s), against at least 9,000 model calls for them.
SLAB = 16


def sliding_window(inputs: torch.Tensor, roi_size: Sequence[int], batch_size: int,
                   predictor: Callable[[torch.Tensor], torch.Tensor], overlap: float,
                   blend: Literal["gaussian", "constant"], output: torch.Tensor | None = None) -> torch.Tensor:
    """`predictor` over the windows of `inputs` (1, channel, *spatial), `batch_size` windows a
    call, overlapping by `overlap` of a window, blended into (1, output channel, *spatial). An
    image smaller than a window is padded with zeros around it, as MONAI pads, and the output
    cropped back. `output`: zeros of (1, output channel, *padded size: output_bytes) to blend
    into, allocated by a caller that must hold it before the first window (inference.pipeline:
    right after its memory check); else allocated at the first answer."""
    if inputs.shape[0] != 1:
        raise ValueError(f"one image at a time, not a batch of {inputs.shape[0]}")
    given = tuple(int(n) for n in inputs.shape[2:])
    roi = tuple(int(n) for n in fall_back_tuple(roi_size, given))  # as MONAI: a side under 1 is the image's
    short = [max(window - n, 0) for window, n in zip(roi, given)]  # padded, half of it before
    if any(short):  # (F.pad takes the last axis first)
        pad = [side for n in reversed(short) for side in (n // 2, n - n // 2)]
        inputs = F.pad(inputs, pad=pad, mode="constant", value=0.0)
    size = tuple(int(n) for n in inputs.shape[2:])
    if output is not None and (output.ndim != len(size) + 2 or tuple(output.shape[2:]) != size):
        raise ValueError(f"an output of {tuple(output.shape)} given for windows over {size}")
    windows = dense_patch_slices(size, roi, _scan_interval(roi, overlap))
    weights = compute_importance_map(roi, mode=blend, sigma_scale=SIGMA_SCALE, device=inputs.device,
                                     dtype=inputs.dtype)
    for first in range(0, len(windows), batch_size):
        group = windows[first:first + batch_size]
        batch = [inputs[(slice(None), slice(None), *where)] for where in group]
        answer = predictor(torch.cat(batch) if batch_size > 1 else batch[0])  # (one a call: a view, as MONAI's)
        if answer.shape[0] != len(group) or tuple(answer.shape[2:]) != roi:
            raise ValueError(f"the predictor answered {tuple(answer.shape)} for {len(group)} windows of {roi}")
        if blend != "constant":  # (weights of one: MONAI multiplies by them all the same, to the same values)
            answer *= weights
        if output is None:
            output = torch.zeros((1, answer.shape[1], *size), dtype=inputs.dtype)
        elif answer.shape[1] != output.shape[1]:
            raise ValueError(f"the predictor answered {answer.shape[1]} channels for an output of {output.shape[1]}")
        for where, part in zip(group, answer):
            output[(0, slice(None), *where)] += part
    assert output is not None  # an image has at least one window
    _divide_by_weights(output, windows, weights)
    if any(short):
        output = output[(slice(None), slice(None), *(slice(m // 2, m // 2 + n) for m, n in zip(short, given)))]
    return output


def output_bytes(roi_size: Sequence[int], given: Sequence[int], channels: int) -> tuple[int, tuple[int, ...]]:
    """The bytes of `sliding_window`'s output over an image of spatial size `given` (its one
    volume-sized array: float32, a value per channel and voxel, a side shorter than a window
    padded to it while the windows run), and that padded size."""
    roi = fall_back_tuple(roi_size, given)
    size = tuple(max(int(window), int(n)) for window, n in zip(roi, given))
    return channels * math.prod(size) * 4, size


def _scan_interval(roi: tuple[int, ...], overlap: float) -> tuple[int, ...]:
    """The step between windows along each axis, as MONAI takes it: the window less its overlap,
    at least one voxel (MONAI steps a whole window where the image is one window wide: one window
    either way)."""
    return tuple(max(int(window * (1 - overlap)), 1) for window in roi)


def _divide_by_weights(output: torch.Tensor, windows: list[tuple[slice, ...]], weights: torch.Tensor) -> None:
    """`output` divided, in place, by the sum of the weights of the windows over each voxel, SLAB
    planes at a time: each slab's sum is added up window by window in the windows' order, as
    MONAI adds up its whole map, so the same floats come out."""
    planes = output.shape[2]
    firsts = np.array([(where[0].start, where[0].stop) for where in windows])  # along the slabs' axis
    for start in range(0, planes, SLAB):
        stop = min(start + SLAB, planes)
        total = torch.zeros((stop - start, *output.shape[3:]), dtype=output.dtype)
        for k in np.flatnonzero((firsts[:, 0] < stop) & (firsts[:, 1] > start)):  # the slab's, in order
            where = windows[k]
            lo, hi = max(where[0].start, start), min(where[0].stop, stop)
            total[(slice(lo - start, hi - start), *where[1:])] += weights[lo - where[0].start:hi - where[0].start]
        output[:, :, start:stop] /= total
