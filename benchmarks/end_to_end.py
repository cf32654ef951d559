"""End to end: a 300-slice 512x512 CT from the last instance received to the results accepted by
Orthanc, split by stage (the quiet period excluded), with LocalBackend and with Triton, for the
first study after the start and the median of the next three (the same images as new studies:
the steady state); and how soon `dicom-node serve` answers a C-ECHO after start, and how long it
takes to stop with an idle association open and a second SIGTERM (targets: 2 s each). It also
prints how many headers each job took parsed ahead, in the quiet period (node.assemble.read_ahead).
The model's compute, not counted, is the backend's calls only (the model_ran event's "model"); the
rest of the sliding window (its windows gathered into batches, their outputs blended) is counted.

    python -m benchmarks.end_to_end [--slices 300] [--size 512]
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.triton_server import TritonCpuServer
from node.jobs.store import JobStore
from node.store.index import Index
from tests.orthanc import Orthanc
from tests.peers import VENV_BIN, NodeProcess, wait_for
from phantom.study import make_dicom_study
from benchmarks.common import benchmark_run, relabel

QUIET = 2.0
AHEAD = "headers its job took read ahead"
ROUTING = {"rules": [{"name": "ct", "match": {"tag": "Modality", "equals": "CT"},
                      "actions": {"run": ["lesion-seg"], "send_to": ["@sender"]}}]}


def run(work: Path, studies: list[tuple[list[Path], str]], triton_url: str | None) -> list[dict[str, float]]:
    """The studies one after another through one node (each once the previous one's results are
    in): the first after the start, and the node's steady state after it."""
    pacs = Orthanc(work / "orthanc").start()
    node = NodeProcess(work / "node", routing=ROUTING, completion={"quiet_period_s": QUIET},
                       destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                       inference={"triton": {"url": triton_url}} if triton_url else {})
    try:
        node.start()
        pacs.stop()
        pacs.modalities["node"] = ("TESTNODE", "127.0.0.1", node.port)
        pacs.start()
        rows = []
        for number, (files, study_uid) in enumerate(studies, start=1):
            pacs.upload(files)
            pacs.forward_study("node", study_uid)
            wait_for(lambda: len(node.query("SELECT 1 FROM outbox WHERE state='delivered'")) >= number,
                     timeout=900, interval=0.2)
            rows.append(stage_times(node, study_uid, number))
        return rows
    finally:
        node.stop()
        pacs.stop()


def steady(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median over the studies after the first (the total's too: the median
    study's total, not a sum of medians)."""
    return {key: float(np.median([row[key] for row in rows])) for key in rows[0]}


def stage_times(node: NodeProcess, study_uid: str, number: int) -> dict[str, float]:
    """Seconds per stage of the study's job, from the index and the node's log."""
    study = node.query("SELECT last_received FROM studies WHERE study_uid=?", (study_uid,))[0]
    job = JobStore(Index(node.data_dir / "index.sqlite")).all_jobs(study_uid)[0]
    sent = node.query("SELECT updated_at FROM outbox WHERE study_uid=?", (study_uid,))[0]
    model = node.events("model_ran")[number - 1]["seconds"]
    stages = job.stages
    last = study["last_received"]
    row = {"completion (after the quiet period)": job.created_at - last - QUIET,
           "routing": stages["route"][1] - stages["route"][0],
           "series to volume": stages["load"][1] - stages["load"][0],
           "inference: preprocess": model["preprocess"],
           "inference: model's calls (not counted)": model["model"],
           "inference: windows gathered and blended": model["inference"] - model["model"],
           "inference: back to source grid": model["postprocess"],
           "inference: measurements": model["measure"],
           "SEG + SR build and write": stages["encode"][1] - stages["encode"][0],
           "delivery to Orthanc": sent["updated_at"] - stages["enqueue"][1]}
    row["total (quiet period excluded)"] = sent["updated_at"] - last - QUIET
    # the backend's calls only: the sliding window's own work around them (MONAI's gathering of the
    # windows into batches and blending of their outputs) is the node's
    row["total without the model's compute"] = row["total (quiet period excluded)"] - model["model"]
    # parsed in the quiet period, which the study waits anyway (node.assemble.read_ahead): not counted above
    row[AHEAD] = node.events("series_loaded")[number - 1]["read_ahead"]
    return row


def lifecycle(work: Path) -> tuple[float, float]:
    """Seconds from `dicom-node serve` to its first C-ECHO answer, and from SIGTERM to exit with an
    idle association open (once the pipeline has loaded: the node's steady state). A stop drains
    open associations (README, "Stopping drains"): the operator's second SIGTERM, 0.5 s after the
    first, ends the drain, as a service manager's stop timeout would."""
    # for its configuration file and its log; with rules, so that it loads its pipeline at start
    node = NodeProcess(work, routing=ROUTING)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    with open(node.log_path, "ab") as log:
        process = subprocess.Popen([str(VENV_BIN / "dicom-node"), "serve", "--config", str(node.config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")
            if assoc.is_established and assoc.send_c_echo().Status == 0:
                break
            assert process.poll() is None and time.perf_counter() - started < 120
            time.sleep(0.02)
        accepting = time.perf_counter() - started
        wait_for(lambda: node.events("pipeline_ready"), timeout=120)
        stopping = time.perf_counter()
        process.terminate()
        try:
            process.wait(0.5)
        except subprocess.TimeoutExpired:
            process.terminate()  # the drain waits for the idle association: the second SIGTERM hurries it
            process.wait(60)
        return accepting, time.perf_counter() - stopping
    finally:
        if process.poll() is None:
            process.kill()


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        # the demo field of view (384 x 384 x 192 mm) at this matrix
        files, _ = make_dicom_study(work / "ct", slices=args.slices, size=args.size, pixel_spacing=384 / args.size,
                                    slice_spacing=192 / args.slices, seed=5)
        # then the same images as new studies: the node's steady state (the median of three)
        again = [relabel(files, work / f"again{n}", n) for n in range(1, 4)]
        studies = [(f, str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID)) for f in [files, *again]]
        local = run(work / "local", studies, None)
        from tests.models import build_test_repository

        repo = build_test_repository(work / "models")
        server = TritonCpuServer(repo, work / "triton.log").start(timeout=120, ready_models=("lesion-seg",))
        try:
            triton = run(work / "triton", studies, server.grpc_url)
        finally:
            server.cleanup()
        start_s, stop_s = lifecycle(work / "lifecycle")
    local, triton = [[rows[0], steady(rows[1:])] for rows in (local, triton)]
    print(f"{args.slices}x{args.size}x{args.size} CT, last instance received -> results accepted by Orthanc;"
          " the first study after the start, then the median of the next three (the same images as new studies)")
    print(f"{'stage':40} {'Local, 1st':>11} {'Local, next':>12} {'Triton, 1st':>12} {'Triton, next':>13}")
    for key in local[0]:
        if key == AHEAD:
            print(f"{key:40} {local[0][key]:11.0f} {local[1][key]:12.0f} {triton[0][key]:12.0f} {triton[1][key]:13.0f}")
        else:
            print(f"{key:40} {local[0][key]:10.2f}s {local[1][key]:11.2f}s {triton[0][key]:11.2f}s {triton[1][key]:12.2f}s")
    key = "total without the model's compute"
    for label, rows, target in (("LocalBackend", local, 1.5), ("Triton (shared memory)", triton, 1.8)):
        print(f"{key}, {label}: first study {rows[0][key]:.2f} s, next {rows[1][key]:.2f} s; target {target} s"
              f" (ratios {rows[0][key] / target:.2f}, {rows[1][key] / target:.2f})")
    print(f"dicom-node serve: first C-ECHO answered {start_s:.2f} s after start (target 2 s, ratio {start_s / 2:.2f}); "
          f"stopped {stop_s:.2f} s after SIGTERM with an idle association open (target 2 s, ratio {stop_s / 2:.2f})")


if __name__ == "__main__":
    main()
