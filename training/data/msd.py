"""Medical Segmentation Decathlon layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/`` (NIfTI).

The one on-disk training format: synthetic phantoms and DICOM+SEG exports are written in it
too, so every source goes through the same loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DatasetError(ValueError):
    pass


def load_msd(root: str | Path) -> tuple[list[dict[str, str]], dict[int, str]]:
    """Training pairs as ``{"image": path, "label": path}`` and the label names by value."""
    root = Path(root)
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{root / 'dataset.json'}: {exc}") from None
    pairs = []
    for item in meta.get("training", []):
        image, label = root / item["image"], root / item["label"]
        for path in (image, label):
            if not path.is_file():
                raise DatasetError(f"{path} is listed in dataset.json but missing")
        pairs.append({"image": str(image), "label": str(label)})
    if not pairs:
        raise DatasetError(f"{root / 'dataset.json'} lists no training pairs")
    labels = {int(k): str(v) for k, v in meta.get("labels", {"0": "background", "1": "foreground"}).items()}
    return pairs, labels


def write_pair(root: Path, name: str, image: np.ndarray, label: np.ndarray, affine_lps: np.ndarray) -> dict[str, str]:
    """Write one image/label pair (arrays indexed like `affine_lps`) as NIfTI in RAS."""
    affine = LPS_TO_RAS @ affine_lps
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def write_dataset_json(root: Path, name: str, pairs: list[dict[str, str]], labels: dict[int, str]) -> None:
    (root / "dataset.json").write_text(json.dumps({
        "name": name,
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": len(pairs),
        "training": pairs,
    }, indent=2))
