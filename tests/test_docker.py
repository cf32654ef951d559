"""The compose stack, checked without a Docker engine: services, ports, mounts, environment and
the node's configuration must agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from node.config import load_config
from node.route.rules import load_rules

DOCKER = Path(__file__).resolve().parent.parent / "docker"


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
    assert host == "triton" and f"{port}:{port}" in triton["ports"] and port == "8001"
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
    models = {p.name for p in (DOCKER.parent / "models").iterdir() if (p / "node.yaml").exists()}
    rules = load_rules(config.pipeline.routing_file, models, set(config.destinations))
    assert [r.actions.run for r in rules.file.rules] == [["lesion-seg"]]


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (DOCKER / "Dockerfile").read_text()
    assert "USER dicomnode" in text and "useradd --system" in text
    assert 'HEALTHCHECK' in text and '"dicom-node", "echo", "127.0.0.1", "11112"' in text
    assert "torch==2.13.0" in text
