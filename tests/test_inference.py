"""Inference: backends against the real Triton server, and DICOM geometry end to end."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
import torch
from pydantic import ValidationError
from pydicom.uid import generate_uid

from inference.backends.base import BackendError, BackendUnavailable
from inference.backends.local import LocalBackend
from inference.backends.triton import TritonBackend
from tritonclient.utils import InferenceServerException
from inference.export.repository import ExportMismatch, export_onnx, write_entry
from inference.pipeline import segment
from tests.triton_server import SilentGrpcProxy, SilentHttpPeer, TritonCpuServer, free_abandoned_regions
from inference.volume import SeriesError, load_series, read_series
from monai.data import MetaTensor
from tests.models import REPO_MODELS, THRESHOLD_HU, WINDOW, ThresholdNet, threshold_spec
from tests.peers import proc_stat, wait_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from phantom.generator import Ellipsoid, Phantom

CENTRE = (3.2, -5.1, 12.7)
RADIUS = 14.0


def _local(repo: Path) -> LocalBackend:
    return LocalBackend(repo / "threshold" / "1" / "model.onnx", threshold_spec())


# -- backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("shared_memory", ["none", "system"])
def test_triton_matches_local_backend(model_repository, triton, protocol, shared_memory):
    batch = np.random.default_rng(1).random((3, 1, 20, 24, 28), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    backend = TritonBackend(url, threshold_spec(), protocol=protocol, shared_memory=shared_memory)
    try:
        got = backend.infer(batch)
        assert got.shape == expected.shape == (3, 2, 20, 24, 28)
        assert got.flags.writeable  # the caller's own: the sliding window weights it in place
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert backend.use_shm is (shared_memory == "system")
    finally:
        backend.close()


def test_triton_wrong_model_name(triton):
    with pytest.raises(BackendError, match=r"model 'nosuchmodel' version 1 is not ready on Triton .*models there: .*threshold"):
        TritonBackend(triton.grpc_url, threshold_spec(name="nosuchmodel"))


def test_triton_spec_disagrees_with_server(triton):
    spec = threshold_spec(output={"name": "probabilities", "dtype": "FP32"})
    with pytest.raises(BackendError, match=r"Triton has no output named 'probabilities' \(it has \['logits'\]\)"):
        TritonBackend(triton.grpc_url, spec)
    spec = threshold_spec(input={"name": "image", "dtype": "FP16"})
    with pytest.raises(BackendError, match=r"input 'image' is FP32 on Triton, the spec says FP16"):
        TritonBackend(triton.http_url, spec, protocol="http")


def test_triton_wrong_shape_is_a_clear_error(triton):
    backend = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="none")
    try:
        with pytest.raises(BackendError, match=r"Triton rejected model threshold on input \[1, 2, 8, 8, 8\]"):
            backend.infer(np.zeros((1, 2, 8, 8, 8), dtype=np.float32))
    finally:
        backend.close()


class _HalvingNet(ThresholdNet):
    """The threshold model's logits at half their input's size: a model whose output is not its
    spec's (windows, channels, *window)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool3d(super().forward(x), 2)


class _DoublingNet(ThresholdNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(super().forward(x), scale_factor=2.0, mode="nearest")


class _HalfNet(ThresholdNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).half()


class _TissueNet(torch.nn.Module):
    """Logits for (air, body, bright): body above -480 HU, bright above the threshold model's 270
    HU. A network with a class a spec may leave unnamed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body, bright = ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) for hu in (-480.0, THRESHOLD_HU))
        # bright's logit overtakes body's at its own level, the background's half-way to it
        return torch.cat([torch.zeros_like(x), (x - body) * 200.0, (x - (body + bright) / 2) * 400.0], dim=1)


def _tissue_spec(values: list[int], mode: str = "argmax", spacing: list[float] | None = None, **output: object):
    """The tissue network's spec naming the labels of `values` (1 body, 2 bright)."""
    label = threshold_spec().model_dump()["labels"][0]
    names = {1: "Body", 2: "Bright region"}
    return threshold_spec(name="tissue", output={"name": "logits", **output},
                          preprocessing={**threshold_spec().model_dump()["preprocessing"], "spacing": spacing},
                          labels=[{**label, "value": value, "name": names[value]} for value in values],
                          postprocessing={"mode": mode, "findings": "per_component"})


def _raw(probabilities: np.ndarray, activation: str) -> torch.Tensor:
    """A model's raw outputs whose `activation` gives `probabilities` (to float32 rounding): what the
    way back to the source grid is given."""
    clipped = np.clip(probabilities, 1e-30, 1 - 1e-7)
    raw = {"softmax": np.log(clipped), "sigmoid": np.log(clipped / (1 - clipped)), "none": probabilities}[activation]
    return torch.from_numpy(np.asarray(raw, dtype=np.float32))


@pytest.fixture(scope="module")
def odd_triton(tmp_path_factory: pytest.TempPathFactory):
    """A Triton of its own serving networks whose outputs are not the threshold model's: halving
    and doubling its input, in FP16, and with a class more (tissue)."""
    folder = tmp_path_factory.mktemp("odd-triton")
    half = threshold_spec(name="half", output={"name": "logits", "dtype": "FP16"})
    for spec, network in ((threshold_spec(name="halving"), _HalvingNet()), (threshold_spec(name="doubling"),
                                                                               _DoublingNet()), (half, _HalfNet()),
                          (_tissue_spec([1, 2]), _TissueNet())):
        onnx = folder / f"{spec.name}.onnx"
        export_onnx(network, onnx, spec, (16, 16, 16))
        write_entry(folder / "repo", spec, onnx)
    server = TritonCpuServer(folder / "repo", folder / "triton.log").start(
        ready_models=("halving", "doubling", "half", "tissue"))
    try:
        yield server, folder / "repo"
    finally:
        server.cleanup()


def test_a_mis_sized_output_over_triton_shared_memory_comes_back_in_the_shape_triton_reports(odd_triton):
    """Over shared memory the node reads the output out of its own region: one smaller than the
    spec implies comes back in its real shape (not the implied one, its rest from an earlier
    call), so the pipeline's check names it as over the socket; one larger is the model's error
    and says so (it was once taken for a restarted server, whose regions are made anew); an FP16
    output comes back as FP16 (it was read as float32)."""
    server, repo = odd_triton
    half = threshold_spec(name="half", output={"name": "logits", "dtype": "FP16"})
    batch = np.random.default_rng(7).random((2, 1, 16, 16, 16), dtype=np.float32)
    halving = LocalBackend(repo / "halving" / "1" / "model.onnx", threshold_spec(name="halving"))
    expected = halving.infer(batch)
    for url, protocol in ((server.grpc_url, "grpc"), (server.http_url, "http")):
        backend = TritonBackend(url, threshold_spec(name="halving"), protocol=protocol, shared_memory="system")
        try:
            assert backend.use_shm
            backend.infer(np.ones((2, 1, 16, 16, 16), dtype=np.float32))  # the region's bytes, another answer
            got = backend.infer(batch)
            assert got.shape == expected.shape == (2, 2, 8, 8, 8)
            np.testing.assert_allclose(got, expected, atol=1e-5)
        finally:
            backend.close()
        backend = TritonBackend(url, half, protocol=protocol, shared_memory="system")
        try:  # an FP16 output: as many bytes as it has, read as the socket gives it
            got = backend.infer(batch)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, LocalBackend(repo / "half" / "1" / "model.onnx", half).infer(batch))
        finally:
            backend.close()
        backend = TritonBackend(url, threshold_spec(name="doubling"), protocol=protocol, shared_memory="system",
                                retries=2, backoff=0.01)
        try:
            with pytest.raises(BackendError, match=r"Triton rejected model doubling on input \[2, 1, 16, 16, 16\]:"
                               r" .*should be at least 524288 bytes.* \(its spec implies an output of"
                               r" \[2, 2, 16, 16, 16\]\)") as failure:
                backend.infer(batch)
            assert not isinstance(failure.value, BackendUnavailable)
        finally:
            backend.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_that_lost_the_nodes_shared_memory_regions_is_unavailable_until_they_are_made_anew(triton, protocol):
    """A restarted Triton knows none of the node's regions: the call is a transient failure (the
    job retries) and the next one registers them again. Made real by unregistering one behind
    the backend's back."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    backend = TritonBackend(url, threshold_spec(), protocol=protocol, shared_memory="system")
    batch = np.random.default_rng(8).random((1, 1, 16, 16, 16), dtype=np.float32)
    try:
        expected = backend.infer(batch)
        for role in ("in", "out"):
            backend._unregister(role)  # (as the backend does: once the answered request lets the region go)
            with pytest.raises(BackendUnavailable, match=r"no longer has this node's shared-memory regions"):
                backend.infer(batch)
            np.testing.assert_array_equal(backend.infer(batch), expected)
    finally:
        backend.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_region_the_server_still_holds_is_unregistered_once_it_lets_go(triton, protocol, monkeypatch, caplog):
    """Triton (since 2.50) refuses to unregister a region a request still holds, and its answer can
    reach the node before the request lets go (server issue #7688; met in CI right after an
    inference). A region grown for a larger batch, and the regions of a closed backend, are
    unregistered once the hold ends: the larger batch gets its answer and the server keeps none of
    the node's regions. A hold that outlasts the wait is a transient failure (the job retries), and
    a closed backend whose regions the server still holds says which it leaves, and unregisters
    them later, on a thread of its own, once the hold has ended. The refusals are Triton's own text
    from a shim on the backend's client, as the race cannot be made to happen at will."""
    caplog.set_level(logging.INFO, logger="inference.triton")
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    larger = np.random.default_rng(9).random((2, 1, 16, 16, 16), dtype=np.float32)
    for holds in (2, None):  # refused twice; refused for as long as it is asked
        backend = TritonBackend(url, threshold_spec(), protocol=protocol, shared_memory="system", retries=2,
                                backoff=0.01)
        real, refused = backend._ctl.unregister_system_shared_memory, Counter()

        def held(name: str, *args, **kwargs):
            if holds is None or refused[name] < holds:
                refused[name] += 1
                raise InferenceServerException(f"Cannot unregister shared memory region '{name}', it is currently"
                                               " in use.", status="StatusCode.INTERNAL")
            return real(name, *args, **kwargs)

        backend._ctl.unregister_system_shared_memory = held
        names = {backend._name(role) for role in ("in", "out")}
        try:
            backend.infer(np.zeros((1, 1, 16, 16, 16), np.float32))
            if holds is None:
                monkeypatch.setattr("inference.backends.triton._REGION_BUSY_WAIT", 0.05)
                with pytest.raises(BackendUnavailable, match=r"unavailable for inference after 2 attempts: .*still held"
                                                             r" by a request after 0.05 s: .*currently in use"):
                    backend.infer(larger)
            else:
                logits = backend.infer(larger)[:, 1]
                np.testing.assert_allclose(logits, (larger[:, 0] - ThresholdNet().level) * 200.0, rtol=1e-5,
                                           atol=1e-3)
                assert refused == {name: 2 for name in names}
                refused.clear()
                grown = {backend._name(role) for role in ("in", "out")}
                assert not grown & names  # (a region's name is never used twice)
                names = grown
        finally:
            backend.close()
        if holds:
            assert refused == {name: 2 for name in names}
        else:
            assert _logged_regions(caplog, "triton_region_left") == names
            wait_for(lambda: not names & _registered_regions(url, protocol), timeout=60)  # later, by the thread
            assert _logged_regions(caplog, "triton_region_freed") == names
        assert not names & _registered_regions(url, protocol)


def _logged_regions(caplog: pytest.LogCaptureFixture, event: str) -> set[str]:
    """The regions named by the backend's `event` log records so far."""
    return {r.event_fields["region"] for r in caplog.records if r.getMessage() == event}


def _registered_regions(url: str, protocol: str, forget: tuple[str, ...] | set[str] = ()) -> set[str]:
    """The names of the system shared-memory regions the server has registered (then those of
    `forget` unregistered)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    client = client_lib.InferenceServerClient(url)
    try:
        status = client.get_system_shared_memory_status(**({"as_json": True} if protocol == "grpc" else {}))
        for name in forget:
            client.unregister_system_shared_memory(name)
    finally:
        client.close()
    regions = status.get("regions", {}).values() if protocol == "grpc" else status
    return {region["name"] for region in regions}


_CALLS = ("ServerReady", "ModelReady", "RepositoryIndex", "ModelMetadata", "SystemSharedMemoryRegister",
          "SystemSharedMemoryStatus", "ModelInfer", "SystemSharedMemoryUnregister")


@pytest.mark.parametrize("silent", _CALLS)
def test_a_triton_that_takes_a_call_and_never_answers_it_holds_no_job_for_good(triton, silent, caplog, monkeypatch):
    """A server whose connection is up and which leaves one kind of call unanswered (a hung Triton,
    a proxy that lost its upstream): every call has a deadline, so the backend's start-up checks,
    an inference on shared memory and its close each end, the unanswered call taken once per
    attempt (the repository's index is asked for a model the server does not have ready). A start
    or an inference is then unavailable (the job waits and retries), naming the call and the
    deadline; a close leaves the server its regions, says which, and frees its own. The regions'
    status, read once to free those of nodes gone, is only logged as unread: the job goes on."""
    caplog.set_level(logging.WARNING, logger="inference.triton")
    monkeypatch.setattr("inference.backends.triton._LEFT_FOR_S", 1.0)  # (regions left: handed on until then)
    free_abandoned_regions(triton.grpc_url)  # (the proxy then takes only this backend's calls)
    proxy = SilentGrpcProxy(triton.grpc_url, {silent})
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            spec = threshold_spec(name="nosuchmodel") if silent == "RepositoryIndex" else threshold_spec()
            backend = TritonBackend(proxy.url, spec, shared_memory="system", timeout=0.5, retries=2, backoff=0.01)
            outcome["prefix"] = backend._prefix
            try:
                outcome["logits"] = backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))[:, 1]
                outcome["names"] = {backend._name(role) for role in ("in", "out")}
            finally:
                backend.close()
        except BaseException as exc:
            outcome["error"] = exc

    proxy.run_and_close(job)
    left = _logged_regions(caplog, "triton_region_left")
    unread = [r.event_fields["error"] for r in caplog.records if r.getMessage() == "triton_regions_unread"]
    if silent in ("SystemSharedMemoryUnregister", "SystemSharedMemoryStatus"):
        assert "error" not in outcome, outcome
        np.testing.assert_allclose(outcome["logits"], (0.0 - ThresholdNet().level) * 200.0, rtol=1e-5)
        assert proxy.taken == [silent]
        names = outcome["names"]
        if silent == "SystemSharedMemoryUnregister":  # at the close: the first region asked for, not the second then
            assert left == names and not unread
            assert names <= _registered_regions(triton.grpc_url, "grpc", forget=names)  # the server kept them
        else:
            assert unread == ["[StatusCode.DEADLINE_EXCEEDED] Deadline Exceeded"] and not left
            assert not names & _registered_regions(triton.grpc_url, "grpc")
    else:
        what = {"ServerReady": "server readiness", "ModelReady": "model readiness",
                "RepositoryIndex": "repository index", "ModelMetadata": "model metadata"}.get(silent, "inference")
        assert isinstance(outcome.get("error"), BackendUnavailable), outcome
        assert re.fullmatch(rf"Triton at {proxy.url} unavailable for {what} after 2 attempts: "
                            r"\[StatusCode.DEADLINE_EXCEEDED\] Deadline Exceeded", str(outcome["error"]))
        assert proxy.taken == [silent] * 2 and not left and not unread
    assert not list(Path("/dev/shm").glob(f"{outcome.get('prefix', 'dicom-node-none')}*"))  # freed here


def test_an_http_triton_that_answers_nothing_holds_a_start_up_check_no_longer_than_its_deadline(monkeypatch):
    """Over HTTP a call's timeout is its client's: a server whose connection is up while it answers
    nothing held each start-up check for the inferences' timeout (120 s by default, 300 s here) an
    attempt. The checks have a client of their own, whose calls have the deadline of every call
    that is not an inference (10 s; 2 s here): the start is unavailable after two attempts, each a
    readiness request the server took."""
    monkeypatch.setattr("inference.backends.triton.CONTROL_TIMEOUT_S", 2.0)
    peer = SilentHttpPeer()
    outcome: dict[str, object] = {}

    def start() -> None:
        try:
            TritonBackend(peer.url, threshold_spec(), protocol="http", timeout=300.0, retries=2, backoff=0.01)
        except BaseException as exc:
            outcome["error"] = exc

    peer.run_and_close(start)
    assert isinstance(outcome.get("error"), BackendUnavailable), outcome
    assert str(outcome["error"]) == f"Triton at {peer.url} unavailable for server readiness after 2 attempts: timed out"
    assert peer.taken == ["GET /v2/health/ready HTTP/1.1"] * 2


def test_a_region_registered_by_a_call_whose_answer_was_lost_is_used_not_registered_again(model_repository,
                                                                                          triton):
    """The server registered the input's region, but its answer never came (the call timed out):
    the next attempt uses the region as it is, where registering the name again would be refused
    for good (ALREADY_EXISTS) and fail the job. The inference gives the local result, and the
    close leaves the server none of the node's regions."""
    batch = np.random.default_rng(4).random((1, 1, 12, 12, 12), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    proxy = SilentGrpcProxy(triton.grpc_url, {"SystemSharedMemoryRegister"}, done_first=True, times=1)
    try:
        backend = TritonBackend(proxy.url, threshold_spec(), shared_memory="system", timeout=0.5, retries=2,
                                backoff=0.01)
        names = {backend._name(role) for role in ("in", "out")}
        try:
            np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-5)
            assert proxy.taken == ["SystemSharedMemoryRegister"]
            assert names <= _registered_regions(triton.grpc_url, "grpc")
        finally:
            backend.close()
    finally:
        proxy.close()
    assert not names & _registered_regions(triton.grpc_url, "grpc")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_region_whose_registration_is_refused_is_never_used(triton, protocol):
    """The server refuses to register the input's region: it holds that name already, for other
    memory (here a decoy of ones; a backend never registers a name twice, so not one of its own).
    The inference is unavailable, naming the refusal, and nothing of the backend's stays in
    /dev/shm; the next one, on a region of a new name, gives the model's answer to its own input,
    never to the decoy's values (as a region kept after the refusal would). The decoy is not the
    backend's to unregister: it stays, although its name is a node's, as its object is not."""
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    backend = TritonBackend(url, threshold_spec(), protocol=protocol, shared_memory="system", retries=2, backoff=0.01)
    name = backend._name("in")
    decoy = shm.create_shared_memory_region("decoy", "/decoy-input", 1 << 16)
    shm.set_shared_memory_region(decoy, [np.ones((1, 1, 8, 8, 8), np.float32)])
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.register_system_shared_memory(name, "/decoy-input", 1 << 16)
    try:
        with pytest.raises(BackendUnavailable, match=rf"already has a shared-memory region named {name}: a new"):
            backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
        assert not list(Path("/dev/shm").glob(f"{name}*"))
        for _ in range(2):
            logits = backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))[:, 1]
            np.testing.assert_allclose(logits, (0.0 - ThresholdNet().level) * 200.0, rtol=1e-5)
        assert backend._name("in") != name and name in _registered_regions(triton.grpc_url, "grpc")
    finally:
        backend.close()
        client.unregister_system_shared_memory(name)
        client.close()
        shm.destroy_shared_memory_region(decoy)
    assert not list(Path("/dev/shm").glob(f"{backend._prefix}*"))


def test_a_region_not_made_anew_for_a_larger_batch_leaves_no_handle_behind(triton, monkeypatch):
    """A larger batch: the input's region is unregistered and freed, and making the larger one
    fails (the host's /dev/shm full, made by a shim). The failure is named, and the backend keeps
    no handle to the freed region: the next larger batch makes it and gets its answer, and the
    close frees everything, here and on the server."""
    import tritonclient.utils.shared_memory as shm

    backend = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system", retries=1)
    larger = np.random.default_rng(6).random((2, 1, 16, 16, 16), dtype=np.float32)
    names = {backend._name(role) for role in ("in", "out")}
    try:
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
        made = shm.create_shared_memory_region

        def full(*args, **kwargs):
            raise shm.SharedMemoryException("unable to create the shared memory region")

        monkeypatch.setattr(shm, "create_shared_memory_region", full)
        with pytest.raises(BackendError, match=r"inference: unable to create the shared memory region"):
            backend.infer(larger)
        monkeypatch.setattr(shm, "create_shared_memory_region", made)
        logits = backend.infer(larger)[:, 1]
        np.testing.assert_allclose(logits, (larger[:, 0] - ThresholdNet().level) * 200.0, rtol=1e-5, atol=1e-3)
    finally:
        backend.close()
    assert not list(Path("/dev/shm").glob(f"{backend._prefix}*"))
    assert not names & _registered_regions(triton.grpc_url, "grpc")


def test_regions_left_behind_are_unregistered_later_never_a_live_region_of_the_same_backend(model_repository,
                                                                                           triton, caplog):
    """The server forgets the node's regions (as a restarted one does) and then leaves the node's
    call to unregister them unanswered: the backend makes new regions and goes on, and the old
    ones are unregistered later, on a thread of their own. The new regions have names of their
    own, so that thread never unregisters the regions the backend is using: every inference after
    it gives the local result."""
    caplog.set_level(logging.INFO, logger="inference.triton")
    batch = np.random.default_rng(5).random((1, 1, 12, 12, 12), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    proxy = SilentGrpcProxy(triton.grpc_url, {"SystemSharedMemoryUnregister"}, times=1)
    backend = TritonBackend(proxy.url, threshold_spec(), shared_memory="system", timeout=1.0, retries=2, backoff=0.01)
    try:
        np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-5)
        old = {backend._name(role) for role in ("in", "out")}
        assert old <= _registered_regions(triton.grpc_url, "grpc", forget=old)  # forgotten, behind the node's back
        with pytest.raises(BackendUnavailable, match=r"no longer has this node's shared-memory regions"):
            backend.infer(batch)
        assert proxy.taken == ["SystemSharedMemoryUnregister"]  # (not asked for the second region then)
        np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-5)  # on new regions
        new = {backend._name(role) for role in ("in", "out")}
        assert new <= _registered_regions(triton.grpc_url, "grpc") and not new & old
        assert _logged_regions(caplog, "triton_region_left") == old
        wait_for(lambda: _logged_regions(caplog, "triton_region_freed") == old, timeout=60)
        for _ in range(3):
            np.testing.assert_allclose(backend.infer(batch), expected, atol=1e-5)
        assert new <= _registered_regions(triton.grpc_url, "grpc")
    finally:
        backend.close()
        proxy.close()
    assert not (old | new) & _registered_regions(triton.grpc_url, "grpc")


# A node's process with a backend on shared memory: it infers once, prints its regions' names and waits to be killed.
_NODE = """
import sys
import numpy as np
from inference.backends.triton import TritonBackend
from inference.spec import ModelSpec
backend = TritonBackend(sys.argv[1], ModelSpec.model_validate_json(sys.argv[2]), shared_memory="system")
backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
print(*(backend._name(role) for role in ("in", "out")), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("killed", ["the process", "its process group"])
def test_regions_of_a_node_killed_are_freed_by_the_next_backend_never_those_of_a_live_one(model_repository, triton,
                                                                                         killed, caplog, monkeypatch):
    """A node killed (the OOM killer; a container stopped) leaves its regions registered, and the
    server maps their memory until it restarts. The next backend to register a region frees them:
    whether Python's resource tracker, killed or not with its process, removed their objects or
    they are still in /dev/shm (then removed too). It never touches the regions of a live node (one
    here, in this process: its next inference runs on them), nor those of an older release whose
    objects are still there (they hold no lock to tell a live node's), nor regions named otherwise
    or whose objects are not named after them. One of an older release whose object is gone is
    freed. An object of a node gone that no server lists (the server restarted since) is removed
    once nobody holds it (and it is older than a minute: none here)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    caplog.set_level(logging.INFO, logger="inference.triton")
    monkeypatch.setattr("inference.backends.triton._ORPHAN_AGE_S", 0.0)
    batch = np.random.default_rng(8).random((1, 1, 8, 8, 8), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    made: dict[str, object] = {}  # this test's regions: name -> tritonclient's handle while its object is kept
    node = subprocess.Popen([sys.executable, "-c", _NODE, triton.grpc_url, threshold_spec().model_dump_json()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    live = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
    fresh = None
    try:
        gone = set(node.stdout.readline().split())
        assert len(gone) == 2 and gone <= _registered_regions(triton.grpc_url, "grpc")
        for name, key in [("dicom-node-0ld00000-0-in", "/dicom-node-0ld00000-0-in"),  # an older node's, live or not
                          ("dicom-node-0ld00001-0-in", "/dicom-node-0ld00001-0-in"),  # an older node's, gone
                          ("elsewhere-0-in", "/elsewhere-0-in"),  # another client's, gone
                          ("dicom-node-held-0ther000-0-in", "/elsewhere-1-in")]:  # its object named otherwise
            made[name] = shm.create_shared_memory_region(name, key, 1 << 12)
            client.register_system_shared_memory(name, key, 1 << 12)
        for name in ("dicom-node-0ld00001-0-in", "elsewhere-0-in", "dicom-node-held-0ther000-0-in"):
            shm.destroy_shared_memory_region(made.pop(name))
        orphan = Path("/dev/shm/dicom-node-held-0rphan00-0-out")  # a node gone's, its server restarted since
        orphan.write_bytes(bytes(64))
        np.testing.assert_allclose(live.infer(batch), expected, atol=1e-5)  # (its first registration: it frees one)
        assert not orphan.exists()
        removed = {r.event_fields["object"] for r in caplog.records
                   if r.getMessage() == "triton_abandoned_object_removed"}
        assert orphan.name in removed and not removed & (gone | {live._name(role) for role in ("in", "out")})
        kept = {live._name(role) for role in ("in", "out")} | {"dicom-node-0ld00000-0-in", "elsewhere-0-in",
                                                                  "dicom-node-held-0ther000-0-in"}
        (os.kill if killed == "the process" else os.killpg)(node.pid, signal.SIGKILL)
        node.wait(30)
        fresh = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
        np.testing.assert_allclose(fresh.infer(batch), expected, atol=1e-5)
        registered = _registered_regions(triton.grpc_url, "grpc")
        assert kept <= registered and not (gone | {"dicom-node-0ld00001-0-in"}) & registered
        assert not {path.name for path in Path("/dev/shm").iterdir()} & gone
        freed = _logged_regions(caplog, "triton_abandoned_region_freed")
        assert gone | {"dicom-node-0ld00001-0-in"} <= freed and not freed & kept
        np.testing.assert_allclose(live.infer(batch), expected, atol=1e-5)  # on the same regions
        assert kept <= _registered_regions(triton.grpc_url, "grpc")
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)
        for backend in (live, fresh):
            if backend is not None:
                backend.close()
        for name in ("dicom-node-0ld00000-0-in", "elsewhere-0-in", "dicom-node-held-0ther000-0-in"):
            client.unregister_system_shared_memory(name)  # (a name the server does not have: no error)
        client.close()
        for handle in made.values():
            shm.destroy_shared_memory_region(handle)


def test_what_is_not_a_plain_file_under_a_nodes_name_in_dev_shm_is_left_alone(model_repository, triton, tmp_path,
                                                                              monkeypatch, caplog):
    """A FIFO, a folder and a link named as a node's object (anyone may make them in /dev/shm): the
    sweep neither waits on the FIFO (a plain open would, until a writer came, holding the job's
    first inference for good) nor removes any of them, nor warns about them."""
    caplog.set_level(logging.INFO, logger="inference.triton")
    monkeypatch.setattr("inference.backends.triton._ORPHAN_AGE_S", 0.0)
    batch = np.random.default_rng(11).random((1, 1, 8, 8, 8), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    fifo, folder, link = (Path("/dev/shm", f"dicom-node-held-{kind}0000-0-in") for kind in ("f1f0", "d1r0", "11nk"))
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "target").write_bytes(bytes(64))
    link.symlink_to(tmp_path / "target")
    backend = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
    outcome: dict[str, np.ndarray] = {}
    try:
        worker = threading.Thread(target=lambda: outcome.update(logits=backend.infer(batch)), daemon=True)
        worker.start()
        worker.join(120)
        if worker.is_alive():  # (a writer lets the waiting open go, so that the test ends)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(30)
            pytest.fail("the first inference still waited after 120 s")
        np.testing.assert_allclose(outcome["logits"], expected, atol=1e-5)
        assert fifo.is_fifo() and folder.is_dir() and link.is_symlink() and (tmp_path / "target").exists()
        named = {r.event_fields.get("object") for r in caplog.records if r.levelno >= logging.WARNING}
        assert not named & {fifo.name, folder.name, link.name}
    finally:
        backend.close()
        for made in (fifo, link):
            made.unlink(missing_ok=True)
        if folder.is_dir():
            folder.rmdir()


def test_a_live_region_whose_object_something_else_removed_is_made_anew(model_repository, triton, caplog):
    """Something else removes a live node's object from /dev/shm (an operator's rm, systemd-logind's
    RemoveIPC): another backend's first registration takes the region for a node gone's and
    unregisters it. The node's next inference is unavailable (the job waits and retries), the one
    after it runs on new regions with the local result, and the close leaves nothing behind; before,
    freeing the region whose object was gone failed, and every inference after it was an error."""
    caplog.set_level(logging.INFO, logger="inference.triton")
    batch = np.random.default_rng(10).random((1, 1, 8, 8, 8), dtype=np.float32)
    expected = _local(model_repository).infer(batch)
    node = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
    other = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
    try:
        np.testing.assert_allclose(node.infer(batch), expected, atol=1e-5)
        removed = node._name("in")
        Path("/dev/shm", removed).unlink()
        np.testing.assert_allclose(other.infer(batch), expected, atol=1e-5)
        assert removed not in _registered_regions(triton.grpc_url, "grpc")
        with pytest.raises(BackendUnavailable, match=r"no longer has this node's shared-memory regions"):
            node.infer(batch)
        assert _logged_regions(caplog, "triton_region_object_gone") == {removed}
        for _ in range(2):
            np.testing.assert_allclose(node.infer(batch), expected, atol=1e-5)
        names = {node._name(role) for role in ("in", "out")}
        assert removed not in names and names <= _registered_regions(triton.grpc_url, "grpc")
    finally:
        node.close()
        other.close()
    assert not list(Path("/dev/shm").glob(f"{node._prefix}*"))
    assert not (names | {removed}) & _registered_regions(triton.grpc_url, "grpc")


def test_a_region_that_cannot_be_freed_leaves_the_others_freed_and_the_close_done(triton, caplog):
    """A view of the input region's memory still held when the backend closes (Python refuses to
    unmap it: BufferError): the close says so, frees the output's region all the same, and ends;
    the server has neither."""
    caplog.set_level(logging.INFO, logger="inference.triton")
    backend = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="system")
    backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
    names = {role: backend._name(role) for role in ("in", "out")}
    mapping = backend._regions["in"].handle._mpsm_handle  # (tritonclient's own)
    view = np.frombuffer(mapping.buf, np.uint8)
    try:
        backend.close()
        assert _logged_regions(caplog, "triton_region_unfreed") == {names["in"]}
        assert not Path("/dev/shm", names["out"]).exists() and not backend._regions
        assert not set(names.values()) & _registered_regions(triton.grpc_url, "grpc")
    finally:
        del view
        mapping.close()
        Path("/dev/shm", names["in"]).unlink(missing_ok=True)


def test_a_network_whose_channels_are_not_its_labels_is_refused_at_export(tmp_path):
    """Two channels (background and one label) for a spec whose labels imply three; the model file
    already at the path (a version being served: `dicom-node-train export` writes into the
    repository) is left as it was, and nothing is left beside it."""
    spec = threshold_spec(labels=[*threshold_spec().model_dump()["labels"],
                                  {**threshold_spec().model_dump()["labels"][0], "value": 2, "name": "Brighter"}])
    served = tmp_path / "model.onnx"
    export_onnx(ThresholdNet(), served, threshold_spec(), (16, 16, 16))
    before = served.read_bytes()
    with pytest.raises(ExportMismatch, match=r"the network's output has shape \(2, 2, 34, 34, 34\) for an input of"
                                             r" \(2, 1, 17, 17, 17\): its spec's labels imply 3 values on axis 1"):
        export_onnx(_DoublingNet(), served, spec, (16, 16, 16))  # (another file than the one served)
    assert served.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("mode", ["argmax", "threshold"])
def test_a_spec_may_name_some_of_its_networks_classes(tmp_path, mode):
    """A segmentation spec may name a few of its network's classes: `output.channels` declares the
    network's (a multi-organ network of which a site reports one organ), and label values may skip
    numbers (the channels between unnamed). A voxel where an unnamed class wins is background, not
    the named class that came second: each named label has exactly the voxels it has when every
    class is named, on the CT's own grid and on a model grid of its own. Without the declaration
    the network is refused at export."""
    onnx = tmp_path / "tissue.onnx"
    export_onnx(_TissueNet(), onnx, _tissue_spec([1, 2]), (16, 16, 16))
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    for spacing in (None, [1.5, 1.5, 1.5]):
        every = _tissue_spec([1, 2], mode, spacing)
        expected = segment(load_series(read_series(files)), every, LocalBackend(onnx, every)).labels
        assert np.count_nonzero(expected == 1) > 0 and np.count_nonzero(expected == 2) > 0
        for named in (_tissue_spec([1], mode, spacing, channels=3), _tissue_spec([2], mode, spacing)):
            values = [label.value for label in named.labels]
            result = segment(load_series(read_series(files)), named, LocalBackend(onnx, named))
            np.testing.assert_array_equal(result.labels, np.where(np.isin(expected, values), expected, 0))
            assert {finding.label.value for finding in result.findings} == set(values)
    with pytest.raises(ExportMismatch, match=r"its spec's labels imply 2 values on axis 1"):
        export_onnx(_TissueNet(), tmp_path / "refused.onnx", _tissue_spec([1]), (16, 16, 16))
    with pytest.raises(ExportMismatch, match=r"\(2, 1, 17, 17, 17\): its spec declares 4 values on axis 1"):
        export_onnx(_TissueNet(), tmp_path / "refused.onnx", _tissue_spec([1], channels=4), (16, 16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "tissue.onnx"]


def test_a_spec_naming_some_of_a_networks_classes_runs_over_triton_as_in_process(tmp_path, odd_triton):
    """Triton's config, written at export, has the network's channels: over shared memory and the
    socket a spec naming one of its classes gives the in-process backend's labels. A spec that
    implies other channels than Triton's config is refused when its backend starts, naming both."""
    server, repo = odd_triton
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    named = _tissue_spec([1], channels=3)
    expected = segment(load_series(read_series(files)), named,
                       LocalBackend(repo / "tissue" / "1" / "model.onnx", named)).labels
    assert np.count_nonzero(expected == 1) > 0 and set(np.unique(expected)) <= {0, 1}
    for url, protocol, shared_memory in ((server.grpc_url, "grpc", "system"), (server.http_url, "http", "none")):
        backend = TritonBackend(url, named, protocol=protocol, shared_memory=shared_memory)
        try:
            np.testing.assert_array_equal(segment(load_series(read_series(files)), named, backend).labels, expected)
        finally:
            backend.close()
    with pytest.raises(BackendError, match=r"model tissue: output 'logits' has 3 channels on Triton \(shape \[-1, 3,"
                                           r" -1, -1, -1\]\), its spec 2"):
        TritonBackend(server.grpc_url, _tissue_spec([1]), shared_memory="none")


def test_a_version_may_name_other_classes_of_the_same_network(tmp_path):
    """Triton has one config per model: a new version keeps its channels, declared or implied by
    the labels alike. A version naming one class of the tissue network (declaring its three
    channels) goes beside one naming both; one whose labels imply two is refused. A spec that
    declares none is written without the key (a node of before it, sharing the repository, reads
    the file)."""
    from inference.export.repository import VersionRefused, add_version
    from inference.repository import ModelRepository

    onnx = tmp_path / "tissue.onnx"
    export_onnx(_TissueNet(), onnx, _tissue_spec([1, 2]), (16, 16, 16))
    write_entry(tmp_path / "repo", _tissue_spec([1, 2]), onnx)
    assert "channels" not in (tmp_path / "repo" / "tissue" / "node.yaml").read_text()
    add_version(tmp_path / "repo", _tissue_spec([1], channels=3).model_copy(update={"version": 2}), _TissueNet())
    models = ModelRepository(tmp_path / "repo")
    assert models.versions("tissue") == [1, 2] and models.spec("tissue@2").output.channels == 3
    with pytest.raises(VersionRefused, match=r"tissue version 3 changes the model's output channels \(version 2"):
        add_version(tmp_path / "repo", _tissue_spec([1]).model_copy(update={"version": 3}), ThresholdNet())
    assert models.versions("tissue") == [1, 2]


def test_a_segmentation_spec_declares_its_networks_channels_only_beyond_its_labels():
    """`output.channels` is a segmentation's (a classifier's and a detector's output columns are
    their labels), more than the highest label value (channel n is label value n), and at most 256
    (labels are a byte per voxel)."""
    assert _tissue_spec([2], channels=200).output_channels == 200
    assert _tissue_spec([2]).output_channels == 3
    with pytest.raises(ValidationError, match=r"output\.channels \(2\) must exceed the highest label value \(2\)"):
        _tissue_spec([2], channels=2)
    with pytest.raises(ValidationError, match=r"output\.channels\n  Input should be less than or equal to 256"):
        _tissue_spec([2], channels=257)
    with pytest.raises(ValidationError, match=r"output\.channels is a segmentation's: a classifier's and a"
                                              r" detector's output columns are its labels"):
        threshold_spec(task="classification", output={"name": "logits", "channels": 3})


def test_a_spec_refuses_label_values_a_byte_cannot_hold_and_windows_under_a_voxel():
    """A segmentation's labels are a byte per voxel (256 would come back as background), and a
    window side under 1 would be the whole image's, as MONAI reads it."""
    label = threshold_spec().model_dump()["labels"][0]
    with pytest.raises(ValidationError, match=r"a segmentation's label values are at most 255: its labels are a"
                                              r" byte per voxel"):
        threshold_spec(labels=[{**label, "value": 256}])
    assert threshold_spec(labels=[{**label, "value": 255}]).output_channels == 256
    # a classifier's labels are its output's columns: as many as it has
    classes = [{**label, "value": value, "name": f"class {value}"} for value in range(1, 301)]
    assert threshold_spec(task="classification", labels=classes).output_channels == 300
    preprocessing = threshold_spec().model_dump()["preprocessing"]
    for side in (0, -1):
        with pytest.raises(ValidationError, match=r"preprocessing\.patch_size\n  Value error, each side is at least"
                                                  r" one voxel"):
            threshold_spec(preprocessing={**preprocessing, "patch_size": [32, side, 32]})


def _cpu_ticks(threads: set[Path]) -> int:
    """The user and system CPU (clock ticks) the threads at these /proc paths have taken so far;
    a thread ended since counts none."""
    fields = [f for f in map(proc_stat, threads) if f is not None]
    return sum(int(f[11]) + int(f[12]) for f in fields)  # utime, stime: fields 14 and 15 of stat(5)


def _idle_ticks(infer: Callable[[], object], threads: Callable[[], set[Path]], calls: int = 8) -> int:
    """The CPU ticks `threads` take in the 0.1 s after each of `calls` calls of `infer`: while
    nothing asks the model for anything."""
    idle = 0
    for _ in range(calls):
        infer()
        watched = threads()
        before = _cpu_ticks(watched)
        time.sleep(0.1)
        idle += _cpu_ticks(watched) - before
    return idle


def _threads_of(pid: int) -> set[Path]:
    return set(Path(f"/proc/{pid}/task").iterdir())


def test_onnx_runtime_threads_take_no_cpu_between_the_model_calls(model_repository):
    """The in-process backend's threads sleep between calls: by default ONNX Runtime's idle
    threads spin about 25 ms of CPU after every call (on 2 cores an organ model's sliding window,
    49 calls, took 1.2 s longer for it; inference/backends/local.py). Spinning here takes some
    20 ticks over the eight idle windows."""
    before = _threads_of(os.getpid())
    backend = LocalBackend(model_repository / "threshold" / "1" / "model.onnx", threshold_spec(), threads=2)
    workers = _threads_of(os.getpid()) - before  # ONNX Runtime's pool, made with the session
    assert workers
    batch = np.random.default_rng(3).random((4, 1, 32, 32, 32), dtype=np.float32)
    assert _idle_ticks(lambda: backend.infer(batch), lambda: workers) <= 3


def test_the_triton_cpu_model_threads_take_no_cpu_between_calls(model_repository, triton):
    """The same for the CPU variant's python model on Triton (inference/export/triton_python_model.py),
    whose ONNX Runtime threads share the node's cores on a machine without a GPU: its stub
    processes take no CPU while nothing is asked of them."""
    assert triton.process is not None
    server = triton.process.pid
    stubs = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
             and _parent_of(entry) == server]
    assert stubs  # one python backend stub per model instance
    backend = TritonBackend(triton.grpc_url, threshold_spec(), shared_memory="none")
    batch = np.random.default_rng(4).random((4, 1, 32, 32, 32), dtype=np.float32)
    try:
        assert _idle_ticks(lambda: backend.infer(batch),
                           lambda: set().union(*(_threads_of(pid) for pid in stubs))) <= 3
    finally:
        backend.close()


def test_the_committed_models_run_on_triton_cpu_through_the_exporters_python_model():
    """Each committed model's CPU runner is the exporter's current file (the exporter copies it;
    the committed ones were copied by hand), so what it promises holds for them too."""
    template = (Path(__file__).resolve().parent.parent / "inference" / "export" / "triton_python_model.py").read_bytes()
    runners = sorted(REPO_MODELS.glob("*/[0-9]*/model.py"))
    assert {p.parent.parent.name for p in runners} == {"chest-nodule-cls", "lesion-seg", "nodule-det"}
    assert all(p.read_bytes() == template for p in runners)


def _parent_of(process: Path) -> int | None:
    fields = proc_stat(process)
    return int(fields[1]) if fields is not None else None


def test_triton_stopped_gives_clear_error_after_retries(model_repository, tmp_path):
    server = TritonCpuServer(model_repository, tmp_path / "triton.log").start(ready_models=("threshold",))
    try:
        backend = TritonBackend(server.grpc_url, threshold_spec(), shared_memory="none", retries=3, backoff=0.05)
        server.stop()
        with pytest.raises(BackendError, match=r"unavailable for inference after 3 attempts"):
            backend.infer(np.zeros((1, 1, 8, 8, 8), dtype=np.float32))
        backend.close()
    finally:
        server.cleanup()


def test_local_backend_names_must_match(model_repository):
    with pytest.raises(BackendError, match=r"spec names input 'pixels'"):
        LocalBackend(model_repository / "threshold" / "1" / "model.onnx", threshold_spec(input={"name": "pixels"}))


# -- geometry ------------------------------------------------------------------------------


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [n for n in range(3) if n != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


OBLIQUE = _rotation(2, 15) @ _rotation(0, 25)
GEOMETRIES = {
    "axial": ((1, 0, 0, 0, 1, 0), (2.0, 0.9, 0.9), (32, 64, 64)),
    "sagittal": ((0, 1, 0, 0, 0, -1), (1.5, 1.0, 1.0), (48, 64, 64)),
    "oblique": (tuple(OBLIQUE[:, 0]) + tuple(OBLIQUE[:, 1]), (1.5, 1.0, 1.0), (48, 64, 64)),
    "anisotropic": ((1, 0, 0, 0, 1, 0), (5.0, 0.6, 0.8), (16, 96, 72)),
}


def _sphere_series(folder: Path, orientation, spacing, shape, **write) -> tuple[list[Path], SeriesGeometry]:
    geometry = SeriesGeometry(spacing=spacing, orientation=orientation)
    centre_index = (np.asarray(shape) - 1) / 2.0
    offset = geometry.to_patient(centre_index) - geometry.to_patient((0, 0, 0))
    geometry.origin = tuple(np.asarray((0.0, 0.0, 10.0)) - offset)
    phantom = Phantom(Ellipsoid((0, 0, 0), (150, 150, 1000), 40.0), lesions=[Ellipsoid(CENTRE, (RADIUS,) * 3, 500.0)],
                      noise_hu=0)
    hu, _ = phantom.sample(shape, geometry)
    return write_ct_series(hu, folder, geometry, SeriesIdentity(), **write), geometry


def _check_sphere(files: list[Path], backend, reverse: bool = False, spec=None) -> None:
    datasets = read_series(files)
    if reverse:
        datasets = datasets[::-1]
    volume = load_series(datasets)
    result = segment(volume, spec or threshold_spec(), backend)
    assert len(result.findings) == 1
    finding = result.findings[0]
    error_mm = np.subtract(finding.centroid, CENTRE)
    error_voxels = np.linalg.inv(volume.affine[:3, :3]) @ error_mm
    assert np.all(np.abs(error_voxels) <= 1.0), (finding.centroid, error_voxels)
    truth = 4 / 3 * math.pi * RADIUS**3
    assert abs(finding.volume_mm3 - truth) / truth < 0.05
    # the label of each source frame lies where that frame is: check one voxel per frame
    inside = np.argwhere(result.labels == 1)
    k, r, c = inside[len(inside) // 2]
    ds = volume.datasets[k]
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    sr, sc = (float(v) for v in ds.PixelSpacing)
    point = ipp + c * sc * iop[:3] + r * sr * iop[3:]
    assert np.linalg.norm(point - np.asarray(CENTRE)) <= RADIUS + 1e-6


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_sphere_centroid_and_volume_in_every_geometry(name, tmp_path, model_repository):
    orientation, spacing, shape = GEOMETRIES[name]
    files, _ = _sphere_series(tmp_path / name, orientation, spacing, shape)
    _check_sphere(files, _local(model_repository))


@pytest.mark.parametrize("name", ["axial", "oblique", "anisotropic"])
def test_model_at_its_own_spacing_maps_back_to_the_source_grid(name, tmp_path, model_repository):
    """With spec spacing, the probabilities are resampled back from the model's grid."""
    orientation, spacing, shape = GEOMETRIES[name]
    files, _ = _sphere_series(tmp_path / name, orientation, spacing, shape)
    spec = threshold_spec(preprocessing={"orientation": "RAS", "spacing": [1.7, 1.3, 2.1],
                                         "intensity": {"window": [-1000, 1000]}, "patch_size": [32, 32, 32]})
    _check_sphere(files, _local(model_repository), spec=spec)


def test_slices_in_reverse_order(tmp_path, model_repository):
    files, _ = _sphere_series(tmp_path / "ax", *GEOMETRIES["axial"])
    _check_sphere(files, _local(model_repository), reverse=True)


def test_signed_pixels_without_intercept_and_unsigned_with_intercept(tmp_path, model_repository):
    files, _ = _sphere_series(tmp_path / "signed", *GEOMETRIES["axial"], rescale_intercept=0.0, unsigned=False)
    assert pydicom.dcmread(files[0]).PixelRepresentation == 1
    _check_sphere(files, _local(model_repository))
    files, _ = _sphere_series(tmp_path / "unsigned", *GEOMETRIES["axial"])
    ds = pydicom.dcmread(files[0])
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024
    _check_sphere(files, _local(model_repository))


def test_jpeg_lossless_series_through_triton(tmp_path, model_repository, triton):
    files, _ = _sphere_series(tmp_path / "plain", *GEOMETRIES["axial"])
    compressed = []
    for path in files:
        out = tmp_path / "jpeg" / path.name
        out.parent.mkdir(exist_ok=True)
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(out)], check=True, capture_output=True)
        compressed.append(out)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    backend = TritonBackend(triton.grpc_url, threshold_spec())
    try:
        _check_sphere(compressed, backend)
    finally:
        backend.close()


# -- refusals ------------------------------------------------------------------------------


def _axial(tmp_path: Path, slices: int = 6) -> list[pydicom.Dataset]:
    files = write_ct_series(np.zeros((slices, 8, 8)), tmp_path / "s", SeriesGeometry(spacing=(2.0, 1.0, 1.0)))
    return read_series(files)


def test_refuses_mixed_orientations(tmp_path):
    datasets = _axial(tmp_path)
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    with pytest.raises(SeriesError, match="mixed orientations in one series: 2 different"):
        load_series(datasets)


def test_refuses_varying_spacing(tmp_path):
    datasets = _axial(tmp_path)
    datasets[3].ImagePositionPatient = [0, 0, 6.7]
    with pytest.raises(SeriesError, match=r"slice spacing varies: 1.30 to 2.70 mm"):
        load_series(datasets)


def test_refuses_missing_slices(tmp_path):
    datasets = _axial(tmp_path)
    del datasets[3]
    with pytest.raises(SeriesError, match=r"missing slices: gap of 4.00 mm after position 4.00 mm where the spacing is 2.00 mm \(1 slice\(s\) missing\)"):
        load_series(datasets)


def test_refuses_non_image_sop_class(tmp_path):
    datasets = _axial(tmp_path)
    sr = pydicom.Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.SOPInstanceUID = generate_uid()
    with pytest.raises(SeriesError, match=r"SOP class 1.2.840.10008.5.1.4.1.1.88.22 \(Enhanced SR Storage\) is not an image"):
        load_series(datasets + [sr])


def test_refuses_multiframe_without_per_frame_geometry(tmp_path):
    ds = _axial(tmp_path)[0]
    ds.NumberOfFrames = 4
    ds.PixelData = ds.PixelData * 4
    with pytest.raises(SeriesError, match="multi-frame object with 4 frames has no per-frame geometry"):
        load_series([ds])


# -- the native pixel fast path ------------------------------------------------------------------


def _variants(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    """Series in the encodings the fast path reads itself: each must give highdicom's values."""
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 2000, size=(5, 12, 10)).astype(float)
    out = {
        "unsigned 12 bit, intercept -1024": read_series(write_ct_series(hu, folder / "u12", SeriesGeometry())),
        "signed 16 bit": read_series(write_ct_series(hu, folder / "s16", SeriesGeometry(), rescale_intercept=0.0,
                                                     unsigned=False)),
    }
    garbage = read_series(write_ct_series(hu, folder / "hb", SeriesGeometry()))
    for k, ds in enumerate(garbage):  # high bits above Bits Stored set (overlay bits in old data)
        ds.PixelData = (ds.pixel_array | np.uint16(0xF000 if k % 2 else 0x3000)).tobytes()
        ds.RescaleSlope = "2.5"
    out["unused high bits set, slope 2.5"] = garbage
    signed12 = read_series(write_ct_series(hu, folder / "s12", SeriesGeometry(), rescale_intercept=0.0, unsigned=False))
    for ds in signed12:
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (ds.pixel_array.astype(np.int16) & 0x0FFF).astype(np.uint16).tobytes()  # no sign extension
    out["signed 12 bit, stored without sign extension"] = signed12
    mr = read_series(write_ct_series(hu, folder / "mr", SeriesGeometry()))
    for k, ds in enumerate(mr):
        del ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType
        ds.Modality = "MR"
    out["no rescale (MR)"] = mr
    varying = read_series(write_ct_series(hu, folder / "vary", SeriesGeometry()))
    for k, ds in enumerate(varying):
        ds.RescaleIntercept = str(-1024 + 7 * k)
    out["intercept varies by slice"] = varying
    return out


def test_native_pixel_fast_path_equals_pydicom(tmp_path):
    """The fast path gives pydicom's values (unused high bits ignored, modality LUT applied), and
    highdicom's wherever the data's unused bits are clear (highdicom keeps them as stored)."""
    from pydicom.pixels import apply_modality_lut

    from inference import volume as module

    for name, datasets in _variants(tmp_path).items():
        frames = [module._Frame.of_instance(ds) for ds in datasets]
        fast = module._native_pixels(frames)
        assert fast is not None, name
        reference = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets]).astype(np.float32)
        np.testing.assert_array_equal(fast, reference, err_msg=name)
        if "unused high bits" not in name:
            np.testing.assert_array_equal(fast, module._decoded_pixels(frames), err_msg=name)
    compressed = _variants(tmp_path / "again")["signed 16 bit"]
    compressed[0].file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1  # not native: highdicom decodes it
    assert module._native_pixels([module._Frame.of_instance(ds) for ds in compressed]) is None


def test_pixel_data_read_from_the_files_equals_the_datasets_values(tmp_path, monkeypatch):
    """read_series leaves Pixel Data in the files and the fast path reads it straight into the
    volume: same values as from the datasets in memory, big-endian files included; integer CT
    values come back as int16, rescaled ones as float32."""
    from inference import volume as module

    monkeypatch.setattr(module, "DEFER_BYTES", 64)  # these test images are small
    variants = _variants(tmp_path)
    big_endian = _variants(tmp_path / "be")["signed 16 bit"]
    for ds in big_endian:
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    variants["signed 16 bit, big endian"] = big_endian
    for name, datasets in variants.items():
        folder = tmp_path / "files" / name.replace(" ", "_").replace(",", "")
        folder.mkdir(parents=True)
        files = []
        for k, ds in enumerate(datasets):
            files.append(folder / f"{k}.dcm")
            pydicom.dcmwrite(files[-1], ds, implicit_vr=False, little_endian="big endian" not in name,
                             force_encoding=True)
        deferred = read_series(files)
        assert deferred[0].get_item("PixelData", keep_deferred=True).value is None, name
        from_files = module._native_pixels([module._Frame.of_instance(ds) for ds in deferred])
        in_memory = module._native_pixels([module._Frame.of_instance(ds) for ds in datasets])
        np.testing.assert_array_equal(from_files, in_memory, err_msg=name)
        expected = np.float32 if ("slope" in name or "varies" in name) else np.int16
        assert from_files.dtype == expected, name


def test_a_file_replaced_while_its_series_is_read_is_a_transient_failure(tmp_path, monkeypatch):
    """A resend replaces the stored file (a rename) between the header read and the pixel read:
    the job must not mix two versions of the instance; it waits and reads the series again."""
    from inference import volume as module
    from node.jobs.failures import is_transient

    monkeypatch.setattr(module, "DEFER_BYTES", 64)
    files = write_ct_series(np.zeros((4, 12, 10)), tmp_path / "s", SeriesGeometry())
    datasets = read_series(files)
    replacement = pydicom.dcmread(files[2])
    replacement.PixelData = bytes(len(replacement.PixelData))
    replacement.save_as(tmp_path / "new.dcm", enforce_file_format=True)
    (tmp_path / "new.dcm").replace(files[2])
    os.utime(files[2], ns=(1, 1))  # a different modification time, however fast the machine
    with pytest.raises(module.SeriesChanged, match=f"instance {datasets[2].SOPInstanceUID} was replaced") as caught:
        load_series(datasets)
    assert is_transient(caught.value)


def test_headers_read_ahead_give_the_same_volume_and_never_a_replaced_files_header(tmp_path, monkeypatch):
    """Headers parsed ahead (in the quiet period) are taken by the job instead of parsed again:
    the volume is voxel- and affine-exact to one read from scratch. A header whose file a
    resend replaced since is never given out: the job reads the new file (its pixels here)."""
    from inference import headers, volume as module

    monkeypatch.setattr(module, "DEFER_BYTES", 64)
    values = np.arange(5 * 12 * 10, dtype=float).reshape(5, 12, 10)
    files = write_ct_series(values, tmp_path / "s", SeriesGeometry())
    parsed = headers.ParsedHeaders()
    assert parsed.read_ahead("1.2.3", files, limit=100) == 5 and len(parsed) == 5
    assert parsed.read_ahead("1.2.3", files, limit=100) == 0  # held already, files unchanged
    fresh = module.read_volumes(files)[0]
    replacement = pydicom.dcmread(files[2])
    replacement.PixelData = bytes(len(replacement.PixelData))  # stored value 0: -1024 HU
    replacement.save_as(tmp_path / "new.dcm", enforce_file_format=True)
    (tmp_path / "new.dcm").replace(files[2])
    os.utime(files[2], ns=(1, 1))  # a different modification time, however fast the machine
    ahead = parsed.take("1.2.3", files)
    assert sorted(ahead) == sorted(set(files) - {files[2]}) and len(parsed) == 0
    volume = module.read_volumes(files, ahead)[0]
    taken = [any(ds is header for header in ahead.values()) for ds in volume.datasets]
    assert sorted(taken) == [False, True, True, True, True]  # all but the replaced file's header
    np.testing.assert_array_equal(volume.affine, fresh.affine)
    np.testing.assert_array_equal(volume.array, module.read_volumes(files)[0].array)
    changed = np.argwhere(volume.array != fresh.array)
    assert len(changed) == 12 * 10  # the whole of the replaced slice, nothing else


def test_headers_read_ahead_hold_the_values_the_volume_reads_decoded(tmp_path, monkeypatch):
    """The values the volume reads from every header (HEADER_KEYWORDS, which the runner passes) are
    decoded while the study waits: reading the volume from the headers taken then decodes nothing
    more in any of them, and gives the volume read from scratch. A value not worth holding decoded
    (more than DECODE_MAX_VALUES parts, or longer than DECODE_MAX_BYTES) is left to the job, which
    decodes it as before. Without `decode` the same reading decodes values in every header (so
    this test can fail)."""
    from pydicom.dataelem import RawDataElement

    from inference import headers, volume as module

    monkeypatch.setattr(module, "DEFER_BYTES", 200)  # these small images' Pixel Data (240 bytes) stays in the file
    files = write_ct_series(np.arange(6 * 12 * 10, dtype=float).reshape(6, 12, 10), tmp_path / "s", SeriesGeometry())
    many_parts, long = pydicom.dcmread(files[1]), pydicom.dcmread(files[2])
    many_parts.ImageType = ["ORIGINAL", "PRIMARY", *["X"] * headers.DECODE_MAX_VALUES]  # 32 bytes, 10 parts
    long.StackID = ["S" * 16] * (headers.DECODE_MAX_VALUES - 1) + ["S" * 15]  # 8 parts, 134 bytes
    many_parts.save_as(files[1], enforce_file_format=True)
    long.save_as(files[2], enforce_file_format=True)
    fresh = module.read_volumes(files)[0]

    def decoded(ds: pydicom.Dataset) -> set[str]:
        return {pydicom.datadict.keyword_for_tag(tag) for tag in ds.keys()
                if not isinstance(ds.get_item(tag, keep_deferred=True), RawDataElement)}

    def decoded_by_reading(keywords: tuple[str, ...]) -> list[set[str]]:
        parsed = headers.ParsedHeaders()
        assert parsed.read_ahead("1.2", files, limit=100, decode=keywords) == len(files)
        ahead = parsed.take("1.2", files)
        before = {f: decoded(ds) for f, ds in ahead.items()}
        volume = module.read_volumes(files, ahead)[0]
        assert all(any(ds is header for header in ahead.values()) for ds in volume.datasets)
        np.testing.assert_array_equal(volume.affine, fresh.affine)
        np.testing.assert_array_equal(volume.array, fresh.array)
        return [decoded(ahead[f]) - before[f] for f in files]

    assert decoded_by_reading(module.HEADER_KEYWORDS) == [set(), {"ImageType"}, {"StackID"}, set(), set(), set()]
    assert all({"ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"} <= new
               for new in decoded_by_reading(()))


def test_headers_read_ahead_stay_within_their_limits_and_leave_what_they_cannot_use(tmp_path, monkeypatch):
    """At most `limit` headers and HELD_MAX_BYTES of their files are held (reading ahead stops
    there, and when `go_on` says so, and adds nothing for a study once its job has taken); a
    study's are let go once it has stopped receiving for the grace; a series read whole (here
    compressed: its pixels would be held) or whose headers are too long is left to the job, its
    first file not parsed again while unchanged, and so are files that cannot be read."""
    from inference import headers, volume as module

    monkeypatch.setattr(module, "DEFER_BYTES", 64)
    files = write_ct_series(np.zeros((40, 12, 10)), tmp_path / "s", SeriesGeometry())
    # (each file's own: its UIDs and positions are not all as long as the others')
    length = [headers._header_bytes(module.read_series([file])[0]) for file in files]
    parsed = headers.ParsedHeaders()
    assert parsed.read_ahead("1.2", files[:6], limit=4) == 4 and len(parsed) == 4
    assert parsed.read_ahead("1.2", files[:6], limit=4) == 0
    assert sorted(parsed.take("1.2", files)) == sorted(files[:4])
    assert parsed.read_ahead("1.2", files, limit=0) == 0 and len(parsed) == 0
    asked: list[int] = []
    assert parsed.read_ahead("1.2", files, 100, go_on=lambda: len(asked.append(1) or asked) < 3) == 2 * 16
    assert len(parsed.take("1.2", files)) == 2 * 16
    monkeypatch.setattr(headers, "HELD_MAX_BYTES", sum(length[:3]))
    assert parsed.read_ahead("1.2", files, limit=100) == 3 and len(parsed.take("1.2", files)) == 3
    monkeypatch.setattr(headers, "HELD_MAX_BYTES", 8 << 20)

    def taken_meanwhile() -> bool:  # the job takes the study's headers while a reading is under way
        if len(asked) == 1:
            parsed.take("1.4", files)
        asked.append(1)
        return True

    asked.clear()
    assert parsed.read_ahead("1.4", files, 100, go_on=taken_meanwhile) == 16 and len(parsed) == 0

    assert parsed.read_ahead("1.2", files[:3], 100) == 3 and parsed.read_ahead("1.3", files[3:5], 100) == 2
    stopped = {"1.2": None, "1.3": time.time() - 30}
    assert parsed.expire(stopped.__getitem__, grace_s=60) == 0 and len(parsed) == 5
    assert parsed.expire(stopped.__getitem__, grace_s=10) == 2 and sorted(parsed.take("1.2", files)) == files[:3]

    (tmp_path / "damaged.dcm").write_bytes(b"DICM" * 10)
    assert parsed.read_ahead("1.5", [tmp_path / "gone.dcm", tmp_path / "damaged.dcm", files[0]], limit=4) == 1
    compressed = []
    for k, f in enumerate(files[:3]):
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        compressed.append(tmp_path / f"rle{k}.dcm")
        ds.save_as(compressed[-1], enforce_file_format=True)
    read = []
    parse = headers.parse_header
    monkeypatch.setattr(headers, "parse_header", lambda file: read.append(file.name) or parse(file))
    assert parsed.read_ahead("1.6", compressed, limit=4) == 0 and read == [str(compressed[0])]
    assert parsed.read_ahead("1.6", compressed, limit=4) == 0 and len(read) == 1  # known: not parsed again
    assert sorted(parsed.take("1.5", files + compressed)) == [files[0]]
    monkeypatch.setattr(headers, "HEADER_MAX_BYTES", length[5] - 1)
    assert parsed.read_ahead("1.7", files[5:8], limit=4) == 0 and read[1:] == [str(files[5])] and len(parsed) == 0


def _resident_fraction(array: np.ndarray) -> float:
    """The share of `array`'s pages in memory, as mincore(2) reports them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = array.ctypes.data // page * page
    pages = (array.ctypes.data + array.nbytes - start + page - 1) // page
    vector = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vector) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vector) / pages


def _skip_without_populate() -> None:
    import platform
    import re

    release = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
    if platform.system() != "Linux" or release < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14 or later: the buffer is ordinary memory there")


def test_a_prefaulted_buffer_has_its_pages_in_memory_before_anything_writes_it():
    """inference.prefault faults the pages in on its own thread without writing them: all of
    them are in memory once it is done, where a fresh array of the same size has next to none
    (64 MB: over glibc's largest mmap threshold, so never memory it already had)."""
    from inference.prefault import prefaulted

    _skip_without_populate()
    size = 64 << 20
    fresh = np.empty(size, dtype=np.uint8)
    buffer = prefaulted(size)
    assert buffer is not None and buffer.wait(60)
    array = buffer.take((size // 2,), np.dtype(np.int16))
    assert array is not None and array.shape == (size // 2,) and buffer.nbytes == 0
    assert _resident_fraction(array) == 1.0
    assert _resident_fraction(fresh) < 0.5
    assert buffer.take((size // 2,), np.dtype(np.int16)) is None  # one volume takes it at most


def test_faulting_pages_in_never_changes_what_was_written_to_them():
    """The frames may be read into the buffer while the thread still runs: the advice faults
    pages in without writing them, so values already there stay (half the chunks written first)."""
    import threading

    from inference import prefault

    _skip_without_populate()
    buffer = np.empty(64 << 20, dtype=np.uint8)
    chunks = buffer.reshape(16, -1)
    chunks[::2] = np.arange(chunks.shape[1], dtype=np.uint64).astype(np.uint8)
    prefault._populate(buffer, threading.Event())
    assert _resident_fraction(buffer) == 1.0
    np.testing.assert_array_equal(chunks[::2], np.broadcast_to(chunks[0], chunks[::2].shape))
    assert chunks[0, :300].tolist() == [k % 256 for k in range(300)]


@pytest.mark.parametrize("let_go", ["released", "taken for another size"])
def test_memory_no_volume_took_is_populated_no_further(monkeypatch, let_go):
    """Let go untaken (a series that failed to load, or a volume of another size), a buffer's
    pages stop being faulted in at the next chunk: the thread does not fill memory nobody uses."""
    import threading

    from inference import prefault

    calls, gate, madvise = [], threading.Event(), prefault._MADVISE

    def held_back(start: int, length: int, advice: int) -> int:  # the test decides when a chunk is done
        calls.append(length)
        gate.wait(30)
        return madvise(start, length, advice)

    monkeypatch.setattr(prefault, "_MADVISE", held_back)
    monkeypatch.setattr(prefault, "CHUNK_BYTES", 1 << 20)
    buffer = prefault.prefaulted(64 << 20)
    assert buffer is not None
    if let_go == "released":
        buffer.release()
    else:
        assert buffer.take((3, 5), np.dtype(np.int16)) is None
    gate.set()
    assert buffer.wait(30) and len(calls) <= 1  # 64 chunks without the stop


def test_a_job_reads_its_volume_into_the_memory_made_ready_while_the_headers_were_parsed(tmp_path, monkeypatch):
    """read_volumes (a job's load) foresees the volume's size from the first header; the volume
    is read into that very memory, with the same values, geometry and order as load_volumes; a
    buffer that does not fit (two volumes at the same positions) or a series that fails to load
    lets it go (no job holds a second copy of its volume's memory)."""
    from inference import prefault
    from inference import volume as module

    monkeypatch.setattr(module, "DEFER_BYTES", 64)  # these test images are small
    monkeypatch.setattr(prefault, "MIN_BYTES", 0)
    made: list[tuple[prefault.PrefaultedBuffer, np.ndarray]] = []

    def recorded(nbytes: int) -> prefault.PrefaultedBuffer | None:
        buffer = prefault.PrefaultedBuffer(nbytes)
        made.append((buffer, buffer._buffer))
        return buffer

    monkeypatch.setattr(module, "prefaulted", recorded)
    hu = np.random.default_rng(5).integers(-1000, 2000, size=(6, 14, 11)).astype(float)
    files = write_ct_series(hu, tmp_path / "ct", SeriesGeometry(spacing=(2.0, 0.7, 0.7)))
    shuffled = [files[k] for k in (3, 0, 5, 1, 4, 2)]
    [volume] = module.read_volumes(shuffled)
    [reference] = module.load_volumes(read_series(shuffled))
    buffer, memory = made.pop()
    assert memory.nbytes == 6 * 14 * 11 * 2
    assert np.shares_memory(volume.array, memory) and buffer.nbytes == 0
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.array, hu[::-1])  # the volume's slice order: highdicom's
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in reference.datasets]

    echoes = []  # the same positions twice, told apart by EchoTime: two volumes of 6 slices, not one of 12
    identity = SeriesIdentity()
    for te in (12, 48):
        for path in write_ct_series(hu + te, tmp_path / f"echo{te}", SeriesGeometry(), identity):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.EchoTime = str(te)
            ds.save_as(path, enforce_file_format=True)
            echoes.append(path)
    volumes = module.read_volumes(echoes)
    buffer, memory = made.pop()
    assert [v.label for v in volumes] == ["EchoTime 12 ms", "EchoTime 48 ms"] and buffer.nbytes == 0
    assert not any(np.shares_memory(v.array, memory) for v in volumes)
    for v, te in zip(volumes, (12, 48)):
        np.testing.assert_array_equal(v.array, (hu + te)[::-1])

    with pytest.raises(SeriesError, match=r"missing slices: .* \(1 slice\(s\) missing\)"):  # fails after the read
        module.read_volumes(files[:2] + files[3:])
    buffer, _ = made.pop()
    assert buffer.nbytes == 0

    # one instance the fast path does not read (its Bits Stored differs): every frame is decoded
    # by highdicom, and the memory is let go before that, not kept beside the decoded frames
    ds = pydicom.dcmread(files[4])
    ds.BitsStored, ds.HighBit = 16, 15
    ds.save_as(files[4], enforce_file_format=True)
    held_while_decoding = []
    decode = module._decoded_pixels
    monkeypatch.setattr(module, "_decoded_pixels",
                        lambda ordered: held_while_decoding.append(made[-1][0].nbytes) or decode(ordered))
    [decoded] = module.read_volumes(files)
    np.testing.assert_array_equal(decoded.array, hu[::-1])
    assert held_while_decoding == [0] and made.pop()[0].nbytes == 0


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique", "tilted"])
@pytest.mark.parametrize("padding", ["border", "constant"])
def test_resampling_equals_monai(orientation, padding, monkeypatch):
    """inference.resample moves voxels where MONAI would (same voxel-centre convention, linear
    interpolation, border or zero padding), from the stored integers, axis-aligned or not. A
    sheared stack onto a regular grid of its planes, some beyond its first and last (gantry tilt,
    inference.pipeline.regular_grid), is moved plane by plane, as the same values; clamped to that
    grid's box (`resample_clamped`), as MONAI's zero padding onto the box and border padding from it."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing, SpatialResample

    from inference import resample as module
    from inference.resample import resample, resample_clamped

    array = np.random.default_rng(1).integers(-1000, 1000, size=(30, 40, 36)).astype(np.int16)
    c, s = math.cos(0.3), math.sin(0.3)
    columns = {"axial": [(0, 0, 2.5), (0, 0.8, 0), (0.7, 0, 0)],
               "sagittal": [(2.5, 0, 0), (0, 0, -0.8), (0, 0.7, 0)],
               "oblique": [(0, -s * 2.5, c * 2.5), (0, c * 0.8, s * 0.8), (0.7, 0, 0)],
               "tilted": [(0.3, 0.6, 2.5), (0, 0.8, 0), (0.7, 0, 0)]}[orientation]
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns).T
    affine[:3, 3] = (10.5, -20.3, 7.1)
    image = MetaTensor(torch.from_numpy(array[None].astype(np.float32)), affine=torch.from_numpy(affine))
    if orientation == "tilted":  # its planes on their normal, three before the first; moved within them
        target = affine.copy()
        target[:3, 0] = (0, 0, 2.5)
        target[:3, 3] += (1.3, -2.1, -3 * 2.5)
        monkeypatch.setattr(module, "_interpolate", lambda *args: pytest.fail("interpolated as a general map"))
        ours = resample(array, affine, target, (36, 44, 36), padding=padding)
        monkeypatch.undo()
        theirs = SpatialResample(mode="bilinear", padding_mode="border" if padding == "border" else "zeros")(
            image, dst_affine=torch.from_numpy(target), spatial_size=(36, 44, 36))
        if padding == "constant":  # (the three planes before the stack and the three after: all fill)
            assert not ours[:3].any() and not ours[33:].any() and ours[3:33].any(axis=(1, 2)).all()
            # the box: the stack's planes; a target beyond it on every side takes the box's faces
            box = target @ np.diag([1.0, 1.0, 1.0, 1.0])
            box[:3, 3] += 3 * target[:3, 0]
            beyond = box.copy()
            beyond[:3, 3] += box[:3, :3] @ (-3.0, -2.0, -4.0)
            clamped = resample_clamped(array, affine, beyond, (37, 49, 43), box, (30, 44, 36))
            faces = np.ix_(*(np.clip(np.arange(n) - s, 0, m - 1) for n, s, m in ((37, 3, 30), (49, 2, 44), (43, 4, 36))))
            np.testing.assert_allclose(clamped, theirs[0].numpy()[3:33][faces], atol=1e-3)
            assert clamped[:, :, :4].any() and clamped[:3].any(axis=(1, 2)).all()  # (faces that hold the stack's values)
        np.testing.assert_allclose(ours, theirs[0].numpy(), atol=1e-3)
        return
    moved = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear")(Orientation(axcodes="RAS", labels=None)(image))
    target = np.asarray(moved.affine, dtype=float)
    if padding == "constant":  # MONAI's zeros padding, on a grid shifted so that part of it lies outside
        target[:3, 3] += (5.0, -3.0, 4.0)
        moved = SpatialResample(mode="bilinear", padding_mode="zeros")(
            image, dst_affine=torch.from_numpy(target), spatial_size=tuple(moved.shape[1:]))
    ours = resample(array, affine, target, tuple(moved.shape[1:]), padding=padding)
    np.testing.assert_allclose(ours, moved[0].numpy(), atol=1e-3)


@pytest.mark.parametrize("padding", ["border", "constant"])
def test_a_map_taken_plane_by_plane_gives_what_interpolating_it_whole_gives(padding, monkeypatch):
    """Maps under which each target plane lies across one source axis and only moves within itself
    (a sheared stack onto its regular grid or a model's grid, a model's grid back onto the stack):
    the planes along each target axis, across each source axis, between its planes or on them,
    within them scaled, flipped, swapped or sheared (a stack whose rows and columns are not quite
    orthogonal onto MONAI's orthogonal grid), partly or wholly beyond the source. Taken plane by
    plane, each gives the values of scipy's general path."""
    from inference import resample as module

    array = np.random.default_rng(2).integers(-1000, 1000, size=(14, 17, 19)).astype(np.int16)
    general, planes, taken = module._interpolate, module._shifted_planes, []
    monkeypatch.setattr(module, "_shifted_planes",
                        lambda *args, **kwargs: taken.append(args[-2:]) or planes(*args, **kwargs))
    cases = 0
    for along, across in itertools.product(range(3), range(3)):
        order = (along, *(j for j in range(3) if j != along))  # the target's axes, the planes' first
        others = [axis for axis in range(3) if axis != across]
        for within, step, scales, start in itertools.product(("aligned", "swapped", "sheared"), (1.0, 0.37, -0.8),
                                                           ((1.0, 1.0), (0.6, -1.3)), (-2.0, 0.25, 3.0)):
            planes_first = np.zeros((3, 3))
            planes_first[across, 0] = step
            rows, columns = others[::-1] if within == "swapped" else others
            planes_first[rows, 1], planes_first[columns, 2] = scales
            if within == "sheared":
                planes_first[rows, 2], planes_first[columns, 1] = 0.21, -3e-4
            planes_first[rows, 0], planes_first[columns, 0] = 0.43, -0.61  # each plane moved within itself
            linear = np.empty((3, 3))
            linear[:, order] = planes_first
            offset = np.array([start, 1.7, -2.2])
            target = np.eye(4)
            target[:3, :3], target[:3, 3] = linear, offset
            shape = tuple(np.array([16, 15, 18])[np.argsort(order)])
            ours = module.resample(array, np.eye(4), target, shape, padding=padding, fill=-1000.0)
            whole = general(array, linear, offset, shape, module._SCIPY_MODE[padding], -1000.0)
            np.testing.assert_allclose(ours, whole, atol=2e-3,
                                       err_msg=f"{along=} {across=} {within=} {step=} {scales=} {start=}")
            assert taken.pop() == (across, None if within == "sheared" else (rows, columns))
            assert (module.map_kind(np.eye(4), target) == "sheared") == (within != "sheared")
            cases += 1
    assert cases == 486


def _clamped_reference(array: np.ndarray, source: np.ndarray, target: np.ndarray, shape: tuple[int, ...],
                       box: np.ndarray, box_shape: tuple[int, ...], fill: float) -> np.ndarray:
    """Each target voxel centre, in the box's voxel coordinates, clipped to the box, then read from
    the source by scipy's general linear interpolation (constant padding): point by point."""
    from scipy import ndimage

    centres = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
    in_box = np.clip(centres @ (np.linalg.inv(box) @ target)[:3, :3].T + (np.linalg.inv(box) @ target)[:3, 3], 0,
                     np.array(box_shape) - 1)
    to_source = np.linalg.inv(source) @ box
    points = in_box @ to_source[:3, :3].T + to_source[:3, 3]
    return ndimage.map_coordinates(array.astype(np.float32), points.T, order=1, mode="grid-constant", cval=fill,
                                   prefilter=False).reshape(shape)


def test_a_stack_clamped_to_a_box_reads_each_voxel_at_its_nearest_point_in_the_box(monkeypatch):
    """`resample_clamped` (a sheared stack onto a model grid laid on its regular grid): a stack
    drifting along both in-plane axes, its regular grid's box, and target grids along the box's axes
    in any order, flipped, finer or coarser, beyond the box on every side by up to two and a half
    voxels or ending short of it, and a box narrower than one target step. Each voxel is the stack
    read at its centre's nearest point in the box, as a point-by-point reference reads it; air (the
    fill) beside the stack, within the box. Each block is interpolated plane by plane (never as a
    general map, nor with a general 2D map within each plane), the faces once each."""
    from inference import resample as module

    monkeypatch.setattr(module, "_interpolate", lambda *args: pytest.fail("interpolated as a general map"))
    planes, taken = module._shifted_planes, []
    monkeypatch.setattr(module, "_shifted_planes", lambda *args: taken.append(args[3].shape) or planes(*args)
                        if args[-1] is not None else pytest.fail("a general map within each plane"))
    rng = np.random.default_rng(5)
    array = rng.integers(-1000, 1000, size=(12, 15, 17)).astype(np.int16)
    for trial in range(40):
        drift = rng.uniform(-0.7, 0.7, 2)
        source = np.eye(4)
        source[1:3, 0] = drift
        box = np.eye(4)
        box[1:3, 3] = np.minimum(0, drift * 11)
        box_shape = (12, 15 + math.ceil(abs(drift[0]) * 11), 17 + math.ceil(abs(drift[1]) * 11))
        axes, signs, scales = rng.permutation(3), rng.choice([-1.0, 1.0], 3), rng.uniform(0.5, 2.2, 3)
        to_box = np.eye(4)
        to_box[:3, :3] = 0
        to_box[axes, range(3)] = signs * scales
        to_box[axes, 3] = [(0 if sign > 0 else box_shape[axis] - 1) + sign * rng.uniform(-2.5, 1.5)
                           for axis, sign in zip(axes, signs)]
        shape = [max(2, int(box_shape[axis] / scale) + int(rng.integers(-2, 4))) for axis, scale in zip(axes, scales)]
        if trial == 0:  # (the slices' box between two centres: each centre beyond one face or the other)
            along = int(np.flatnonzero(axes == 0)[0])
            to_box[0, along], to_box[0, 3], shape[along] = 15.0 * signs[along], 13.0 if signs[along] < 0 else -2.0, 2
        shape = tuple(shape)
        target = box @ to_box
        taken.clear()
        ours = module.resample_clamped(array, source, target, shape, box, box_shape, fill=-1024.0)
        np.testing.assert_allclose(ours, _clamped_reference(array, source, target, shape, box, box_shape, -1024.0),
                                   atol=2e-3, err_msg=f"{trial=}")
        assert ours.shape == shape and len(taken) <= 27 and sum(math.prod(block) for block in taken) <= math.prod(shape)
    with pytest.raises(ValueError, match="follow the box's axes"):  # (a target oblique to the box)
        turned = np.eye(4)
        turned[1:3, 1:3] = [[0.8, -0.6], [0.6, 0.8]]
        module.resample_clamped(array, source, box @ turned, (4, 4, 4), box, box_shape)


@pytest.mark.parametrize("mode", ["argmax", "threshold", "argmax of sigmoids", "argmax of logits"])
def test_a_label_found_below_the_usual_evidence_is_mapped_back(mode):
    """Only the boxes around a label's evidence are mapped back, and evidence is no fixed level (it
    was 0.05): a class that wins an argmax over 30 channels with 0.045, is above a threshold of
    0.03 with 0.04, or wins an argmax of sigmoids or logits (0.03 against 0.0025; -1 against -3),
    keeps every one of its voxels (given the raw outputs whose activation these are)."""
    from inference import pipeline
    from inference.volume import SeriesVolume

    volume = SeriesVolume(np.zeros((12, 12, 12), dtype=np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]), [], "1.2.3")
    block = (slice(4, 8), slice(3, 9), slice(5, 7))  # (the model grid is the source's, in RAS)
    if mode == "argmax":
        spec = _tissue_spec([1], channels=30)
        probabilities = np.full((30, 12, 12, 12), 0.1 / 29, dtype=np.float32)
        probabilities[0] = 0.9
        probabilities[(slice(None), *block)] = 0.955 / 29
        probabilities[(1, *block)] = 0.045  # the largest there, the others 0.033 each
    elif mode == "threshold":
        spec = threshold_spec(postprocessing={"mode": "threshold", "threshold": 0.03})
        probabilities = np.zeros((2, 12, 12, 12), dtype=np.float32)
        probabilities[(1, *block)] = 0.04
        probabilities[0] = 1 - probabilities[1]
    else:  # (what the activation gave: sigmoids, or the logits themselves)
        spec = threshold_spec(output_activation="sigmoid" if "sigmoid" in mode else "none")
        low, high = (0.0025, 0.03) if "sigmoid" in mode else (-3.0, -1.0)
        probabilities = np.full((2, 12, 12, 12), low, dtype=np.float32)
        probabilities[0] = high
        probabilities[0][block] = low
        probabilities[1][block] = high
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[block] = 1
    got = pipeline._labels_on_source(_raw(probabilities, spec.output_activation), torch.eye(4), volume, spec)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("classes", [4, 10])
def test_saturated_sigmoids_tie_as_their_activation_does(classes):
    """An argmax of sigmoids is the sigmoids' argmax, ties included: saturated, sigmoid(20) and
    sigmoid(30) are both 1.0, and the first of the two wins everywhere, on the source's own grid and
    on a finer one, however many classes (read from the logits, label 2 won where the corners
    agreed and label 1 between them)."""
    from inference import pipeline
    from inference.volume import SeriesVolume

    logits = np.full((classes, 8, 8, 8), -10.0, np.float32)
    logits[(slice(1, 3), *(slice(2, 6),) * 3)] = [[[[20.0]]], [[[30.0]]]]
    spec = _tissue_spec([1, 2], channels=classes).model_copy(update={"output_activation": "sigmoid"})
    for spacing in (1.0, 0.5):  # (the model grid is the source's in RAS: whole voxels, then a grid twice as fine)
        source = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag([spacing, spacing, spacing, 1.0])
        shape = (int(8 / spacing),) * 3
        volume = SeriesVolume(np.zeros(shape, dtype=np.int16), source, [], "1.2.3")
        got = pipeline._labels_on_source(torch.from_numpy(logits.copy()), torch.eye(4), volume, spec)
        assert set(np.unique(got)) == {0, 1} and np.count_nonzero(got) >= (4 / spacing) ** 3, (spacing, classes)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_labels_mapped_back_from_the_boxes_are_those_of_the_whole_model_grid_mapped_back(activation):
    """Only the boxes around the voxels where a named class beats the background are mapped back:
    on a finer, anisotropic, shifted source grid reaching past the model grid's last voxels, the
    labels are those of every channel interpolated at every source voxel, for smooth random
    fields of three classes (one of them unnamed, or none) reaching the grid's faces, whatever the
    activation (applied there only to the voxels interpolated). A box's interpolation is the whole
    grid's up to float32 rounding (its corner moves the points, the activation is applied to fewer
    voxels at once): a voxel may differ only where its two largest channels tie to it."""
    from scipy import ndimage

    from inference import pipeline
    from inference.resample import first_argmax, resample
    from inference.volume import SeriesVolume

    rng = np.random.default_rng(5)
    labelled = Counter()
    # (source spacing, shape): a little finer than the model's 1.5 mm, then five times finer, its
    # last voxels up to 2 mm past the model grid's last centres
    for spacing, shape in (((0.6, 0.7, 0.8), (40, 36, 30)), ((0.5, 0.4, 0.3), (50, 62, 82))):
        source = np.diag([*spacing, 1.0])
        source[:3, 3] = (-3.0, 2.0, 1.5)
        volume = SeriesVolume(np.zeros(shape, dtype=np.int16), source, [], "1.2.3")
        model_affine = pipeline._LPS_TO_RAS @ np.diag([1.5, 1.5, 1.5, 1.0])
        model_affine[:3, 3] = pipeline._LPS_TO_RAS[:3, :3] @ source[:3, 3]
        for _ in range(4):
            logits = ndimage.gaussian_filter(rng.normal(size=(3, 16, 17, 16)), sigma=(0, 2, 2, 2)) * 12.0
            logits[0] += 1.0  # (the background a little ahead: regions, not noise)
            raw = torch.from_numpy(logits.astype(np.float32))
            values = {"softmax": lambda v: torch.softmax(v, dim=0), "sigmoid": torch.sigmoid, "none": lambda v: v}[
                activation](raw.clone())
            channels = np.stack([resample(c.numpy(), model_affine, pipeline._LPS_TO_RAS @ source, volume.shape,
                                          padding="constant") for c in values])
            for named, declared in (([1], {"channels": 3}), ([2], {}), ([1, 2], {})):
                spec = _tissue_spec(named, **declared).model_copy(update={"output_activation": activation})
                whole = pipeline._named_only(first_argmax(channels, len(channels)), spec)
                got = pipeline._labels_on_source(raw.clone(), torch.from_numpy(model_affine), volume, spec)
                differ = np.argwhere(got != whole)
                for where in differ:
                    second, first = np.sort(channels[(slice(None), *where)])[-2:]
                    assert first - second <= 1e-6 * max(1.0, abs(first)), (spacing, named, tuple(where), first, second)
                assert len(differ) <= 4, (spacing, named, len(differ))
                labelled.update(int(v) for v in got[got > 0][:1])
    assert labelled[1] > 0 and labelled[2] > 0  # (the fields gave both classes somewhere)


def test_a_many_class_output_back_on_a_tilted_stack_takes_its_softmax_only_where_it_interpolates(monkeypatch):
    """A 12-class network's raw output back onto a tilted stack (a sheared map, decided plane by
    plane): not activated whole first, the softmax taken of the voxels read where the labels can
    change; the labels those of every channel's softmax interpolated at every source voxel (but
    where two classes tie to float32 rounding)."""
    from scipy import ndimage

    from inference import pipeline
    from inference.resample import first_argmax, map_kind, resample
    from inference.volume import SeriesVolume

    source = np.eye(4)  # slices 0.8 mm apart along z, each 0.25 mm further along y
    source[:3, :3] = np.array([(0.0, 0.25, 0.8), (0.0, 0.7, 0.0), (0.6, 0.0, 0.0)]).T
    source[:3, 3] = (-3.0, 2.0, 1.5)
    volume = SeriesVolume(np.zeros((30, 40, 36), dtype=np.int16), source, [], "1.2.3")
    model_affine = pipeline._LPS_TO_RAS @ np.diag([1.5, 1.5, 1.5, 1.0])
    model_affine[:3, 3] = pipeline._LPS_TO_RAS[:3, :3] @ source[:3, 3]
    assert volume.sheared and map_kind(model_affine, pipeline._LPS_TO_RAS @ source) == "sheared"
    logits = ndimage.gaussian_filter(np.random.default_rng(7).normal(size=(12, 15, 24, 16)), sigma=(0, 2, 2, 2)) * 12
    logits[0] += 1.0
    raw = torch.from_numpy(logits.astype(np.float32))
    spec = _tissue_spec([1, 2], channels=12)
    read, whole_activations = [], []
    softmax, activation = pipeline._softmax, pipeline._activation
    monkeypatch.setattr(pipeline, "_softmax", lambda values: read.append(values.shape[1]) or softmax(values))
    monkeypatch.setattr(pipeline, "_activation", lambda *args: whole_activations.append(1) or activation(*args))
    got = pipeline._labels_on_source(raw.clone(), torch.from_numpy(model_affine), volume, spec)
    assert read and not whole_activations
    channels = np.stack([resample(c, model_affine, pipeline._LPS_TO_RAS @ source, volume.shape, padding="constant")
                         for c in torch.softmax(raw, dim=0).numpy()])
    differ = np.argwhere(got != pipeline._named_only(first_argmax(channels, len(channels)), spec))
    for where in differ:
        second, first = np.sort(channels[(slice(None), *where)])[-2:]
        assert first - second <= 1e-6 * max(1.0, abs(first)), (tuple(where), first, second)
    assert len(differ) <= 4 and (got == 1).any() and (got == 2).any()


def test_labels_mapped_back_from_the_evidences_box_equal_those_of_the_whole_model_grid(monkeypatch):
    """The regions to map back are found inside the box of all the evidence grown by the
    dilation's reach: the same regions (boxes on the model grid) and the same labels on the
    source grid as dilating and labelling the whole model grid, with blobs at the grid's faces
    and corners, blobs two voxels apart (one region once dilated) and no evidence at all."""
    import torch
    from scipy import ndimage

    from inference import pipeline
    from inference.volume import SeriesVolume

    spec = threshold_spec()
    source = np.diag([0.6, 0.7, 0.8, 1.0])
    source[:3, 3] = (-3.0, 2.0, 1.5)
    volume = SeriesVolume(np.zeros((40, 36, 30), dtype=np.int16), source, [], "1.2.3")
    model_affine = pipeline._LPS_TO_RAS @ np.diag([1.5, 1.5, 1.5, 1.0])
    model_affine[:3, 3] = pipeline._LPS_TO_RAS[:3, :3] @ source[:3, 3]
    resample_box = pipeline._resample_box
    mapped = []

    def recording_box(probabilities, affine, lo, hi, *rest):
        mapped.append((tuple(int(v) for v in lo), tuple(int(v) for v in hi)))
        resample_box(probabilities, affine, lo, hi, *rest)

    monkeypatch.setattr(pipeline, "_resample_box", recording_box)
    rng = np.random.default_rng(8)
    grid = (16, 17, 16)
    for case, blobs in enumerate([[(0, 0, 0)], [(15, 16, 15), (0, 8, 15)], [(5, 5, 5), (5, 5, 10)],
                                  [(3, 12, 7), (10, 2, 2), (14, 14, 0)], [(8, 8, 8)], []]):
        probabilities = np.zeros((2, *grid), dtype=np.float32)
        for centre in blobs:
            box = tuple(slice(max(c - 1, 0), c + 2) for c in centre)
            probabilities[(1, *box)] = rng.uniform(0.3, 1.0, probabilities[(1, *box)].shape)
        probabilities[0] = 1 - probabilities[1]
        tensor = torch.from_numpy(probabilities)
        expected = np.zeros(volume.shape, dtype=np.uint8)  # the whole grid, as before
        regions, _ = ndimage.label(ndimage.binary_dilation(probabilities[1] > probabilities[0],
                                                           iterations=2))
        boxes = [(tuple(b.start for b in box), tuple(b.stop for b in box)) for box in ndimage.find_objects(regions)]
        for lo, hi in boxes:
            resample_box(tensor, model_affine, np.array(lo), np.array(hi), volume, spec, expected)
        mapped.clear()
        got = pipeline._labels_on_source(_raw(probabilities, "softmax"), torch.from_numpy(model_affine), volume, spec)
        assert mapped == boxes, case
        assert np.array_equal(got, expected) and got.any() == bool(blobs), case


def test_interpolating_in_slabs_gives_the_values_of_one_call_whatever_the_cores(monkeypatch):
    """Split along its first axis, each slab's offset moved by its first index, the output is
    scipy's one-call output up to one float32 step (the point's rounding), for diagonal and full
    maps, flips, both paddings, slabs of uneven sizes and more slabs than planes, small grids
    and a large one. The slabs depend on the output's size only: one, two or four cores give
    the very same values."""
    from scipy import ndimage

    from inference import resample as module

    rng = np.random.default_rng(3)
    small = rng.integers(-1000, 1000, size=(23, 30, 19)).astype(np.int16)
    large = rng.integers(-1000, 1000, size=(60, 64, 64)).astype(np.int16)
    cases = [(small, tuple(int(v) for v in rng.integers(1, 25, 3))) for _ in range(60)]
    cases += [(large, (100, 60, 60)), (large, (100, 60, 60))]
    for case, (array, shape) in enumerate(cases):
        if array is large:  # scales below one: the output covers the source with many voxels
            matrix = rng.uniform(-0.7, 0.7, (3, 3)) if case % 2 else rng.uniform(0.3, 0.7, 3)
        else:
            matrix = rng.uniform(-2, 2, (3, 3)) if case % 2 else rng.uniform(0.3, 3.5, 3) * rng.choice([-1, 1], 3)
        offset = rng.uniform(-10, 30, 3)
        mode = ("nearest", "grid-constant")[case // 2 % 2]
        whole = ndimage.affine_transform(array, matrix, offset, output_shape=shape, output=np.float32, order=1,
                                         mode=mode, cval=-5.0, prefilter=False)
        for slabs in (2, 3, 7):
            got = module._interpolate(array, matrix, offset, shape, mode, -5.0, slabs=slabs)
            np.testing.assert_array_max_ulp(got, whole, maxulp=1)
    # A map where the split moves a voxel by one step: one, two and four cores must still agree.
    array = np.random.default_rng(11).integers(-1000, 1000, size=(40, 40, 40)).astype(np.int16)
    scale = np.array([0.47320622082427327, 0.7107045918967085, 0.8417614016599406])
    offset = np.array([4.390755908538661, 8.456581619949329, 4.585332268794401])
    by_slabs = [module._interpolate(array, scale, offset, (60, 30, 30), "nearest", 0.0, slabs=k) for k in (1, 2)]
    assert not np.array_equal(*by_slabs), "this map no longer tells slab counts apart: pick another"
    monkeypatch.setattr(module, "MIN_SLAB_VOXELS", 60 * 30 * 30 // 4)  # four slabs by default
    by_cores = []
    for cores in (1, 2, 4):
        monkeypatch.setattr(module, "usable_cpus", lambda n=cores: n)
        by_cores.append(module._interpolate(array, scale, offset, (60, 30, 30), "nearest", 0.0))
    assert np.array_equal(by_cores[0], by_cores[1]) and np.array_equal(by_cores[0], by_cores[2])


def test_a_large_output_is_interpolated_on_one_thread_per_core(monkeypatch):
    """resample cuts a large output into slabs (here four) and interpolates them on a thread per
    core (here three, the caller's among them) at once; a thread that cannot be started leaves
    its slabs to the caller, each interpolated once. The values are the same either way."""
    import threading
    import types

    from inference import resample as module

    real = module.ndimage.affine_transform
    array = np.random.default_rng(4).integers(-1000, 1000, size=(40, 50, 44)).astype(np.int16)
    source, target = np.diag([0.7, 0.8, 2.5, 1.0]), np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (14, 20, 55)
    monkeypatch.setattr(module, "MIN_SLAB_VOXELS", 1000)
    monkeypatch.setattr(module, "usable_cpus", lambda: 3)
    three_at_once = threading.Barrier(3, timeout=30)  # passes only while three threads interpolate
    calls = []

    def recording(*args, **kwargs):
        first = threading.get_ident() not in {thread for thread, _ in calls}
        calls.append((threading.get_ident(), kwargs["output_shape"][0]))
        if first:
            three_at_once.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(module.ndimage, "affine_transform", recording)
    threaded = module.resample(array, source, target, shape)
    assert len({thread for thread, _ in calls}) == 3 and sorted(planes for _, planes in calls) == [3, 3, 4, 4]

    class Unstartable(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    calls.clear()

    def counting(*args, **kwargs):
        calls.append((threading.get_ident(), kwargs["output_shape"][0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module.ndimage, "affine_transform", counting)
    monkeypatch.setattr(module, "threading", types.SimpleNamespace(Thread=Unstartable))
    alone = module.resample(array, source, target, shape)
    # slabs 1 and 2 as their threads fail to start, then the caller's own 0 and 3: each once
    assert calls == [(threading.get_ident(), planes) for planes in (3, 3, 4, 4)]
    np.testing.assert_array_equal(alone, threaded)


def test_a_whole_voxel_map_is_copied_into_the_targets_axis_order(monkeypatch):
    """A map of flips and axis order only (a model without a spacing step) gives each target voxel
    its source voxel's value, as float32, in an array C-contiguous in the target's axis order
    (what the sliding window gathers its batches from): for all 48 such maps, in blocks that do
    not divide the volume, on one, two and three threads alike."""
    import itertools

    from inference import resample as module

    array = np.random.default_rng(12).integers(-1200, 1500, size=(37, 20, 23)).astype(np.int16)
    source = np.diag([0.7, 0.8, 2.5, 1.0])
    source[:3, 3] = (4.0, -7.0, 12.5)
    monkeypatch.setattr(module, "RELAY_BLOCK", (5, 7))
    monkeypatch.setattr(module, "MIN_BLOCKED_VOXELS", 0)
    for cores in (1, 2, 3):
        monkeypatch.setattr(module, "usable_cpus", lambda n=cores: n)
        for order in itertools.permutations(range(3)):
            for flips in itertools.product((1, -1), repeat=3):
                to_source = np.zeros((4, 4))  # target index -> source index
                to_source[3, 3] = 1.0
                for j, axis in enumerate(order):
                    to_source[axis, j] = flips[j]
                    to_source[axis, 3] = 0 if flips[j] > 0 else array.shape[axis] - 1
                shape = tuple(array.shape[axis] for axis in order)
                got = module.resample(array, source, source @ to_source, shape)
                indices = np.indices(shape).reshape(3, -1)
                expected = array[tuple((to_source[:3, :3] @ indices + to_source[:3, 3:]).astype(int))].reshape(shape)
                assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == shape
                np.testing.assert_array_equal(got, expected)


def test_labels_laid_over_labels_in_blocks_keep_every_label_already_there(monkeypatch):
    """A region's labels go onto the source grid from the model's axis order (a transposed view) in
    blocks: only their nonzero values are written, so a neighbouring region's labels already in the
    grid stay, for blocks that do not divide the grid, on one, two and three threads alike, and for
    a box small enough to be copied at once. Arrays of different shapes are refused before anything
    is written."""
    from inference import resample as module

    rng = np.random.default_rng(8)
    monkeypatch.setattr(module, "RELAY_BLOCK", (5, 7))
    for smallest_blocked, cores in [(0, 1), (0, 2), (0, 3), (1 << 18, 2)]:
        monkeypatch.setattr(module, "MIN_BLOCKED_VOXELS", smallest_blocked)
        monkeypatch.setattr(module, "usable_cpus", lambda n=cores: n)
        there = rng.integers(0, 3, size=(23, 19, 11)).astype(np.uint8)
        found = np.ascontiguousarray(rng.integers(0, 4, size=(11, 19, 23)).astype(np.uint8)).transpose(2, 1, 0)
        expected = np.where(found > 0, found, there)
        module.copy_in_blocks(there, found, nonzero_only=True)
        np.testing.assert_array_equal(there, expected)
        before = there.copy()
        with pytest.raises(ValueError, match=r"copying \(21, 19, 11\) into \(23, 19, 11\)"):
            module.copy_in_blocks(there, found[:21], nonzero_only=True)
        np.testing.assert_array_equal(there, before)


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "radiograph"])
def test_the_intensity_window_written_into_the_model_grid_equals_monais(orientation, monkeypatch):
    """to_model_space applies the intensity window slab by slab into the resampled array (MONAI's
    ScaleIntensityRange makes three model-grid temporaries): the values are MONAI's to the bit,
    for a grid in the source's axis order and for a transposed one (sagittal), and for one plane
    (a radiograph: slabs of its rows), over the slabs' edges (slabs of WINDOW_SLAB_VOXELS, made
    small here, that do not divide the planes); z-score runs whole (it needs the image's
    statistics)."""
    import torch
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    from inference import pipeline
    from inference.pipeline import _model_grid, to_model_space
    from inference.resample import resample
    from inference.volume import SeriesVolume

    size = (1, 61, 131) if orientation == "radiograph" else (37, 20, 23)
    array = np.random.default_rng(5).integers(-1200, 1500, size=size).astype(np.int16)
    columns = {"axial": [(0, 0, 2.5), (0, 0.8, 0), (0.7, 0, 0)], "sagittal": [(2.5, 0, 0), (0, 0, -0.8), (0, 0.7, 0)],
               "radiograph": [(0, 1.0, 0), (0, 0, -0.15), (0.15, 0, 0)]}
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns[orientation]).T
    volume = SeriesVolume(array, affine, [], "1.2.3")
    monkeypatch.setattr(pipeline, "WINDOW_SLAB_VOXELS", 3000)
    in_slabs, slabs = pipeline._in_slabs, []
    monkeypatch.setattr(pipeline, "_in_slabs", lambda tensor, transform, axis, slab: slabs.append(
        (tensor.shape[axis], slab, tensor.numel() // tensor.shape[axis])) or in_slabs(tensor, transform, axis, slab))
    spec = threshold_spec()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    target, shape = _model_grid(MetaTensor(torch.from_numpy(array[None]), affine=torch.from_numpy(lps_to_ras @ affine)),
                                spec)
    moved = torch.from_numpy(resample(array, lps_to_ras @ affine, target, shape))
    lo, hi = spec.preprocessing.intensity.window
    expected = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(moved[None])
    image = to_model_space(volume, spec)
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert torch.equal(image.as_tensor(), torch.as_tensor(expected))
    [(planes, slab, plane)] = slabs  # (planes along the axis that lies apart, not a multiple of the slab)
    assert slab == max(1, 3000 // plane) and 1 < slab < planes and planes % slab, (planes, slab, plane)
    np.testing.assert_array_equal(np.asarray(image.affine), target)
    zscore = threshold_spec(preprocessing={**spec.preprocessing.model_dump(),
                                           "intensity": {"window": None, "normalize": "zscore"}})
    assert torch.equal(to_model_space(volume, zscore).as_tensor(), torch.as_tensor(NormalizeIntensity()(moved[None])))


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal", "not orthogonal"])
def test_a_tilted_stack_goes_onto_the_models_grid_once_with_its_regular_grids_box_as_its_edges(plane, monkeypatch):
    """A tilted stack's input (to_model_space): the model's grid is laid on the stack's regular grid
    and reaches beyond that grid's box (by the rounding of a spacing that does not divide it). Each
    voxel is the stack read at its centre's nearest point in the box, as a point-by-point reference
    reads it: beyond the box, the box's faces, tissue where they hold tissue (not air), as a
    series' edges are repeated; beside the stack within the box, air (its lowest value). The
    regular grid's voxels are never made (no resampling onto it). Also where the stack's rows and
    columns are not quite orthogonal (0.06°: MONAI's model grid is orthogonal, its regular grid too)."""
    from inference import pipeline
    from inference import resample as resample_module
    from inference.pipeline import _LPS_TO_RAS, regular_grid, to_model_space
    from inference.volume import SeriesVolume

    rng = np.random.default_rng(3)
    array = (rng.integers(-100, 300, size=(23, 30, 27)) + 40).astype(np.int16)  # (tissue everywhere: no air)
    array[:, :2] = -1000  # (but air along the first rows)
    t = math.tan(math.radians(17))
    columns = {"axial": [(0, t, 2.0), (0, 0.8, 0), (0.7, 0, 0)], "sagittal": [(2.0, 0, t), (0, 0, -0.8), (0, 0.7, 0)],
               "coronal": [(t, 2.0, 0), (0, 0, -0.8), (0.7, 0, 0)],
               "not orthogonal": [(0, t, 2.0), (0, 0.8, 0), (0.7, 0.7e-3, 0.35e-3)]}[plane]
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns).T
    affine[:3, 3] = (4.5, -7.3, 11.2)
    volume = SeriesVolume(array, affine, [], "1.2.3")
    assert volume.sheared
    box, box_shape = regular_grid(volume)
    spec = threshold_spec(preprocessing={"orientation": "RAS", "spacing": [1.7, 1.7, 1.7], "intensity": {},
                                         "patch_size": [16, 16, 16]})
    monkeypatch.setattr(pipeline, "resample", lambda *args, **kwargs: pytest.fail("a sheared stack resampled twice"))
    planes, within = resample_module._shifted_planes, set()
    monkeypatch.setattr(resample_module, "_shifted_planes", lambda *args: within.add(args[-1]) or planes(*args))
    image = to_model_space(volume, spec)
    # each plane moved within itself along its rows and columns; a general 2D map only where they are not orthogonal
    assert (None in within) == (plane == "not orthogonal") and len(within) == 1
    target = np.asarray(image.affine, dtype=float)
    shape = tuple(image.shape[1:])
    # the model's grid reaches beyond the box along each of the box's axes (two, where the columns are not orthogonal)
    centres = np.array(list(itertools.product(*[(0, n - 1) for n in shape])))
    in_box = centres @ (np.linalg.inv(_LPS_TO_RAS @ box) @ target)[:3, :3].T + (np.linalg.inv(_LPS_TO_RAS @ box)
                                                                                  @ target)[:3, 3]
    overhang = np.maximum(in_box.max(axis=0) - (np.array(box_shape) - 1), -in_box.min(axis=0))
    assert (overhang > 0.05).sum() == (2 if plane == "not orthogonal" else 3), (overhang, box_shape)
    expected = _clamped_reference(array, _LPS_TO_RAS @ affine, target, shape, _LPS_TO_RAS @ box, box_shape, -1000.0)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=2e-3)
    every = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1).reshape(-1, 3)
    in_box = every @ (np.linalg.inv(_LPS_TO_RAS @ box) @ target)[:3, :3].T + (np.linalg.inv(_LPS_TO_RAS @ box)
                                                                               @ target)[:3, 3]
    beyond = (np.abs(in_box - np.clip(in_box, 0, np.array(box_shape) - 1)) > 0.05).any(axis=1)
    assert (image[0].numpy().reshape(-1)[beyond] > -500).mean() > 0.1  # (tissue there, as on the faces)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_the_sliding_window_blends_monais_values_to_the_bit(blend):
    """inference.windows sums the windows' weights slab by slab instead of in a map of the
    output's size: its output is MONAI's sliding_window_inference's to the bit, over images whose
    sides are not a multiple of the step or of the slab, one a window wide, one smaller than a
    window (padded, then cropped), windows of different sides, a side under 1 (the image's, as
    MONAI takes it), several overlaps and batch sizes (a last call of one window among them: a copy,
    as MONAI's), and a predictor whose values differ per window and with its input's layout. A
    predictor that answers another size is an error that says so."""
    import torch
    from monai.inferers import sliding_window_inference

    from inference.windows import output_bytes, sliding_window

    rng = np.random.default_rng(11)
    mix = torch.from_numpy(rng.normal(size=(3, 1)).astype(np.float32))

    layouts: list[tuple[int, bool]] = []  # what each call was given: how many windows, and whether a copy

    def predictor(windows: torch.Tensor) -> torch.Tensor:  # three channels, not linear in the input
        layouts.append((windows.shape[0], windows.is_contiguous()))
        return torch.sin(windows * 7.0) * mix[None, :, :, None, None] + windows.mean(dim=(2, 3, 4), keepdim=True)

    for size, roi, overlap, batch in [((37, 20, 41), (16, 16, 16), 0.25, 4), ((33, 16, 50), (16, 12, 20), 0.5, 1),
                                      ((9, 40, 21), (16, 16, 8), 0.0, 3), ((18, 18, 18), (16, 16, 16), 0.75, 2),
                                      ((5, 7, 9), (4, 6, 8), 0.0, 7), ((12, 20, 30), (-1, 16, 16), 0.25, 2)]:
        image = torch.from_numpy(rng.random((1, 1, *size), dtype=np.float32))
        expected = sliding_window_inference(image, roi, batch, predictor, overlap, mode=blend)
        given, layouts[:] = layouts[:], []
        got = sliding_window(image, roi, batch, predictor, overlap, blend)
        assert layouts == given, (size, roi, overlap, batch)
        layouts.clear()
        assert got.shape == expected.shape == (1, 3, *size) and got.dtype == torch.float32
        assert torch.equal(got, torch.as_tensor(expected)), (size, roi, overlap, batch)
        # into an output allocated before (inference.room: its memory checked first): that very one
        _, padded = output_bytes(roi, size, 3)
        given_output = torch.zeros((1, 3, *padded))
        into = sliding_window(image, roi, batch, predictor, overlap, blend, given_output)
        layouts.clear()
        assert torch.equal(into, got) and into.untyped_storage().data_ptr() == given_output.untyped_storage().data_ptr()
    # an FP16 network's output, weighted in float16 in place and added into float32, as MONAI does
    image = torch.from_numpy(rng.random((1, 1, 37, 20, 41), dtype=np.float32))
    expected = sliding_window_inference(image, (16, 16, 16), 4, lambda w: predictor(w).half(), 0.25, mode=blend)
    got = sliding_window(image, (16, 16, 16), 4, lambda w: predictor(w).half(), 0.25, blend)
    assert got.dtype == torch.float32 and torch.equal(got, torch.as_tensor(expected))
    with pytest.raises(ValueError, match=r"the predictor answered \(2, 3, 8, 8, 8\) for 2 windows of \(16, 16, 16\)"):
        sliding_window(torch.zeros((1, 1, 20, 20, 20)), (16, 16, 16), 2,
                       lambda windows: predictor(windows)[:, :, ::2, ::2, ::2], 0.25, blend)
    with pytest.raises(ValueError, match=r"the predictor answered 3 channels for an output of 7"):
        sliding_window(image, (16, 16, 16), 4, predictor, 0.25, blend, torch.zeros((1, 7, 37, 20, 41)))
    with pytest.raises(ValueError, match=r"an output of \(1, 3, 37, 20, 40\) given for windows over \(37, 20, 41\)"):
        sliding_window(image, (16, 16, 16), 4, predictor, 0.25, blend, torch.zeros((1, 3, 37, 20, 40)))


@pytest.mark.parametrize("answer, shape", [
    (lambda out: out[:, :, ::2, ::2, ::2], "(2, 2, 8, 8, 8)"),  # a model that halves its input
    (lambda out: np.concatenate([out, out[:, :1]], axis=1), "(2, 3, 16, 16, 16)"),  # a channel more than its labels
])
def test_a_segmentation_model_whose_output_is_not_its_windows_size_fails_the_job_saying_so(
        tmp_path, model_repository, answer, shape):
    """The way back takes the model's output voxel for voxel on its input's grid, a channel per
    label value: an output of another size, or with other channels, is the model's error, named,
    not labels on the wrong voxels (or values no label has)."""
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    backend = _local(model_repository)

    class Answering:  # the real model's output, changed
        def infer(self, batch):
            return answer(backend.infer(batch))

    with pytest.raises(BackendError, match=r"model threshold answered windows of shape \(2, 1, 16, 16, 16\) with an"
                                           rf" output of shape {re.escape(shape)}: a segmentation model's output is"
                                           r" \(windows, 2 channels, \*window\)"):
        segment(load_series(read_series(files)), threshold_spec(preprocessing={
            "orientation": "RAS", "intensity": {"window": list(WINDOW)}, "patch_size": [16, 16, 16], "batch_size": 2}),
            Answering())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_model_answering_nan_fails_the_job_saying_so(tmp_path, model_repository, value):
    """One NaN in one window of a model's output (an FP16 overflow, a broken export) fails the job
    naming the model: read on, it gave no labels there, or labels wherever a box fell. So does an
    infinity under a softmax (its probabilities are NaN there; read on lazily, its class); minus
    infinity in a class where another is finite is a probability of 0 (a log-softmax's): the job
    goes on, its labels those of the model's own output but around that voxel."""
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    backend = _local(model_repository)
    calls: list[int] = []

    class Answering:  # the real model's output, a NaN in one voxel of its third call
        def infer(self, batch):
            answer = backend.infer(batch)
            calls.append(1)
            if len(calls) == 3:
                answer[0, 1, 5, 6, 7] = value
            return answer

    spec = threshold_spec(preprocessing={"orientation": "RAS", "intensity": {"window": list(WINDOW)},
                                         "patch_size": [16, 16, 16], "batch_size": 2})
    if value < 0:
        labels = segment(load_series(read_series(files)), spec, Answering()).labels
        clean = segment(load_series(read_series(files)), spec, backend).labels
        assert labels.any() and np.count_nonzero(labels != clean) <= 27  # (a model voxel: ~2 source voxels a side)
        return
    with pytest.raises(BackendError, match=r"model threshold answered NaN \(not a number\), infinities of both"
                                           r" signs, or an infinity under its softmax \(whose probabilities are NaN"
                                           r" there\): no result can be read from it"):
        segment(load_series(read_series(files)), spec, Answering())
    assert len(calls) > 3  # (the windows ran on: the whole output is read once, after)


@pytest.mark.parametrize("fails", [False, True], ids=["done", "failed"])
def test_a_job_lets_go_of_its_output_before_the_room_counts_it_free(tmp_path, model_repository, monkeypatch, fails):
    """inference.room: once a job's output is released from the count, the next job's check
    reads the process's memory without it. So it must be gone by then, also when the job fails
    mid-way: its traceback, kept until the failure is recorded and notified, holds the frames
    the output was in."""
    import weakref

    from inference.room import ARRAYS

    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    backend = _local(model_repository)
    outputs: list[weakref.ref] = []
    alive_at_release: list[bool] = []
    allocate, release = ARRAYS.allocate, ARRAYS.release

    def allocating(*args):
        output, held = allocate(*args)
        outputs.append(weakref.ref(output))
        return output, held

    def releasing(held):
        alive_at_release.append(outputs[-1]() is not None)
        release(held)

    monkeypatch.setattr(ARRAYS, "allocate", allocating)
    monkeypatch.setattr(ARRAYS, "release", releasing)
    calls: list[int] = []

    class Answering:  # the real model, failing at its third call
        def infer(self, batch):
            calls.append(1)
            if fails and len(calls) == 3:
                raise BackendError("model threshold failed at its third call")
            return backend.infer(batch)

    spec = threshold_spec(preprocessing={"orientation": "RAS", "intensity": {"window": list(WINDOW)},
                                         "patch_size": [16, 16, 16], "batch_size": 2})
    if fails:
        with pytest.raises(BackendError, match="third call") as caught:
            segment(load_series(read_series(files)), spec, Answering())
        assert caught.value.__traceback__ is not None  # (still held here, as the runner holds it)
    else:
        assert segment(load_series(read_series(files)), spec, Answering()).labels.any()
    assert alive_at_release == [False] and len(calls) >= 3


def test_a_segmentation_tells_the_models_calls_from_the_sliding_windows_own_work(tmp_path, model_repository):
    """`seconds["model"]` is the backend's calls alone, inside the sliding window's
    `seconds["inference"]`: what benchmarks.end_to_end leaves out as the model's compute (the
    windows gathered and their outputs blended are the node's)."""
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    backend = _local(model_repository)
    calls: list[float] = []

    class Clocked:  # the real backend, each call timed from inside
        def infer(self, batch):
            start = time.perf_counter()
            try:
                return backend.infer(batch)
            finally:
                calls.append(time.perf_counter() - start)

    result = segment(load_series(read_series(files)), threshold_spec(preprocessing={
        "orientation": "RAS", "intensity": {"window": list(WINDOW)}, "patch_size": [16, 16, 16], "overlap": 0.25,
        "batch_size": 2}), Clocked())
    assert len(calls) > 1
    assert sum(calls) <= result.seconds["model"] < result.seconds["inference"]


def test_the_source_voxels_are_let_go_while_the_model_runs_and_read_again_when_needed(tmp_path, model_repository,
                                                                                     monkeypatch):
    """From inference on, the volume's voxels are not in memory (they would be a job's peak beside
    the model's input and output); the first read of `array` after that reads
    them again from the same files. The result is the one of a volume kept whole, also after a
    model that failed on the same volume (a shadow run reuses it). A file replaced in between (a
    resend) makes that read a transient failure, as on the first read; a volume built in memory,
    or given other voxels since it was read, keeps them."""
    from inference import volume as module
    from inference.volume import SeriesChanged, SeriesVolume
    from node.jobs.failures import is_transient

    monkeypatch.setattr(module, "DEFER_BYTES", 64)  # Pixel Data stays in the files, as a CT's does
    files, _ = _sphere_series(tmp_path / "s", *GEOMETRIES["axial"])
    backend = _local(model_repository)
    volume = load_series(read_series(files))
    whole = SeriesVolume(volume.array.copy(), volume.affine, volume.datasets, volume.frame_of_reference_uid)
    assert not whole.set_pixels_aside() and "array" in vars(whole)
    seen: list[bool] = []

    class Watching:  # the real backend, noting whether the volume holds its voxels while the model runs
        def __init__(self, watched: SeriesVolume):
            self.watched = watched

        def infer(self, batch):
            seen.append("array" in vars(self.watched))
            return backend.infer(batch)

    result = segment(volume, threshold_spec(), Watching(volume))
    kept = segment(whole, threshold_spec(), backend)
    assert seen and not any(seen) and "array" not in vars(volume) and volume.shape == whole.array.shape
    assert volume.intensity() == whole.intensity() and "array" not in vars(volume)  # a run's figures: no read
    np.testing.assert_array_equal(result.labels, kept.labels)
    assert [f.volume_mm3 for f in result.findings] == [f.volume_mm3 for f in kept.findings] != []
    assert [f.centroid for f in result.findings] == [f.centroid for f in kept.findings]
    np.testing.assert_array_equal(volume.array, whole.array)  # read again, once
    assert "array" in vars(volume)

    class Failing:  # the backend fails mid-inference: the voxels come back all the same (a shadow
        def infer(self, batch):  # run on the same volume comes next)
            raise BackendError("the model server went away")

    with pytest.raises(BackendError):
        segment(volume, threshold_spec(), Failing())
    np.testing.assert_array_equal(segment(volume, threshold_spec(), backend).labels, kept.labels)
    np.testing.assert_array_equal(volume.array, whole.array)
    for other in (dataclasses.replace(volume, array=volume.array * 0), copy.copy(volume)):
        other.array = volume.array * 0  # voxels given since it was read: never replaced by the files'
        seen.clear()
        segment(other, threshold_spec(), Watching(other))
        assert seen and all(seen) and not other.array.any()

    volume = load_series(read_series(files))
    segment(volume, threshold_spec(), backend)
    resent = pydicom.dcmread(files[5])  # a resend renames a new copy of one instance over the stored file
    resent.save_as(tmp_path / "resent.dcm", enforce_file_format=True)
    (tmp_path / "resent.dcm").replace(files[5])
    os.utime(files[5], ns=(1, 1))
    with pytest.raises(SeriesChanged, match="was replaced while its series was read") as caught:
        volume.array
    assert is_transient(caught.value)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_the_activation_written_into_the_logits_equals_torchs(activation):
    """The pipeline applies the output activation slab by slab, in the logits' own memory (a
    second class x volume array would be a job's peak): the values are torch's, slab edges
    included (37 slices: not a multiple of the slab)."""
    import torch

    from inference.pipeline import _activation
    from inference.spec import ModelSpec

    spec = ModelSpec.model_validate({**threshold_spec().model_dump(), "output_activation": activation})
    logits = torch.from_numpy(np.random.default_rng(3).normal(0, 4, size=(1, 3, 37, 9, 11)).astype(np.float32))
    expected = torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)
    out = _activation(logits, spec)
    assert out.data_ptr() == logits.data_ptr()  # in place
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    scores = torch.from_numpy(np.array([[0.5, -1.0, 2.0]], dtype=np.float32))  # a classifier's (batch, class)
    expected = torch.softmax(scores, dim=1) if activation == "softmax" else torch.sigmoid(scores)
    torch.testing.assert_close(_activation(scores, spec), expected, rtol=0, atol=1e-7)


def test_separate_boxes_find_the_components_of_the_whole_grid():
    """Labelling box by box (findings, cleaning) finds exactly the components of the whole grid."""
    from scipy import ndimage

    from inference.findings import separate_boxes

    rng = np.random.default_rng(7)
    labels = np.zeros((60, 80, 70), np.uint8)
    for _ in range(25):
        centre = rng.integers(0, [60, 80, 70])
        size = rng.integers(1, 6, 3)
        labels[tuple(slice(max(0, c - d), c + d) for c, d in zip(centre, size))] = rng.integers(1, 3)
    whole = sorted(np.bincount(ndimage.label(labels > 0)[0].ravel())[1:].tolist())
    boxes = separate_boxes(labels)
    per_box = sorted(n for box in boxes for n in np.bincount(ndimage.label(labels[box] > 0)[0].ravel())[1:].tolist())
    assert len(boxes) > 1 and per_box == whole
    covered = np.zeros(labels.shape, bool)
    for box in boxes:
        assert not covered[box].any()  # disjoint
        covered[box] = True
    assert not labels[~covered].any()


def test_foreground_box_is_the_smallest_box_holding_every_nonzero_voxel():
    """Against the box read off np.nonzero, for labels (uint8), evidence (bool) and signed and
    float values (negative ones too, which a maximum would miss), on views that are not
    contiguous and on grids with an axis of length 0."""
    from inference.findings import foreground_box

    rng = np.random.default_rng(11)
    for dtype, values in ((np.uint8, [1, 2, 255]), (bool, [True]), (np.int16, [-1, 3]), (np.float32, [-0.5, 0.25])):
        for ndim in (1, 2, 3, 4):
            for _ in range(40):
                grid = np.zeros(rng.integers(0, 7, ndim), dtype)  # an axis of length 0 too: nothing held
                for _ in range(rng.integers(0, 4) if grid.size else 0):
                    grid[tuple(rng.integers(0, n) for n in grid.shape)] = rng.choice(values)
                for view in (grid, grid[::-1], grid.T):
                    found = np.nonzero(view)
                    expected = None if not found[0].size else tuple(
                        slice(int(axis.min()), int(axis.max()) + 1) for axis in found)
                    assert foreground_box(view) == expected, (dtype, view)


def test_a_truncated_file_is_a_permanent_failure_and_compressed_files_are_read_whole(tmp_path, monkeypatch):
    """A file shorter than its Pixel Data header says is refused for good (not retried for an
    hour as if it were being replaced); compressed data sets are read whole (pydicom decodes them)."""
    from inference import volume as module
    from node.jobs.failures import is_transient

    monkeypatch.setattr(module, "DEFER_BYTES", 64)
    files = write_ct_series(np.zeros((4, 12, 10)), tmp_path / "s", SeriesGeometry())
    files[1].write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(SeriesError) as caught:
        load_series(read_series(files))
    assert not is_transient(caught.value)
    rle = pydicom.dcmread(files[0])
    rle.compress(pydicom.uid.RLELossless)
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    (ds,) = read_series([tmp_path / "rle.dcm"])
    assert ds.get_item("PixelData", keep_deferred=True).value is not None


def test_reorientation_without_spacing_is_an_exact_copy():
    """A model without a spacing step: only flips and axis order, so the voxels are copied (no
    interpolation), exactly as MONAI's Orientation gives them."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from inference.resample import resample

    array = np.random.default_rng(2).integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = np.array([(2.5, 0, 0), (0, 0, -0.8), (0, 0.7, 0)]).T  # sagittal-like
    affine[:3, 3] = (1.0, 2.0, 3.0)
    moved = Orientation(axcodes="RAS", labels=None)(MetaTensor(torch.from_numpy(array[None]), affine=torch.from_numpy(affine)))
    ours = resample(array, affine, np.asarray(moved.affine, dtype=float), tuple(moved.shape[1:]))
    np.testing.assert_array_equal(ours, moved[0].numpy().astype(np.float32))


def _measured_voxel_by_voxel(labels: np.ndarray, volume, spec) -> list[tuple]:
    """The findings' measurements from every voxel's index (np.argwhere), every pair of voxels of a
    slice compared: slow and plain, the reference for `measure`."""
    from scipy import ndimage
    from scipy.spatial.distance import pdist

    def one(indices: np.ndarray) -> tuple:
        widths = [pdist(volume.to_patient(indices[indices[:, 0] == k])).max()
                  for k in np.unique(indices[:, 0]) if (indices[:, 0] == k).sum() > 1]
        return (len(indices), tuple(volume.to_patient(indices.mean(axis=0))[0]), tuple(indices.min(axis=0)),
                tuple(indices.max(axis=0)), max(widths, default=0.0))

    def labelled(value: int, indices: np.ndarray) -> tuple:
        return (value, *one(indices))

    out = []
    for label in spec.labels:
        if spec.postprocessing.findings != "per_component":
            out += [labelled(label.value, np.argwhere(labels == label.value))] if (labels == label.value).any() else []
            continue
        components, count = ndimage.label(labels == label.value)
        out += sorted((labelled(label.value, np.argwhere(components == n)) for n in range(1, count + 1)),
                      key=lambda m: -m[1])
    return out


@pytest.mark.parametrize("many_values", [8, 0])
def test_findings_measure_as_every_voxel_would_and_hold_no_list_of_their_voxels(monkeypatch, many_values):
    """`measure` reads count, centroid, box and the longest in-plane diameter off each finding's mask
    (its projections, and the first and last voxel of each row for the diameter): the same as from
    every voxel's index and every pair of voxels of a slice, on an oblique, anisotropic grid, for
    blobs, boxes, lines along each axis and diagonally, single voxels and scattered ones, per label
    and per component, each finding read off its mask's projections and, if its box is small, off its
    voxels' indices; each label looked for over the box of all, or in its own box found for all in
    one pass (as for a network of many classes). An organ-sized finding is measured without
    allocating its voxels' indices (np.argwhere: 24 bytes a voxel)."""
    from inference import findings
    from inference.findings import measure
    from inference.spec import ModelSpec
    from inference.volume import SeriesVolume
    from tests.fuzz.targets import allocation_ceiling

    code = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
    labels_spec = [{"value": v, "name": f"L{v}", "category": code, "type": code} for v in (1, 2)]
    specs = [ModelSpec.model_validate({"name": "m", "task": "segmentation", "labels": labels_spec,
                                       "postprocessing": {"findings": reported}})
             for reported in ("per_label", "per_component")]
    angle = math.radians(25)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)],
                               [1.0, 0.0, 0.0]]) @ np.diag([2.5, 0.7, 0.9])
    affine[:3, 3] = (-120.0, 35.5, 80.25)
    volume = SeriesVolume(np.zeros((1, 1, 1), np.float32), affine, [], "1.2.3")
    rng = np.random.default_rng(5)
    grids = []
    for _ in range(12):
        grid = np.zeros((rng.integers(1, 9), rng.integers(1, 40), rng.integers(1, 40)), np.uint8)
        k, r, c = np.indices(grid.shape)
        centre, radii = rng.uniform(0, grid.shape), rng.uniform(0.5, 12, 3)
        grid[(((np.stack([k, r, c], -1) - centre) / radii) ** 2).sum(-1) <= 1] = 1  # a blob
        corner, size = rng.integers(0, grid.shape), rng.integers(1, 6, 3)
        grid[tuple(slice(int(a), int(a) + int(n)) for a, n in zip(corner, size))] = 2  # a box
        grid[rng.random(grid.shape) < 0.01] = rng.integers(1, 3)  # scattered voxels
        grids.append(grid)
    lines = np.zeros((4, 30, 30), np.uint8)
    lines[0, 3, 2:25] = 1  # along a row
    lines[1, 2:28, 7] = 1  # along a column
    lines[2, np.arange(5, 25), np.arange(3, 23)] = 2  # diagonally
    lines[3, 29, 29] = 1  # one voxel
    lines[3, 0, 0] = 2
    long_lines = np.zeros((3, 100, 100), np.uint8)  # more row ends than are compared pair by pair
    long_lines[0, 5:95, 40] = 1  # along a column: every end on one line (no hull)
    long_lines[1, np.arange(3, 97), np.arange(99, 5, -1)] = 2  # diagonally
    r, c = np.indices((100, 100))
    long_lines[2][((r - 48) / 45.0) ** 2 + ((c - 51) / 30.0) ** 2 + 0.004 * (r - 48) * (c - 51) <= 1] = 1  # a hull
    grids += [lines, long_lines, np.zeros((3, 4, 5), np.uint8)]
    for grid, spec, small_box in itertools.product(grids, specs, (0, findings.SMALL_BOX, 10**9)):
        monkeypatch.setattr(findings, "SMALL_BOX", small_box)  # projections always, by the box's size, indices
        monkeypatch.setattr(findings, "MANY_VALUES", many_values)
        measured = measure(grid, volume, spec)
        by_component = spec.postprocessing.findings == "per_component"
        assert [(f.label.value, f.component) for f in measured] == [  # per label, numbered by size if components
            (value, n if by_component else None) for value in (1, 2)
            for n in range(1, 1 + sum(f.label.value == value for f in measured))]
        assert all(f.volume_mm3 == f.voxel_count * volume.voxel_volume for f in measured)
        found = [(f.label.value, f.voxel_count, f.centroid, f.bbox_min_index, f.bbox_max_index,
                  f.longest_in_plane_diameter_mm) for f in measured]
        expected = _measured_voxel_by_voxel(grid, volume, spec)
        assert [f[:2] for f in found] == [e[:2] for e in expected]  # per component: largest first
        key = lambda m: (m[0], m[1], m[3], m[4])  # equal sizes: in the order of the grid's boxes
        for f, e in zip(sorted(found, key=key), sorted(expected, key=key)):
            assert f[:2] == e[:2] and f[3:5] == e[3:5], (f, e)
            assert f[2] == pytest.approx(e[2], abs=1e-9) and f[5] == pytest.approx(e[5], rel=1e-12), (f, e)
    monkeypatch.undo()
    ties = np.zeros((9, 6, 6), np.uint8)
    ties[6:8, 1:3, 1:3] = 1  # 8 voxels, later in the grid
    ties[0:2, 3:5, 3:5] = 1  # 8 voxels, first in the grid
    assert [(f.component, f.bbox_min_index) for f in measure(ties, volume, specs[1])] == [(1, (0, 3, 3)),
                                                                                         (2, (6, 1, 1))]
    organ = np.zeros((60, 160, 160), np.uint8)
    organ[2:58, 10:150, 20:155] = 1  # 1.06 million voxels: their indices would be 25 MB
    for spec, ceiling in zip(specs, (3, 7)):  # masks of the box, 1 byte a voxel; components numbered in 4 bytes
        with allocation_ceiling(ceiling * organ.nbytes, "measuring an organ"):
            (finding,) = measure(organ, volume, spec)
        assert finding.voxel_count == 56 * 140 * 135


@pytest.mark.parametrize("many_values", [8, 0])
def test_small_components_are_dropped_and_the_largest_kept_as_over_the_whole_grid(monkeypatch, many_values):
    """`clean_labels` works label by label within each label's own box; what it keeps is what
    labelling the whole grid keeps: every component of at least the spec's minimum, or only the
    largest (one of them, where several are largest), for blobs, boxes and scattered voxels; each
    label looked for over the box of all, or in its own box found for all in one pass."""
    from scipy import ndimage

    from inference import findings
    from inference.findings import clean_labels

    monkeypatch.setattr(findings, "MANY_VALUES", many_values)
    from inference.spec import ModelSpec

    code = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
    labels_spec = [{"value": v, "name": f"L{v}", "category": code, "type": code} for v in (1, 2, 3)]
    rng = np.random.default_rng(8)
    for trial in range(30):
        grid = np.zeros((rng.integers(1, 9), rng.integers(1, 40), rng.integers(1, 40)), np.uint8)
        for _ in range(rng.integers(1, 5)):
            corner, size = rng.integers(0, grid.shape), rng.integers(1, 8, 3)
            grid[tuple(slice(int(a), int(a) + int(n)) for a, n in zip(corner, size))] = rng.integers(1, 4)
        grid[rng.random(grid.shape) < 0.02] = rng.integers(1, 4)
        minimum, largest_only = int(rng.integers(1, 12)), bool(trial % 2)
        spec = ModelSpec.model_validate({"name": "m", "task": "segmentation", "labels": labels_spec,
                                         "postprocessing": {"min_component_voxels": minimum,
                                                            "keep_largest_component": largest_only}})
        cleaned = clean_labels(grid.copy(), spec)
        for value in (1, 2, 3):
            components, count = ndimage.label(grid == value)
            sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
            if not largest_only:
                kept = np.flatnonzero(sizes >= minimum) + 1
                assert np.array_equal(cleaned == value, np.isin(components, kept)), (trial, value)
                continue
            choices = [np.isin(components, [n + 1]) for n in np.flatnonzero(sizes == sizes.max())] if count else []
            assert any(np.array_equal(cleaned == value, c) for c in choices) or not (count or (cleaned == value).any())
        assert np.all((cleaned == grid) | (cleaned == 0))  # only ever cleared, never relabelled
    ties = np.zeros((9, 6, 6), np.uint8)
    ties[6:8, 1:3, 1:3] = 1
    ties[0:2, 3:5, 3:5] = 1
    spec = ModelSpec.model_validate({"name": "m", "task": "segmentation", "labels": labels_spec[:1],
                                     "postprocessing": {"keep_largest_component": True}})
    first = ties.copy()
    first[6:] = 0
    assert np.array_equal(clean_labels(ties, spec), first)  # the first of the two largest in the grid


def test_labels_from_channels_one_at_a_time_are_those_of_all_channels_at_once():
    """The labels made channel by channel are those of the whole stack: np.argmax over the channels
    (the first on ties, the first NaN taken as the maximum, on transposed views as the resampling
    gives them; the last channel not kept as the running maximum when their count is known; in
    blocks of planes on the usable CPUs, up to 40 channels), and for `threshold` every label's
    channel at or above it, the spec's later label winning where two are above."""
    from inference.pipeline import _above_threshold
    from inference.resample import argmax_in_blocks, first_argmax

    rng = np.random.default_rng(3)
    for channels in (1, 2, 3, 5):
        for _ in range(20):
            stack = rng.integers(0, 4, (channels, 5, 6, 7)).astype(np.float32) / 4  # ties are common
            stack[rng.random(stack.shape) < 0.03] = np.nan
            views = [c.transpose(2, 0, 1).copy().transpose(1, 2, 0) for c in stack]  # not C-ordered
            assert np.array_equal(first_argmax(iter(views)), np.argmax(stack, axis=0)), channels
            assert np.array_equal(first_argmax(iter(views), channels), np.argmax(stack, axis=0)), channels
            assert np.array_equal(np.stack(views), stack, equal_nan=True)  # the channels given are only read
    for channels, planes in ((2, 3), (12, 21), (40, 9)):  # in blocks of planes on the usable CPUs (over 2^18 voxels)
        stack = rng.integers(0, 4, (channels, planes, 120, 111)).astype(np.float32) / 4
        stack[rng.random(stack.shape) < 0.01] = np.nan
        assert np.array_equal(argmax_in_blocks(stack[:, ::-1]), np.argmax(stack[:, ::-1], axis=0)), channels
    code = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}
    spec = threshold_spec(labels=[{"value": v, "name": f"L{v}", "category": code, "type": code} for v in (2, 1)],
                          postprocessing={"mode": "threshold", "threshold": 0.5})
    stack = rng.random((3, 8, 9, 10)).astype(np.float32)
    expected = np.zeros(stack.shape[1:], np.uint8)
    for value in (2, 1):  # the spec's order
        expected[stack[value] >= 0.5] = value
    assert np.array_equal(_above_threshold(((value, stack[value]) for value in (2, 1)), spec), expected)
    assert (expected == 1).any() and ((stack[1] >= 0.5) & (stack[2] >= 0.5)).any()  # the order did matter


def test_argmax_of_resampled_channels_interpolates_only_where_the_answer_can_change(monkeypatch):
    """`resample_argmax` gives the argmax of every channel resampled (linear, the source's edge
    fading to the fill), for grids that flip, permute and scale the axes, reach beyond the source,
    are sheared (each plane across one source axis: decided plane by plane) and (oblique) do not map
    axis to axis, for float32, float64 and uint8 channels, with exact ties,
    the undecided voxels taken in one round or several; where it differs, two channels came out
    equal to float32 rounding. A whole-voxel map takes the argmax of the channels as they are
    (a NaN stays where it is), beyond the source label 0, nothing interpolated; label 255 is found
    as any other."""
    from scipy import ndimage

    from inference import resample as module
    from inference.resample import first_argmax, resample, resample_argmax

    def resampled_whole(channels: np.ndarray, source: np.ndarray, target: np.ndarray, shape: tuple) -> np.ndarray:
        return np.stack([resample(c, source, target, shape, padding="constant") for c in channels])

    planes, by_planes = module._cells_plane_by_plane, []
    monkeypatch.setattr(module, "_cells_plane_by_plane", lambda *args: by_planes.append(args[-2:]) or planes(*args))
    rng = np.random.default_rng(21)
    for trial in range(60):
        monkeypatch.setattr(module, "UNDECIDED_CHUNK", [module.UNDECIDED_CHUNK, 1, 700][trial % 3])  # in rounds
        monkeypatch.setattr(module, "UNDECIDED_VALUES", [module.UNDECIDED_VALUES, 20000, 3000][trial % 3])
        classes = int(rng.integers(2, 5)) if trial % 6 else int(rng.integers(20, 40))  # a multi-organ network's
        channels = ndimage.gaussian_filter(rng.random((classes, *rng.integers(2, 24, 3))), (0, 1.5, 1.5, 1.5))
        channels = [channels.astype(np.float32), channels, np.round(channels * 4) / 4,  # ties: the first wins
                    (channels * 255).astype(np.uint8)][trial % 4]
        source = np.diag([*rng.uniform(1, 3, 3), 1.0])
        source[:3, 3] = rng.uniform(-5, 5, 3)
        target = np.eye(4)
        target[:3, :3] = 0
        for j, (axis, flip) in enumerate(zip(rng.permutation(3), rng.choice([-1, 1], 3))):
            target[axis, j] = flip * rng.uniform(0.4, 1.3)
        if trial % 5 == 4:  # oblique: interpolated whole
            target[:3, :3] = target[:3, :3] @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
        if trial % 5 == 3:  # sheared: each target plane across one source axis (a model grid back onto a tilted stack)
            shear, along = np.eye(3), trial // 5 % 3  # (the planes along each target axis in turn)
            shear[[j for j in range(3) if j != along], along] = 0.45, -0.3
            target[:3, :3] = target[:3, :3] @ shear
        target[:3, 3] = rng.uniform(-8, 25, 3)
        shape = tuple(int(n) for n in rng.integers(8, 50, 3))
        resampled = resampled_whole(channels, source, target, shape)
        expected = first_argmax(iter(resampled))
        found = resample_argmax(channels, source, target, shape)
        assert len(by_planes) == (trial % 5 == 3), trial
        by_planes.clear()
        assert found.shape == expected.shape and found.dtype == np.uint8
        differ = found != expected
        top = np.sort(resampled[:, differ], axis=0)
        assert np.all(top[-1] - top[-2] <= 1e-6), (trial, int(differ.sum()))
        assert differ.sum() <= 2, (trial, int(differ.sum()))
        if trial % 4 == 0 and trial % 5 != 4:  # raw outputs, an activation (keeping each voxel's order) applied
            # where they are interpolated: as the activation's outputs resampled (softmax's ties are rarer)
            activated = torch.softmax(torch.from_numpy(channels * 20), dim=0).numpy()
            padding = "border" if trial % 8 else "constant"  # (the edge repeated beyond the source, or the fill)
            resampled = np.stack([resample(c, source, target, shape, padding=padding) for c in activated])
            found = resample_argmax(channels * 20, source, target, shape, padding=padding,
                                    activation=lambda v: torch.softmax(torch.from_numpy(v), dim=0).numpy())
            by_planes.clear()
            differ = found != first_argmax(iter(resampled))
            top = np.sort(resampled[:, differ], axis=0)
            assert np.all(top[-1] - top[-2] <= 1e-6) and differ.sum() <= 2, (trial, int(differ.sum()))
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])
    with pytest.raises(ValueError, match="only where the map is axis-aligned or plane by plane"):  # (activated whole)
        resample_argmax(channels, np.eye(4), oblique, (4, 4, 4), activation=lambda v: v)
    infinite = np.full((10, 3, 1, 1), -100.0, np.float32)  # minus infinity at a corner weighed 0: NaN, which wins
    infinite[1:4, :, 0, 0] = [[0, 5, 10], [0, 10, 5], [-50, 0, -np.inf]]
    half = np.diag([0.5, 1, 1, 1.0])
    expected = first_argmax(iter(resampled_whole(infinite, np.eye(4), half, (5, 1, 1))))
    assert np.array_equal(resample_argmax(infinite, np.eye(4), half, (5, 1, 1)), expected) and 3 in expected
    channels = np.zeros((2, 6, 6, 6), np.float32)
    channels[1] = 1.0
    channels[:, 3, 3, 3] = np.nan  # a NaN logit's softmax
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 5.0
    for target in (np.eye(4), flipped):  # whole voxels: copied, the NaN stays one voxel
        expected = first_argmax(iter(resampled_whole(channels, np.eye(4), target, (6, 6, 6))))
        assert np.array_equal(resample_argmax(channels, np.eye(4), target, (6, 6, 6)), expected)
        assert np.count_nonzero(expected == 0) == 1
    many = rng.random((256, 4, 4, 4)).astype(np.float32)
    many[255, :2] += 1  # label 255, the mark of an undecided cell, in whole cells
    target = np.diag([0.7, 0.7, 0.7, 1.0])
    expected = first_argmax(iter(resampled_whole(many, np.eye(4), target, (5, 5, 5))))
    assert np.array_equal(resample_argmax(many, np.eye(4), target, (5, 5, 5)), expected)
    assert np.count_nonzero(expected == 255) > 8
    with pytest.raises(ValueError, match="over 256 channels"):
        first_argmax(iter(np.zeros((257, 2), np.float32)))
    monkeypatch.setattr(module, "UNDECIDED_CHUNK", 1 << 20)  # (one round)
    monkeypatch.setattr(module, "UNDECIDED_VALUES", 1 << 20)
    interpolated: list[int] = []  # a ball on a 2x finer grid: only the voxels along its surface interpolated
    interpolate, argmax_at = ndimage.map_coordinates, module._argmax_at  # (scipy: once per channel)
    monkeypatch.setattr(ndimage, "map_coordinates", lambda c, points, **kw: (
        interpolated.append(points.shape[1] / 2), interpolate(c, points, **kw))[1])
    monkeypatch.setattr(module, "_argmax_at", lambda channels, points, *rest: (
        interpolated.append(points.shape[1]), argmax_at(channels, points, *rest))[1])
    ball = (np.sum((np.indices((20, 20, 20)) - 9.5) ** 2, axis=0) <= 49).astype(np.float32)
    channels = np.stack([1 - ball, ball])
    finer = np.diag([0.5, 0.5, 0.5, 1.0])
    expected = first_argmax(iter(resampled_whole(channels, np.eye(4), finer, (38, 38, 38))))  # within the source
    assert np.array_equal(resample_argmax(channels, np.eye(4), finer, (38, 38, 38)), expected)
    assert 0 < sum(interpolated) < 0.15 * expected.size, sum(interpolated)
    by_channel = sum(interpolated)  # where each can win (an activation given): the same voxels
    interpolated.clear()
    activated: list[int] = []  # the activation applied to the voxels read around those, not the grid
    assert np.array_equal(resample_argmax(channels, np.eye(4), finer, (38, 38, 38),
                                          activation=lambda v: (activated.append(v.shape[1]), v)[1]), expected)
    cube = np.ones((3, 3, 3), bool)
    shell = ndimage.binary_dilation(ball, cube) & ~ndimage.binary_erosion(ball, cube)  # next to its surface
    assert sum(interpolated) == by_channel and 0 < sum(activated) <= np.count_nonzero(shell), sum(activated)
    interpolated.clear()
    reach: Counter = Counter()  # trials by padding, partly or wholly beyond the source, interpolated
    for trial in range(80):  # whole voxels (a model without a spacing step), flipped and permuted, partly or
        # wholly beyond the source (a box grown past the model's): the same labels, nothing interpolated
        spacing = rng.uniform(0.5, 3, 3)
        channels = rng.random((int(rng.integers(2, 5)), *rng.integers(4, 12, 3)))
        channels = channels.astype(np.float32) if trial % 2 else channels  # float64: compared as float32
        source = np.diag([*spacing, 1.0])
        target = np.eye(4)
        target[:3, :3] = 0
        flips = np.empty(3)
        for j, (axis, flip) in enumerate(zip(rng.permutation(3), rng.choice([-1, 1], 3))):
            target[axis, j], flips[axis] = flip * spacing[axis], flip
        size = np.array(channels.shape[1:])
        # the source voxel of its origin: inside; past the edge and running into the source; far away
        past = np.where(flips < 0, size + rng.integers(0, 3, 3), -rng.integers(1, 3, 3))
        target[:3, 3] = spacing * (rng.integers(0, size) if trial % 4 else past if trial % 8 else size + 20)
        shape = tuple(int(n) for n in rng.integers(1 if trial % 4 else 4, 8, 3))
        # a whole voxel or more beyond the source, every channel is the fill (interpolating there
        # may weigh the edge voxel by a rounding error of the position: a tie broken by noise);
        # "border" padding repeats the edge there (interpolated as any map, the same labels)
        reads = np.rint(np.einsum("ij,j...->i...", np.linalg.inv(source) @ target,
                                  np.concatenate([np.indices(shape), np.ones((1, *shape))])))[:3]
        inside = np.all([(0 <= r) & (r < n) for r, n in zip(reads, channels.shape[1:])], axis=0)
        padding = "border" if trial % 5 == 1 else "constant"
        expected = first_argmax(resample(c, source, target, shape, padding=padding) for c in channels)
        expected = expected if padding == "border" else np.where(inside, expected, 0)
        before = len(interpolated)
        assert np.array_equal(resample_argmax(channels, source, target, shape, padding=padding), expected), trial
        reach[(padding, inside.any(), inside.all(), len(interpolated) > before)] += 1
    assert reach[("constant", True, False, False)] >= 10 and reach[("constant", False, False, False)], reach
    assert reach[("constant", True, True, False)] and reach[("border", True, False, True)], reach
    assert not any(key[3] for key in reach if key[0] == "constant"), reach  # nothing interpolated
    flipped_out = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped_out[0, 3] = -1.0  # a flipped axis whose first voxel lies before the source: none of an empty axis
    assert resample(np.ones((4, 4, 4), np.float32), np.eye(4), flipped_out, (0, 4, 4)).shape == (0, 4, 4)
