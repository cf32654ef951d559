"""STOW-RS into the node (PS3.18 10.5) from real clients: curl and dicomweb-client. The same
promises as C-STORE: stored exactly (the data set as sent), indexed before the answer, refused
per instance with C-STORE's statuses, the study completed and routed (the account's name is the
calling AE title rules match), results at the PACS (Orthanc over DIMSE)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pydicom
import requests

from tests.peers import VENV_BIN, dataset_bytes, make_study, wait_for
from tests.test_jobs import sphere_study

PASSWORD = "correct horse battery"
ROUTING = {"rules": [{"name": "from-stow", "match": {"calling_ae": {"equals": "stow-bot"}},
                      "actions": {"run": ["threshold"], "send_to": ["pacs"]}}]}


def _token(node: Any, name: str, role: str) -> str:
    add = subprocess.run([str(VENV_BIN / "dicom-node"), "users", "add", name, "--role", role, "--password-stdin",
                          "--config", str(node.config_path)], input=PASSWORD + "\n", capture_output=True, text=True,
                         timeout=120)
    assert add.returncode == 0, add.stderr
    out = subprocess.run([str(VENV_BIN / "dicom-node"), "users", "token", name, "--config", str(node.config_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _multipart(parts: list[bytes], boundary: str) -> bytes:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _curl(url: str, token: str, body: Path, boundary: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", url,
                          "-H", f"Authorization: Bearer {token}", "-H", "Accept: application/dicom+json",
                          "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
                          "--data-binary", f"@{body}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(text) if text.strip() else {}


def _items(response: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return response.get(tag, {}).get("Value", [])


def test_a_study_stowed_with_curl_is_stored_exactly_routed_and_its_results_reach_the_pacs(
        start_node, orthanc, tmp_path, model_repository):
    pacs = orthanc()
    node = start_node(routing=ROUTING, completion={"quiet_period_s": 1.0},
                      destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                      inference={"model_repository": str(model_repository)})
    token = _token(node, "stow-bot", "operator")
    files, study_uid = sphere_study(tmp_path / "ct", "STOW-1", slices=12, size=32, centre=(6, 16, 16))
    boundary = uuid.uuid4().hex
    body = tmp_path / "body"
    body.write_bytes(_multipart([f.read_bytes() for f in files], boundary))
    status, response = _curl(f"{node.url}/dicomweb/studies", token, body, boundary)
    assert status == 200, response
    stored = {item["00081155"]["Value"][0] for item in _items(response, "00081199")}
    assert stored == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert not _items(response, "00081198")
    # indexed before the answer, as sent, from the account over its STOW-RS "association"
    rows = node.query("SELECT i.sop_instance_uid, i.path, i.calling_ae, a.called_ae, a.instances FROM instances i"
                      " JOIN associations a ON a.id = i.association_id WHERE i.study_uid=?", (study_uid,))
    assert len(rows) == 12 and {(r["calling_ae"], r["called_ae"], r["instances"]) for r in rows} == {
        ("stow-bot", "STOW-RS", 12)}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        [row] = [r for r in rows if r["sop_instance_uid"] == uid]
        assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(f)
    # completed, routed by the account's name, results at the PACS
    wait_for(lambda: {"SEG", "SR"} <= set(pacs.instances_by_modality(study_uid)), timeout=180, interval=0.5)
    [job] = node.query("SELECT state, decision FROM work_items WHERE study_uid=?", (study_uid,))
    assert job["state"] == "done" and "from-stow" in job["decision"]
    # a resend of the same instances: stored again as C-STORE would (identical), 200
    assert _curl(f"{node.url}/dicomweb/studies", token, body, boundary)[0] == 200
    trail = [r for r in json.loads(subprocess.run(
        [str(VENV_BIN / "dicom-node"), "audit", "--since", "1h", "--json", "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=120).stdout) if r["event_id"] == "110104" and r["action"] == "C"]
    assert trail[0]["actor"] == "stow-bot" and trail[0]["studies"] == {study_uid: 12}
    assert trail[0]["patients"] == {study_uid: "STOW-1"} and trail[0]["reason"] == "STOW-RS"


def test_each_part_gets_its_own_status_and_the_request_its_limits(start_node, tmp_path):
    """A damaged part, a part of another study, a part that is not DICOM, a part over
    scp.max_instance_mb: each refused with its reason, the good ones stored (202); a body past
    http.max_stow_mb: 413 while it streams; no credential 401, a viewer 403, XML 406."""
    node = start_node(scp={"max_instance_mb": 1}, http={"max_stow_mb": 4})
    token = _token(node, "stow-bot", "operator")
    viewer = _token(node, "vera", "viewer")
    files = make_study(tmp_path / "ct", slices=3, size=16, patient_id="STOW-2")
    other = make_study(tmp_path / "other", slices=1, size=16, patient_id="STOW-3")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study_uid = str(headers[0].StudyInstanceUID)
    damaged = files[1].read_bytes()[:-40]  # the pixel data cut short
    big = make_study(tmp_path / "big", slices=1, size=800, patient_id="STOW-4")[0].read_bytes()  # 1.3 MB
    boundary = uuid.uuid4().hex
    parts = [files[0].read_bytes(), damaged, other[0].read_bytes(), b"not a DICOM file", big, files[2].read_bytes()]
    url = f"{node.url}/dicomweb/studies/{study_uid}"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    answer = requests.post(url, data=_multipart(parts, boundary), timeout=120,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    body = answer.json()
    assert "00081190" not in body  # no Retrieve URL: no WADO-RS yet
    assert {i["00081155"]["Value"][0] for i in _items(body, "00081199")} == {
        str(headers[0].SOPInstanceUID), str(headers[2].SOPInstanceUID)}
    failed = [(i["00081155"].get("Value", [""])[0], i["00081197"]["Value"][0]) for i in _items(body, "00081198")]
    assert failed == [(str(headers[1].SOPInstanceUID), 0xC212), (str(pydicom.dcmread(other[0]).SOPInstanceUID), 0xC211),
                      ("", 0xC210), ("", 0xA700)]
    assert len(node.query("SELECT sop_instance_uid FROM instances")) == 2
    assert len(list((node.data_dir / "quarantine").glob("*.dcm"))) == 2  # the damaged and the other study's

    # a SOP class the node does not take (what C-STORE would not negotiate), and a body cut off
    # before its closing boundary: what was stored is said, the cut part is not stored
    odd = pydicom.dcmread(other[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5"
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    odd_path = tmp_path / "odd.dcm"
    odd.save_as(odd_path)
    more = make_study(tmp_path / "more", slices=2, size=16, patient_id="STOW-6")
    cut = _multipart([odd_path.read_bytes(), more[0].read_bytes(), more[1].read_bytes()], boundary)[:-200]
    answer = requests.post(f"{node.url}/dicomweb/studies", data=cut, timeout=120,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    assert answer.status_code == 202, answer.text
    assert [i["00081197"]["Value"][0] for i in _items(answer.json(), "00081198")] == [0x0122, 0xC210]
    assert len(_items(answer.json(), "00081199")) == 1
    assert len(node.query("SELECT sop_instance_uid FROM instances")) == 3

    # limits: the whole request, announced or streamed
    huge = requests.post(f"{node.url}/dicomweb/studies", data=b"x" * (5 * 1024 * 1024), timeout=120,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    assert huge.status_code == 413 and "http.max_stow_mb" in huge.json()["detail"]
    opening = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    streamed = requests.post(f"{node.url}/dicomweb/studies", data=iter([opening] + [b"x" * 1024 * 1024] * 6),
                             timeout=120,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    assert streamed.status_code == 413
    # who may, and in what form
    plain = {"Content-Type": content_type}
    assert requests.post(url, data=_multipart(parts[:1], boundary), headers=plain, timeout=60).status_code == 401
    assert requests.post(url, data=_multipart(parts[:1], boundary), timeout=60,
                         headers={**plain, "Authorization": f"Bearer {viewer}"}).status_code == 403
    assert requests.post(url, data=_multipart(parts[:1], boundary), timeout=60, headers={
        **plain, "Authorization": f"Bearer {token}", "Accept": "application/dicom+xml"}).status_code == 406
    assert requests.post(url, data=parts[0], timeout=60, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/dicom+json"}).status_code == 415
    assert requests.get(f"{node.url}/health/ready", timeout=30).status_code == 200  # it goes on


def test_dicomweb_client_stores_datasets_in_the_node(start_node, tmp_path):
    """dicomweb-client (the library OHIF's and highdicom's authors maintain) as the sender."""
    from dicomweb_client.api import DICOMwebClient

    node = start_node()
    token = _token(node, "stow-bot", "operator")
    files = make_study(tmp_path / "ct", slices=4, size=16, patient_id="STOW-5")
    client = DICOMwebClient(f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    response = client.store_instances([pydicom.dcmread(f) for f in files])
    assert len(response.ReferencedSOPSequence) == 4 and not response.get("FailedSOPSequence")
    assert len(node.query("SELECT sop_instance_uid FROM instances")) == 4
