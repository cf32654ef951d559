"""Time to result: seconds from the last word that says the study is done (its last instance
acknowledged, its MPPS N-SET COMPLETED answered, or the RIS's HL7 ORU^R01 acknowledged) to the
SEG and SR accepted by the PACS (Orthanc), for a CT with the demo model on the embedded backend:
completion by the quiet period (60 s, the default) against completion by MPPS and by HL7, in one
run. Target: MPPS and HL7 <= the job's own time + 1 s. HL7 completes once no instance came for
completion.hl7_settle_s (2 s): an ORU sent right at the last image waits out the settle; one sent
later (as a RIS does: the exam is ended, the report signed, after the images) does not. Both are run.

    python -m benchmarks.time_to_result [--slices 300] [--size 512]
"""

from __future__ import annotations

import time
from pathlib import Path

import hl7
import hl7.client
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from benchmarks.common import benchmark_run
from phantom.study import make_dicom_study
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, wait_for

QUIET_S = 60.0  # completion.quiet_period_s's default
HL7_SETTLE_S = 2.0  # completion.hl7_settle_s's default
ROUTING = {"rules": [{"name": "ct", "match": {"tag": "Modality", "equals": "CT"},
                      "actions": {"run": ["lesion-seg"], "send_to": ["pacs"]}}]}


def _step(study_uid: str, datasets: list[pydicom.Dataset] | None) -> Dataset:
    """The N-CREATE attribute list (datasets None) or the N-SET COMPLETED listing `datasets`."""
    ds = Dataset()
    if datasets is None:
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = [item]
        return ds
    ds.PerformedProcedureStepStatus = "COMPLETED"
    series = Dataset()
    series.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    series.ReferencedImageSequence = []
    for d in datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = d.SOPClassUID
        ref.ReferencedSOPInstanceUID = d.SOPInstanceUID
        series.ReferencedImageSequence.append(ref)
    ds.PerformedSeriesSequence = [series]
    return ds


def _final_result(accession: str) -> str:
    """An ORU^R01 whose OBR-25 says F (final) for the accession number in OBR-18."""
    obr = ["OBR", "1", "PL1", "FI1", "CT"] + [""] * 13 + [accession] + [""] * 6 + ["F"]
    return ("MSH|^~\\&|RIS|HOSP|NODE|HOSP|20261123||ORU^R01|BENCH1|P|2.5.1\rPID|1||PAT1\r"
            + "|".join(obr) + "\r")


def run(work: Path, files: list[Path], signal: str) -> tuple[float, float]:
    """(the last word -> results at the PACS, the job's own time: completion -> results at the PACS);
    `signal`: quiet_period, mpps or hl7."""
    pacs = Orthanc(work / "orthanc").start()
    node = NodeProcess(work / "node", routing=ROUTING, completion={"quiet_period_s": QUIET_S},
                       hl7={"port": 0, "bind": "127.0.0.1"},
                       destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}})
    try:
        node.start()
        wait_for(lambda: node.events("pipeline_ready"), timeout=120)
        hl7_port = node.events("node_started")[-1]["hl7_port"]
        datasets = [pydicom.dcmread(f) for f in files]
        study_uid = str(datasets[0].StudyInstanceUID)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")
        step = generate_uid()
        if signal == "mpps":
            assert assoc.send_n_create(_step(study_uid, None), ModalityPerformedProcedureStep, step)[0].Status == 0
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
        if signal == "mpps":
            assert assoc.send_n_set(_step(study_uid, datasets), ModalityPerformedProcedureStep, step)[0].Status == 0
        if signal == "hl7_later":  # as a RIS does in practice: the message some time after the images
            time.sleep(HL7_SETTLE_S)
        if signal.startswith("hl7"):
            with hl7.client.MLLPClient("127.0.0.1", hl7_port) as client:
                ack = hl7.parse(client.send_message(_final_result(str(datasets[0].AccessionNumber))))
            assert str(ack.segment("MSA")(1)) == "AA"
        last_word = time.time()
        assoc.release()

        def all_delivered() -> list | None:
            rows = node.query("SELECT state, updated_at FROM outbox")
            return rows if rows and all(r["state"] == "delivered" for r in rows) else None

        rows = wait_for(all_delivered, timeout=QUIET_S + 900, interval=0.2)
        delivered = max(r["updated_at"] for r in rows)
        created = node.query("SELECT created_at FROM work_items WHERE study_uid=?", (study_uid,))[0]["created_at"]
        return delivered - last_word, delivered - created
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        files, _ = make_dicom_study(work / "ct", slices=args.slices, size=args.size, pixel_spacing=384 / args.size,
                                    slice_spacing=192 / args.slices, seed=5)
        runs = {name: run(work / signal, files, signal) for name, signal in (
            ("quiet period (60 s)", "quiet_period"), ("MPPS (N-SET COMPLETED)", "mpps"),
            ("HL7 at the last image", "hl7"), ("HL7 2 s after the images", "hl7_later"))}
    print(f"{args.slices}x{args.size}x{args.size} CT, demo model (embedded backend): last word -> SEG and SR at Orthanc")
    print(f"{'completion by':28} {'time to result':>15} {'job own time':>13} {'overhead':>9}")
    for name, (total, own) in runs.items():
        print(f"{name:28} {total:14.2f}s {own:12.2f}s {total - own:8.2f}s")
    timer = runs["quiet period (60 s)"]
    for name in ("MPPS (N-SET COMPLETED)", "HL7 at the last image", "HL7 2 s after the images"):
        total, own = runs[name]
        print(f"{name} vs timer: {total / timer[0]:.3f} of the time; overhead {total - own:.2f} s "
              f"(target <= 1 s, ratio {(total - own) / 1.0:.2f})")


if __name__ == "__main__":
    main()
