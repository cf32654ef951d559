"""Models for the tests: a threshold 'segmentation' whose right answer is known exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from inference.spec import ModelSpec
from inference.export.repository import add_version, export_onnx, write_entry

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
THRESHOLD_HU = 270.0
WINDOW = (-1000.0, 1000.0)


class ThresholdNet(torch.nn.Module):
    """Logits for (background, bright) from a windowed [0, 1] input: bright above `threshold_hu`."""

    def __init__(self, threshold_hu: float = THRESHOLD_HU):
        super().__init__()
        self.level = (threshold_hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x - self.level) * 200.0
        return torch.cat([-d, d], dim=1)


def threshold_spec(**changes: object) -> ModelSpec:
    spec = {
        "name": "threshold",
        "task": "segmentation",
        "description": "Voxels above 270 HU (test model)",
        "preprocessing": {"orientation": "RAS", "intensity": {"window": list(WINDOW)},
                          "patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 4},
        "postprocessing": {"findings": "per_component"},
        "labels": [{
            "value": 1, "name": "Bright region",
            "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"},
            "type": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"},
            "color": [255, 64, 0],
        }],
    }
    spec.update(changes)
    return ModelSpec.model_validate(spec)


def build_test_repository(root: Path) -> Path:
    spec = threshold_spec()
    onnx = root / "threshold.onnx"
    export_onnx(ThresholdNet(), onnx, spec, (16, 16, 16))
    write_entry(root, spec, onnx)
    # "thresholds": two versions side by side (270 HU, then 0 HU), as `dicom-node models import-*` adds them
    write_entry(root, threshold_spec(name="thresholds"), onnx)
    onnx.unlink()
    add_version(root, threshold_spec(name="thresholds", version=2, description="Voxels above 0 HU"), ThresholdNet(0.0))
    for entry in REPO_MODELS.iterdir() if REPO_MODELS.is_dir() else []:
        if (entry / "node.yaml").exists():
            shutil.copytree(entry, root / entry.name)
    return root
