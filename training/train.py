"""Train a MONAI 3D UNet whose preprocessing matches the model's node-side spec.

The transforms come from the same spec the node uses at inference (orientation, spacing,
intensity window, patch size), so a model cannot be trained in one space and served in another.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, decollate_batch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscrete,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import set_determinism
from tqdm import tqdm

from inference.spec import ModelSpec
from training.data.msd import load_msd

log = logging.getLogger("training")


@dataclass
class NetworkConfig:
    channels: tuple[int, ...] = (8, 16, 32)
    strides: tuple[int, ...] = (2, 2)
    num_res_units: int = 2

    @property
    def divisor(self) -> int:
        """Spatial sizes the network accepts are multiples of this."""
        return int(np.prod(self.strides))


@dataclass
class TrainConfig:
    data: Path
    out: Path
    spec: ModelSpec
    network: NetworkConfig = field(default_factory=NetworkConfig)
    epochs: int = 20
    iterations_per_epoch: int = 10
    batch_size: int = 2
    samples_per_volume: int = 2
    learning_rate: float = 2e-3
    val_fraction: float = 0.2
    val_interval: int = 1
    seed: int = 0
    resume: Path | None = None


def build_network(spec: ModelSpec, network: NetworkConfig) -> UNet:
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=spec.output_channels,
        channels=network.channels, strides=network.strides, num_res_units=network.num_res_units,
    )


def spec_transforms(spec: ModelSpec, keys: tuple[str, ...] = ("image", "label")) -> list:
    """Load and move data into the model's space, as the node does before inference."""
    pre = spec.preprocessing
    steps: list = [
        LoadImaged(keys=list(keys), image_only=False),
        EnsureChannelFirstd(keys=list(keys)),
        Orientationd(keys=list(keys), axcodes=pre.orientation, labels=None),
    ]
    if pre.spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(Spacingd(keys=list(keys), pixdim=pre.spacing, mode=modes))
    if pre.intensity.window is not None:
        lo, hi = pre.intensity.window
        b_lo, b_hi = pre.intensity.output_range
        steps.append(ScaleIntensityRanged(keys=["image"], a_min=lo, a_max=hi, b_min=b_lo, b_max=b_hi, clip=True))
    elif pre.intensity.normalize == "zscore":
        steps.append(NormalizeIntensityd(keys=["image"]))
    return steps


def _train_transforms(spec: ModelSpec, config: TrainConfig) -> Compose:
    patch = spec.preprocessing.patch_size
    return Compose(spec_transforms(spec) + [
        SpatialPadd(keys=["image", "label"], spatial_size=patch),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=2, neg=1,
                               num_samples=config.samples_per_volume),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
        RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=["image"], offsets=0.05, prob=0.5),
        EnsureTyped(keys=["image", "label"], track_meta=False),
    ])


def _val_transforms(spec: ModelSpec) -> Compose:
    return Compose(spec_transforms(spec) + [EnsureTyped(keys=["image", "label"], track_meta=False)])


def split(pairs: list[dict[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, int(round(len(pairs) * fraction))) if len(pairs) > 1 else 0
    val = [pairs[i] for i in order[:n_val]]
    train = [pairs[i] for i in order[n_val:]]
    return train, val


def validate(network: torch.nn.Module, loader: DataLoader, spec: ModelSpec) -> dict[str, float]:
    """Mean Dice per label with sliding-window inference over whole validation volumes; each label's
    from its own channel (its value: the values may skip numbers, channels go unnamed)."""
    channels = spec.output_channels
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    to_pred, to_label = AsDiscrete(argmax=True, to_onehot=channels), AsDiscrete(to_onehot=channels)
    network.eval()
    with torch.no_grad():
        for batch in loader:
            logits = sliding_window_inference(
                batch["image"], spec.preprocessing.patch_size, spec.preprocessing.batch_size, network,
                overlap=spec.preprocessing.overlap,
            )
            preds = [to_pred(p) for p in decollate_batch(logits)]
            labels = [to_label(lab) for lab in decollate_batch(batch["label"])]
            metric(y_pred=preds, y=labels)
    per_channel = metric.aggregate().reshape(-1).tolist()  # channels 1, 2, ... (the background's left out)
    metric.reset()
    return {label.name: float(per_channel[label.value - 1]) for label in sorted(spec.labels, key=lambda l: l.value)}


def train(config: TrainConfig) -> dict:
    """Train; write best.pt, last.pt and metrics.csv/json to `config.out`; return the summary."""
    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    pairs, _ = load_msd(config.data)
    train_pairs, val_pairs = split(pairs, config.val_fraction, config.seed)
    train_ds = CacheDataset(train_pairs, _train_transforms(config.spec, config), progress=False)
    val_ds = CacheDataset(val_pairs, _val_transforms(config.spec), progress=False)
    train_loader = DataLoader(train_ds, batch_size=config.batch_size, shuffle=True, num_workers=0)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=0)

    network = build_network(config.spec, config.network)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start_epoch, best, history = 0, -1.0, []
    if config.resume:
        state = torch.load(config.resume, map_location="cpu", weights_only=False)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best, history = state["epoch"], state["best_dice"], state["history"]

    for epoch in range(start_epoch, config.epochs):
        network.train()
        losses = []
        started = time.perf_counter()
        batches = iter(train_loader)
        bar = tqdm(range(config.iterations_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=None)  # None: a bar on a terminal, quiet in logs
        for _ in bar:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(train_loader)
                batch = next(batches)
            optimizer.zero_grad()
            loss = loss_fn(network(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        row: dict = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started}
        if val_pairs and (epoch + 1) % config.val_interval == 0:
            dice = validate(network, val_loader, config.spec)
            row.update({f"dice_{k}": v for k, v in dice.items()})
            row["dice_mean"] = float(np.mean(list(dice.values())))
            if row["dice_mean"] > best:
                best = row["dice_mean"]
                torch.save({"network": network.state_dict(), "epoch": epoch + 1, "dice": dice,
                            "network_config": asdict(config.network)}, config.out / "best.pt")
        history.append(row)
        print(json.dumps(row), flush=True)
        torch.save({"network": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                    "best_dice": best, "history": history, "network_config": asdict(config.network)},
                   config.out / "last.pt")
        _write_metrics(config.out, history)
    if not (config.out / "best.pt").exists():  # no validation data: the last model is the best we have
        torch.save({"network": network.state_dict(), "epoch": config.epochs, "dice": {},
                    "network_config": asdict(config.network)}, config.out / "best.pt")
    summary = {"best_dice_mean": best, "epochs": len(history), "history": history}
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_metrics(out: Path, history: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(history, indent=2))
    fields = sorted({key for row in history for key in row}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def load_network(checkpoint: Path, spec: ModelSpec) -> tuple[UNet, NetworkConfig]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    settings = state.get("network_config", {})
    network_config = NetworkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    network = build_network(spec, network_config)
    network.load_state_dict(state["network"])
    return network.eval(), network_config
