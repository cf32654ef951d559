"""The compose stack, checked without a Docker engine: services, ports, mounts, environment and
the node's configuration must agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pydicom
import pytest
import yaml

from node.config import load_config
from inference.repository import ModelRepository
from node.route.rules import load_rules

DOCKER = Path(__file__).resolve().parent.parent / "docker"


@pytest.fixture(autouse=True)
def _console_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose.yml hands the node its console token in the environment."""
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", "compose-token-0123456789")


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _mounts(service: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_services_and_node_configuration_agree():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"node", "triton", "orthanc", "ohif"}
    config = load_config(DOCKER / "node.compose.yaml")

    node = services["node"]
    assert f"{config.scp.port}:{config.scp.port}" in node["ports"]
    mounts = _mounts(node)
    assert mounts[str(config.inference.model_repository)] == "../models"
    assert mounts["/etc/dicom-node/node.yaml"] == "./node.compose.yaml"
    assert mounts["/etc/dicom-node/" + config.pipeline.routing_file.name] == "./" + config.pipeline.routing_file.name
    assert str(config.storage.data_dir) in mounts

    triton = services["triton"]
    host, port = config.inference.triton.url.split(":")
    assert host == "triton" and port in triton["expose"] and port == "8001"
    assert "--model-repository=/models" in triton["command"]
    assert _mounts(triton)["/models"] == "../models"
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    orthanc = services["orthanc"]["environment"]
    pacs = config.destinations["pacs"]
    assert (pacs.host, pacs.port, pacs.ae_title) == ("orthanc", int(orthanc["ORTHANC__DICOM_PORT"]), orthanc["ORTHANC__DICOM_AET"])
    forward = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])["node"]
    assert forward == [config.scp.ae_title, "node", config.scp.port]
    assert [c.ae_title for c in config.scp.allowed_callers] == [orthanc["ORTHANC__DICOM_AET"]]
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true" and orthanc["TCP_NODELAY"] == "1"

    ohif = _mounts(services["ohif"])
    assert ohif["/usr/share/nginx/html/app-config.js"] == "./ohif-config.js"
    assert "proxy_pass http://orthanc:8042/dicom-web/" in (DOCKER / "ohif-nginx.conf").read_text()


def test_compose_rules_use_the_shipped_model_and_configured_destinations():
    config = load_config(DOCKER / "node.compose.yaml")
    models = ModelRepository(DOCKER.parent / "models").catalog()
    rules = load_rules(config.pipeline.routing_file, models, set(config.destinations))
    assert [r.actions.run for r in rules.file.rules] == [["lesion-seg"]]


def test_dockerfile_runs_as_non_root_with_the_cpu_torch_build():
    text = (DOCKER / "Dockerfile").read_text()
    assert "USER dicomnode" in text and "useradd --system" in text
    # the CPU build from PyTorch's own index, at the version pyproject.toml pins
    assert 'pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0' in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '"torch==2.13.0"' in (DOCKER.parent / "pyproject.toml").read_text()


def _healthcheck_url(dockerfile: str) -> str:
    command = dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].splitlines()[0]
    return re.search(r"https?://[^'\"]+", command).group(0)


def test_healthcheck_reaches_the_ready_endpoint_whoever_the_node_allows_to_call():
    """The Dockerfile's HEALTHCHECK, the node's configuration in the stack and the compose file
    together: the check asks /health/ready on the console's port inside the container, which no
    scp.allowed_callers entry can refuse (the old C-ECHO as AE HEALTHCHECK always was)."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    config = load_config(DOCKER / "node.compose.yaml")
    url = urlparse(_healthcheck_url(dockerfile))
    assert url.path == "/health/ready" and url.hostname == "127.0.0.1"
    assert url.port == config.http.port
    assert config.http.bind == "0.0.0.0"  # reachable on the container's loopback and published port
    assert "echo" not in dockerfile.split("HEALTHCHECK", 1)[1].split("ENTRYPOINT")[0]
    assert f"EXPOSE {config.scp.port} {config.http.port}" in dockerfile
    # the node beyond loopback needs its token, and compose refuses to start without one
    node = _compose()["services"]["node"]
    assert config.http.token is None and not config.http.on_loopback()
    assert node["environment"]["DICOM_NODE_HTTP_TOKEN"].startswith("${DICOM_NODE_HTTP_TOKEN:?")
    # the console is published on the host's loopback only; DICOM on every interface
    assert f"127.0.0.1:{config.http.port}:{config.http.port}" in node["ports"]
    assert f"{config.scp.port}:{config.scp.port}" in node["ports"]
    # /health/ready and the allowed callers do not depend on each other; Orthanc still may call
    assert [c.ae_title for c in config.scp.allowed_callers] == ["ORTHANC"]


def test_compose_waits_for_healthy_peers_and_publishes_no_open_orthanc_rest():
    services = _compose()["services"]
    assert services["node"]["depends_on"] == {"triton": {"condition": "service_healthy"},
                                              "orthanc": {"condition": "service_healthy"}}
    assert services["ohif"]["depends_on"] == {"orthanc": {"condition": "service_healthy"}}
    for name in ("triton", "orthanc"):
        assert services[name]["healthcheck"]["test"], name
    assert "/v2/health/ready" in " ".join(services["triton"]["healthcheck"]["test"])
    orthanc = services["orthanc"]
    published = [p.rsplit(":", 1)[-1] for p in orthanc.get("ports", [])]
    if orthanc["environment"]["ORTHANC__AUTHENTICATION_ENABLED"] != "true":
        assert "8042" not in published  # the REST API without credentials stays inside the network
    assert published == ["4242"]
    assert services["ohif"]["ports"] == ["127.0.0.1:3000:80"]


def test_orthanc_forwards_stable_series_by_its_lua_script():
    services = _compose()["services"]
    orthanc = services["orthanc"]
    scripts = json.loads(orthanc["environment"]["ORTHANC__LUA_SCRIPTS"])
    mounts = _mounts(orthanc)
    assert [mounts[s] for s in scripts] == ["./orthanc-forward.lua"]
    lua = (DOCKER / "orthanc-forward.lua").read_text()
    modality = re.search(r"NODE_MODALITY = '([^']+)'", lua).group(1)
    assert modality in json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    config = load_config(DOCKER / "node.compose.yaml")
    assert re.search(r"NODE_MANUFACTURER = '([^']+)'", lua).group(1) == config.output.manufacturer


def test_the_lua_script_makes_a_real_orthanc_forward_studies_but_not_the_node_results(start_node, orthanc, tmp_path):
    """Debian's Orthanc with docker/orthanc-forward.lua: a study uploaded to it arrives at the node
    with nobody asking; the node's SEG/SR coming back are not sent to it again."""
    from tests.orthanc import Orthanc
    from tests.peers import make_study, wait_for

    node = start_node(completion={"quiet_period_s": 1.0})
    pacs: Orthanc = orthanc(modalities={"node": ("TESTNODE", "127.0.0.1", node.port)})
    pacs.stop()
    original = pacs.write_config

    def with_lua() -> None:
        original()
        config = json.loads(pacs.config_path.read_text())
        config["LuaScripts"] = [str(DOCKER / "orthanc-forward.lua")]
        pacs.config_path.write_text(json.dumps(config))

    pacs.write_config = with_lua  # type: ignore[method-assign]
    pacs.start()
    files = make_study(tmp_path / "study", slices=6, size=16)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    pacs.upload(files)
    wait_for(lambda: node.instance_count(study_uid) == 6, timeout=60, interval=0.3)
    node.wait_complete(study_uid)

    # A result series, as the node's SEG/SR would come back: same study, Manufacturer dicom-node.
    results = []
    series_uid = pydicom.uid.generate_uid()
    for n, path in enumerate(files[:2]):
        ds = pydicom.dcmread(path)
        ds.Manufacturer, ds.SeriesInstanceUID, ds.SeriesNumber = "dicom-node", series_uid, 9101
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        results.append(tmp_path / f"result{n}.dcm")
        ds.save_as(results[-1], enforce_file_format=True)
    pacs.upload(results)
    orthanc_series = pacs.request("POST", "/tools/lookup", series_uid.encode())[0]["ID"]
    wait_for(lambda: pacs.get(f"/series/{orthanc_series}")["IsStable"], timeout=60, interval=0.3)
    stores = [j for j in pacs.get("/jobs?expand") if j["Type"] == "DicomModalityStore"]
    assert len(stores) == 1  # the CT series only
    wait_for(lambda: all(j["State"] == "Success" for j in pacs.get("/jobs?expand")), timeout=60)
    assert node.instance_count(study_uid) == 6
    assert not node.query("SELECT 1 FROM series WHERE series_uid=?", (str(series_uid),))
