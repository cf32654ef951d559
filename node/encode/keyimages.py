"""Secondary Capture key images: the finding burned into the source slice, for any viewer.

Every PACS shows a Secondary Capture. Each key image is one source slice (windowed, enlarged to
at least 512 pixels so the text is legible) with every label tinted and outlined in its colour,
and a band under it that says "AI result, not for primary diagnosis" and names the model and
version: the picture cannot be mistaken for an acquired image even after it leaves the node.
"""

from __future__ import annotations

import math

import cv2
import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from inference.detection import DetectionResult
from inference.pipeline import SegmentationResult
from node.config import OutputOptions
from node.encode.kos import finding_slices
from node.encode.seg import image_laterality, segment_labels
from node.encode.uids import ResultUIDs

LEGEND = "AI result, not for primary diagnosis"
MIN_SIZE = 512  # pixels across: smaller slices are enlarged (nearest neighbour) for legible text
BAND = 44  # legend band height, pixels
TINT = 0.45  # weight of the label colour inside the region


def key_slices(result: SegmentationResult, count: int) -> list[int]:
    """Slices with a finding, the `count` with the largest segmented area, in slice order; for a
    detector, the slices through the centres of its `count` most probable findings."""
    if isinstance(result, DetectionResult):
        return finding_slices(result.volume, result.findings[:count])
    area = (result.labels > 0).sum(axis=(1, 2))
    ranked = [int(k) for k in np.argsort(-area, kind="stable") if area[k] > 0]
    return sorted(ranked[:count])


def scale_of(result: SegmentationResult) -> int:
    """The integer enlargement of every key image of this result."""
    return max(1, math.ceil(MIN_SIZE / max(result.labels.shape[1:])))


def _window(result: SegmentationResult) -> tuple[float, float]:
    """The source's first window, or the 1st-99th percentile of the volume."""
    source = result.volume.datasets[0]
    centre, width = source.get("WindowCenter"), source.get("WindowWidth")
    if centre is not None and width is not None:
        first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
        return first(centre) - first(width) / 2, first(centre) + first(width) / 2
    low, high = np.percentile(result.volume.array, [1, 99])
    return float(low), float(max(high, low + 1))


def render(result: SegmentationResult, k: int, model: str) -> np.ndarray:
    """RGB uint8 picture of slice k: grey image, tinted and outlined labels, legend band below."""
    low, high = _window(result)
    grey = np.clip((result.volume.array[k].astype(float) - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    scale = scale_of(result)
    labels = np.kron(result.labels[k], np.ones((scale, scale), dtype=np.uint8))
    picture = np.repeat(np.kron(grey, np.ones((scale, scale), dtype=np.uint8))[..., None], 3, axis=2).astype(float)
    for label in segment_labels(result):
        mask = labels == label.value
        if not mask.any():
            continue
        colour = np.array(label.color, dtype=float)
        picture[mask] = (1 - TINT) * picture[mask] + TINT * colour
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        picture[edge] = colour
    rows, columns = labels.shape
    canvas = Image.new("RGB", (columns, rows + BAND), (0, 0, 0))
    canvas.paste(Image.fromarray(picture.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    draw.text((6, rows + 4), LEGEND, fill=(255, 255, 0), font=font)
    draw.text((6, rows + 24), model[:60], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _orientation(direction: np.ndarray) -> str:
    """Patient Orientation letters of a direction (LPS): the main axis first, others above 0.1."""
    letters = ("LR", "PA", "HF")
    unit = direction / np.linalg.norm(direction)
    return "".join(letters[a][0 if unit[a] > 0 else 1] for a in np.argsort(-np.abs(unit)) if abs(unit[a]) > 0.1)


def build_key_images(result: SegmentationResult, options: OutputOptions, uids: ResultUIDs) -> list[hd.sc.SCImage]:
    """One Secondary Capture per key slice, in the source study; none when nothing was found."""
    volume = result.volume
    model = f"{result.spec.name} {result.spec.version}"
    images = []
    scale = scale_of(result)
    for number, k in enumerate(key_slices(result, options.key_images), start=1):
        source, frame = volume.source_of(k)
        spacing = (float(np.linalg.norm(volume.affine[:3, 1])) / scale,
                   float(np.linalg.norm(volume.affine[:3, 2])) / scale)
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=render(result, k, model),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=uids.series("SC"),
            series_number=options.sc_series_number,
            sop_instance_uid=uids.instance("SC", f"slice-{k}"),
            instance_number=number,
            manufacturer=options.manufacturer,
            pixel_spacing=spacing,
            # highdicom takes one letter per direction; an oblique or tilted plane has more (below)
            patient_orientation=(_orientation(volume.affine[:3, 2])[0], _orientation(volume.affine[:3, 1])[0]),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        image.PatientOrientation = [_orientation(volume.affine[:3, 2]), _orientation(volume.affine[:3, 1])]
        image.SeriesDescription = options.describe(result.spec.name, "key images")
        image.BurnedInAnnotation = "YES"
        image.ImageLaterality = image_laterality(source)  # as on the SEG: satisfies dciodvfy and pixelmed
        image.ImageComments = f"{LEGEND}. {model}"[:10240]
        image.ManufacturerModelName = result.spec.name[:64]
        image.SoftwareVersions = options.software_version
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame is not None:
            reference.ReferencedFrameNumber = frame
        image.SourceImageSequence = [reference]
        images.append(image)
    return images
