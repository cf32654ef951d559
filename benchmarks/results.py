"""Results for a 300-slice 512x512 CT with 2 segments: SEG and SR build, write, send to Orthanc.

    python -m benchmarks.results [--slices 300] [--size 512]
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.dataset import Dataset

from inference.findings import measure
from inference.pipeline import SegmentationResult
from inference.spec import ModelSpec
from inference.volume import SeriesVolume
from node.config import NodeConfig
from node.config import OutputOptions
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from node.encode.uids import ResultUIDs, SourceIdentity
from node.encode.writing import dataset_bytes
from node.send.outbox import Outbox
from node.store.index import Index
from tests.orthanc import Orthanc
from tests.peers import wait_for
from phantom.dicom import SeriesGeometry, write_ct_series
from benchmarks.common import benchmark_run

CODE = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
SPEC = ModelSpec.model_validate({
    "name": "bench", "task": "segmentation",
    "labels": [{"value": 1, "name": "Lesion", "category": CODE, "type": CODE},
               {"value": 2, "name": "Organ", "category": CODE, "type": CODE, "color": [0, 255, 0]}],
})


def step(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label:42} {time.perf_counter() - start:7.3f} s")
    return result


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        shape = (args.slices, args.size, args.size)
        files = write_ct_series(np.zeros(shape, dtype=np.float32), work / "ct", SeriesGeometry(spacing=(1.0, 0.7, 0.7)))
        import pydicom

        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        affine = SeriesGeometry(spacing=(1.0, 0.7, 0.7)).affine()
        volume = SeriesVolume(np.zeros(shape, dtype=np.float32), affine, datasets, str(datasets[0].FrameOfReferenceUID))
        labels = np.zeros(shape, dtype=np.uint8)
        k, r, c = np.indices((60, 120, 120))
        labels[100:160, 100:220, 100:220][(k - 30) ** 2 / 900 + (r - 60) ** 2 / 3600 + (c - 60) ** 2 / 3600 <= 1] = 1
        labels[20:280, 300:460, 250:450] = 2
        print(f"SEG and SR for {args.slices}x{args.size}x{args.size} with 2 segments")
        result = SegmentationResult(SPEC, volume, labels, step("measure findings", lambda: measure(labels, volume, SPEC)))
        source = SourceIdentity.of(volume.datasets[0].StudyInstanceUID, volume.datasets[0].SeriesInstanceUID,
                                   [d.SOPInstanceUID for d in volume.datasets])
        uids = ResultUIDs(installation_uid="2.25.1", job_id=1, source=source, model=SPEC.name, model_version="1")
        options = OutputOptions()
        from node.encode.warmup import warm_up

        step("warm-up (the node does it at start)", warm_up)
        seg = step("SEG build (BINARY, all frames)", lambda: build_seg(result, options, uids))
        seg_bytes = step("SEG write", lambda: _write(seg, work / "seg.dcm"))
        step("SEG write, pydicom's save_as (reference)", lambda: _save_as(seg))
        step("SEG build (LABELMAP, JPEG-LS)", lambda: build_seg(result, OutputOptions(segmentation_type="LABELMAP"), uids))
        sr = step("SR build (TID 1500)", lambda: build_sr(result, options, uids, seg))
        step("SR write", lambda: _write(sr, work / "sr.dcm"))
        step("SR write, pydicom's save_as (reference)", lambda: _save_as(sr))
        print(f"{'SEG size':42} {seg_bytes / 1e6:7.2f} MB")

        pacs = Orthanc(work / "orthanc").start()
        try:
            config = NodeConfig.model_validate({"destinations": {"pacs": {
                "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}}})
            scheduler = BackgroundScheduler(timezone="UTC")
            outbox = Outbox(config, Index(work / "index.sqlite"), scheduler)
            item = outbox.enqueue("bench", str(datasets[0].StudyInstanceUID), "pacs", [work / "seg.dcm", work / "sr.dcm"])
            state = step("send SEG + SR to Orthanc (one assoc.)", lambda: outbox.attempt(item))
            assert state == "delivered", state
            wait_for(lambda: pacs.study_id(str(datasets[0].StudyInstanceUID)), timeout=30)
        finally:
            pacs.stop()


def _write(dataset: Dataset, path: Path) -> int:
    """As the node writes a result (node/jobs/stages.py); its size in bytes."""
    data = dataset_bytes(dataset)
    path.write_bytes(data)
    return len(data)


def _save_as(dataset: Dataset) -> int:
    """As pydicom writes it, for reference; its size in bytes."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


if __name__ == "__main__":
    main()
