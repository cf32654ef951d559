"""Dice per label of a checkpoint on a dataset (whole volumes, sliding window, as validation)."""

from __future__ import annotations

from pathlib import Path

from monai.data import Dataset, DataLoader
from monai.transforms import Compose, EnsureTyped

from inference.spec import ModelSpec
from training.data.msd import load_msd
from training.train import load_network, spec_transforms, validate


def evaluate(checkpoint: Path, data: Path, spec: ModelSpec) -> dict[str, float]:
    network, _ = load_network(checkpoint, spec)
    pairs, _ = load_msd(data)
    transforms = Compose(spec_transforms(spec) + [EnsureTyped(keys=["image", "label"], track_meta=False)])
    return validate(network, DataLoader(Dataset(pairs, transforms), batch_size=1), spec)
