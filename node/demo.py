"""`dicom-node demo`: a phantom CT study through a running node, results checked against truth.

It plays both ends a site would: a modality that sends the study (calling AE = the demo
destination's AE title, so results return to sender) and a small viewer-side SCP that
receives the SEG and SR. The summary compares each lesion of the phantom with the finding
the model reported for it, and shows the time per pipeline stage.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from node.config import NodeConfig
from node.encode.sr import read_findings
from node.send.scu import associate, storage_contexts
from node.send.status import delivered
from node.jobs.store import JobStore
from node.store.index import SQLITE_FILE, Index
from phantom.study import make_dicom_study


@dataclass
class Received:
    folder: Path
    files: list[Path] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: Event) -> int:
        ds = event.dataset
        path = self.folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        with self.lock:
            self.files.append(path)
        return 0x0000

    def of_class(self, sop_class: str) -> list[Path]:
        with self.lock:
            return [p for p in self.files if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == sop_class]


def run_demo(config: NodeConfig, host: str, slices: int, size: int, seed: int, timeout: float,
             port: int | None = None) -> int:
    """`port`: the node's DICOM port (default: scp.port)."""
    port = port or config.scp.port
    destination = config.destinations.get("demo-viewer")
    if destination is None:
        print("the configuration has no 'demo-viewer' destination (see config/node.yaml)")
        return 2
    with tempfile.TemporaryDirectory(prefix="dicom-node-demo-") as tmp:
        work = Path(tmp)
        (work / "received").mkdir()
        files, phantom = make_dicom_study(work / "study", slices=slices, size=size, seed=seed)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        received = Received(work / "received")
        viewer = AE(ae_title=destination.ae_title)
        viewer.supported_contexts = AllStoragePresentationContexts
        try:
            server = viewer.start_server((destination.host, destination.port), block=False,
                                         evt_handlers=[(evt.EVT_C_STORE, received.handle)])
        except OSError as exc:
            print(f"the demo viewer cannot listen on {destination.host}:{destination.port} ({exc.strerror}):"
                  " another program uses that port; stop it, or change the demo-viewer destination's port")
            return 1
        try:
            print(f"phantom study {study_uid}: {len(files)} CT images, {len(phantom.lesions)} lesions")
            sent_at = time.time()
            assoc = associate(host, port, destination.ae_title, config.scp.ae_title, storage_contexts(files))
            if not assoc.is_established:
                print(f"cannot reach the node at {host}:{port} - is it running (make run)? (--port: its DICOM port)")
                return 1
            statuses = [getattr(assoc.send_c_store(f), "Status", None) for f in files]
            assoc.release()
            print(f"sent {sum(delivered(s) for s in statuses)}/{len(files)} images in {time.time() - sent_at:.1f} s;"
                  f" waiting for the quiet period ({config.completion.quiet_period_for(destination.ae_title):.0f} s)"
                  " and the results ...")
            deadline = time.monotonic() + timeout + config.completion.quiet_period_for(destination.ae_title)
            while time.monotonic() < deadline and not received.of_class(Comprehensive3DSRStorage):
                time.sleep(0.5)
            srs = received.of_class(Comprehensive3DSRStorage)
            segs = received.of_class(SegmentationStorage)
            if not srs:
                print(f"no results within {timeout:.0f} s after the quiet period: see `dicom-node jobs` and the node's log")
                return 1
            print(f"received {len(segs)} SEG and {len(srs)} SR {time.time() - sent_at:.1f} s after sending")
            _summary(phantom.truth()["lesions"], read_findings(pydicom.dcmread(srs[0])))
            _stages(config, study_uid)
        finally:
            server.shutdown()
    return 0


def _summary(truth: list[dict], findings: list[dict]) -> None:
    print(f"\n{'lesion':8} {'truth centre (mm)':>26} {'found':>8} {'centre error':>13} {'truth mm3':>10} {'found mm3':>10} {'error':>7}")
    used: set[int] = set()
    for n, lesion in enumerate(truth, start=1):
        distances = [np.linalg.norm(np.subtract(f["centroid"], lesion["centre_mm"])) if i not in used else np.inf
                     for i, f in enumerate(findings)]
        best = int(np.argmin(distances)) if findings else -1
        centre = "(" + ", ".join(f"{v:6.1f}" for v in lesion["centre_mm"]) + ")"
        if best < 0 or distances[best] > 10:
            print(f"{n:<8} {centre:>26} {'missed':>8}")
            continue
        used.add(best)
        found = findings[best]
        error = found["volume_mm3"] / lesion["volume_mm3"] - 1
        print(f"{n:<8} {centre:>26} {found['tracking_id']:>8} {distances[best]:10.2f} mm {lesion['volume_mm3']:10.0f}"
              f" {found['volume_mm3']:10.0f} {error:+7.1%}")
    extra = [f["tracking_id"] for i, f in enumerate(findings) if i not in used]
    if extra:
        print(f"findings with no lesion in the phantom: {', '.join(extra)}")


def _stages(config: NodeConfig, study_uid: str) -> None:
    if not config.storage.effective_index_url() and not (Path(config.storage.data_dir) / SQLITE_FILE).exists():
        return
    jobs = JobStore(Index.open(config.storage)).all_jobs(study_uid)
    if jobs and jobs[-1].stages:
        print("\ntime per stage: " + ", ".join(f"{name} {s:.2f} s" for name, s in jobs[-1].stage_seconds().items()))
