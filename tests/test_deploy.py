"""The scale-out deployments, checked without a Docker engine or a cluster: the replicas compose
file, HAProxy's configuration and the Kubernetes manifests must agree with the node's
configuration, with each other and with the health endpoints the node serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from node.config import load_config
from node.route.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
REPLICAS = ("node-a", "node-b")


def _node_routes() -> set[str]:
    """The paths the node's console serves without a token (node/console/app.py)."""
    return set(re.findall(r'@app\.get\("(/health/[a-z]+)"', (ROOT / "node" / "console" / "app.py").read_text()))


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.replicas.yml").read_text())


def _replica_config(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]):
    """node.replicas.yaml as a replica reads it, with the environment compose gives it."""
    for key, value in environment.items():
        monkeypatch.setenv(key, re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"<{m.group(1)}>", value))
    return load_config(DOCKER / "node.replicas.yaml")


def test_replicas_share_one_index_one_data_volume_and_one_configuration(monkeypatch):
    services = _compose()["services"]
    assert set(services) == {"postgres", *REPLICAS, "dicom-lb", "triton", "orthanc"}
    first, second = (services[name] for name in REPLICAS)
    assert first["volumes"] == second["volumes"] and first["environment"] == second["environment"]
    config = _replica_config(monkeypatch, first["environment"])
    index = urlsplit(config.storage.effective_index_url())
    postgres = services["postgres"]["environment"]
    assert (index.scheme, index.hostname, index.port, index.path.lstrip("/"), index.username) == (
        "postgresql+psycopg", "postgres", 5432, postgres["POSTGRES_DB"], postgres["POSTGRES_USER"])
    assert index.password == "<POSTGRES_PASSWORD>" and postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in first["volumes"]}
    assert mounts[str(config.storage.data_dir)] == "node-data"  # a named volume, the same path in both
    assert mounts["/etc/dicom-node/node.yaml"] == "./node.replicas.yaml"
    for name in REPLICAS:
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # every replica's console on the host's loopback only, each on its own port
    published = [services[name]["ports"] for name in REPLICAS]
    assert published == [[f"127.0.0.1:8081:{config.http.port}"], [f"127.0.0.1:8082:{config.http.port}"]]
    # the Triton pool names the compose service
    host, port = config.inference.triton.servers[0].split(":")
    assert host == "triton" and port in services["triton"]["expose"]
    # the routing the replicas load uses the shipped model and the configured PACS
    models = {p.name for p in (ROOT / "models").iterdir() if (p / "node.yaml").exists()}
    monkeypatch.chdir(DOCKER)
    load_rules(DOCKER / config.pipeline.routing_file, models, set(config.destinations))


def test_dicom_reaches_the_replicas_only_through_the_load_balancer(monkeypatch):
    services = _compose()["services"]
    config = _replica_config(monkeypatch, services["node-a"]["environment"])
    assert services["dicom-lb"]["ports"] == [f"{config.scp.port}:{config.scp.port}"]
    assert all(f":{config.scp.port}" not in p for name in REPLICAS for p in services[name]["ports"])
    orthanc = services["orthanc"]["environment"]
    assert json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])["node"] == [config.scp.ae_title, "dicom-lb", config.scp.port]
    assert [c.ae_title for c in config.scp.allowed_callers] == [orthanc["ORTHANC__DICOM_AET"]]
    assert not any(c.host for c in config.scp.allowed_callers)  # behind HAProxy every caller has its address

    haproxy = (DOCKER / "haproxy.cfg").read_text()
    assert re.search(rf"^\s*bind :{config.scp.port}$", haproxy, re.M)
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)", haproxy, re.M)
    assert [(name, host, int(port)) for name, host, port in servers] == [(n, n, config.scp.port) for n in REPLICAS]
    assert "balance leastconn" in haproxy and "mode tcp" in haproxy
    check = re.search(r"option httpchk GET (\S+)", haproxy).group(1)
    assert check == "/health/ready" and check in _node_routes()
    assert f"check port {config.http.port}" in haproxy and config.http.bind == "0.0.0.0"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["dicom-lb"]["volumes"]}
    assert mounted["/usr/local/etc/haproxy/haproxy.cfg"] == "./haproxy.cfg"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (not needed by the node)")
def test_haproxy_accepts_its_configuration():
    out = subprocess.run(["haproxy", "-c", "-f", str(DOCKER / "haproxy.cfg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(KUBERNETES.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _kind(kind: str, name: str) -> dict:
    return next(d for docs in _manifests().values() for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_manifest_is_listed_and_well_formed():
    manifests = _manifests()
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(manifests)
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name


def test_kubernetes_replicas_probe_the_node_and_share_the_data_volume(tmp_path, monkeypatch):
    deployment = _kind("Deployment", "dicom-node")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap = _kind("ConfigMap", "dicom-node-config")
    (tmp_path / "node.yaml").write_text(configmap["data"]["node.yaml"])
    (tmp_path / "routing.yaml").write_text(configmap["data"]["routing.yaml"])
    secret = _kind("Secret", "dicom-node")["stringData"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["DICOM_NODE_INDEX_URL"] == {"name": "dicom-node", "key": "index-url"}
    assert env["DICOM_NODE_HTTP_TOKEN"] == {"name": "dicom-node", "key": "http-token"}
    assert all("CHANGE-ME" in value for value in secret.values())  # placeholders only
    monkeypatch.setenv("DICOM_NODE_INDEX_URL", secret["index-url"])
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", secret["http-token"])
    config = load_config(tmp_path / "node.yaml")
    assert urlsplit(config.storage.effective_index_url()).scheme == "postgresql+psycopg"
    models = {p.name for p in (ROOT / "models").iterdir() if (p / "node.yaml").exists()}
    load_rules(tmp_path / "routing.yaml", models, set(config.destinations))

    assert deployment["spec"]["replicas"] >= 2
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": config.scp.port, "http": config.http.port}
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"} and path in _node_routes()
    assert pod["terminationGracePeriodSeconds"] > config.scp.timeouts.drain
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["data"] == str(config.storage.data_dir)
    data_claim = _kind("PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"])
    assert data_claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts["models"] == str(config.inference.model_repository)
    assert _kind("PodDisruptionBudget", "dicom-node")["spec"]["minAvailable"] == 1

    services = {s["metadata"]["name"]: s for docs in _manifests().values() for s in docs if s["kind"] == "Service"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert services["dicom-node-dicom"]["spec"]["selector"] == selector
    assert services["dicom-node-dicom"]["spec"]["ports"][0]["port"] == config.scp.port
    host, port = config.inference.triton.servers[0].split(":")
    triton = services[host]
    assert int(port) in [p["port"] for p in triton["spec"]["ports"]]
    triton_pod = _kind("Deployment", host)["spec"]["template"]["spec"]["containers"][0]
    assert triton_pod["resources"]["limits"]["nvidia.com/gpu"] == 1
