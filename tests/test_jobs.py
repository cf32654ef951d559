"""The job state machine, result identities and exactly-once delivery, with real peers.

The node runs the threshold test model (LocalBackend, or the real Triton server where the test
is about Triton), dcmtk's storescu is the modality, Orthanc is the PACS.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pytest

from node.encode.uids import ResultUIDs, SourceIdentity
from node.jobs.store import IllegalTransition, JobState, JobStore, UnknownJob
from node.route.decision import AppliedRule, RoutingDecision
from node.route.rules import Actions
from node.store.index import Index
from tests.orthanc import Orthanc
from tests.peers import VENV_BIN, NodeProcess, storescu, wait_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series

ROUTING = {"rules": [{
    "name": "bright-regions",
    "match": {"tag": "Modality", "equals": "CT"},
    "actions": {"run": ["threshold"], "send_to": ["pacs"]},
}]}


def sphere_study(folder: Path, patient_id: str, slices: int = 24, size: int = 48, centre: tuple = (12, 24, 24),
                 **identity: Any) -> tuple[list[Path], str]:
    """A CT series at -1000 HU with one 500 HU sphere (radius 5 voxels): one finding."""
    k, r, c = np.indices((slices, size, size))
    hu = np.full((slices, size, size), -1000.0)
    hu[(k - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= 25] = 500.0
    files = write_ct_series(hu, folder, SeriesGeometry(spacing=(2.0, 1.0, 1.0)),
                            SeriesIdentity(patient_id=patient_id, **identity))
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def pair(start_node, tmp_path, model_repository) -> Iterator[Callable[..., tuple[NodeProcess, Orthanc]]]:
    """Start a node that sends the threshold model's results to an Orthanc (made here unless given;
    started unless `pacs_running=False`). Every Orthanc made here is stopped at teardown."""
    made: list[Orthanc] = []

    def start(name: str = "node", pacs: Orthanc | None = None, pacs_running: bool = True,
              routing: dict[str, Any] = ROUTING, **overrides: Any) -> tuple[NodeProcess, Orthanc]:
        if pacs is None:
            pacs = Orthanc(tmp_path / f"{name}-pacs")
            made.append(pacs)
            if pacs_running:
                pacs.start()
        sections: dict[str, Any] = {
            "completion": {"quiet_period_s": 1.0},
            "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
            "sending": {"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5},
            "inference": {"model_repository": str(model_repository)},
        }
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return start_node(tmp_path / name, routing=routing, **sections), pacs

    yield start
    for pacs in made:
        pacs.discard()


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """SEG and SR objects Orthanc holds for the study, read back."""
    found = pacs.instances_by_modality(study_uid)
    return {m: [pydicom.dcmread(io.BytesIO(pacs.instance_file(i["ID"]))) for i in found.get(m, [])]
            for m in ("SEG", "SR")}


def wait_results(pacs: Orthanc, study_uid: str, count: int = 1, timeout: float = 120) -> dict[str, list]:
    def ready() -> Any:
        found = pacs.instances_by_modality(study_uid)
        return len(found.get("SEG", [])) >= count and len(found.get("SR", [])) >= count
    wait_for(ready, timeout=timeout, interval=0.3)
    return results_in(pacs, study_uid)


def jobs_of(node: NodeProcess, study_uid: str | None = None) -> list[Any]:
    return JobStore(Index(node.data_dir / "index.sqlite")).all_jobs(study_uid)


def wait_job(node: NodeProcess, study_uid: str, states: set[str], timeout: float = 120) -> Any:
    return wait_for(lambda: next((j for j in jobs_of(node, study_uid) if j.state.value in states), None),
                    timeout=timeout, interval=0.1)


def delivered(node: NodeProcess) -> int:
    return node.query("SELECT COUNT(*) AS n FROM outbox WHERE state='delivered'")[0]["n"]


def send(node: NodeProcess, files: list[Path]) -> None:
    out = storescu(node.port, files)
    assert out.returncode == 0, out.stdout + out.stderr


# -- the state machine itself ---------------------------------------------------------------------

def _decision(run: bool = True) -> RoutingDecision:
    actions = Actions(run=["threshold"], send_to=["pacs"]) if run else Actions(discard=True)
    return RoutingDecision(rules_version="v1", mode="first_match", priority=0, explanation="",
                           applied=(AppliedRule(rule="r", series_uid="1.2.3", actions=actions),), outcomes=())


def test_transitions_are_guarded_and_claims_exclusive(tmp_path):
    store = JobStore(Index(tmp_path / "index.sqlite"))
    with store.index.transaction() as db:
        ids = [store.create(db, f"1.2.{n}", _decision(), time.time())[0] for n in range(20)]
        discarded, state = store.create(db, "1.2.99", _decision(run=False), time.time())
    assert state is JobState.IGNORED and store.get(discarded).reason == "the routing rule discards the study"

    claimed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        stores = JobStore(Index(tmp_path / "index.sqlite"))  # its own connections, like another worker
        while (job := stores.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == ids  # every job claimed exactly once

    first = ids[0]
    with pytest.raises(IllegalTransition, match=f"job {first} is running: it cannot become queued"):
        store.retry(first)
    store.finish(first)
    with pytest.raises(IllegalTransition, match="is done"):
        store.fail(first, "late")
    with pytest.raises(UnknownJob, match="no job 999"):
        store.retry(999)

    second = ids[1]
    assert store.wait(second, "Triton down", delay_s=0.0, deadline_s=60) is JobState.WAITING
    assert store.claim(now=time.time() + 1).id == second and store.get(second).attempts == 2
    assert store.wait(second, "Triton down", delay_s=120, deadline_s=60) is JobState.FAILED
    assert store.get(second).reason.startswith("gave up after the retry deadline: Triton down")
    assert store.retry() == 1 and store.get(second).state is JobState.QUEUED  # --all: the failed one


def test_a_job_its_node_died_under_runs_alone_and_nothing_starts_beside_it():
    """node.jobs.turns: with two workers, a job with a death against it waits, unclaimed (a death
    meanwhile is not counted against it), for the job already running to end; nothing is claimed
    while it waits or runs; then the workers take turns as before. A stop ends its wait, still
    unclaimed."""
    from types import SimpleNamespace

    from node.jobs.turns import Turns

    turns = Turns()
    queue = [SimpleNamespace(id=n, interruptions=k) for n, k in ((1, 0), (2, 1), (3, 0), (4, 0))]
    claimed: list[int] = []

    def claim() -> Any:
        job = queue.pop(0) if queue else None
        claimed.append(job.id if job else 0)
        return job

    def take(waiting: Callable[[], bool] = lambda: True) -> Any:
        return turns.take(claim, alone=lambda job: job.interruptions > 0,
                          next_alone=lambda: bool(queue) and queue[0].interruptions > 0, waiting=waiting)

    first = take()
    suspect: list[Any] = []
    worker = threading.Thread(target=lambda: suspect.append(take()))
    worker.start()
    wait_for(lambda: turns._blocked, timeout=10)  # waiting for job 1 to end, job 2 not claimed
    assert claimed == [1] and suspect == [] and worker.is_alive()
    assert take() is None and claimed == [1]  # nothing claimed beside it
    turns.ended(first)
    worker.join(10)
    assert [j.id for j in suspect] == [2] and claimed == [1, 2]
    assert take() is None and claimed == [1, 2]  # it runs alone
    turns.ended(suspect[0])
    third, fourth = take(), take()
    assert (third.id, fourth.id) == (3, 4)  # side by side again

    queue.append(SimpleNamespace(id=5, interruptions=1))  # the node stops while it waits: never claimed
    stopping = threading.Event()
    late: list[Any] = []
    worker = threading.Thread(target=lambda: late.append(take(waiting=lambda: not stopping.is_set())))
    worker.start()
    wait_for(lambda: turns._blocked, timeout=10)
    stopping.set()
    worker.join(10)
    assert late == [None] and claimed == [1, 2, 3, 4] and not turns._blocked

    turns.ended(third)  # a job to run alone claimed beside others all the same (the look ahead saw none)
    queue.insert(0, SimpleNamespace(id=6, interruptions=0))
    queue.insert(1, SimpleNamespace(id=7, interruptions=1))
    sixth = take()
    both: list[Any] = []
    worker = threading.Thread(target=lambda: both.append(turns.take(
        claim, alone=lambda job: job.interruptions > 0, next_alone=lambda: False, waiting=lambda: True)))
    worker.start()
    wait_for(lambda: claimed[-1] == 7 and turns._blocked, timeout=10)  # claimed, then waiting for 4 and 6
    turns.ended(fourth)
    turns.ended(sixth)
    worker.join(10)
    assert [j.id for j in both] == [7]


# -- identities ---------------------------------------------------------------------------------------

def test_two_installations_never_share_result_uids(pair, tmp_path):
    first, pacs = pair("first")
    second, _ = pair("second", pacs=pacs)
    files_a, study_a = sphere_study(tmp_path / "a", "PAT-A")
    files_b, study_b = sphere_study(tmp_path / "b", "PAT-B")
    send(first, files_a)
    send(second, files_b)
    a, b = wait_results(pacs, study_a), wait_results(pacs, study_b)
    # Both nodes ran their first job (id 1) with the same model: only the identity tells them apart.
    assert [j.id for j in jobs_of(first)] == [1] and [j.id for j in jobs_of(second)] == [1]
    objects = a["SEG"] + a["SR"] + b["SEG"] + b["SR"]
    assert len(objects) == 4
    assert len({o.SOPInstanceUID for o in objects}) == 4
    assert len({o.SeriesInstanceUID for o in objects}) == 4
    assert {o.PatientID for o in a["SEG"] + a["SR"]} == {"PAT-A"}
    assert {o.PatientID for o in b["SEG"] + b["SR"]} == {"PAT-B"}
    assert len({n.query("SELECT value FROM installation")[0]["value"] for n in (first, second)}) == 2


def test_crash_mid_job_and_mid_send_delivers_once_with_the_same_uids(pair, tmp_path):
    node, pacs = pair(pacs_running=False, pipeline={"workers": 1})  # deliveries wait for Orthanc
    files, study_uid = sphere_study(tmp_path / "study", "PAT-C", slices=96, size=192, centre=(48, 96, 96))
    send(node, files)
    # SIGKILL while the job runs (its series loading, inference or encoding)
    wait_job(node, study_uid, {"running"}, timeout=60)
    node.kill_all()
    assert jobs_of(node, study_uid)[0].state is JobState.RUNNING

    node.start()  # the job runs again from its start: nothing was finished
    wait_for(lambda: node.query("SELECT COUNT(*) AS n FROM outbox WHERE attempts>=1")[0]["n"] >= 1, timeout=120)
    # the first attempt may run before the job's own transition to done commits
    wait_for(lambda: jobs_of(node, study_uid)[0].state is not JobState.RUNNING)
    job = jobs_of(node, study_uid)[0]
    assert (job.state, job.attempts, job.interruptions) == (JobState.DONE, 2, 1)
    node.kill_all()  # mid-send: the delivery was tried (Orthanc is down) and is still pending

    pacs.start()
    node.start()
    found = wait_results(pacs, study_uid)
    wait_for(lambda: delivered(node) == 1, timeout=60)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    # the UIDs a clean run of job 1 gives
    installation = node.query("SELECT value FROM installation")[0]["value"]
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    instances = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    uids = ResultUIDs(installation_uid=installation, job_id=1, source=SourceIdentity.of(study_uid, series_uid, instances),
                      model="threshold", model_version="1", rule="bright-regions")
    assert found["SEG"][0].SOPInstanceUID == uids.instance("SEG", "BINARY-full")
    assert found["SR"][0].SOPInstanceUID == uids.instance("SR", "BINARY-full")
    assert found["SEG"][0].SeriesInstanceUID == uids.series("SEG")
    assert len(jobs_of(node)) == 1


def _stuck_repository(root: Path, model_repository: Path) -> Path:
    """The test models and "stuck": the threshold model over 16^3 windows a voxel apart, one a
    call (216,513 calls over a 48x96x96 series: minutes), so that a stop or a kill finds its job
    running."""
    from inference.export.repository import export_onnx, write_entry
    from tests.models import ThresholdNet, threshold_spec

    root.mkdir()
    for entry in model_repository.iterdir():
        (root / entry.name).symlink_to(entry)
    spec = threshold_spec(name="stuck", preprocessing={
        "orientation": "RAS", "intensity": {"window": [-1000.0, 1000.0]}, "patch_size": [16, 16, 16],
        "overlap": 0.95, "batch_size": 1})
    export_onnx(ThresholdNet(), root / "stuck.onnx", spec, (16, 16, 16))
    write_entry(root, spec, root / "stuck.onnx")
    return root


def test_a_job_its_node_dies_running_twice_fails_and_the_node_goes_on(pair, tmp_path, model_repository):
    """A job that kills its node (the kernel's OOM killer, a container's memory limit) was run
    again at every start: a crash loop in which no other study was processed. The node dying
    under it counts; a stop does not: not a SIGKILL once the stop began (a container's grace
    period shorter than the receivers' drain), nor a stop that ends (the job is queued again)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    routing = {"rules": [
        {"name": "stuck", "match": {"tag": "SeriesDescription", "equals": "Stuck"},
         "actions": {"run": ["stuck"], "send_to": ["pacs"]}},
        ROUTING["rules"][0]]}
    node, pacs = pair(routing=routing, pipeline={"workers": 1},
                      inference={"model_repository": str(_stuck_repository(tmp_path / "models", model_repository))})
    files, study_uid = sphere_study(tmp_path / "study", "PAT-S", slices=48, size=96, centre=(24, 48, 48),
                                   series_description="Stuck")
    send(node, files)

    def in_inference(run: int) -> bool:
        """Running, in the inference stage of its `run`-th run: its series loaded that often (a
        run's stage reads `inference` from the run before until it enters `load`)."""
        jobs = jobs_of(node, study_uid)
        return (bool(jobs) and jobs[0].state is JobState.RUNNING and jobs[0].stage == "inference"
                and len([e for e in node.events("series_loaded") if e["job"] == jobs[0].id]) >= run)

    def job() -> Any:
        return jobs_of(node, study_uid)[0]

    wait_for(lambda: in_inference(1), timeout=120)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")  # the stop's drain waits for it
    assert held.is_established
    node.process.send_signal(signal.SIGTERM)
    wait_for(lambda: node.query("SELECT stopping FROM work_items WHERE id=?", (job().id,))[0]["stopping"] == 1,
             timeout=30)
    node.kill_all()  # killed during the drain
    held.abort()
    node.start()
    wait_for(lambda: in_inference(2), timeout=120)
    assert job().interruptions == 0
    node.stop()  # a stop that ends: the job is queued again
    assert (job().state, job().interruptions, job().attempts) == (JobState.QUEUED, 0, 2)
    assert node.events("jobs_released")[-1]["jobs"] == [job().id]
    for dead in (1, 2):
        node.start()
        wait_for(lambda: in_inference(dead + 2), timeout=120)
        node.kill_all()
    node.start()
    failed = wait_job(node, study_uid, {"failed", "done"}, timeout=120)
    assert (failed.state, failed.interruptions, failed.attempts) == (JobState.FAILED, 2, 5)
    assert failed.reason == (
        "the node stopped 2 times while this job ran (last in its inference stage), killed or crashed: it is not"
        " run again, as it may be what stops the node (killed for memory: see the kernel's log); `dicom-node jobs"
        f" retry {failed.id}` runs it again")

    other_files, other_uid = sphere_study(tmp_path / "other", "PAT-OTHER")  # the node goes on
    send(node, other_files)
    assert len(wait_results(pacs, other_uid)["SEG"]) == 1
    retry = subprocess.run([str(VENV_BIN / "dicom-node"), "jobs", "retry", str(failed.id), "--config",
                            str(node.config_path)], capture_output=True, text=True, timeout=120)
    assert retry.returncode == 0, retry.stderr
    wait_for(lambda: in_inference(5), timeout=120)  # the count cleared: it runs again
    assert job().interruptions == 0


def test_identical_resend_after_delivery_sends_nothing_new(pair, tmp_path):
    # a quiet period a loaded machine's storescu cannot pause through: the study must complete once
    # before the resend (seen: a 1.2 s gap after 2 instances split the first send into two jobs)
    node, pacs = pair(completion={"quiet_period_s": 4.0})
    files, study_uid = sphere_study(tmp_path / "study", "PAT-D")
    send(node, files)
    first = wait_results(pacs, study_uid)
    wait_job(node, study_uid, {"done"})
    wait_for(lambda: delivered(node) == 1, timeout=60)

    send(node, files)  # every instance again, byte-identical: acknowledged, nothing reopens
    study = node.study(study_uid)
    assert study["state"] == "complete" and study["completions"] == 1
    assert len(jobs_of(node, study_uid)) == 1
    assert node.instance_count(study_uid) == len(files)
    again = results_in(pacs, study_uid)
    assert [o.SOPInstanceUID for o in again["SEG"] + again["SR"]] == [
        o.SOPInstanceUID for o in first["SEG"] + first["SR"]]

    # A changed instance (new pixel data, same UIDs) is new information: the study is processed
    # again (completion.after_complete: reprocess) as a new job, whose results have new UIDs.
    changed = pydicom.dcmread(files[3])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    send(node, [tmp_path / "changed.dcm"])
    jobs = wait_for(lambda: (found := jobs_of(node, study_uid)) and len(found) == 2
                    and found[1].state.value in ("done", "failed") and found, timeout=120)
    assert jobs[1].state is JobState.DONE, jobs[1].reason
    both = wait_results(pacs, study_uid, count=2)
    assert len({o.SOPInstanceUID for o in both["SEG"] + both["SR"]}) == 4


# -- concurrency, outages, failures ------------------------------------------------------------------

def test_many_studies_at_once_with_four_workers(pair, tmp_path):
    node, pacs = pair(pipeline={"workers": 4})
    studies = [sphere_study(tmp_path / f"s{n}", f"PAT-{n}", slices=16, size=32, centre=(8, 16, 16))
               for n in range(8)]
    broken, broken_uid = sphere_study(tmp_path / "broken", "PAT-X", slices=16, size=32, centre=(8, 16, 16))
    odd = pydicom.dcmread(broken[5])  # one image of another size: not one volume
    odd.Rows, odd.Columns = 16, 16
    odd.PixelData = odd.PixelData[: 16 * 16 * 2]
    odd.save_as(broken[5], enforce_file_format=True)
    send(node, [f for files, _ in studies for f in files] + broken)  # one association, all complete together
    for _, study_uid in studies:
        job = wait_job(node, study_uid, {"done", "failed"})
        assert job.state is JobState.DONE, job.reason
    failed = wait_job(node, broken_uid, {"done", "failed"})
    assert failed.state is JobState.FAILED and failed.attempts == 1  # permanent: at once, no retry
    assert "images of different sizes" in failed.reason and failed.reason.startswith("load: ")
    wait_for(lambda: delivered(node) == 9, timeout=120)  # 8 result sets and the broken study's "AI ran" notice
    for _, study_uid in studies:
        found = results_in(pacs, study_uid)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1


def test_triton_outage_job_waits_then_completes(pair, tmp_path, model_repository):
    from tests.triton_server import TritonCpuServer

    # the one model the rules use (Triton loads every model of a repository: 2.3 s against 6 s)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "threshold").symlink_to(model_repository / "threshold")
    triton = TritonCpuServer(tmp_path / "models", tmp_path / "triton.log")  # down when the study completes
    try:
        node, pacs = pair(inference={"triton": {"url": triton.grpc_url, "retries": 1},
                                     "retry_initial_s": 1.5, "retry_max_s": 2.0})
        files, study_uid = sphere_study(tmp_path / "study", "PAT-T")
        send(node, files)
        waiting = wait_job(node, study_uid, {"waiting"}, timeout=120)
        assert waiting.reason.startswith("inference: Triton at") and waiting.next_attempt > waiting.updated_at
        def listed_waiting() -> str | None:  # the operator's view: state, next attempt, reason
            out = subprocess.run([str(VENV_BIN / "dicom-node"), "jobs", "--config", str(node.config_path)],
                                 capture_output=True, text=True, timeout=60).stdout
            row = out.splitlines()[-1]
            return row if row.split()[1] == "waiting" and "inference: Triton at" in row else None

        row = wait_for(listed_waiting, timeout=60)
        assert row.split()[0] == "1" and row.split()[3].startswith("20")  # the next attempt's date

        triton.start(timeout=120, ready_models=("threshold",))
        done = wait_job(node, study_uid, {"done", "failed"}, timeout=180)
        assert done.state is JobState.DONE, done.reason
        assert done.attempts >= 2
        found = wait_results(pacs, study_uid)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1

        # Triton restarts between two jobs: the node's cached connection and shared-memory
        # regions are stale; the next job waits once, reconnects, and completes.
        triton.stop()
        triton.start(timeout=120, ready_models=("threshold",))
        files, second = sphere_study(tmp_path / "second", "PAT-T2")
        send(node, files)
        done = wait_job(node, second, {"done", "failed"}, timeout=180)
        assert done.state is JobState.DONE, done.reason
        assert len(wait_results(pacs, second)["SEG"]) == 1
    finally:
        triton.cleanup()


def _torch_mapped(node: NodeProcess) -> bool:
    """Whether torch's library is mapped into the service process (imported)."""
    assert node.process is not None
    return "libtorch" in Path(f"/proc/{node.process.pid}/maps").read_text()


def test_a_node_without_rules_loads_its_pipeline_only_once_a_rule_may_take_a_study(pair, tmp_path):
    """No routing rules: torch and MONAI stay unloaded (5 s of CPU, hundreds of MB), through a
    study that no rule takes. Rules put in force by a reload load them, before any study needs
    them (and out of the garbage collector's walks), and the next study's job completes with its
    results at the PACS."""
    node, pacs = pair(routing={"rules": []})
    assert len(node.events("pipeline_deferred")) == 1
    files, first = sphere_study(tmp_path / "first", "PAT-D1")
    send(node, files)
    assert wait_job(node, first, {"ignored"}).reason  # no rule took it
    assert not node.events("pipeline_ready") and not _torch_mapped(node)

    node.write_routing(ROUTING)
    wait_for(lambda: node.events("pipeline_ready"), timeout=120)  # loaded as the rules come in force
    files, second = sphere_study(tmp_path / "second", "PAT-D2")
    send(node, files)
    done = wait_job(node, second, {"done", "failed"}, timeout=180)
    assert done.state is JobState.DONE, done.reason
    ready = node.events("pipeline_ready")
    assert len(ready) == 1 and _torch_mapped(node)
    # torch's and MONAI's objects out of the collector's walks (676,000 here; the service's own
    # modules, loaded before the pipeline, make about 100,000)
    assert ready[0]["frozen_objects"] > 500_000
    found = wait_results(pacs, second)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1


def test_malformed_birth_date_neither_fails_the_job_nor_leaks(pair, tmp_path):
    node, pacs = pair()
    files, study_uid = sphere_study(tmp_path / "study", "PAT-B")
    marker = "1970-01-01XQZ"
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = marker
        ds.save_as(path, enforce_file_format=True)
    send(node, files)
    job = wait_job(node, study_uid, {"done", "failed"})
    assert job.state is JobState.DONE, job.reason
    found = wait_results(pacs, study_uid)
    assert found["SEG"][0].PatientBirthDate == "" and found["SR"][0].PatientBirthDate == ""
    listing = subprocess.run([str(VENV_BIN / "dicom-node"), "jobs", "--json", "--config", str(node.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert json.loads(listing.stdout)[0]["state"] == "done"
    assert "XQZ" not in listing.stdout and "XQZ" not in node.log()

    retry = subprocess.run([str(VENV_BIN / "dicom-node"), "jobs", "retry", "99", "--config",
                            str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert retry.returncode == 1 and retry.stderr.strip() == "no job 99" and "Traceback" not in retry.stderr


def test_failure_reasons_quote_no_source_values_and_classify_transience():
    from inference.backends.base import BackendError, BackendUnavailable
    from inference.errors import MemoryTaken, NotEnoughMemory
    from node.jobs.failures import JobError, describe, is_transient

    try:
        pydicom.valuerep.DA("1970-01-01XQZ")
    except ValueError as exc:
        reason = describe(exc, "encode")
    assert "XQZ" not in reason and reason.startswith("encode: ValueError in valuerep.py:")
    assert describe(JobError("series 1.2.3 has no stored instances"), "load") == "load: series 1.2.3 has no stored instances"
    assert is_transient(BackendUnavailable("Triton at 127.0.0.1:1 is not ready"))
    assert not is_transient(BackendError("model 'nope' version 1 is not ready (models there: threshold)"))
    # a model's output that cannot fit in the node's memory at all fails; one that could, were other use gone, waits
    assert not is_transient(NotEnoughMemory("model m's output needs 9.0 GiB"))
    assert is_transient(NotEnoughMemory("model m's output needs 9.0 GiB"), beside_others=True)
    assert not is_transient(NotEnoughMemory("model m's output needs 9.0 GiB", beyond_limit=True), beside_others=True)
    assert is_transient(MemoryTaken("model m's output needs 1.0 GiB"))
    assert describe(MemoryTaken("model m's output needs 1.0 GiB"), "inference") == "inference: model m's output needs 1.0 GiB"


def test_routing_failure_completes_the_study_with_a_failed_job_and_newer_completions_supersede(tmp_path):
    """A defect in routing cannot hold a study open: it completes with a failed job that says why
    (a retry routes it again). A study completing again supersedes its jobs not yet started."""
    from node.jobs.admission import Admission
    from node.store.index import InstanceRecord

    class BrokenRules:  # a rule set whose evaluation raises (a defect no valid rule file can make)
        class current:
            version = "broken"

            @staticmethod
            def evaluate(view):
                raise RuntimeError("rule engine defect")

    index = Index(tmp_path / "index.sqlite")
    store = JobStore(index)
    record = InstanceRecord("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3", "", "1.2.840.10008.1.2.1",
                            "studies/1.2.3/1.2.3.4/1.2.3.4.5.dcm", 10, "MOD", "TESTNODE", "127.0.0.1", {})
    index.record_instance(record, now=100.0, quiet_period=1.0, reopen=True)
    admission = Admission(index, BrokenRules(), tmp_path)  # type: ignore[arg-type]
    routed = admission.route("1.2.3", 200.0)
    assert routed is not None and routed.decision is None and routed.failure is not None
    completed, _ = index.complete_if_due("1.2.3", 200.0, lambda db: admission.admit(db, routed, 200.0))
    assert completed and index.query("SELECT state FROM studies")[0]["state"] == "complete"
    [job] = store.all_jobs("1.2.3")
    assert job.state is JobState.FAILED and job.decision is None
    assert job.reason.startswith("route: RuntimeError in") and "defect" not in job.reason
    assert store.retry(job.id) == 1  # queued again; the runner routes it with the rules then in force

    with index.transaction() as db:
        newer, _ = store.create(db, "1.2.3", _decision(), 300.0)
    assert store.get(job.id).state is JobState.IGNORED
    assert store.get(job.id).reason == "superseded: the study completed again"
    assert store.get(newer).state is JobState.QUEUED


def test_results_for_a_caller_with_no_destination_go_to_the_fallback_and_explain_says_so(pair, tmp_path):
    """`@sender` for a modality that is no destination: with sending.sender_fallback the results
    go there (and explain says so beforehand); without it the job fails naming the AE title, and
    explain warns of that."""
    routing = ("rules:\n  - name: back-to-sender\n    match: {tag: Modality, equals: CT}\n"
               "    actions: {run: [threshold], send_to: ['@sender']}\n")
    node, pacs = pair(sending={"sender_fallback": "pacs"})
    node.write_routing(routing)
    wait_for(lambda: node.events("routing_reloaded"), timeout=30)
    files, study_uid = sphere_study(tmp_path / "study", "PAT-F")
    send(node, files)  # storescu calls as MODALITY, which no destination is
    wait_results(pacs, study_uid)
    assert node.events("sender_fallback_used")[0]["calling_ae"] == "MODALITY"
    explained = subprocess.run([str(VENV_BIN / "dicom-node"), "route", "explain", study_uid, "--config",
                                str(node.config_path)], capture_output=True, text=True, timeout=120)
    assert "! @sender: no destination has AE title 'MODALITY'; results and notices go to" \
           " sending.sender_fallback 'pacs'" in explained.stdout, explained.stdout + explained.stderr

    alone, _ = pair("alone")
    alone.write_routing(routing)
    wait_for(lambda: alone.events("routing_reloaded"), timeout=30)
    send(alone, files)
    job = wait_job(alone, study_uid, {"failed"})
    assert "no destination has the study's calling AE title 'MODALITY'" in job.reason
    explained = subprocess.run([str(VENV_BIN / "dicom-node"), "route", "explain", study_uid, "--config",
                                str(alone.config_path)], capture_output=True, text=True, timeout=120)
    assert "a job sending there fails (add a destination with that AE title, or set sending.sender_fallback)" \
        in explained.stdout
