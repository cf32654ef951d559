"""De-identification both ways, against reading and writing the same files (the floor).

    python -m benchmarks.deid [--slices 300] [--size 512]

Out: a CT series read, de-identified (PS3.15 E.1, modified dates) and written, per instance, as
the deidentify action does; the reference is the same read and write with nothing changed.
Back: a BINARY SEG with 2 segments over the whole series, re-identified through the mapping (one
lookup per distinct UID) and written, against reading and writing it unchanged.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from benchmarks.common import benchmark_run
from benchmarks.results import SPEC
from inference.findings import measure
from inference.pipeline import SegmentationResult
from inference.volume import SeriesVolume
from node.config import OutputOptions
from node.deid.engine import deidentify
from node.deid.profile import Option, Profile
from node.deid.pseudonyms import Pseudonyms
from node.deid.reidentify import patient_and_study, reidentify
from node.encode.seg import build_seg
from node.encode.uids import ResultUIDs, SourceIdentity, returned_result_uid
from node.store.index import Index
from node.store.pseudonyms import PseudonymMap
from phantom.dicom import SeriesGeometry, write_ct_series

KEY = b"benchmark key, 32 bytes or more!"


def _write(dataset: pydicom.Dataset) -> int:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        shape = (args.slices, args.size, args.size)
        rng = np.random.default_rng(7)
        files = write_ct_series(rng.integers(-1000, 1000, size=shape).astype(np.float32), work / "ct",
                                SeriesGeometry(spacing=(1.0, 0.7, 0.7)))
        pseudonyms = Pseudonyms(KEY, "bench")
        profile = Profile(frozenset({Option.RETAIN_LONGITUDINAL_MODIFIED_DATES}))
        uids: dict[str, str] = {}

        def out() -> None:
            for path in files:
                made = deidentify(pydicom.dcmread(path), profile, pseudonyms)
                uids.update(made.uids)
                _write(made.dataset)

        reference = _timed(lambda: [_write(pydicom.dcmread(p)) for p in files])
        deid = _timed(out)
        print(f"out: {len(files)} instances of {args.size}x{args.size}")
        print(f"  read + write (reference)   {reference:7.2f} s  {len(files) / reference:7.1f} instances/s")
        print(f"  read + de-identify + write {deid:7.2f} s  {len(files) / deid:7.1f} instances/s"
              f"  ({deid / reference:.2f}x the reference)")

        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        volume = SeriesVolume(np.zeros(shape, dtype=np.float32), SeriesGeometry(spacing=(1.0, 0.7, 0.7)).affine(),
                              datasets, str(datasets[0].FrameOfReferenceUID))
        labels = np.zeros(shape, dtype=np.uint8)
        n, size = shape[0], args.size
        labels[n // 4: n // 2, size // 5: 2 * size // 5, size // 5: 2 * size // 5] = 1
        labels[n // 2: 3 * n // 4, size // 2: 4 * size // 5, size // 2: 4 * size // 5] = 2
        result = SegmentationResult(SPEC, volume, labels, measure(labels, volume, SPEC))
        source = SourceIdentity.of(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID,
                                   [d.SOPInstanceUID for d in datasets])
        seg = build_seg(result, OutputOptions(), ResultUIDs(installation_uid="2.25.1", job_id=1, source=source,
                                                            model=SPEC.name, model_version="1"))
        # the SEG as the outside service would send it: made on the de-identified copy; the
        # mapping sealed in an index, as the node keeps it
        index = Index(work / "index.sqlite")
        with index.transaction() as db:
            PseudonymMap.record(db, "bench", pseudonyms.mapping_key(),
                                {pseudonyms.lookup(p): s for s, p in uids.items()}, time.time(), 86400.0)
        mapping = PseudonymMap(index)
        seg = pydicom.dcmread(BytesIO(_bytes(seg)))  # as a file, like what a service sends
        returned = pydicom.dcmread(BytesIO(_bytes(deidentify(seg, Profile(), pseudonyms).dataset)))
        returned.SOPInstanceUID, returned.SeriesInstanceUID = "2.25.77", "2.25.78"
        study = patient_and_study(pydicom.dcmread(files[0], stop_before_pixels=True))
        lookups = []

        known: dict[str, str | None] = {}

        def source_of(uid: str) -> str | None:  # as node/jobs/returns.py: one sealed lookup per UID
            if uid not in known:
                lookups.append(uid)
                known[uid] = mapping.source_of("bench", pseudonyms.mapping_key(), pseudonyms.lookup(uid))
            return known[uid]

        def back() -> None:
            made = reidentify(returned, source_of=source_of, study=study, returned={"2.25.77", "2.25.78"},
                              mint=lambda uid: returned_result_uid("2.25.1", "bench", "digest", uid))
            _write(made)

        seg_reference = _timed(lambda: _write(pydicom.dcmread(BytesIO(_bytes(returned)))))
        reid = _timed(back)
        frames = int(returned.NumberOfFrames)
        index.close()
        print(f"back: a SEG of {frames} frames, {len(lookups)} distinct UIDs looked up in the sealed mapping")
        print(f"  read + write (reference)   {seg_reference:7.3f} s")
        print(f"  re-identify + write        {reid:7.3f} s  ({reid / seg_reference:.2f}x the reference)")


def _bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
