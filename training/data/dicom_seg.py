"""DICOM CT series paired with DICOM SEG (e.g. annotations made on the PACS) as training data.

Each SEG is matched to the series it references, the series becomes a volume with the node's
own loader, and the SEG's segments are read on that series' frames with highdicom. The pairs
are written in MSD layout, so training sees them like any other dataset.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import SegmentationStorage

from inference.volume import load_series
from training.data.msd import DatasetError, write_dataset_json, write_pair


def dicom_seg_to_msd(source: Path, out: Path) -> Path:
    """Convert every (series, SEG) pair under `source`; segment number N becomes label N."""
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    segs: list[hd.seg.Segmentation] = []
    for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        if ds.SOPClassUID == SegmentationStorage:
            segs.append(hd.seg.Segmentation.from_dataset(ds))
        elif "PixelData" in ds:
            series[str(ds.SeriesInstanceUID)].append(ds)
    if not segs:
        raise DatasetError(f"no DICOM SEG objects under {source}")
    pairs, names = [], {0: "background"}
    for number, seg in enumerate(segs):
        referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        if referenced not in series:
            raise DatasetError(f"SEG {seg.SOPInstanceUID} references series {referenced}, which is not under {source}")
        volume = load_series(series[referenced])
        labels = seg.get_pixels_by_source_instance(
            [str(ds.SOPInstanceUID) for ds in volume.datasets],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        ).astype(np.uint8)
        for item in seg.SegmentSequence:
            names[int(item.SegmentNumber)] = str(item.SegmentLabel)
        pairs.append(write_pair(out, f"case_{number:04d}", volume.array, labels, volume.affine))
    write_dataset_json(out, "dicom-seg", pairs, names)
    return out
