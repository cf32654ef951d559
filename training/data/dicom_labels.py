"""A site's own classification data: a folder of DICOM files and a CSV of labels.

``labels.csv`` has a ``file`` column (path relative to the folder: one image, or one file of a
series; every file of that series in the folder is then read) and a ``label`` column: the name
of a label of the model spec, several separated by ``;`` for a multi-label (sigmoid) model, or
empty for "no finding". Each image becomes a volume with the node's own loader and the node's
own classification preprocessing, so training sees exactly what inference will.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from inference.pipeline import classification_input
from inference.spec import ModelSpec
from inference.volume import load_volumes, read_series
from training.data.msd import DatasetError


def targets(names: list[str], spec: ModelSpec) -> np.ndarray:
    """Target vector: multi-hot over the spec's labels (sigmoid) or one-hot of the class (softmax)."""
    by_name = {label.name.lower(): i for i, label in enumerate(spec.labels)}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        raise DatasetError(f"labels {unknown} are not in the model spec ({sorted(by_name)})")
    if spec.output_activation == "softmax" and len(names) != 1:
        raise DatasetError("a softmax classifier needs exactly one class per image")
    out = np.zeros(len(spec.labels), np.float32)
    for name in names:
        out[by_name[name.lower()]] = 1.0
    return out


def read_labels(csv_path: Path) -> list[tuple[str, list[str]]]:
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DatasetError(f"{csv_path}: needs the columns 'file' and 'label'")
    return [(row["file"], [n.strip() for n in (row["label"] or "").split(";") if n.strip()]) for row in rows]


def load_labelled_dicom(folder: Path, csv_path: Path, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(inputs (N, 1, *patch_size), targets (N, labels), file names) for every row of the CSV."""
    folder = Path(folder)
    rows = read_labels(csv_path)
    series_files: dict[str, list[Path]] = defaultdict(list)
    series_of: dict[str, str] = {}
    for name, _ in rows:
        series_of[name] = str(pydicom.dcmread(folder / name, stop_before_pixels=True).SeriesInstanceUID)
    wanted = set(series_of.values())
    singles = len(wanted) == len(rows)  # one image per row (radiographs): no need to scan the folder
    if singles:
        for name, uid in series_of.items():
            series_files[uid].append(folder / name)
    else:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
            except (InvalidDicomError, OSError):
                continue  # the CSV, notes, anything that is not DICOM
            if uid in wanted:
                series_files[uid].append(path)
    inputs, labels = [], []
    for name, names in rows:
        volumes = load_volumes(read_series(series_files[series_of[name]]))
        inputs.append(classification_input(volumes[0], spec).as_tensor())
        labels.append(torch.from_numpy(targets(names, spec)))
    return torch.stack(inputs), torch.stack(labels), [name for name, _ in rows]
