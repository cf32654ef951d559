"""STOW-RS into the node (PS3.18 10.5) from real clients: curl and dicomweb-client. The same
promises as C-STORE: stored exactly (the data set as sent), indexed before the answer, refused
per instance with C-STORE's statuses, the study completed and routed (the account's name is the
calling AE title rules match), results at the PACS (Orthanc over DIMSE)."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.uid import CTImageStorage
import requests
from prometheus_client.parser import text_string_to_metric_families

from node.config import DestinationConfig
from node.receive.stow import StowError, StowRequest
from node.send.delivery import Permanent, Transient
from node.send.stow import StowSender

from tests.peers import VENV_BIN, dataset_bytes, make_study, wait_for
from tests.test_jobs import sphere_study

ROUTING = {"rules": [{"name": "from-stow", "match": {"calling_ae": {"equals": "stow-bot"}},
                      "actions": {"run": ["threshold"], "send_to": ["pacs", "web"]}}]}


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
    """In by STOW-RS; results out by C-STORE to one Orthanc and by STOW-RS (basic auth) to
    another's DICOMweb plugin, where they read back (WADO-RS) identical to what the node made."""
    pacs = orthanc()
    web = orthanc(users={"node": "s3cret-pass"})
    (tmp_path / "web-password").write_text("s3cret-pass\n")
    node = start_node(routing=ROUTING, completion={"quiet_period_s": 1.0},
                      destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
                                    "web": {"dicomweb": {
                                        "url": f"http://127.0.0.1:{web.http_port}/dicom-web",
                                        "auth": {"kind": "basic", "username": "node",
                                                 "password_file": str(tmp_path / "web-password")}}}},
                      inference={"model_repository": str(model_repository)})
    token = node.api_token("stow-bot", "operator")
    files, study_uid = sphere_study(tmp_path / "ct", "STOW-1", slices=300, size=16, centre=(150, 8, 8))
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
    assert len(rows) == 300 and {(r["calling_ae"], r["called_ae"], r["instances"]) for r in rows} == {
        ("stow-bot", "STOW-RS", 300)}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        [row] = [r for r in rows if r["sop_instance_uid"] == uid]
        assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(f)
    # completed, routed by the account's name, results at the PACS
    wait_for(lambda: {"SEG", "SR"} <= set(pacs.instances_by_modality(study_uid)), timeout=180, interval=0.5)
    # results go out before the job is marked done
    [job] = wait_for(lambda: [j for j in node.query("SELECT state, decision FROM work_items WHERE study_uid=?",
                                                    (study_uid,)) if j["state"] == "done"], timeout=60)
    assert "from-stow" in job["decision"]
    wait_for(lambda: {r["state"] for r in node.query("SELECT state FROM outbox")} == {"delivered"}, timeout=60)
    [sent] = node.query("SELECT files FROM outbox WHERE destination='web'")
    made = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in json.loads(sent["files"]))}
    from dicomweb_client.api import DICOMwebClient
    reader = DICOMwebClient(f"http://127.0.0.1:{web.http_port}/dicom-web", headers={
        "Authorization": "Basic " + base64.b64encode(b"node:s3cret-pass").decode()})
    read = {str(ds.SOPInstanceUID): ds for series in reader.search_for_series(study_uid)
            for ds in reader.retrieve_series(study_uid, series["0020000E"]["Value"][0])
            if str(ds.Modality) in ("SEG", "SR")}
    assert read.keys() == made.keys() and len(made) >= 2
    for uid, ds in made.items():
        assert ds == read[uid]  # every element, pixel data included, as the node made it
    # /metrics: each destination's kind and peer, to join the per-destination delivery figures on
    text = requests.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    info = {tuple(s.labels[k] for k in ("destination", "kind", "where")) for family in
            text_string_to_metric_families(text) for s in family.samples if s.name == "dicom_node_destination_info"}
    assert info == {("pacs", "dimse", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"),
                    ("web", "dicomweb", f"http://127.0.0.1:{web.http_port}/dicom-web")}

    # the node's own QIDO-RS and WADO-RS: the study with its results, as a viewer reads it
    node_web = DICOMwebClient(f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    [study] = node_web.search_for_studies(search_filters={"PatientID": "STOW-1"})
    assert study["0020000D"]["Value"] == [study_uid] and {"CT", "SEG", "SR"} <= set(study["00080061"]["Value"])
    assert study["00201208"]["Value"] == [300 + len(made)]
    assert node_web.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    assert len(node_web.search_for_studies(search_filters={"StudyDate": "19000101-20991231", "PatientName": "*"})) == 1
    series = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in node_web.search_for_series(study_uid)}
    results = [ds for kind in ("SEG", "SR") for ds in node_web.retrieve_series(study_uid, series[kind])]
    assert {str(ds.SOPInstanceUID): ds for ds in results} == made
    metadata = node_web.retrieve_series_metadata(study_uid, series["CT"])
    assert len(metadata) == 300 and "BulkDataURI" in metadata[0]["7FE00010"]
    first = metadata[0]["00080018"]["Value"][0]
    [frame] = node_web.retrieve_instance_frames(study_uid, series["CT"], first, [1])
    assert frame == pydicom.dcmread(next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == first)).PixelData
    viewer_token = node.api_token("vera", "viewer")  # patient data: operators and admins only
    assert requests.get(f"{node.url}/dicomweb/studies", timeout=30,
                        headers={"Authorization": f"Bearer {viewer_token}"}).status_code == 403
    # a resend of the same instances: stored again as C-STORE would (identical), 200
    assert _curl(f"{node.url}/dicomweb/studies", token, body, boundary)[0] == 200
    trail = [r for r in json.loads(subprocess.run(
        [str(VENV_BIN / "dicom-node"), "audit", "--since", "1h", "--json", "--config", str(node.config_path)],
        capture_output=True, text=True, timeout=120).stdout) if r["event_id"] == "110104" and r["action"] == "C"]
    assert trail[0]["actor"] == "stow-bot" and trail[0]["studies"] == {study_uid: 300}
    assert trail[0]["patients"] == {study_uid: "STOW-1"} and trail[0]["reason"] == "STOW-RS"


def test_each_part_gets_its_own_status_and_the_request_its_limits(start_node, tmp_path):
    """A damaged part, a part of another study, a part that is not DICOM, a part over
    scp.max_instance_mb: each refused with its reason, the good ones stored (202); a body past
    http.max_stow_mb: 413 while it streams; no credential 401, a viewer 403, XML 406."""
    node = start_node(scp={"max_instance_mb": 1}, http={"max_stow_mb": 4})
    token = node.api_token("stow-bot", "operator")
    viewer = node.api_token("vera", "viewer")
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
    assert {i["00081155"]["Value"][0] for i in _items(body, "00081199")} == {
        str(headers[0].SOPInstanceUID), str(headers[2].SOPInstanceUID)}
    assert body["00081190"]["Value"] == [f"{node.url}/dicomweb/studies/{study_uid}"]  # PS3.18 10.5.3.1
    retrieve = _items(body, "00081199")[0]["00081190"]["Value"][0]  # each stored instance's WADO-RS URL
    assert requests.get(retrieve, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
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
    # /metrics: the requests read (by the status answered), what they stored and refused, by reason
    text = requests.get(f"{node.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    samples = {(s.name, tuple(s.labels.values())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert {k[1][0]: v for k, v in samples.items() if k[0] == "dicom_node_stow_requests_total"} == {"202": 2, "413": 1}
    assert samples[("dicom_node_stow_instances_received_total", ())] == 3
    assert {k[1][0]: v for k, v in samples.items() if k[0] == "dicom_node_stow_failures_by_reason_total"} == {
        "0xC212": 1, "0xC211": 1, "0xC210": 2, "0xA700": 1, "0x0122": 1}

    # the node's own STOW-RS client (result delivery) against this STOW-RS server with a bearer token
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "wrong").write_text("dnt_not-a-token\n")

    def peer(token_file: str = "token", **web: Any) -> DestinationConfig:
        return DestinationConfig(dicomweb={"url": f"{node.url}/dicomweb", **web, "auth": {
            "kind": "bearer", "token_file": str(tmp_path / token_file)}})

    sender = StowSender()
    requests_before = len(node.query("SELECT id FROM associations WHERE called_ae='STOW-RS'"))
    fresh = make_study(tmp_path / "fresh", slices=3, size=16, patient_id="STOW-7")
    assert sender("NODE", peer(max_request_mb=0.001), fresh, 30).warnings == []  # one request per file
    assert len(node.query("SELECT id FROM associations WHERE called_ae='STOW-RS'")) == requests_before + 3
    assert len(node.query("SELECT sop_instance_uid FROM instances")) == 6
    with pytest.raises(Permanent, match=r"1 of 2 refused: 1\.2\.3\.4\.5\.6: failure reason 0x0122"):
        sender("NODE", peer(), [fresh[0], odd_path], 30)  # per instance, with its reason
    with pytest.raises(Permanent, match="HTTP 401 .*credentials refused"):
        sender("NODE", peer("wrong"), fresh, 30)
    assert sender.probe(peer(), 30)[0] and not sender.probe(peer("wrong"), 30)[0]  # the console's destination test
    node.stop()
    with pytest.raises(Transient, match="connection refused or lost"):
        sender("NODE", peer(), fresh, 30)


def test_a_body_broken_after_a_good_part_stores_that_part_and_a_long_boundary_is_a_400(start_node, tmp_path):
    """Found by fuzzing (README, "Fuzzing"): a part completed in the same chunk as a later parse
    error was lost (what was stored depended on how TCP cut the body); a boundary over 256
    characters made the multipart parser raise outside the request's handling (500)."""
    node = start_node()
    token = node.api_token("stow-fuzz", "operator")
    good = make_study(tmp_path / "ct", slices=1, size=16, patient_id="STOW-F")[0]
    uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    body = _multipart([good.read_bytes()], "B")[:-len(b"--B--\r\n")] + b"--B\r\nBad\x00Header: x\r\n\r\nrest\r\n--B--\r\n"
    answer = requests.post(f"{node.url}/dicomweb/studies", data=body, timeout=60, headers={
        "Authorization": f"Bearer {token}", "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
    assert answer.status_code == 202, answer.text
    assert [i["00081155"]["Value"][0] for i in _items(answer.json(), "00081199")] == [uid]
    assert [i["00081197"]["Value"][0] for i in _items(answer.json(), "00081198")] == [0xC210]
    assert node.query("SELECT COUNT(*) AS n FROM instances WHERE sop_instance_uid=?", (uid,))[0]["n"] == 1
    long = "b" * 300
    answer = requests.post(f"{node.url}/dicomweb/studies", data=_multipart([good.read_bytes()], long), timeout=60,
                           headers={"Authorization": f"Bearer {token}",
                                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={long}'})
    assert answer.status_code == 400 and "boundary is longer than 256" in answer.json()["detail"], answer.text
    # a part whose file meta announces a 70,000-character SOP Instance UID: refused (0xC210), not a 500
    data = good.read_bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    long_uid = b"1." * 35_000
    meta = b"".join(struct.pack("<HH2s2xI" if vr in (b"OB", b"UN") else "<HH2sH", 2, element, vr, len(value)) + value
                    for element, vr, value in ((1, b"OB", b"\0\1"), (2, b"UN", str(CTImageStorage).encode() + b"\0"),
                                               (3, b"UN", long_uid), (0x10, b"UI", b"1.2.840.10008.1.2.1\0")))
    part = data[:128] + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(meta)) + meta + data[meta_end:]
    answer = requests.post(f"{node.url}/dicomweb/studies", data=_multipart([part], "B"), timeout=60, headers={
        "Authorization": f"Bearer {token}", "Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
    assert answer.status_code == 409, answer.text
    assert [i["00081197"]["Value"][0] for i in _items(answer.json(), "00081198")] == [0xC210]
    reasons = [p.read_text() for p in (node.data_dir / "quarantine").glob("*.reason.txt")]
    assert any("a UID longer than 64 characters in the file meta" in r for r in reasons), reasons


def _parts(boundary: bytes, chunks: list[bytes]) -> tuple[list[bytes], int | None]:
    """What a STOW-RS request parser completes from these chunks, and the route's error status."""
    request, parts = StowRequest(boundary, 1 << 20), []
    try:
        for chunk in chunks:
            parts += request.feed(chunk)
    except StowError as exc:
        return [bytes(p.data) for p in parts + exc.completed], exc.status
    return [bytes(p.data) for p in parts], None if request.ended and parts else 400


@pytest.mark.parametrize("preamble, expected", [
    (b"", [b"one"]),
    (b"a preamble\r\n", [b"one"]),
    (b"p" * 65_000 + b"\r\n", [b"one"]),  # under MAX_PREAMBLE
    (b"p" * 70_000 + b"\r\n", []),  # over it: 400
    (b"x--B\r\nContent-Type: application/dicom\r\n\r\nsmuggled\r\n", [b"one"]),  # a delimiter opens a line
])
def test_the_preamble_is_dropped_the_same_however_the_body_is_cut(preamble, expected):
    """RFC 2046 5.1.1: what comes before the first delimiter is ignored (found by fuzzing: the
    multipart parser took a preamble only when it arrived in one chunk with the delimiter)."""
    body = preamble + b"--B\r\nContent-Type: application/dicom\r\n\r\none\r\n--B--\r\n"
    cuts = sorted({len(preamble) - 1, len(preamble), len(preamble) + 2, 65_537, *range(0, len(body), 997)})
    outcomes = {repr(_parts(b"B", [body[:cut], body[cut:]])) for cut in cuts if 0 <= cut <= len(body)}
    assert outcomes == {repr((expected, None if expected else 400))}
    assert _parts(b"B", [body[i:i + 1] for i in range(len(body))]) == (expected, None if expected else 400)


def test_dicomweb_client_stores_datasets_in_the_node(start_node, tmp_path):
    """dicomweb-client (the library OHIF's and highdicom's authors maintain) as the sender."""
    from dicomweb_client.api import DICOMwebClient

    node = start_node()
    token = node.api_token("stow-bot", "operator")
    files = make_study(tmp_path / "ct", slices=300, size=16, patient_id="STOW-5")
    client = DICOMwebClient(f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    response = client.store_instances([pydicom.dcmread(f) for f in files])
    assert len(response.ReferencedSOPSequence) == 300 and not response.get("FailedSOPSequence")
    assert len(node.query("SELECT sop_instance_uid FROM instances")) == 300


def test_a_node_killed_mid_request_acknowledged_nothing_it_lost(start_node, tmp_path):
    """SIGKILL while a STOW-RS body streams: the client got no answer (nothing acknowledged);
    what was indexed before the kill is whole on disk; the sender's resend stores the rest (200)."""
    node = start_node()
    token = node.api_token("stow-bot", "operator")
    files = make_study(tmp_path / "ct", slices=10, size=16, patient_id="STOW-8")
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    held_back = threading.Event()

    def body() -> Iterator[bytes]:
        for number, f in enumerate(files):
            if number == 5:
                held_back.wait(120)  # the rest never goes: the node dies first
            yield head + f.read_bytes() + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["response"] = requests.post(f"{node.url}/dicomweb/studies", data=body(), timeout=120, headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        except requests.RequestException as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    # the fifth part has gone but not its closing boundary: four are complete and stored
    wait_for(lambda: len(node.query("SELECT sop_instance_uid FROM instances")) == 4, timeout=60)
    node.kill_all()
    held_back.set()
    sender.join(60)
    assert "response" not in outcome and "error" in outcome  # no answer: nothing was acknowledged
    node.start()
    rows = node.query("SELECT sop_instance_uid, path FROM instances")
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert len(rows) == 4
    for row in rows:  # whole and exact, as sent
        assert dataset_bytes(node.data_dir / row["path"]) == dataset_bytes(sent[row["sop_instance_uid"]])
    answer = requests.post(f"{node.url}/dicomweb/studies", data=_multipart([f.read_bytes() for f in files], boundary),
                           timeout=120, headers={
                               "Authorization": f"Bearer {token}",
                               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert answer.status_code == 200 and len(_items(answer.json(), "00081199")) == 10
    assert {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances")} == set(sent)


def test_a_dicomweb_destination_authenticates_with_oauth2_client_credentials_at_a_real_authorization_server(
        start_node, tmp_path):
    """The node's STOW-RS client gets its token from panva's oidc-provider (client credentials,
    RFC 6749 4.4; a JWT for the receiver's audience, RFC 8707) and keeps it across sends; the
    receiving node checks it against the provider's keys and records the client as the caller.
    A refused client is a permanent failure that names the provider's answer; a provider that
    cannot be reached is a transient one (retried)."""
    from tests.authserver import AuthServer

    audience = "urn:dicom-node:stow-test"
    provider = AuthServer(tmp_path / "auth", {"sending-node": "a-long-client-secret-for-tests"}, audience).start()
    try:
        node = start_node(http={"oidc": {"issuer": provider.issuer, "client_id": "receiving-console",
                                         "audience": audience, "role_map": {"dicom-senders": "operator"}}})
        (tmp_path / "secret").write_text("a-long-client-secret-for-tests\n")
        (tmp_path / "wrong").write_text("not-the-secret\n")

        def peer(secret_file: str = "secret", token_url: str = provider.token_url) -> DestinationConfig:
            return DestinationConfig(dicomweb={"url": f"{node.url}/dicomweb", "auth": {
                "kind": "oauth2", "token_url": token_url, "client_id": "sending-node", "scope": "stow",
                "client_secret_file": str(tmp_path / secret_file)}})

        sender = StowSender()
        first = make_study(tmp_path / "first", slices=2, size=16)
        second = make_study(tmp_path / "second", slices=3, size=16)
        assert sender("NODE", peer(), first, 30).warnings == []
        assert sender("NODE", peer(), second, 30).warnings == []
        assert [e["client_id"] for e in provider.events("token_issued")] == ["sending-node"]  # one token, kept
        stored = node.query("SELECT i.sop_instance_uid, a.calling_ae FROM instances i"
                            " JOIN associations a ON a.id = i.association_id")
        assert sorted(r["sop_instance_uid"] for r in stored) == sorted(
            pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in first + second)
        assert {r["calling_ae"] for r in stored} == {"sending-node"}  # the token's subject: the client

        with pytest.raises(Permanent, match=r"gave no token: .*invalid_client"):
            StowSender()("NODE", peer("wrong"), first, 30)
        assert [e["error"] for e in provider.events("grant_refused")] == ["invalid_client"]
        provider.stop()
        with pytest.raises(Transient, match=r"no token from http://127\.0\.0\.1:\d+/token: "):
            StowSender()("NODE", peer(), first, 30)
    finally:
        provider.stop()
