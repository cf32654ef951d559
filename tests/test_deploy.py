"""The scale-out deployments, checked without a Docker engine or a cluster: the replicas compose
file, HAProxy's configuration and the Kubernetes manifests must agree with the node's
configuration, with each other and with the health endpoints the node serves."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import MagicMock
from urllib.parse import urlsplit

import pytest
import yaml

from common.yamlfile import ConfigError
from inference.repository import ModelRepository
from node.config import load_config
from node.receive.workers import ReceiverPool
from node.route.rules import load_rules
from node.store.index import Index

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
KUBERNETES = ROOT / "deploy" / "kubernetes"
REPLICAS = ("node-a", "node-b")
MODELS = ModelRepository(ROOT / "models").catalog()  # what the image's /models holds (docker/Dockerfile)
# The most connections one node process opens (the service; a receiver opens fewer).
CONNECTIONS_PER_PROCESS = inspect.signature(Index.__init__).parameters["connections"].default


def _node_routes() -> set[str]:
    """The paths the node's console serves to a caller without the token (a probe, HAProxy's
    check): routes of the real app that depend on nothing (no token check)."""
    from node.console.app import create_app

    app = create_app(MagicMock())
    return {route.path for route in app.routes if hasattr(route, "dependant") and not route.dependant.dependencies}


def _seconds(value: str) -> float:
    """An HAProxy duration (10s, 15m, 500ms, 1h)."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[unit]


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.replicas.yml").read_text())


def _replica_config(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], name: str = "node.replicas.yaml"):
    """A compose node's configuration (node.replicas.yaml: a replica's) as it reads it, with the
    environment compose gives it."""
    for key, value in environment.items():
        monkeypatch.setenv(key, re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"<{m.group(1)}>", value))
    return load_config(DOCKER / name)


def test_replicas_share_one_index_one_data_volume_and_one_configuration(monkeypatch):
    compose = _compose()
    services = compose["services"]
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
    # ... but not the single node's volume: both compose files are in docker/, whose name would be
    # the project name of each, and the replicas would take over that node's spool
    assert compose["name"] not in (DOCKER.name, yaml.safe_load((DOCKER / "docker-compose.yml").read_text()).get("name"))
    for name in REPLICAS:
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # every process of every replica has connections of its own; receivers counted per replica,
    # not per core of the host
    assert config.scp.workers > 0
    command = services["postgres"]["command"]
    max_connections = int(command[command.index("-c") + 1].removeprefix("max_connections="))
    assert max_connections >= len(REPLICAS) * (config.scp.workers + 1) * CONNECTIONS_PER_PROCESS
    # every replica's console on the host's loopback only, each on its own port
    published = [services[name]["ports"] for name in REPLICAS]
    assert published == [[f"127.0.0.1:8081:{config.http.port}"], [f"127.0.0.1:8082:{config.http.port}"]]
    # the Triton pool names the compose service
    host, port = config.inference.triton.servers[0].split(":")
    assert host == "triton" and port in services["triton"]["expose"]
    # the routing the replicas load uses the shipped model and the configured PACS
    monkeypatch.chdir(DOCKER)
    load_rules(DOCKER / config.pipeline.routing_file, MODELS, set(config.destinations))


def test_dicom_reaches_the_replicas_only_through_the_load_balancer(monkeypatch):
    services = _compose()["services"]
    config = _replica_config(monkeypatch, services["node-a"]["environment"])
    assert services["dicom-lb"]["ports"] == [f"{config.scp.port}:{config.scp.port}"]
    assert all(f":{config.scp.port}" not in p for name in REPLICAS for p in services[name]["ports"])
    # HAProxy checks the replicas itself: it must not wait for both to be healthy to open DICOM
    assert services["dicom-lb"]["depends_on"] == {n: {"condition": "service_started"} for n in REPLICAS}
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
    assert check == "/health/receiving" and check in _node_routes()
    assert f"check port {config.http.port}" in haproxy and config.http.bind == "0.0.0.0"
    # a connection refused by a stopping replica goes to the other one
    assert "option redispatch" in haproxy and int(re.search(r"^\s*retries (\d+)", haproxy, re.M).group(1)) >= 1
    timeouts = {k: _seconds(v) for k, v in re.findall(r"^\s*timeout (\w+) (\S+)$", haproxy, re.M)}
    # the node, not the proxy, ends idle associations (with an A-ABORT the sender understands)
    assert min(timeouts["client"], timeouts["server"]) > config.scp.timeouts.network
    assert timeouts["check"] >= 2  # the node answers it from its own state
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["dicom-lb"]["volumes"]}
    assert mounted["/usr/local/etc/haproxy/haproxy.cfg"] == "./haproxy.cfg"


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (not needed by the node)")
def test_haproxy_accepts_its_configuration():
    out = subprocess.run(["haproxy", "-c", "-f", str(DOCKER / "haproxy.cfg")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _get(app, path: str) -> int:
    """The status of a GET with no credentials from another host, straight through the ASGI app."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [], "root_path": "",
             "client": ("10.1.2.3", 40000), "server": ("10.1.2.4", 8080)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_the_health_endpoints_answer_without_the_token():
    """What HAProxy and the kubelet send carries no token, to a console bound beyond loopback."""
    from node.console.app import create_app

    assert {"/health/live", "/health/ready", "/health/receiving"} <= _node_routes()
    ctx = MagicMock()
    ctx.config.http.on_loopback.return_value = False
    ctx.config.http.effective_token.return_value = "a-token-the-probes-do-not-have"
    app = create_app(ctx)
    assert _get(app, "/health/live") == 200
    assert _get(app, "/api/summary") == 401  # the same request elsewhere needs the token


def _manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(KUBERNETES.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _kind(kind: str, name: str) -> dict:
    return next(d for docs in _manifests().values() for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _kustomization() -> dict:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def _secret_template() -> dict[str, str]:
    lines = (KUBERNETES / "secrets.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_every_manifest_is_listed_and_well_formed():
    manifests = _manifests()
    assert sorted(_kustomization()["resources"]) == sorted(manifests)
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
            assert "namespace" not in doc["metadata"], name  # the namespace is the caller's choice


def test_the_secret_is_generated_from_an_ignored_file_and_the_template_holds_placeholders_only():
    (generator,) = _kustomization()["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    assert "secrets.env" in (KUBERNETES / ".gitignore").read_text().splitlines()
    template = _secret_template()
    assert template and all("REPLACE-ME" in value for value in template.values())
    # the keys the node reads are exactly the template's
    (container,) = _kind("Deployment", "dicom-node")["spec"]["template"]["spec"]["containers"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"]]
    assert {r["name"] for r in refs} == {generator["name"]} and {r["key"] for r in refs} == set(template)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (its kustomize renders the folder)")
def test_kustomize_renders_the_folder_only_with_real_secrets(tmp_path):
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder, ignore=shutil.ignore_patterns("secrets.env"))
    build = ["kubectl", "kustomize", str(folder)]
    missing = subprocess.run(build, capture_output=True, text=True)
    assert missing.returncode != 0 and "secrets.env" in missing.stderr  # placeholders never applied
    shutil.copy(folder / "secrets.env.example", folder / "secrets.env")
    out = subprocess.run(build, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    refs = [env["valueFrom"]["secretKeyRef"] for o in objects if o["kind"] == "Deployment"
            for c in o["spec"]["template"]["spec"]["containers"] for env in c.get("env", [])]
    # kustomize renamed the Secret (hash of its values) and every reference with it
    assert refs and all(r["name"] == secret["metadata"]["name"] != "dicom-node" and r["key"] in secret["data"] for r in refs)


def _k8s_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    configmap = _kind("ConfigMap", "dicom-node-config")
    for name in ("node.yaml", "routing.yaml"):
        (tmp_path / name).write_text(configmap["data"][name])
    template = _secret_template()
    monkeypatch.setenv("DICOM_NODE_INDEX_URL", template["index-url"])
    # the template's placeholder token is refused (too short), so no one deploys it by mistake
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", template["http-token"])
    with pytest.raises(ConfigError, match="DICOM_NODE_HTTP_TOKEN: has 10 characters; a token needs at least 16"):
        load_config(tmp_path / "node.yaml")
    monkeypatch.setenv("DICOM_NODE_HTTP_TOKEN", "a-real-token-0123456789")
    return load_config(tmp_path / "node.yaml")


def test_kubernetes_replicas_probe_the_node_and_share_the_data_volume(tmp_path, monkeypatch):
    deployment = _kind("Deployment", "dicom-node")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _k8s_config(tmp_path, monkeypatch)
    assert urlsplit(config.storage.effective_index_url()).scheme == "postgresql+psycopg"
    load_rules(tmp_path / "routing.yaml", MODELS, set(config.destinations))

    assert deployment["spec"]["replicas"] >= 2
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": config.scp.port, "http": config.http.port}
    # readiness for the DICOM Service is receiving: a Triton outage must not stop intake
    for probe, path in (("readinessProbe", "/health/receiving"), ("livenessProbe", "/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"} and path in _node_routes()
    # receivers per requested CPU, not per core of the host the pod lands on
    assert config.scp.workers == 2 * int(container["resources"]["requests"]["cpu"])
    # the kubelet only starts a runAsNonRoot pod whose user it knows by number: the image's
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (DOCKER / "Dockerfile").read_text()).group(1))
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["data"] == str(config.storage.data_dir)
    data_claim = _kind("PersistentVolumeClaim", volumes["data"]["persistentVolumeClaim"]["claimName"])
    assert data_claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # the models are the image's (nothing mounted over them)
    assert "COPY models/ /models/" in (DOCKER / "Dockerfile").read_text()
    assert str(config.inference.model_repository) == "/models" and "/models" not in mounts.values()
    assert volumes["config"]["configMap"]["name"] == "dicom-node-config" and mounts["config"] == "/etc/dicom-node"
    assert _kind("PodDisruptionBudget", "dicom-node")["spec"]["minAvailable"] == 1

    services = {s["metadata"]["name"]: s for docs in _manifests().values() for s in docs if s["kind"] == "Service"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert services["dicom-node-dicom"]["spec"]["selector"] == selector
    assert services["dicom-node-dicom"]["spec"]["ports"][0]["port"] == config.scp.port
    assert services["dicom-node-http"]["spec"]["ports"][0]["targetPort"] == "http"


def _drain_command() -> tuple[list[str], dict[str, float]]:
    (container,) = _kind("Deployment", "dicom-node")["spec"]["template"]["spec"]["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    options = dict(zip(command[2::2], map(float, command[3::2])))
    return command, options


def test_a_stopping_pod_keeps_its_associations_until_they_end(tmp_path, monkeypatch):
    """The node aborts open associations at SIGTERM; the preStop waits for them first, within the
    grace period, and long enough for the load balancer to stop sending new ones."""
    config = _k8s_config(tmp_path, monkeypatch)
    pod = _kind("Deployment", "dicom-node")["spec"]["template"]["spec"]
    command, options = _drain_command()
    assert command[:2] == ["python", "/etc/dicom-node/drain.py"]
    assert "drain.py" in _kind("ConfigMap", "dicom-node-config")["data"]
    assert options["--port"] == config.scp.port
    assert options["--max"] == config.scp.timeouts.drain  # as long as a reload lets associations finish
    stop_grace = inspect.signature(ReceiverPool.stop).parameters["grace"].default
    assert pod["terminationGracePeriodSeconds"] >= options["--max"] + stop_grace
    assert options["--settle"] >= 10


@pytest.mark.parametrize("compose_file", ["docker-compose.yml", "docker-compose.replicas.yml"])
def test_docker_stop_waits_for_the_nodes_drain(compose_file, monkeypatch):
    """`docker compose stop` sends SIGTERM, then SIGKILL after stop_grace_period: long enough for
    the node's own drain (scp.timeouts.drain) and its grace."""
    services = yaml.safe_load((DOCKER / compose_file).read_text())["services"]
    nodes = {name: s for name, s in services.items() if "dicom-node" in str(s.get("volumes", []))}
    assert nodes
    stop_grace = inspect.signature(ReceiverPool.stop).parameters["grace"].default
    for name, service in nodes.items():
        mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        with monkeypatch.context() as env:
            config = _replica_config(env, service.get("environment", {}),
                                     mounted["/etc/dicom-node/node.yaml"].removeprefix("./"))
        assert _seconds(service["stop_grace_period"]) >= config.scp.timeouts.drain + stop_grace, name


def _run_drain(script: Path, port: int, settle: float, most: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), "--port", str(port), "--settle", str(settle),
                             "--max", str(most)])


def test_the_drain_script_waits_for_open_connections_on_the_dicom_port_only(tmp_path):
    """drain.py as shipped, on this machine's TCP table: a connection to the port holds it; one
    closed, or to another port, does not; --max bounds the wait."""
    script = tmp_path / "drain.py"
    script.write_text(_kind("ConfigMap", "dicom-node-config")["data"]["drain.py"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    try:
        drain = _run_drain(script, port, 0, 60)
        time.sleep(2)
        assert drain.poll() is None  # an association is still open
        accepted.close()  # the node's side closes first: its socket lingers in TIME_WAIT, which holds nothing
        client.close()
        assert drain.wait(10) == 0
        started = time.monotonic()
        assert _run_drain(script, port, 1, 60).wait(10) == 0  # nothing open: only the settle time
        assert 1 <= time.monotonic() - started < 5

        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        started = time.monotonic()
        assert _run_drain(script, port + 1 if port < 65535 else port - 1, 0, 60).wait(10) == 0  # another port
        assert _run_drain(script, port, 0, 1.5).wait(10) == 0  # still open: gives up at --max
        assert time.monotonic() - started >= 1.5
    finally:
        client.close()
        accepted.close()
        listener.close()


def test_triton_servers_are_the_pool_the_nodes_name(tmp_path, monkeypatch):
    config = _k8s_config(tmp_path, monkeypatch)
    statefulset = _kind("StatefulSet", "dicom-node-triton")
    service = _kind("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # a name per pod: the node balances, not a virtual IP
    template = statefulset["spec"]["template"]
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"] == template["metadata"]["labels"]
    (triton,) = template["spec"]["containers"]
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "grpc")
    assert grpc in [p["containerPort"] for p in triton["ports"] if p["name"] == "grpc"]
    name = statefulset["metadata"]["name"]
    assert config.inference.triton.protocol == "grpc"
    assert config.inference.triton.servers == [
        f"{name}-{n}.{service['metadata']['name']}:{grpc}" for n in range(statefulset["spec"]["replicas"])]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Triton serves the repository the nodes' image holds: copied from that image into its volume
    (copy,) = template["spec"]["initContainers"]
    (node,) = _kind("Deployment", "dicom-node")["spec"]["template"]["spec"]["containers"]
    assert copy["image"] == node["image"]
    assert copy["command"][-2:] == [f"{config.inference.model_repository}/.", copy["volumeMounts"][0]["mountPath"] + "/"]
    served = next(a.split("=", 1)[1] for a in triton["args"] if a.startswith("--model-repository="))
    assert {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}[copy["volumeMounts"][0]["name"]] == served
