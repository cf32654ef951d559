"""Study completion by signals instead of a timer. MPPS (PS3.4 Annex F): a pynetdicom modality
creates its procedure step, sends the images and ends the step; IAN (PS3.4 Annex R): a PACS says
which instances of a study it holds. The node completes the study as soon as every listed
instance is in, instead of after the quiet period (600 s here), and refuses malformed or
out-of-order requests with their statuses."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    InstanceAvailabilityNotification,
    ModalityPerformedProcedureStep,
    Verification,
)

from tests.peers import VENV_BIN, NodeProcess, make_study, storescu, wait_for
from node.send.pynetdicom_internals import steady

QUIET = {"quiet_period_s": 600.0}


def _associate(node: NodeProcess, ae_title: str = "MODALITY"):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=ae_title)
    for context in (CTImageStorage, ModalityPerformedProcedureStep, InstanceAvailabilityNotification, Verification):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESTNODE")
    assert assoc.is_established
    return steady(assoc)


def _in_progress(study_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "STEP1"
    ds.Modality = "CT"
    if study_uid is not None:
        item = Dataset()
        item.StudyInstanceUID = study_uid
        ds.ScheduledStepAttributesSequence = [item]
    return ds


def _ended(series_uid: str, sop_uids: list[str], state: str = "COMPLETED") -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    images = []
    for uid in sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        images.append(ref)
    series.ReferencedImageSequence = images
    ds.PerformedSeriesSequence = [series]
    return ds


def _study(folder: Path, slices: int) -> tuple[list[pydicom.Dataset], str, str]:
    datasets = [pydicom.dcmread(f) for f in make_study(folder, slices=slices, size=16)]
    return datasets, str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)


def _perform(node: NodeProcess, datasets: list[pydicom.Dataset], listed: list[str], stored_first: int,
             state: str = "COMPLETED", ae_title: str = "MODALITY") -> str:
    """A modality's procedure: N-CREATE, the first `stored_first` images, N-SET `state` listing
    `listed`; returns the step's SOP Instance UID (the association is released)."""
    step = generate_uid()
    assoc = _associate(node, ae_title)
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    assert assoc.send_n_create(_in_progress(study_uid), ModalityPerformedProcedureStep, step)[0].Status == 0
    for ds in datasets[:stored_first]:
        assert assoc.send_c_store(ds).Status == 0
    assert assoc.send_n_set(_ended(series_uid, listed, state), ModalityPerformedProcedureStep, step)[0].Status == 0
    assoc.release()
    return step


def _store(node: NodeProcess, datasets: list[pydicom.Dataset]) -> None:
    assoc = _associate(node)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()


def _completed_by(node: NodeProcess, study_uid: str) -> dict:
    return wait_for(lambda: [e for e in node.events("study_complete") if e["study_uid"] == study_uid],
                    timeout=30)[-1]


def test_a_completed_step_completes_the_study_at_once(start_node, tmp_path):
    node = start_node(completion=QUIET)
    datasets, study_uid, _ = _study(tmp_path / "ct", 4)
    step = _perform(node, datasets, [d.SOPInstanceUID for d in datasets], stored_first=4)
    event = _completed_by(node, study_uid)  # well inside the 600 s quiet period
    assert (event["completed_by"], event["instances"]) == ("mpps", 4)
    assert node.study(study_uid)["state"] == "complete"
    row = node.query("SELECT kind, state, ended_at FROM completion_signals WHERE sop_instance_uid=?", (step,))[0]
    assert (row["kind"], row["state"]) == ("mpps", "COMPLETED") and row["ended_at"] is not None
    # the job, the API, the study page and /metrics say what completed it
    job = wait_for(lambda: node.query("SELECT completed_by FROM work_items WHERE study_uid=?", (study_uid,)))[0]
    assert job["completed_by"] == "mpps"
    api = json.loads(urllib.request.urlopen(f"{node.url}/api/studies/{study_uid}", timeout=10).read())
    assert [j["completed_by"] for j in api["jobs"]] == ["mpps"]
    page = urllib.request.urlopen(f"{node.url}/studies/{study_uid}", timeout=10).read().decode()
    assert '<td class="completed-by">mpps</td>' in page
    metrics = urllib.request.urlopen(f"{node.url}/metrics", timeout=10).read().decode()
    assert 'dicom_node_studies_completed_total{completed_by="mpps"} 1.0' in metrics.splitlines()


def test_a_step_ended_before_its_last_images_completes_when_they_are_in(start_node, tmp_path):
    """The step lists four images and two are in: the quiet period (1 s here) passing does not
    complete the study, the step says two more are coming; they come, and it completes."""
    node = start_node(completion={"quiet_period_s": 1.0})
    datasets, study_uid, _ = _study(tmp_path / "ct", 4)
    _perform(node, datasets, [d.SOPInstanceUID for d in datasets], stored_first=0)
    _store(node, datasets[:2])
    deadline = node.study(study_uid)["deadline"]
    wait_for(lambda: time.time() > deadline + 2.0, timeout=10)  # past the quiet period and a poll
    assert node.study(study_uid)["state"] == "receiving"
    _store(node, datasets[2:])
    event = _completed_by(node, study_uid)
    assert (event["completed_by"], event["instances"]) == ("mpps", 4)


def test_an_instance_the_step_lists_that_never_comes_completes_after_the_grace(start_node, tmp_path):
    node = start_node(completion={**QUIET, "mpps_grace_s": 2.0})
    datasets, study_uid, _ = _study(tmp_path / "ct", 3)
    _perform(node, datasets, [d.SOPInstanceUID for d in datasets] + [generate_uid()], stored_first=3)
    event = _completed_by(node, study_uid)
    assert (event["completed_by"], event["instances"]) == ("mpps", 3)
    [warning] = node.events("signal_instances_never_arrived")
    assert (warning["study_uid"], warning["missing"], warning["listed"]) == (study_uid, 1, 4)


def test_a_step_ended_before_a_sigkill_completes_its_study_after_the_restart(start_node, tmp_path):
    node = start_node(completion=QUIET)
    datasets, study_uid, _ = _study(tmp_path / "ct", 3)
    # one listed instance never comes: the study is not complete when the node dies
    _perform(node, datasets, [d.SOPInstanceUID for d in datasets] + [generate_uid()], stored_first=3)
    node.kill_all()
    assert node.study(study_uid)["state"] == "receiving"
    node.write_routing({"rules": []})
    config = yaml.safe_load(node.config_path.read_text())
    config["completion"]["mpps_grace_s"] = 1.0
    node.config_path.write_text(yaml.safe_dump(config))
    node.start()
    event = _completed_by(node, study_uid)  # from the stored step, not the 600 s quiet period
    assert (event["completed_by"], event["instances"]) == ("mpps", 3)


def test_malformed_and_out_of_order_steps_get_their_statuses(start_node, tmp_path):
    node = start_node(completion=QUIET)
    study_uid = generate_uid()
    assoc = _associate(node)
    done = _in_progress(study_uid)
    done.PerformedProcedureStepStatus = "COMPLETED"
    assert assoc.send_n_create(done, ModalityPerformedProcedureStep, generate_uid())[0].Status == 0x0106
    assert assoc.send_n_create(_in_progress(None), ModalityPerformedProcedureStep, generate_uid())[0].Status == 0x0120
    odd = _in_progress(study_uid)
    odd.PerformedProcedureStepStatus = "FINISHED"
    assert assoc.send_n_create(odd, ModalityPerformedProcedureStep, generate_uid())[0].Status == 0x0106
    step = generate_uid()
    assert assoc.send_n_create(_in_progress(study_uid), ModalityPerformedProcedureStep, step)[0].Status == 0
    assert assoc.send_n_create(_in_progress(study_uid), ModalityPerformedProcedureStep, step)[0].Status == 0x0111
    assert assoc.send_n_set(_ended(generate_uid(), []), ModalityPerformedProcedureStep,
                            generate_uid())[0].Status == 0x0112
    bad_ref = _ended(generate_uid(), ["not-a-uid"])
    assert assoc.send_n_set(bad_ref, ModalityPerformedProcedureStep, step)[0].Status == 0x0106
    assert assoc.send_n_set(_ended(generate_uid(), []), ModalityPerformedProcedureStep, step)[0].Status == 0
    assert assoc.send_n_set(_ended(generate_uid(), []), ModalityPerformedProcedureStep, step)[0].Status == 0x0110
    assert assoc.send_c_echo().Status == 0  # the association, and the node, go on
    assoc.release()
    refused = node.events("signal_refused")
    assert [e["status"] for e in refused] == ["0x0106", "0x0120", "0x0106", "0x0111", "0x0112", "0x0106", "0x0110"]


def test_a_study_without_a_step_completes_by_its_quiet_period(start_node, tmp_path):
    node = start_node(completion={"quiet_period_s": 1.0})
    datasets, study_uid, _ = _study(tmp_path / "ct", 2)
    _store(node, datasets)
    assert _completed_by(node, study_uid)["completed_by"] == "quiet_period"
    job = wait_for(lambda: node.query("SELECT completed_by FROM work_items WHERE study_uid=?", (study_uid,)))[0]
    assert job["completed_by"] == "quiet_period"


def _availability(study_uid: str, series_uid: str, listed: dict[str, str]) -> Dataset:
    """An IAN attribute list (PS3.3 C.4.23): the study, its series and each instance's availability."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.ReferencedPerformedProcedureStepSequence = []
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    items = []
    for uid, availability in listed.items():
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        item.InstanceAvailability = availability
        item.RetrieveAETitle = "PACS"
        items.append(item)
    series.ReferencedSOPSequence = items
    ds.ReferencedSeriesSequence = [series]
    return ds


def test_an_instance_availability_notification_completes_the_study_when_its_instances_are_in(start_node, tmp_path):
    """The PACS notifies before it forwards the images (dcmtk storescu); an UNAVAILABLE instance
    is not waited for; the study completes by the IAN, not the 600 s quiet period."""
    node = start_node(completion=QUIET)
    files = make_study(tmp_path / "ct", slices=3, size=16)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    listed = {str(d.SOPInstanceUID): "ONLINE" for d in datasets} | {generate_uid(): "UNAVAILABLE"}
    assoc = _associate(node)
    notification = generate_uid()
    status, _ = assoc.send_n_create(_availability(study_uid, series_uid, listed), InstanceAvailabilityNotification,
                                    notification)
    assert status.Status == 0x0000
    no_study = _availability("", series_uid, listed)
    assert assoc.send_n_create(no_study, InstanceAvailabilityNotification, generate_uid())[0].Status == 0x0120
    assoc.release()
    assert storescu(node.port, files).returncode == 0
    event = _completed_by(node, study_uid)
    assert (event["completed_by"], event["instances"]) == ("ian", 3)
    row = node.query("SELECT kind, state, instances FROM completion_signals WHERE sop_instance_uid=?",
                     (notification,))[0]
    assert (row["kind"], row["state"]) == ("ian", "COMPLETED")
    assert sorted(json.loads(row["instances"])) == sorted(str(d.SOPInstanceUID) for d in datasets)
    assert not node.events("signal_instances_never_arrived")


def test_retention_takes_a_studys_signals_with_it(start_node, tmp_path):
    node = start_node(completion=QUIET)
    datasets, study_uid, _ = _study(tmp_path / "ct", 2)
    _perform(node, datasets, [d.SOPInstanceUID for d in datasets], stored_first=2)
    wait_for(lambda: node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='ignored'", (study_uid,)))
    config = yaml.safe_load(node.config_path.read_text())
    config["storage"]["retention"] = {"instances_days": 1e-6}
    aged = node.workdir / "aged.yaml"
    aged.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(VENV_BIN / "dicom-node"), "cleanup", "--config", str(aged)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "deleted 1 studies" in done.stdout, done.stdout + done.stderr
    assert not node.query("SELECT 1 FROM completion_signals")
    assert not node.query("SELECT 1 FROM completion_signal_studies")


def test_a_signal_that_completed_a_study_does_not_complete_it_again_when_it_reopens(start_node, tmp_path):
    """A late instance the step did not list reopens the study (after_complete: reprocess): the
    step that completed it before does not complete it again at once; its quiet period does."""
    node = start_node(completion={"quiet_period_s": 2.0})
    datasets, study_uid, _ = _study(tmp_path / "ct", 3)
    _perform(node, datasets[:2], [d.SOPInstanceUID for d in datasets[:2]], stored_first=2)
    assert _completed_by(node, study_uid)["completed_by"] == "mpps"
    _store(node, datasets[2:])
    second = wait_for(lambda: [e for e in node.events("study_complete") if e["study_uid"] == study_uid][1:],
                      timeout=30)[0]
    assert (second["completed_by"], second["instances"]) == ("quiet_period", 3)


def test_signals_that_say_nothing_yet_leave_the_study_to_its_quiet_period(start_node, tmp_path):
    """A step that ends listing no instance, and a second step still IN PROGRESS while the
    first one's images are all in: neither completes the study early; its quiet period does."""
    node = start_node(completion={"quiet_period_s": 2.0})
    empty, empty_uid, _ = _study(tmp_path / "empty", 2)
    _perform(node, empty, [], stored_first=2)
    two, two_uid, _ = _study(tmp_path / "two", 2)
    assoc = _associate(node)
    assert assoc.send_n_create(_in_progress(two_uid), ModalityPerformedProcedureStep, generate_uid())[0].Status == 0
    assoc.release()
    _perform(node, two, [d.SOPInstanceUID for d in two], stored_first=2)
    for study_uid in (empty_uid, two_uid):
        assert _completed_by(node, study_uid)["completed_by"] == "quiet_period"


def test_a_step_that_ends_after_its_study_completed_does_not_complete_it_when_it_reopens(start_node, tmp_path):
    """The quiet period completed the study before the modality ended its step: the step
    describes a completion that happened; a late instance reopens the study, and the quiet
    period completes it again, not the step at once."""
    node = start_node(completion={"quiet_period_s": 2.0})
    datasets, study_uid, series_uid = _study(tmp_path / "ct", 3)
    step = generate_uid()
    assoc = _associate(node)
    assert assoc.send_n_create(_in_progress(study_uid), ModalityPerformedProcedureStep, step)[0].Status == 0
    for ds in datasets[:2]:
        assert assoc.send_c_store(ds).Status == 0
    assert _completed_by(node, study_uid)["completed_by"] == "quiet_period"
    listed = [d.SOPInstanceUID for d in datasets[:2]]
    assert assoc.send_n_set(_ended(series_uid, listed), ModalityPerformedProcedureStep, step)[0].Status == 0
    assoc.release()
    row = node.query("SELECT used_at FROM completion_signal_studies WHERE sop_instance_uid=?", (step,))[0]
    assert row["used_at"] is not None
    _store(node, datasets[2:])
    second = wait_for(lambda: [e for e in node.events("study_complete") if e["study_uid"] == study_uid][1:],
                      timeout=30)[0]
    assert (second["completed_by"], second["instances"]) == ("quiet_period", 3)
