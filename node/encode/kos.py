"""Key Object Selection: the source images on which findings lie, flagged for the reader.

A PACS or viewer that shows no SR still lists a KOS as the study's key images (IHE Key Image
Note); the reader opens them and finds the finding on the slice. Title (113000, DCM, "Of
Interest") from CID 7010, never (113037, DCM) "Rejected for Patient Safety Reasons", which the
node itself reads as a reader's rejection of a result (README, "Monitoring models"). highdicom builds and checks
the document (PS3.3 A.35.4).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.findings import Finding
from inference.pipeline import SegmentationResult
from inference.volume import SeriesVolume
from node.config import OutputOptions
from node.encode.provenance import contributing_equipment
from node.encode.sr import device_observer
from node.encode.uids import ResultUIDs


def finding_slices(volume: SeriesVolume, findings: list[Finding]) -> list[int]:
    """The slice nearest each finding's centre, in slice order, each once."""
    inverse = np.linalg.inv(volume.affine)
    centres = [inverse @ np.append(finding.centroid, 1.0) for finding in findings]
    last = volume.shape[0] - 1
    return sorted({int(np.clip(round(float(index[0])), 0, last)) for index in centres})


def build_key_object_selection(result: SegmentationResult, options: OutputOptions,
                               uids: ResultUIDs) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS of the images with findings (of their frames, in a multi-frame source); None when
    nothing was found (the SR says so)."""
    volume = result.volume
    images: dict[str, Dataset] = {}
    frames: dict[str, set[int]] = {}
    for k in finding_slices(volume, result.findings):
        source, frame = volume.source_of(k)
        images.setdefault(str(source.SOPInstanceUID), source)
        if frame is not None:
            frames.setdefault(str(source.SOPInstanceUID), set()).add(int(frame))
    if not images:
        return None
    count = len(result.findings)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(images.values()),
        observer_device_context=device_observer(result, options, uids),
        description=f"AI result, not for primary diagnosis: {result.spec.name} {result.spec.version},"
                    f" {count} finding{'s' if count != 1 else ''}"[:1024],
    )
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=list(images.values()),
        content=content,
        series_instance_uid=uids.series("KOS"),
        series_number=options.kos_series_number,
        sop_instance_uid=uids.instance("KOS"),  # no variant: every destination's KOS has the same content
        instance_number=1,
        manufacturer=options.manufacturer,
        contributing_equipment=contributing_equipment(result.spec, options),
    )
    document.SeriesDescription = options.describe(result.spec.name, "KOS")
    for item in document.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        # highdicom 0.28 names each flagged image "Source" (SCT 260753009); TID 2010 row 8 gives the
        # IMAGE item no concept name, and pixelmed's validator rejects one there.
        if "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
        # highdicom flags whole objects: in a multi-frame one, only the frames with findings
        reference = item.ReferencedSOPSequence[0]
        if str(reference.ReferencedSOPInstanceUID) in frames:
            reference.ReferencedFrameNumber = sorted(frames[str(reference.ReferencedSOPInstanceUID)])
    return document
