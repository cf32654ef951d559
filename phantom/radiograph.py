"""Synthetic chest radiographs (DX) with and without a nodule-like opacity.

Training data for the demo classifier and the phantoms of its end-to-end tests: a body with two
dark lung fields, a bright mediastinum, rib shadows and noise; a nodule is a soft round opacity
inside a lung field. Written as DX For Presentation images with only ImagerPixelSpacing (no
patient geometry), as a real radiograph arrives at the node.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import expit

from phantom.dicom import SeriesIdentity, image_header

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DEFAULT_SIZE = 192
DEFAULT_SPACING = 2.0  # mm per pixel: a 384 mm field of view


@dataclass
class Nodule:
    """Where the opacity is, in pixels of the written image (row, column, radius)."""

    row: float
    column: float
    radius: float

    def contains(self, row: float, column: float, margin: float = 1.0) -> bool:
        return float(np.hypot(row - self.row, column - self.column)) <= self.radius * margin


def chest_radiograph(rng: np.random.Generator, size: int = DEFAULT_SIZE,
                     nodule: bool = False) -> tuple[np.ndarray, Nodule | None]:
    """Stored values (uint16, 12 bit, MONOCHROME2: lungs dark) and the nodule, if any."""
    r, c = np.indices((size, size), dtype=np.float32) / size
    image = np.full((size, size), 600.0, np.float32)  # air around the body
    body = ((c - 0.5) / rng.uniform(0.40, 0.46)) ** 2 + ((r - 0.55) / rng.uniform(0.45, 0.52)) ** 2 <= 1
    image[body] = rng.uniform(1900, 2300)
    lungs = np.zeros((size, size), bool)
    centres = []
    for side in (-1, 1):
        cx, cy = 0.5 + side * rng.uniform(0.17, 0.21), rng.uniform(0.45, 0.52)
        ax, ay = rng.uniform(0.11, 0.14), rng.uniform(0.24, 0.29)
        lung = ((c - cx) / ax) ** 2 + ((r - cy) / ay) ** 2 <= 1
        lungs |= lung
        centres.append((cy, cx, ay, ax))
    image[lungs] = rng.uniform(900, 1100)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (r * rng.uniform(9, 12) + 0.15 * np.abs(c - 0.5) * 8 + rng.uniform(0, 1)))
    image += np.where(lungs, ribs ** 4 * rng.uniform(120, 220), 0)
    found: Nodule | None = None
    if nodule:
        cy, cx, ay, ax = centres[int(rng.integers(2))]
        angle, distance = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.45))
        row, column = (cy + distance * ay * np.sin(angle)) * size, (cx + distance * ax * np.cos(angle)) * size
        radius = rng.uniform(0.02, 0.045) * size
        d = np.hypot(r * size - row, c * size - column)
        image += rng.uniform(200, 600) * expit((radius - d) / 1.2)
        found = Nodule(float(row), float(column), float(radius))
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 40, image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16), found


def write_dx(path: Path, pixels: np.ndarray, identity: SeriesIdentity | None = None,
             spacing: float = DEFAULT_SPACING) -> Path:
    """A DX For Presentation image (chest PA) with ImagerPixelSpacing and no patient geometry."""
    identity = identity or SeriesIdentity(series_description="Chest PA", body_part="CHEST")
    ds = image_header(DX_FOR_PRESENTATION, "DX", identity)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.BodyPartExamined, ds.ViewPosition = "FOR PRESENTATION", identity.body_part, "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_dx_dataset(root: Path, count: int, seed: int = 0, size: int = DEFAULT_SIZE,
                    label: str = "Nodule") -> Path:
    """`count` radiographs, half with a nodule, as a site would export them: DICOM files and a
    ``labels.csv`` (file, label; empty label: no finding). Truth (nodule pixels) in ``truth.json``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    for i in range(count):
        pixels, nodule = chest_radiograph(rng, size, nodule=bool(i % 2))
        name = f"dx_{i:05d}.dcm"
        write_dx(root / name, pixels, SeriesIdentity(patient_id=f"SYN{seed:03d}{i:05d}", series_description="Chest PA"))
        rows.append({"file": name, "label": label if nodule else ""})
        truth[name] = asdict(nodule) if nodule else None
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return root
