"""Running the node day to day: live configuration, readiness against the disk watermark, and
retention, each against a running node with real peers (dcmtk storescu and storescp)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import yaml

from tests.peers import REPO_ROOT, VENV_BIN, NodeProcess, free_port, make_study, proc_stat, storescu, wait_for
from node.config import NodeConfig
from node.receive import workers
from node.receive.launch import LaunchedReceiver, LaunchFailed, launch_receiver, launched_ahead
from node.receive.workers import ReceiverPool
from node.store.index import Index
from node.send.pynetdicom_internals import steady
from tests.test_console import StoreSCP, _metrics

CT_RULE = {"tag": "Modality", "equals": "CT"}


def _rule(name: str, destination: str, calling_ae: str | None = None) -> dict[str, Any]:
    match: list[dict[str, Any]] = [CT_RULE, {"tag": "InstanceCount", "ge": 16}]
    if calling_ae:
        match.append({"calling_ae": {"equals": calling_ae}})
    return {"name": name, "match": {"all": match}, "actions": {"run": ["lesion-seg"], "send_to": [destination]}}


def _api(node: NodeProcess, path: str) -> Any:
    with urllib.request.urlopen(node.url + path, timeout=30) as response:
        return json.loads(response.read())


def _ready(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(node.url + "/health/ready", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "dicom-node"), *args], capture_output=True, text=True, timeout=120)


def _edit_config(node: NodeProcess, change: Any) -> None:
    config = yaml.safe_load(node.config_path.read_text())
    change(config)
    node.config_path.write_text(yaml.safe_dump(config))


def _send(node: NodeProcess, folder: Path, slices: int, aet: str = "MODALITY") -> str:
    files = make_study(folder, slices=slices, size=32)
    result = storescu(node.port, files, aet)
    assert result.returncode == 0, result.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _results(node: NodeProcess, study_uid: str) -> set[str]:
    jobs = _api(node, f"/api/studies/{study_uid}")["jobs"]
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for job in jobs for files in job["outputs"].values() for f in files}


def test_a_destination_added_while_running_receives_results_without_a_restart(start_node, tmp_path):
    first, late = StoreSCP(tmp_path / "first", free_port()), StoreSCP(tmp_path / "late", free_port())
    try:
        first.start()
        late.start()
        node = start_node(routing={"rules": [_rule("ct", "first")]}, completion={"quiet_period_s": 1.0},
                          destinations={"first": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": first.port}},
                          sending={"retry_initial_s": 0.5, "sweep_s": 0.5})
        wait_for(lambda: _ready(node)[0] == 200, timeout=30)
        pid = node.process.pid
        # Today's mistake, the other way round: the rule first, its destination not yet added.
        node.write_routing({"rules": [{**_rule("ct", "first"), "actions": {"run": ["lesion-seg"],
                                                                             "send_to": ["first", "late"]}}]})
        refused = wait_for(lambda: node.events("routing_reload_refused"), timeout=20)[-1]
        assert "unknown destination 'late'" in " ".join(refused["problems"])
        check = _cli("config", "check", str(node.config_path))
        assert check.returncode == 2 and "unknown destination 'late'" in check.stderr
        assert _api(node, "/api/rules")["check"]["ok"] is False  # the console shows the same check

        _edit_config(node, lambda c: c["destinations"].update(
            late={"ae_title": "VIEWER", "host": "127.0.0.1", "port": late.port}))
        wait_for(lambda: "late" in {d["name"] for d in _api(node, "/api/destinations")}, timeout=20)
        # the config is in force before its listeners run; the event is logged after them
        wait_for(lambda: node.events("config_reloaded"), timeout=20)
        check = _cli("config", "check", str(node.config_path))
        assert check.returncode == 0 and "configuration OK" in check.stdout and "restart" not in check.stdout
        reloaded = node.events("config_reloaded")[-1]
        assert "destinations.late" in reloaded["changed"] and reloaded["restart_needed"] == []

        study_uid = _send(node, tmp_path / "study", slices=20)
        wait_for(lambda: len([d for d in _api(node, f"/api/studies/{study_uid}")["deliveries"]
                              if d["state"] == "delivered"]) == 2, timeout=120, interval=0.3)
        results = _results(node, study_uid)
        assert len(results) == 2 and results <= late.received() and results <= first.received()
        assert node.process.pid == pid  # the same process all along

        # A key that the receivers read at start: applied only after a restart, and said so.
        _edit_config(node, lambda c: c["scp"].update(workers=1))
        wait_for(lambda: len(node.events("config_reloaded")) >= 2, timeout=20)
        assert node.events("config_reloaded")[-1]["restart_needed"] == ["scp.workers"]
        check = _cli("config", "check", str(node.config_path))
        assert check.returncode == 0 and "only after a restart: scp.workers" in check.stdout
        assert _api(node, "/api/summary")["live"]["restart_pending"] == ["scp.workers"]
    finally:
        first.stop()
        late.stop()


def test_readiness_turns_503_under_the_disk_watermark_and_200_after(start_node, tmp_path):
    # A model the rules run, whose file is missing; and a watermark of a petabyte.
    repository = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / "lesion-seg", repository / "lesion-seg")
    model_file = repository / "lesion-seg" / "1" / "model.onnx"
    model_file.rename(tmp_path / "model.onnx")
    node = start_node(storage={"min_free_mb": 1e12}, inference={"model_repository": str(repository)},
                      routing={"rules": [_rule("ct", "@sender")]})
    status, body = wait_for(lambda: (r := _ready(node))[0] and r, timeout=30)
    assert status == 503 and body["checks"]["disk"] is False and body["checks"]["model:lesion-seg"] is False
    assert any(r.startswith("disk under the watermark") for r in body["reasons"])
    assert any(r.startswith("model lesion-seg unavailable") and "model file not found" in r for r in body["reasons"])
    assert body["checks"]["receiver"] and body["checks"]["index"]
    before = _metrics(node)
    files = make_study(tmp_path / "refused", slices=3, size=16)
    result = storescu(node.port, files, "MODALITY")
    output = result.stdout + result.stderr
    refused = output.count("Received Store Response (Refused: OutOfResources)")  # 0xA700; storescu stops there
    assert refused >= 1 and "Received Store Response (Success" not in output
    wait_for(lambda: _metrics(node).get(("dicom_node_associations_total", (("outcome", "with_failures"),)), 0)
             > before.get(("dicom_node_associations_total", (("outcome", "with_failures"),)), 0), timeout=30)
    after = _metrics(node)
    assert after[("dicom_node_cstore_failures_total", ())] - before[("dicom_node_cstore_failures_total", ())] == refused
    assert after[("dicom_node_instances_received_total", ())] == before[("dicom_node_instances_received_total", ())]

    node.stop()  # storage.min_free_mb is read by the receiver processes at start
    _edit_config(node, lambda c: c["storage"].update(min_free_mb=1))
    (tmp_path / "model.onnx").rename(model_file)
    node.start()
    status, body = wait_for(lambda: (r := _ready(node))[0] == 200 and r, timeout=30)
    assert body == {"ready": True, "reasons": [], "checks": body["checks"]} and all(body["checks"].values())


def _plan(node: NodeProcess, config: Path) -> dict[str, Any]:
    result = _cli("cleanup", "--dry-run", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _policy_file(node: NodeProcess, name: str, retention: dict[str, Any]) -> Path:
    config = yaml.safe_load(node.config_path.read_text())
    config["storage"]["retention"] = retention
    path = node.workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


def _stored(node: NodeProcess, study_uid: str) -> list[Path]:
    return list((node.data_dir / "studies" / study_uid).rglob("*.dcm"))


def test_a_study_retention_deleted_is_received_again_by_the_same_receiver(start_node, tmp_path):
    """Retention removes a study's folders while the receiver that made them runs on: the same
    study sent again (a prior the PACS forwards for comparison) is stored, not refused."""
    node = start_node(scp={"workers": 1}, completion={"quiet_period_s": 1.0})
    uid = _send(node, tmp_path / "prior", 4)
    wait_for(lambda: node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='ignored'", (uid,)))
    done = _cli("cleanup", "--config", str(_policy_file(node, "aged.yaml", {"instances_days": 1e-6})))
    assert done.returncode == 0 and "deleted 1 studies" in done.stdout, done.stdout + done.stderr
    assert not (node.data_dir / "studies" / uid).exists()
    again = storescu(node.port, sorted((tmp_path / "prior").rglob("*.dcm")))
    assert (again.stdout + again.stderr).count("(Success)") == 4
    assert len(_stored(node, uid)) == 4 == node.instance_count(uid)


def test_retention_removes_exactly_the_eligible_studies(start_node, tmp_path):
    viewer = StoreSCP(tmp_path / "viewer", free_port())
    try:
        viewer.start()
        node = start_node(
            routing={"rules": [_rule("to-viewer", "viewer", "MODALITY"), _rule("to-down", "down", "DOWNAE")]},
            completion={"quiet_period_s": 1.0, "quiet_period_by_calling_ae": {"SLOW": 3600}},
            destinations={"viewer": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": viewer.port},
                          "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}},
            sending={"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5},
        )
        # Finished: two small studies no rule takes (ignored), one whose results were delivered.
        old = _send(node, tmp_path / "old", 8)
        wait_for(lambda: node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='ignored'", (old,)))
        newer = _send(node, tmp_path / "newer", 8)
        delivered = _send(node, tmp_path / "delivered", 20)
        # Not finished: results that cannot be delivered, and a study still receiving.
        pending = _send(node, tmp_path / "pending", 20, aet="DOWNAE")
        receiving = _send(node, tmp_path / "receiving", 8, aet="SLOW")
        wait_for(lambda: node.query("SELECT 1 FROM work_items WHERE study_uid=? AND state='ignored'", (newer,)))
        wait_for(lambda: node.query("SELECT 1 FROM outbox WHERE study_uid=? AND state='delivered'", (delivered,)),
                 timeout=120)
        wait_for(lambda: node.query("SELECT 1 FROM outbox WHERE study_uid=? AND attempts>0", (pending,)), timeout=120)
        result_files = [Path(f) for job in _api(node, f"/api/studies/{delivered}")["jobs"]
                        for files in job["outputs"].values() for f in files]
        assert len(result_files) == 2 and all(f.is_file() for f in result_files)
        bytes_before = _metrics(node)[("dicom_node_received_bytes_total", ())]

        # A size cap just under what is stored: only the oldest finished study goes.
        total = sum(r["bytes"] for r in node.query("SELECT size AS bytes FROM instances"))
        old_size = sum(r["size"] for r in node.query("SELECT size FROM instances WHERE study_uid=?", (old,)))
        capped = _policy_file(node, "cap.yaml", {"max_store_gb": (total - old_size + 1) / 2**30})
        plan = _plan(node, capped)
        assert [s["study_uid"] for s in plan["studies"]] == [old] and plan["results"] == []
        assert _cli("cleanup", "--config", str(capped)).returncode == 0
        assert _stored(node, old) == [] and node.study(old) is None
        for kept in (newer, delivered, pending, receiving):
            assert _stored(node, kept) and node.study(kept) is not None

        # Age: every finished study's instances and the delivered results; nothing with work left.
        aged = _policy_file(node, "aged.yaml", {"instances_days": 1e-6, "results_days": 1e-6})
        plan = _plan(node, aged)
        assert sorted(s["study_uid"] for s in plan["studies"]) == sorted([newer, delivered])
        assert [r["study_uid"] for r in plan["results"]] == [delivered]
        done = _cli("cleanup", "--config", str(aged))
        assert done.returncode == 0 and "deleted 2 studies" in done.stdout and "2 result files" in done.stdout
        assert not any(f.exists() for f in result_files)
        for gone in (newer, delivered):
            assert _stored(node, gone) == [] and node.study(gone) is None
        for kept in (pending, receiving):
            assert _stored(node, kept) and node.study(kept) is not None
        # Counters stay counters: deleted bytes are still bytes that were received.
        assert _metrics(node)[("dicom_node_received_bytes_total", ())] == bytes_before

        # The node's own schedule, switched on by a live reload: the next finished study goes by itself.
        _edit_config(node, lambda c: c["storage"].update(retention={"instances_days": 1e-6, "interval_s": 1}))
        latest = _send(node, tmp_path / "latest", 8)
        wait_for(lambda: any(e["study_uid"] == latest for e in node.events("retention_deleted_study")), timeout=60)
        # the scheduled run that deleted it: logged once its run is recorded, after its deletions
        wait_for(lambda: any(e["studies"] >= 1 for e in node.events("retention_run")), timeout=30)
        assert _api(node, "/api/summary")["retention"]["last_run"] is not None
        page = urllib.request.urlopen(node.url + "/", timeout=30).read().decode()
        assert "Last run: 20" in page  # the dashboard shows the last run's time
        for kept in (pending, receiving):
            assert _stored(node, kept) and node.study(kept) is not None
        page = urllib.request.urlopen(f"{node.url}/studies/{newer}", timeout=30).read().decode()
        assert "deleted by retention" in page
    finally:
        viewer.stop()


def test_the_console_serves_https_and_refuses_to_bind_beyond_loopback_without_a_token(start_node, tmp_path,
                                                                                     monkeypatch):
    import ssl

    from node.config import load_config

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    # Also: the rules run a model on a Triton server that is not there.
    node = start_node(http={"tls": {"certificate": str(cert), "private_key": str(key)}},
                      inference={"triton": {"url": f"127.0.0.1:{free_port()}"}},
                      routing={"rules": [_rule("ct", "@sender")]})
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    url = f"https://127.0.0.1:{node.http_port}/health/live"
    body = wait_for(lambda: _try(lambda: urllib.request.urlopen(url, context=context, timeout=10).read()), timeout=30)
    assert json.loads(body) == {"status": "alive"}
    status = _cli("status", "--config", str(node.config_path))  # over HTTPS, from the running node
    assert status.returncode == 0, status.stderr
    assert "node TESTNODE: NOT READY (model lesion-seg unavailable (triton 127.0.0.1:" in status.stdout
    assert "Triton not reachable" in status.stdout and "lesion-seg (Triton not reachable" in status.stdout

    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(yaml.safe_dump({"http": {"bind": "0.0.0.0"}}))
    monkeypatch.delenv("DICOM_NODE_HTTP_TOKEN", raising=False)
    # beyond loopback every call needs an account or a token (node.console.auth: no open mode),
    # so a console there without the shared token is safe and starts
    assert load_config(exposed).http.effective_token() is None
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", "env-token-0123456789")
    assert load_config(exposed).http.effective_token() == "env-token-0123456789"


def _try(call: Any) -> Any:
    try:
        return call()
    except OSError:
        return None


def _associate(node: NodeProcess, calling: str, called: str = "TESTNODE") -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    return steady(assoc) if assoc.is_established else assoc


def test_receiver_settings_reload_live_and_open_associations_finish_under_the_old_ones(start_node, tmp_path):
    """Allowed callers, AE titles and the disk watermark change without a restart: new receiver
    processes take new connections with the new settings, while an association opened before the
    reload goes on (and ends) under the settings it started with. /metrics counts the rejection,
    the 0xA700 answers and the abort."""
    # acse 3 s: a rejected association is over (for pynetdicom) when the peer closes or at the ACSE timeout
    node = start_node(scp={"allowed_callers": [{"ae_title": "MODALITY"}], "require_called_ae_title": True,
                           "timeouts": {"acse": 3}})
    wait_for(lambda: _ready(node)[0] == 200, timeout=30)
    before = _metrics(node)
    refused = _associate(node, "OTHER")
    assert refused.is_rejected
    files = make_study(tmp_path / "study", slices=3, size=32)
    held = _associate(node, "MODALITY")
    assert held.is_established
    ready = len(node.events("receiver_ready"))

    _edit_config(node, lambda c: (c["scp"].update(allowed_callers=[{"ae_title": "MODALITY"}, {"ae_title": "OTHER"}],
                                                  ae_titles=["TESTNODE", "NEWTITLE"]),
                                  c["storage"].update(min_free_mb=10**9)))
    wait_for(lambda: node.events("receivers_reconfigured"), timeout=20)
    wait_for(lambda: len(node.events("receiver_ready")) >= ready + node.receivers, timeout=60)
    # logged once every listener (the receivers' reconfiguration among them) has returned
    assert wait_for(lambda: node.events("config_reloaded"), timeout=20)[-1]["restart_needed"] == []

    # The old association: still served, under the old watermark (1 MB): stored.
    assert held.send_c_echo().Status == 0x0000
    assert held.send_c_store(pydicom.dcmread(files[0])).Status == 0x0000
    # A new one: the caller and the title the reload added, the new watermark: refused for space.
    fresh = _associate(node, "OTHER", "NEWTITLE")
    assert fresh.is_established
    assert fresh.send_c_store(pydicom.dcmread(files[1])).Status == 0xA700
    fresh.release()
    assert len(node.events("receiver_drained")) < node.receivers  # the held association keeps its receiver
    held.release()
    drained = wait_for(lambda: len(node.events("receiver_drained")) == node.receivers and node.events("receiver_drained"),
                       timeout=30)
    assert {e["exit_code"] for e in drained} == {0}
    aborted = _associate(node, "MODALITY", "NEWTITLE")
    assert aborted.is_established
    aborted.abort()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return _metrics(node).get(key, 0.0) - before.get(key, 0.0)

    wait_for(lambda: delta("dicom_node_associations_aborted_total") == 1, timeout=20)
    assert delta("dicom_node_associations_rejected_total", reason="calling AE not allowed") == 1
    assert delta("dicom_node_cstore_failures_by_status_total", status="0xA700") == 1
    assert delta("dicom_node_instances_received_total") == 1
    assert len(node.query("SELECT * FROM instances")) == 1

    # A certificate that cannot be loaded: the reload is refused, the receivers in force stay.
    running = {e["pid"] for e in node.events("receiver_ready")} - {e["pid"] for e in node.events("receiver_drained")}
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    _edit_config(node, lambda c: c["scp"].update(tls={"enabled": True, "certificate": str(tmp_path / "bad.pem"),
                                                      "private_key": str(tmp_path / "bad.pem")}))
    refused_reload = wait_for(lambda: node.events("config_reload_refused"), timeout=20)[-1]
    assert any("scp.tls" in p and "cannot be loaded" in p for p in refused_reload["problems"])
    check = _cli("config", "check", str(node.config_path))
    assert check.returncode == 2 and "scp.tls" in check.stderr
    again = _associate(node, "OTHER", "NEWTITLE")
    assert again.is_established and again.send_c_echo().Status == 0x0000
    again.release()
    assert len(node.events("receivers_reconfigured")) == 1

    # The receivers end with the service, even when it is killed (their channel closes).
    assert all(Path(f"/proc/{pid}").exists() for pid in running)
    node.process.kill()
    node.process.wait(10)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in running), timeout=20)


def test_the_cli_follows_a_node_started_on_other_ports_and_survives_a_typo(tmp_path):
    """Started with --port/--http-port (node.yaml says other ports): status, echo, jobs, outbox,
    studies and audit reach it or its index. A typo in node.yaml on disk (the node refused it and
    runs on) leaves the read-only commands working on the configuration in force, with a
    warning; `config check` names the typo with a suggestion and exits 2. A short token from
    the environment is refused like one in the file. One --version."""
    import os

    from tests.processes import stop_process_group

    node = NodeProcess(tmp_path / "node")  # writes node.yaml (its ports) and the routing file
    port, http_port = free_port(), free_port()
    log = open(node.log_path, "ab")
    process = subprocess.Popen([str(VENV_BIN / "dicom-node"), "serve", "--config", str(node.config_path),
                                "--port", str(port), "--http-port", str(http_port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_for(lambda: node.events("node_started") or process.poll() is not None, timeout=120)
        assert process.poll() is None, node.log()[-3000:]
        config = str(node.config_path)
        status = _cli("status", "--config", config)
        assert status.returncode == 0 and "node TESTNODE: ready" in status.stdout, status.stdout + status.stderr
        echo = _cli("echo", "--config", config)
        assert echo.returncode == 0 and f"127.0.0.1:{port}" in echo.stdout, echo.stdout + echo.stderr
        for args in (("jobs",), ("outbox",), ("studies",), ("audit",)):
            result = _cli(*args, "--config", config)
            assert result.returncode == 0, (args, result.stderr)

        text = node.config_path.read_text()
        node.config_path.write_text(text.replace("ae_title: TESTNODE", "ae_tittle: TESTNODE"))
        check = _cli("config", "check", config)
        assert check.returncode == 2 and "scp.ae_tittle: unknown key (did you mean 'ae_title'?)" in check.stderr
        for args in (("status",), ("jobs",)):
            result = _cli(*args, "--config", config)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert "has 1 problem(s)" in result.stderr and "using the configuration in force" in result.stderr
        assert "node TESTNODE: ready" in _cli("status", "--config", config).stdout
        # the running node polls node.yaml (2 s): once it refused the typo, `status` says so
        wait_for(lambda: "ON THE PREVIOUS CONFIGURATION: the last reload was refused"
                 in _cli("status", "--config", config).stdout, timeout=60, interval=1)
        node.config_path.write_text(text + "\n  oops: [\n")  # not even YAML: the data folder is found by its line
        for args in (("status",), ("jobs",), ("audit",)):
            result = _cli(*args, "--config", config)
            assert result.returncode == 0 and "using the configuration in force" in result.stderr, \
                (args, result.stdout, result.stderr)
        node.config_path.write_text(text)

        short = subprocess.run([str(VENV_BIN / "dicom-node"), "config", "check", config], capture_output=True,
                               text=True, timeout=120, env={**os.environ, "DICOM_NODE_HTTP_TOKEN": "x"})
        assert short.returncode == 2 and "DICOM_NODE_HTTP_TOKEN: has 1 characters; a token needs at least 16" \
            in short.stderr, short.stderr
        # an account's API token as the shared admin token would outlive its revocation
        account = subprocess.run([str(VENV_BIN / "dicom-node"), "config", "check", config], capture_output=True,
                                 text=True, timeout=120,
                                 env={**os.environ, "DICOM_NODE_HTTP_TOKEN": "dnt_" + "a" * 40})
        assert account.returncode == 2 and "DICOM_NODE_HTTP_TOKEN: is an account's API token (dnt_...)" \
            in account.stderr, account.stderr
        version = _cli("--version")
        assert version.returncode == 0 and version.stdout.startswith("dicom-node ")
        bad_port = _cli("serve", "--config", config, "--port", "99999")
        assert bad_port.returncode == 2 and "--port" in bad_port.stderr and "node.yaml" not in bad_port.stderr
    finally:
        stop_process_group(process, 30)


def test_every_configuration_key_is_in_the_shipped_node_yaml():
    """config/node.yaml lists every key NodeConfig takes (set, or commented with its meaning), so
    an operator finds each setting where the README says it is."""
    import re
    import typing

    from pydantic import BaseModel

    from node.config import NodeConfig

    text = (REPO_ROOT / "config" / "node.yaml").read_text()

    def model_of(annotation: Any) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for a in reversed(typing.get_args(annotation)) if (m := model_of(a)) is not None), None)

    missing: list[str] = []

    def walk(model: Any, prefix: str, seen: frozenset[Any]) -> None:
        for name, field in model.model_fields.items():
            if not re.search(rf"(^|[\s{{,#-]){re.escape(name)}:", text, re.M):
                missing.append(prefix + name)
            sub = model_of(field.annotation)
            if sub is not None and sub not in seen:
                walk(sub, f"{prefix}{name}.", seen | {sub})

    walk(NodeConfig, "", frozenset({NodeConfig}))
    assert missing == []


def test_a_bad_ae_title_is_explained_in_words_not_by_a_regular_expression(tmp_path):
    bad = tmp_path / "node.yaml"
    bad.write_text('scp:\n  ae_title: "THIS-TITLE-IS-FAR-TOO-LONG"\ndestinations:\n  pacs: {ae_title: "A\\\\B", host: h, port: 1}\n')
    check = _cli("config", "check", str(bad))
    assert check.returncode == 2
    assert "scp.ae_title: Value error, not an AE title (1 to 16 characters, not all spaces, no backslash or" \
           " control characters (PS3.5 AE)): 'THIS-TITLE-IS-FAR-TOO-LONG'" in check.stderr, check.stderr
    assert "destinations.pacs.ae_title" in check.stderr and "\\x5b" not in check.stderr


def _processes_with(marker: str) -> list[int]:
    """The processes whose environment holds `marker` (a receiver inherits the service's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:  # gone, or not ours
            pass
    return found


def test_a_console_port_in_use_stops_the_start_before_anything_runs(tmp_path):
    """The console's port is bound first thing: taken, the node says so and exits 1 before a
    receiver takes a connection (its DICOM port stays free), and the receiver processes launched
    ahead of the service's start (node/receive/launch.py) are stopped with it, none left behind."""
    import socket

    node = NodeProcess(tmp_path / "node")
    marker = f"DICOM_NODE_TEST_MARK={uuid.uuid4().hex}"
    # into a file, not a pipe: a receiver holding the pipe would keep run() waiting, not fail here
    with socket.create_server(("127.0.0.1", node.http_port)), open(tmp_path / "out", "w+") as out:
        result = subprocess.run([str(VENV_BIN / "dicom-node"), "serve", "--config", str(node.config_path)],
                                stdout=out, stderr=subprocess.STDOUT, text=True, timeout=120,
                                env={**os.environ, marker.split("=")[0]: marker.split("=")[1]})
        out.seek(0)
        output = out.read()
    assert result.returncode == 1, output[-2000:]
    assert f"cannot start: the console cannot listen on 127.0.0.1:{node.http_port}" in output
    assert _processes_with(marker) == []
    with socket.create_server(("127.0.0.1", node.port)):  # nothing kept the DICOM port
        pass


def test_receivers_are_launched_ahead_on_the_cores_the_service_leaves_free():
    """Ahead of the service's imports, one receiver per core besides the service's, at least one
    (launch.py): more took the cores from the service's start."""
    assert [launched_ahead(receivers, cores) for receivers, cores in
            ((4, 2), (2, 2), (1, 1), (4, 1), (32, 16), (2, 8))] == [1, 1, 1, 1, 15, 2]


def test_a_node_on_one_core_starts_the_receivers_not_launched_ahead_and_each_takes_associations(start_node):
    """On one core one receiver is launched ahead and the pool starts the two others: all three
    become ready (the harness waits for three) and take associations, three held open at once
    landing on three processes. (On the CI's two cores every node of the suite starts so.)"""
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(own)})  # inherited by the node and its receivers
    try:
        node = start_node(scp={"workers": 3})
    finally:
        os.sched_setaffinity(0, own)
    assert [(e["slot"], e["ahead"]) for e in node.events("receiver_started")] == [(0, True), (1, False), (2, False)]
    receivers = [e["pid"] for e in node.events("receiver_ready")]
    assert _associations_held_per_receiver(node.port, receivers) == [1, 1, 1]


def test_a_node_under_a_cpu_quota_runs_two_receivers_and_one_model_thread_per_cpu_it_allows(tmp_path):
    """A container's CPU limit is a quota (Docker's --cpus, Kubernetes' limits), which neither
    os.cpu_count() nor the affinity sees: in a real cgroup with a 1-CPU quota on this machine of
    two or more CPUs, the node's default is two receivers, each taking associations, the first
    launched ahead, and its pipeline runs torch on one thread, in the job's thread too
    (common.cpus). torch's own default is set to four threads, so that only the fitting brings
    it to one on any machine."""
    from tests.cgroups import cpu_quota_cgroup, skip_unless_two_cpus

    skip_unless_two_cpus()

    routing = {"rules": [{"name": "ct", "match": {"tag": "Modality", "equals": "CT"},
                          "actions": {"run": ["lesion-seg"], "send_to": ["pacs"]}}]}
    pacs = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}}  # nothing listens: not needed
    with cpu_quota_cgroup(1.0) as prefix:
        launcher = ("env", "OMP_NUM_THREADS=4", "MKL_NUM_THREADS=4", *prefix)
        node = NodeProcess(tmp_path / "node", routing=routing, launcher=launcher, scp={"workers": 0},
                           destinations=pacs)
        node.receivers = 2  # what the node should find: the harness waits for that many (this process sees two CPUs)
        try:
            node.start()
            assert [(e["slot"], e["ahead"]) for e in node.events("receiver_started")] == [(0, True), (1, False)]
            receivers = [e["pid"] for e in node.events("receiver_ready")]
            assert _associations_held_per_receiver(node.port, receivers) == [1, 1]
            wait_for(lambda: node.events("pipeline_ready") or node.events("pipeline_load_failed"), timeout=120)
            assert [e["threads"] for e in node.events("pipeline_ready")] == [1]
            sent = storescu(node.port, make_study(tmp_path / "study", slices=12))
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: node.events("model_ran") or node.events("job_failed"), timeout=180)
            failures = [e["reason"] for e in node.events("job_failed")]
            assert [e["threads"] for e in node.events("model_ran")] == [1], failures
        finally:
            node.stop()


def _associations_held_per_receiver(port: int, receivers: list[int]) -> list[int]:
    """Open one association per receiver at once, each answering a C-ECHO; while all are held,
    how many each receiver process holds (sorted)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="OPS")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="TESTNODE") for _ in receivers]
    try:
        assert [assoc.is_established and assoc.send_c_echo().Status for assoc in held] == [0] * len(receivers)
        return sorted(_connections_to(pid, port) for pid in receivers)
    finally:
        for assoc in held:
            assoc.release()


def _connections_to(pid: int, port: int) -> int:
    """The established TCP connections to local `port` that process `pid` holds (/proc/net/tcp's
    socket inodes among its descriptors)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return sum(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


def _refuse_exec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """From now on the kernel refuses to exec a receiver (no such interpreter): a real launch failure."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))


def _pool_config(tmp_path: Path, workers: int) -> NodeConfig:
    return NodeConfig.model_validate({"scp": {"bind": "127.0.0.1", "port": free_port(), "workers": workers,
                                              "ae_title": "TESTNODE"},
                                      "storage": {"data_dir": str(tmp_path)}})


@contextmanager
def _started_pool(tmp_path: Path, workers: int) -> Iterator[ReceiverPool]:
    """A receiver pool on an index of its own, every receiver ready; stopped afterwards."""
    Index(tmp_path / "index.sqlite").close()  # as the service does before its receivers start
    pool = ReceiverPool(_pool_config(tmp_path, workers), on_study_opened=lambda uid, deadline: None)
    pool.start()
    try:
        assert pool.wait_ready(60)
        yield pool
    finally:
        pool.stop()


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of the events `name` logged in this process."""
    return [r.event_fields for r in caplog.records if r.getMessage() == name]


def test_a_receiver_the_pool_cannot_launch_stops_those_it_started_and_is_raised(tmp_path, monkeypatch):
    """The pool starts the receivers not launched ahead (launch.py). One whose exec the kernel
    refuses (here: no such interpreter) fails the start with LaunchFailed, whose text says what
    could not start, after the receiver already started, launched ahead and handed its settings,
    was stopped: none left running. A reconfiguration after it is refused."""
    launched = [launch_receiver()]
    config = _pool_config(tmp_path, workers=2)
    pool = ReceiverPool(config, on_study_opened=lambda uid, deadline: None, launched=launched)
    _refuse_exec(monkeypatch, tmp_path)
    with pytest.raises(LaunchFailed, match=r"^\[Errno 2\] a receiver process cannot be launched \(No such file"):
        pool.start()
    assert launched[0].process.returncode is not None
    assert pool.reconfigure(config) is False


def test_a_reconfiguration_whose_receivers_cannot_be_launched_keeps_the_running_ones(tmp_path, monkeypatch, caplog):
    """New settings start a new receiver for each slot before the running ones drain. When one
    cannot be launched (the second's exec refused), the reconfiguration is refused and the
    running receivers stay, each still taking associations; the new one that did start is stopped."""
    caplog.set_level(logging.INFO, logger="node.receive")
    with _started_pool(tmp_path, workers=2) as pool:
        running = [e["pid"] for e in _events(caplog, "receiver_started")]

        def first_only() -> LaunchedReceiver:  # the second exec is refused
            if launches:
                _refuse_exec(monkeypatch, tmp_path)
            launches.append(launch_receiver())
            return launches[-1]

        launches: list[LaunchedReceiver] = []
        monkeypatch.setattr(workers, "launch_receiver", first_only)
        assert pool.reconfigure(pool.config.model_copy(update={
            "scp": pool.config.scp.model_copy(update={"max_pdu": 65536})})) is False
        monkeypatch.undo()
        started = [e["pid"] for e in _events(caplog, "receiver_started")]
        assert started[:2] == running and len(started) == 3  # one of the new generation started
        wait_for(lambda: not _alive(started[2]), timeout=30)
        assert all(_alive(pid) for pid in running)
        assert _associations_held_per_receiver(pool.port, running) == [1, 1]


def test_a_receiver_that_cannot_be_respawned_is_tried_again(tmp_path, monkeypatch, caplog):
    """A receiver that dies is respawned; when the kernel refuses the new one (its exec, here),
    the slot is not left empty: the failure is logged and tried again after a pause, and the
    receiver that then starts takes associations."""
    caplog.set_level(logging.INFO, logger="node.receive")
    with _started_pool(tmp_path, workers=1) as pool:
        first = _events(caplog, "receiver_started")[0]["pid"]
        _refuse_exec(monkeypatch, tmp_path)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: _events(caplog, "receiver_launch_failed"), timeout=30)
        assert _events(caplog, "receiver_launch_failed")[0]["error"].startswith("a receiver process cannot be launched")
        monkeypatch.undo()
        wait_for(lambda: len(_events(caplog, "receiver_started")) == 2, timeout=60)
        wait_for(lambda: pool.alive() and pool.wait_ready(1), timeout=60)  # in its slot, and ready
        assert _associations_held_per_receiver(pool.port, [_events(caplog, "receiver_started")[1]["pid"]]) == [1]


def _alive(pid: int) -> bool:
    """`pid` runs (a zombie, ended but not yet reaped, does not)."""
    fields = proc_stat(f"/proc/{pid}")
    return fields is not None and fields[0] not in "ZX"


def test_a_pool_stopped_before_it_started_stops_the_receivers_launched_for_it():
    """The service failed between the launch and the start (the console's port, a data volume not
    mounted): its pool's stop kills and reaps what was launched for it, before the process ends."""
    launched = [launch_receiver(), launch_receiver()]
    pool = ReceiverPool(NodeConfig.model_validate({"scp": {"bind": "127.0.0.1", "port": free_port(), "workers": 2}}),
                        on_study_opened=lambda uid, deadline: None, launched=launched)
    pool.stop()
    assert [receiver.process.returncode for receiver in launched] == [-signal.SIGKILL] * 2


def _ignored_signals(pid: int) -> int:
    """The signal numbers `pid` ignores, as a bit mask (SigIgn in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)


def test_a_receiver_launched_ahead_ignores_the_terminals_signals_while_it_waits():
    """Launched while the service starts, a receiver sets SIGTERM and SIGINT aside before its
    imports and its settings (node/receive/__main__.py): a Ctrl-C to the process group then is the
    service's to handle (a drain), and does not kill a receiver (nor print its traceback)."""
    launched = launch_receiver()
    try:
        wanted = 1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1)
        wait_for(lambda: _ignored_signals(launched.process.pid) & wanted == wanted, timeout=30)
        launched.process.send_signal(signal.SIGINT)
        launched.process.send_signal(signal.SIGTERM)
        os.close(launched.settings)
        assert launched.process.wait(60) == 0
    finally:
        launched.channel.close()


def test_a_receiver_launched_ahead_ends_quietly_when_its_settings_never_come():
    """A receiver launched before the service's start (launch.py) waits for its settings; if the
    service goes away first (its end of the pipe closes unwritten), the receiver ends with
    status 0 and takes no connection, instead of failing on an empty message."""
    launched = launch_receiver()
    try:
        os.close(launched.settings)
        assert launched.process.wait(60) == 0
        assert launched.channel.recv(4096) == b""  # nothing said: no "ready"
    finally:
        launched.channel.close()
