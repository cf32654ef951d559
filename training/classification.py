"""Train a MONAI classifier (DenseNet or ResNet, 2D or 3D) on what the node feeds it.

Inputs are made by the node's own classification preprocessing (``classification_input``), so
a classifier cannot be trained in one space and served in another. A 2D network sits in
``Planar``, which takes the node's (N, 1, X, Y, 1) input of a one-slice volume (a radiograph
in RAS order: columns, rows, one slice), so the exported ONNX model has the same interface as
every other model in the repository. Metrics (accuracy, sensitivity, specificity, F1, ROC AUC,
confusion matrix) come from MONAI, per epoch on the validation set and at the end on a
held-out test set, with a ROC plot.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix
from monai.networks.nets import DenseNet, DenseNet121, ResNet
from monai.transforms import Compose, RandFlip, RandGaussianNoise, RandScaleIntensity
from monai.utils import set_determinism
from tqdm import tqdm

from inference.spec import ModelSpec

Architecture = Literal["densenet", "densenet121", "resnet"]
METRICS = ("accuracy", "sensitivity", "specificity", "f1 score")


@dataclass
class ClassifierConfig:
    """The network; the defaults are small enough to train on 2 CPU cores in minutes."""

    architecture: Architecture = "densenet"
    spatial_dims: Literal[2, 3] = 2
    init_features: int = 16  # densenet
    growth_rate: int = 8  # densenet
    block_config: tuple[int, ...] = (2, 4, 4)  # densenet
    layers: tuple[int, ...] = (1, 1, 1, 1)  # resnet (basic blocks)
    block_inplanes: tuple[int, ...] = (16, 32, 64, 128)  # resnet


class Planar(torch.nn.Module):
    """A 2D network behind the node's 3D input: (N, C, X, Y, 1) -> (N, C, X, Y) -> the network."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[..., 0])


def build_classifier(spec: ModelSpec, config: ClassifierConfig) -> torch.nn.Module:
    out, dims = spec.output_channels, config.spatial_dims
    if dims == 2 and spec.preprocessing.patch_size[2] != 1:
        raise ValueError("a 2D classifier needs patch_size [X, Y, 1] (one slice, e.g. a radiograph)")
    if config.architecture == "densenet121":
        network: torch.nn.Module = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=out)
    elif config.architecture == "densenet":
        network = DenseNet(spatial_dims=dims, in_channels=1, out_channels=out, init_features=config.init_features,
                           growth_rate=config.growth_rate, block_config=config.block_config)
    else:
        network = ResNet(block="basic", layers=list(config.layers), block_inplanes=list(config.block_inplanes),
                         spatial_dims=dims, n_input_channels=1, num_classes=out)
    return Planar(network) if dims == 2 else network


def load_classifier(checkpoint: Path, spec: ModelSpec) -> tuple[torch.nn.Module, ClassifierConfig]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["network_config"].items()})
    network = build_classifier(spec, config)
    network.load_state_dict(state["network"])
    return network.eval(), config


@dataclass
class ClassificationTrainConfig:
    out: Path
    spec: ModelSpec
    network: ClassifierConfig = field(default_factory=ClassifierConfig)
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0


def activate(logits: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return torch.sigmoid(logits) if spec.output_activation == "sigmoid" else torch.softmax(logits, dim=1)


def decide(probabilities: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """The node's decision per label (ClassificationResult.present), as a 0/1 matrix."""
    if spec.output_activation == "sigmoid":
        return (probabilities >= spec.postprocessing.threshold).float()
    return torch.nn.functional.one_hot(probabilities.argmax(1), probabilities.shape[1]).float()


def metrics(probabilities: torch.Tensor, targets: torch.Tensor, spec: ModelSpec) -> dict[str, dict]:
    """Per label (one-vs-rest): accuracy, sensitivity, specificity, F1, ROC AUC, confusion matrix."""
    matrix = get_confusion_matrix(decide(probabilities, spec), targets).sum(0)  # (labels, [tp, fp, tn, fn])
    out = {}
    for i, label in enumerate(spec.labels):
        cm = matrix[i]
        values = {name.replace(" score", ""): float(compute_confusion_matrix_metric(name, cm)) for name in METRICS}
        y = targets[:, i]
        values["roc_auc"] = float(compute_roc_auc(probabilities[:, i], y)) if 0 < y.sum() < len(y) else float("nan")
        values["confusion_matrix"] = {"tp": int(cm[0]), "fp": int(cm[1]), "tn": int(cm[2]), "fn": int(cm[3])}
        out[label.name] = values
    return out


def predict(network: torch.nn.Module, inputs: torch.Tensor, spec: ModelSpec, batch_size: int = 32) -> torch.Tensor:
    network.eval()
    with torch.no_grad():
        return torch.cat([activate(network(inputs[i:i + batch_size]), spec) for i in range(0, len(inputs), batch_size)])


def _augment() -> Compose:
    """Mild and label-preserving (a finding stays a finding): flips of the first two axes, intensity scale, noise."""
    return Compose([RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1),
                    RandScaleIntensity(factors=0.1, prob=0.5), RandGaussianNoise(prob=0.3, std=0.05)])


def train_classifier(config: ClassificationTrainConfig, train: tuple[torch.Tensor, torch.Tensor],
                     validation: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train; best.pt (best validation ROC AUC, then accuracy), last.pt, metrics.json/csv in `config.out`."""
    set_determinism(seed=config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    spec = config.spec
    network = build_classifier(spec, config.network)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    loss_fn = (torch.nn.BCEWithLogitsLoss() if spec.output_activation == "sigmoid"
               else lambda logits, y: torch.nn.functional.cross_entropy(logits, y.argmax(1)))
    augment = _augment()
    inputs, targets = train
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    best_key: tuple[float, float] = (-1.0, -1.0)
    batches = (len(inputs) + config.batch_size - 1) // config.batch_size
    # tqdm shows the epoch, the running loss and the ETA of the whole run (disable=None: quiet in logs)
    bar = tqdm(total=config.epochs * batches, desc="training", unit="batch", disable=None)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        network.train()
        losses = []
        for batch in torch.randperm(len(inputs), generator=generator).split(config.batch_size):
            x = torch.stack([torch.as_tensor(augment(inputs[i])) for i in batch.tolist()])
            optimizer.zero_grad()
            loss = loss_fn(network(x), targets[batch])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{np.mean(losses):.4f}")
            bar.update()
        scheduler.step()
        values = metrics(predict(network, validation[0], spec), validation[1], spec)
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - started, 2),
               **_flat(values)}
        history.append(row)
        tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        key = (_mean(values, "roc_auc"), _mean(values, "accuracy"))
        state = {"network": network.state_dict(), "epoch": epoch, "validation": values,
                 "network_config": asdict(config.network)}
        if key > best_key:
            best_key = key
            torch.save(state, config.out / "best.pt")
        torch.save(state, config.out / "last.pt")
        write_rows(config.out / "metrics", history)
    bar.close()
    summary = {"epochs": config.epochs, "best_validation": _best(history, best_key), "history": history}
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(values: dict[str, dict], key: str) -> float:
    found = [v[key] for v in values.values() if not np.isnan(v[key])]
    return float(np.mean(found)) if found else 0.0


def _flat(values: dict[str, dict]) -> dict[str, float | int]:
    """One label: plain metric names; several: `<label>/<metric>`."""
    row: dict[str, float | int] = {}
    for label, metric in values.items():
        prefix = "" if len(values) == 1 else f"{label}/"
        for name, value in metric.items():
            if name == "confusion_matrix":
                row.update({f"{prefix}{k}": v for k, v in value.items()})
            else:
                row[f"{prefix}{name}"] = value
    return row


def _best(history: list[dict], key: tuple[float, float]) -> dict:
    return next((row for row in history if ("roc_auc" not in row) or (row["roc_auc"], row["accuracy"]) == key),
                history[-1])


def write_rows(stem: Path, rows: list[dict]) -> None:
    """`<stem>.json` and `<stem>.csv` of metric rows."""
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """(threshold, false positive rate, true positive rate) at every distinct score."""
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order].astype(bool)
    positives, negatives = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    points = [{"threshold": float("inf"), "fpr": 0.0, "tpr": 0.0}]
    tp = fp = 0
    for i, (score, positive) in enumerate(zip(scores, truth)):
        tp, fp = tp + int(positive), fp + int(not positive)
        if i + 1 == len(scores) or scores[i + 1] != score:
            points.append({"threshold": float(score), "fpr": fp / negatives, "tpr": tp / positives})
    return points


def evaluate_classifier(network: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], spec: ModelSpec,
                        out: Path, name: str = "test") -> dict[str, dict]:
    """Metrics on a held-out set: `<name>_metrics.json/csv`, `<name>_roc.csv` and `<name>_roc.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probabilities = predict(network, data[0], spec)
    values = metrics(probabilities, data[1], spec)
    write_rows(out / f"{name}_metrics", [{"set": name, "images": len(data[0]), **_flat(values)}])
    (out / f"{name}_metrics.json").write_text(json.dumps(values, indent=2))  # per label, nested
    figure, axes = plt.subplots(figsize=(5, 5))
    rows = []
    for i, label in enumerate(spec.labels):
        curve = roc_curve(probabilities[:, i].numpy(), data[1][:, i].numpy())
        rows += [{"label": label.name, **point} for point in curve]
        axes.plot([p["fpr"] for p in curve], [p["tpr"] for p in curve],
                  label=f"{label.name} (AUC {values[label.name]['roc_auc']:.3f})")
    write_rows(out / f"{name}_roc", rows)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
             title=f"ROC, {spec.name}, {name} set ({len(data[0])} images)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / f"{name}_roc.png", dpi=100)
    plt.close(figure)
    return values
