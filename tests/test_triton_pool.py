"""A pool of real Triton servers (the nvidia-pytriton wheel's tritonserver on CPU): requests spread
over the ready servers, move to another when one is stopped mid-run, and fail clearly when none
is left; a node with two servers keeps processing studies while one of them is stopped."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from inference.backends.base import BackendUnavailable
from inference.repository import ModelRepository
from tests.triton_server import SilentGrpcProxy, TritonCpuServer, free_abandoned_regions
from node.config import NodeConfig, TritonConfig
from node.jobs.backends import BackendCache
from tests.peers import free_port, storescu, wait_for
from tests.test_jobs import pair, sphere_study, wait_results  # noqa: F401 (pair: a fixture)

BATCH = np.random.default_rng(3).random((1, 1, 16, 20, 24), dtype=np.float32)


@pytest.fixture
def second_triton(model_repository: Path, tmp_path: Path) -> Iterator[TritonCpuServer]:
    """Another server on the same model repository (the session's `triton` is the first)."""
    server = TritonCpuServer(model_repository, tmp_path / "triton2.log").start(timeout=120, ready_models=("threshold",))
    yield server
    server.cleanup()


def _cache(model_repository: Path, *urls: str) -> BackendCache:
    return BackendCache(ModelRepository(model_repository), TritonConfig(urls=list(urls), shared_memory="none"))


def test_requests_spread_over_the_ready_servers_with_the_local_result(model_repository, triton, second_triton):
    expected = ModelRepository(model_repository).backend("threshold").infer(BATCH)
    cache = _cache(model_repository, triton.grpc_url, second_triton.grpc_url)
    try:
        with cache.use("threshold") as pool:
            for _ in range(6):
                np.testing.assert_allclose(pool.infer(BATCH), expected, atol=1e-5)
        assert [s.requests["ok"] for s in cache.servers] == [3, 3]  # idle servers take turns
        assert all(s.up and s.outstanding == 0 for s in cache.servers)
    finally:
        cache.close()


def test_a_server_stopped_mid_run_loses_its_requests_to_the_other(model_repository, triton, second_triton, caplog):
    caplog.set_level(logging.WARNING, logger="inference.triton")
    expected = ModelRepository(model_repository).backend("threshold").infer(BATCH)
    cache = _cache(model_repository, second_triton.grpc_url, triton.grpc_url)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    answered = threading.Semaphore(0)
    gone = threading.Event()
    before_stop = 4  # requests answered by both servers before one is stopped

    def study() -> None:  # a job's requests, one after another
        try:
            with cache.use("threshold") as pool:
                for n in range(12):
                    if n == before_stop:  # the rest once the server is gone: Triton answers while it shuts down
                        assert gone.wait(300)
                    results.append(pool.infer(BATCH))
                    answered.release()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=study)
    worker.start()
    for _ in range(before_stop):
        assert answered.acquire(timeout=120)
    second_triton.stop()  # mid-run, its process ended: the next request for it finds it gone
    gone.set()
    worker.join(300)
    cache.close()

    assert not errors and len(results) == 12
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)
    stopped, alive = cache.servers
    assert (stopped.up, alive.up) == (False, True)
    assert stopped.failovers >= 1 and stopped.requests["unavailable"] >= 1
    assert stopped.requests["ok"] + alive.requests["ok"] == 12
    assert any(r.getMessage() == "triton_failover" for r in caplog.records)
    assert any(r.getMessage() == "triton_server_down" for r in caplog.records)


@pytest.mark.parametrize("silent", [{"ModelMetadata"}, {"ModelInfer"}, {"ModelInfer", "SystemSharedMemoryUnregister"}],
                         ids=["start-up", "inference", "inference and its regions"])
def test_a_server_that_takes_calls_and_answers_none_loses_its_requests_to_the_other(model_repository, triton,
                                                                                   silent, monkeypatch):
    """A server whose connection is up while it leaves a kind of call unanswered, at its start-up
    checks or at an inference (over shared memory, and then also its regions' unregistering):
    after one attempt's deadline it is marked down and its requests go to the other server, each
    with the local result (without a deadline the first of them would wait for good, holding that
    server's lock)."""
    monkeypatch.setattr("inference.backends.triton._LEFT_FOR_S", 1.0)  # (regions left: handed on until then)
    expected = ModelRepository(model_repository).backend("threshold").infer(BATCH)
    proxy = SilentGrpcProxy(triton.grpc_url, silent)
    cache = BackendCache(ModelRepository(model_repository),
                         TritonConfig(urls=[proxy.url, triton.grpc_url], shared_memory="system", timeout_s=1.0))
    results: list[np.ndarray] = []

    def study() -> None:
        with cache.use("threshold") as pool:
            results.extend(pool.infer(BATCH) for _ in range(6))

    try:
        proxy.run_and_close(study)
    finally:
        cache.close()
    assert len(results) == 6
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-5)
    silent_server, alive = cache.servers
    assert (silent_server.up, alive.up) == (False, True)
    # one attempt, then the other server (the silent one asked again only after its probe period)
    assert proxy.taken and set(proxy.taken) <= silent
    assert alive.requests["ok"] == 6 and silent_server.requests["ok"] == 0


def test_a_pool_closed_waits_for_the_backends_of_failed_servers_still_closing(model_repository, triton, monkeypatch):
    """A server that answers nothing is left at once, its backend closing on a thread of its own
    (asking the server to unregister its regions, until the deadline); a pool closed meanwhile, as
    at a node's stop, waits for that close, so the regions are unregistered, or handed on, before
    the process ends."""
    monkeypatch.setattr("inference.backends.triton._LEFT_FOR_S", 1.0)  # (the hand-on thread ends with the test)
    free_abandoned_regions(triton.grpc_url)  # (the proxy then takes only the pool's calls)
    proxy = SilentGrpcProxy(triton.grpc_url, {"ModelInfer", "SystemSharedMemoryUnregister"})
    cache = BackendCache(ModelRepository(model_repository),
                         TritonConfig(urls=[proxy.url, triton.grpc_url], shared_memory="system", timeout_s=5.0))
    try:
        with cache.use("threshold") as pool:
            for _ in range(2):  # (the first or the second goes to the silent server)
                pool.infer(BATCH)
        # the silent server's close asks it to unregister, and waits (its deadline: 5 s)
        wait_for(lambda: proxy.taken == ["ModelInfer", "SystemSharedMemoryUnregister"], timeout=30)
        closing = [t for t in threading.enumerate() if t.name == "triton-backend-close"]
        assert closing
        cache.close()
        assert not any(t.is_alive() for t in closing)
    finally:
        proxy.close()


def test_no_server_left_is_unavailable_and_names_the_servers(model_repository):
    gone = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cache = _cache(model_repository, *gone)
    with cache.use("threshold") as pool, pytest.raises(BackendUnavailable) as raised:
        pool.infer(BATCH)
    assert f"no Triton server could run threshold ({gone[0]}, {gone[1]})" in str(raised.value)
    assert [s.up for s in cache.servers] == [False, False]


def test_servers_are_named_one_way():
    with pytest.raises(ValueError, match="give either url .* or urls"):
        TritonConfig(url="127.0.0.1:8001", urls=["127.0.0.1:8002"])
    with pytest.raises(ValueError, match="urls lists a server twice"):
        TritonConfig(urls=["127.0.0.1:8001", "127.0.0.1:8001"])
    assert TritonConfig(url="127.0.0.1:8001").servers == ["127.0.0.1:8001"]
    assert NodeConfig.model_validate({"inference": {"triton": {"urls": ["a:1", "b:2"]}}}).inference.triton.servers == [
        "a:1", "b:2"]


def test_a_node_with_two_servers_completes_every_job_while_one_is_stopped(pair, triton, second_triton, tmp_path):
    node, pacs = pair(inference={"triton": {"urls": [second_triton.grpc_url, triton.grpc_url]}})
    studies = [sphere_study(tmp_path / f"s{n}", patient_id=f"P{n}") for n in range(3)]
    for n, (files, study_uid) in enumerate(studies):
        if n == 1:
            second_triton.stop()  # between jobs of a running node
        out = storescu(node.port, files)
        assert out.returncode == 0, out.stdout + out.stderr
        found = wait_results(pacs, study_uid)
        assert (len(found["SEG"]), len(found["SR"])) == (1, 1)
    wait_for(lambda: not [j for j in node.query("SELECT state FROM work_items") if j["state"] != "done"],
             timeout=60)  # results go out before the job is marked done
    with urllib.request.urlopen(node.url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert f'dicom_node_triton_server_up{{server="{triton.grpc_url}"}} 1.0' in metrics
    wait_for(lambda: len(node.events("job_done")) == 3, timeout=30)


def test_no_model_server_stops_processing_readiness_but_not_receiving(start_node, model_repository, tmp_path):
    """A load balancer asks /health/receiving: a Triton outage keeps DICOM coming in (the jobs wait)."""
    from tests.test_jobs import ROUTING

    gone = f"127.0.0.1:{free_port()}"
    node = start_node(routing=ROUTING, inference={"model_repository": str(model_repository),
                                                  "triton": {"urls": [gone]}},
                      destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})

    def health(path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(node.url + path, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, ready = health("/health/ready")
    assert status == 503 and any(r.startswith("model threshold unavailable") for r in ready["reasons"])
    status, receiving = health("/health/receiving")
    assert (status, receiving["ready"]) == (200, True)
    assert set(receiving["checks"]) == {"receiver", "index", "disk"}
    out = storescu(node.port, sphere_study(tmp_path / "study", patient_id="R1")[0])
    assert out.returncode == 0, out.stdout + out.stderr


class HungServer:
    """A "server" that accepts connections and never answers (a hung or blackholed Triton: the worst
    case for a probe, which waits for its whole timeout). Records when each connection opens."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[list[float | None]] = []  # [opened, closed by the client]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                record: list[float | None] = [time.monotonic(), None]
                self.connections.append(record)
            threading.Thread(target=self._hold, args=(conn, record), daemon=True).start()

    def _hold(self, conn: socket.socket, record: list[float | None]) -> None:
        try:
            while conn.recv(65536):  # read what the client sends; answer nothing
                pass
        except OSError:
            pass
        record[1] = time.monotonic()
        conn.close()

    def opened(self) -> int:
        with self._lock:
            return len(self.connections)

    def close(self) -> None:
        self.listener.close()


def test_readiness_probes_the_pool_in_parallel_and_caches_it_with_servers_down(start_node, model_repository,
                                                                                triton, tmp_path):
    """A pool where one server refuses connections and two hang: /health/ready still counts the model
    ready (one server has it). The servers are probed at the same time, not one after another, and
    a call within the cache period asks no server at all; the latencies are printed."""
    from node.console.health import MODEL_CACHE_S, PROBE_TIMEOUT_S
    from tests.test_jobs import ROUTING

    refused = f"127.0.0.1:{free_port()}"  # nobody listens there
    hung = [HungServer(), HungServer()]
    try:
        node = start_node(routing=ROUTING, inference={
            "model_repository": str(model_repository),
            "triton": {"urls": [refused, hung[0].url, hung[1].url, triton.grpc_url]}},
            destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})

        def ready() -> tuple[int, dict, float]:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(node.url + "/health/ready", timeout=30) as response:
                    status, body = response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                status, body = exc.code, json.loads(exc.read())
            return status, body, time.monotonic() - started

        first = ready()  # nothing cached yet: this call waits for the probe
        assert first[:2] == (200, {"ready": True, "reasons": [], "checks": first[1]["checks"]}), first
        assert first[1]["checks"]["model:threshold"] is True
        opened = [h.opened() for h in hung]
        assert all(n >= 1 for n in opened), opened  # the hung servers were asked, at the same time:
        # one after the other, the second would be asked only once the first probe gave up, a whole
        # probe timeout later (the half is slack for a busy machine, not a speed requirement)
        gap = abs(hung[1].connections[0][0] - hung[0].connections[0][0])  # type: ignore[operator]
        assert gap < PROBE_TIMEOUT_S / 2, f"the servers were probed {gap:.2f} s apart: one after the other"

        second = ready()  # within the cache period: the same answer, and no server is asked again
        assert second[:2] == first[:2]
        assert [h.opened() for h in hung] == opened

        time.sleep(MODEL_CACHE_S + 0.2)
        third = ready()  # past it: answered from the last probe while a new one runs in the background
        assert third[:2] == first[:2]
        wait_for(lambda: all(h.opened() > n for h, n in zip(hung, opened)), timeout=30)
        print(f"\n/health/ready with 1 refusing and 2 hung servers of 4 (probe timeout {PROBE_TIMEOUT_S} s): "
              f"first call {first[2] * 1000:.0f} ms (probes), cached {second[2] * 1000:.0f} ms, "
              f"stale while re-probing {third[2] * 1000:.0f} ms")
    finally:
        for server in hung:
            server.close()
