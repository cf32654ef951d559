"""Triton Inference Server backend (tritonclient): gRPC or HTTP, binary tensors, shared memory.

Tensors always travel as binary (never JSON). When the server runs on this host, inputs and
outputs go through POSIX shared memory instead of the socket: for a 300x512x512 float volume
that is about 5x faster than HTTP and 9x faster than gRPC on this machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from inference.backends.base import BackendError, BackendUnavailable
from inference.spec import ModelSpec
from common.backoff import backoff_delay
from common import logs

log = logging.getLogger("inference.triton")
T = TypeVar("T")

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# What Triton 2.x answers for a region it does not know (a restarted server), over gRPC and HTTP
# alike; its other shared-memory errors (an output larger than the region) are the model's.
_REGION_UNKNOWN = "unable to find shared memory region"
# Since 2.50 Triton refuses to unregister a region a request still holds (server PR #7567), and its
# answer to that request can reach us before the request lets the region go (server issue #7688; met
# under load right after an inference). The hold ends with the request: unregistering waits for it,
# a while, and a hold longer than that is a TimeoutError (transient: the job retries).
_REGION_BUSY = "currently in use"
_REGION_BUSY_WAIT = 5.0  # seconds
_NAME_TAKEN = "already in manager"  # its answer to a registration of a name it holds (ALREADY_EXISTS over gRPC)
# A region the server kept (held past that wait, or no answer) maps memory this node has freed: it
# is unregistered later, on a thread of its own, tried this often for this long.
_LEFT_RETRY_S = 2.0
_LEFT_FOR_S = 600.0
# A node killed (the OOM killer, SIGKILL at a container's stop) or stopped while the server held a
# region leaves its regions registered, and the server maps their memory until it restarts (the
# output region of a 105-class network's two 96^3 windows: 743 MB). A backend frees those of nodes
# gone, after its first registration. Every node's region names begin with _OURS; this release's
# with _HELD, and its process holds a shared flock(2) on each region's object while the region
# lives. Regions named by older releases, which hold no lock, are judged gone only when their
# object is.
_OURS = "dicom-node-"
_HELD = f"{_OURS}held-"
_SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared-memory objects (shm_open(3))
# An object of this release that nobody holds and that is older than this is a dead node's, also
# when no server lists its region (a server restarted since): a live node holds each object within
# microseconds of making it.
_ORPHAN_AGE_S = 60.0
# The deadline of every call that is not an inference (readiness, metadata, a region's
# registration): a live server answers them in milliseconds (under load: 91 ms at most, measured),
# and without one a server whose connection is up while it answers nothing holds the job (and the
# pool's server lock) for good over gRPC, and for the inferences' timeout (120 s) over HTTP.
CONTROL_TIMEOUT_S = 10.0
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "failed to connect", "Connection refused",
              "connection reset", "Socket closed", "Broken pipe", "timed out")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(exc, InferenceServerException):
        text = f"{exc.status()} {exc.message()}"
        return any(marker.lower() in text.lower() for marker in _TRANSIENT)
    return False


def _timed_out(exc: BaseException) -> bool:
    """A region still held past our wait, or a call the server took and did not answer in time."""
    return isinstance(exc, TimeoutError) or (isinstance(exc, InferenceServerException)
                                             and "DEADLINE_EXCEEDED" in str(exc.status()))


# How an object is opened to hold or judge it: never following a link, and never waiting (a FIFO
# someone put in /dev/shm under a node's name would block a plain open until a writer came).
_OPEN_OBJECT = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def _hold(name: str) -> int:
    """A descriptor holding a shared lock on a region's object, for as long as the region lives."""
    fd = os.open(_SHM_DIR / name, _OPEN_OBJECT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _abandoned(name: str, key: str) -> bool:
    """Whether a region is a node's (its object named as the region, as nodes name theirs) and no
    live process owns it: its object is gone (unlinked by its node, or by Python's resource tracker
    after its node was killed), or, for a region of this release, no process holds its lock (a node
    killed with its tracker: the object outlives both). An object this process may not open
    (another user's), or that is not a plain file (a link, a FIFO), is not judged: it is kept."""
    if not name.startswith(_OURS) or "/" in name or key != f"/{name}":
        return False
    path = _SHM_DIR / name
    try:
        fd = os.open(path, _OPEN_OBJECT)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not name.startswith(_HELD) or not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (let go with the descriptor)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@dataclass
class _Region:
    """One of the backend's shared-memory regions: its name (its object's too), tritonclient's
    handle, its size, and the descriptor holding its lock (`_hold`)."""
    name: str
    handle: Any
    size: int
    lock: int

    def free(self) -> None:
        """Unmap and unlink the object, then let its lock go. An object something else removed from
        /dev/shm (an operator, systemd-logind's RemoveIPC) is unmapped all the same, and said."""
        try:
            shm.destroy_shared_memory_region(self.handle)  # (unmaps, then unlinks)
        except FileNotFoundError:
            logs.event(log, "triton_region_object_gone", logging.WARNING, region=self.name)
        finally:
            os.close(self.lock)


class TritonBackend:
    """A model served by Triton, checked against its node-side spec at start."""

    def __init__(
        self,
        url: str,
        spec: ModelSpec,
        protocol: Literal["grpc", "http"] = "grpc",
        shared_memory: Literal["auto", "system", "none"] = "auto",
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
    ):
        self.spec = spec
        self.url = url
        self.protocol = protocol
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        host = urlsplit(f"//{url}").hostname or ""
        self.use_shm = shared_memory == "system" or (shared_memory == "auto" and host in _LOCAL_HOSTS)
        self._lib: Any = grpcclient if protocol == "grpc" else httpclient
        # Calls that are not inferences go through `_ctl` within CONTROL_TIMEOUT_S: over gRPC the
        # inferences' client, given a deadline per call (`_control`); over HTTP, whose timeouts are
        # the client's, a second client.
        self._control: dict[str, float] = {}
        if protocol == "grpc":
            self._control["client_timeout"] = min(timeout, CONTROL_TIMEOUT_S)
        self.client: Any = self._connect(timeout)
        self._ctl: Any = self.client if protocol == "grpc" else self._connect(min(timeout, CONTROL_TIMEOUT_S))
        self._regions: dict[str, _Region] = {}
        self._per_item: tuple[int, ...] = ()  # a detector's output per batch item, from the server's metadata
        self._prefix = f"{_HELD}{uuid.uuid4().hex[:8]}"
        # regions made per role: a region's name is never used again (one left behind, unregistered later or by
        # another backend's first registration, is never the name of a live region)
        self._made: dict[str, int] = {}
        self._swept = False  # the regions of nodes gone freed (`_free_abandoned_regions`)
        self._check_model()

    def _connect(self, timeout: float) -> Any:
        """A client of the server; over HTTP, `timeout` bounds each of its calls."""
        if self.protocol == "grpc":
            return grpcclient.InferenceServerClient(self.url)
        return httpclient.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)

    # -- start-up checks -------------------------------------------------------------------

    def _check_model(self) -> None:
        name, version = self.spec.name, str(self.spec.version)
        if not self._retry(lambda: self._ctl.is_server_ready(**self._control), "server readiness"):
            raise BackendUnavailable(f"Triton at {self.url} is not ready")
        if not self._retry(lambda: self._ctl.is_model_ready(name, version, **self._control), "model readiness"):
            index = self._retry(self._repository_names, "repository index")
            # A model the server does not have will not appear by waiting; one it has may be loading.
            error = BackendUnavailable if name in index else BackendError
            raise error(
                f"model {name!r} version {version} is not ready on Triton at {self.url}"
                f" (models there: {', '.join(index) or 'none'})"
            )
        meta = self._retry(lambda: self._metadata(name, version), "model metadata")
        self._check_tensor("input", meta.get("inputs", []), self.spec.input.name, self.spec.input.dtype, 5)
        rank = {"segmentation": 5, "detection": 3}.get(self.spec.task, 2)
        shape = self._check_tensor("output", meta.get("outputs", []), self.spec.output.name, self.spec.output.dtype,
                                   rank)
        if self.spec.task == "detection":  # (batch, anchors, box + scores): the anchors are the model's
            if shape[1] <= 0 or shape[2] != self.spec.output_channels:
                raise BackendError(f"model {self.spec.name}: output {self.spec.output.name!r} has shape {shape} on"
                                   f" Triton, expected [-1, anchors, {self.spec.output_channels}]")
            self._per_item = (shape[1], shape[2])
        elif shape[1] not in (-1, self.spec.output_channels):  # (a config may leave them open: each answer is checked)
            raise BackendError(f"model {self.spec.name}: output {self.spec.output.name!r} has {shape[1]} channels on"
                               f" Triton (shape {shape}), its spec {self.spec.output_channels}")

    def _metadata(self, name: str, version: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self._ctl.get_model_metadata(name, version, as_json=True, **self._control)
        return self._ctl.get_model_metadata(name, version)

    def _repository_names(self) -> list[str]:
        if self.protocol == "grpc":
            index = self._ctl.get_model_repository_index(as_json=True, **self._control)
        else:
            index = self._ctl.get_model_repository_index()
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted(m.get("name", "") for m in models)

    def _check_tensor(self, kind: str, tensors: list[dict[str, Any]], name: str, dtype: str, rank: int) -> list[int]:
        found = {t["name"]: t for t in tensors}
        if name not in found:
            raise BackendError(
                f"model {self.spec.name}: Triton has no {kind} named {name!r} (it has {sorted(found)})"
            )
        tensor = found[name]
        if tensor.get("datatype") != dtype:
            raise BackendError(
                f"model {self.spec.name}: {kind} {name!r} is {tensor.get('datatype')} on Triton, the spec says {dtype}"
            )
        shape = [int(s) for s in tensor.get("shape", [])]
        if len(shape) != rank:
            raise BackendError(
                f"model {self.spec.name}: {kind} {name!r} has shape {shape} on Triton, expected rank {rank}"
            )
        return shape

    # -- inference ---------------------------------------------------------------------------

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.spec.task == "segmentation":
            out_shape = (batch.shape[0], self.spec.output_channels, *batch.shape[2:])
        elif self.spec.task == "detection":
            out_shape = (batch.shape[0], *self._per_item)
        else:
            out_shape = (batch.shape[0], self.spec.output_channels)
        return self._retry(lambda: self._infer_once(batch, out_shape), "inference")

    def _infer_once(self, batch: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        lib = self._lib
        request = lib.InferInput(self.spec.input.name, list(batch.shape), np_to_triton_dtype(batch.dtype))
        output = lib.InferRequestedOutput(self.spec.output.name, **({} if self.protocol == "grpc" else {"binary_data": True}))
        out_bytes = int(np.prod(out_shape)) * np.dtype(triton_to_np_dtype(self.spec.output.dtype)).itemsize
        if self.use_shm:
            in_handle = self._region("in", batch.nbytes)
            out_handle = self._region("out", out_bytes)
            shm.set_shared_memory_region(in_handle, [batch])
            request.set_shared_memory(self._name("in"), batch.nbytes)
            output.set_shared_memory(self._name("out"), out_bytes)
        elif self.protocol == "grpc":
            request.set_data_from_numpy(batch)
        else:
            request.set_data_from_numpy(batch, binary_data=True)
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {"timeout": int(self.timeout * 1e6)}
        try:
            result = self.client.infer(self.spec.name, [request], model_version=str(self.spec.version),
                                       outputs=[output], **kwargs)
        except InferenceServerException as exc:
            if _is_transient(exc):
                raise
            if self.use_shm and _REGION_UNKNOWN in str(exc.message()).lower():
                # A restarted server knows none of our regions: make them anew on the next attempt.
                self._forget_regions()
                raise BackendUnavailable(f"Triton at {self.url} no longer has this node's shared-memory regions"
                                         " (restarted?)") from None
            about_output = self.use_shm and f"output '{self.spec.output.name}'" in str(exc.message())
            implied = f" (its spec implies an output of {list(out_shape)})" if about_output else ""
            raise BackendError(
                f"Triton rejected model {self.spec.name} on input {list(batch.shape)}: {exc.message()}{implied}"
            ) from None
        if self.use_shm:
            array = self._shared_output(result, out_handle, out_bytes)
        else:  # (a read-only view of the answer's bytes: the caller's to write into, as the other paths give it)
            found = result.as_numpy(self.spec.output.name)
            array = None if found is None else np.array(found)
        if array is None or array.size == 0:
            raise BackendError(f"Triton returned an empty {self.spec.output.name!r} tensor for {self.spec.name}")
        return array

    def _shared_output(self, result: Any, handle: Any, capacity: int) -> np.ndarray | None:
        """The output in the shape Triton reports for it, read from our region (None where it
        reports none): a model whose output is smaller than its spec implies writes only part of
        the region, and reading the implied shape would take the rest from an earlier call. Read
        as reported, a mis-sized output meets the same checks as one that came over the socket."""
        tensor = result.get_output(self.spec.output.name)
        if tensor is None:
            return None
        reported = tensor if isinstance(tensor, dict) else {"shape": tensor.shape, "datatype": tensor.datatype}
        shape = [int(s) for s in reported["shape"]]
        dtype = np.dtype(triton_to_np_dtype(reported["datatype"]) or np.float32)  # as the socket's answer comes
        size = int(np.prod(shape)) * dtype.itemsize
        if size == 0:
            return np.empty(shape, dtype)
        if size > capacity:
            raise BackendError(f"Triton reports an output {self.spec.output.name!r} of shape {shape} for"
                               f" {self.spec.name}, which its shared-memory region of {capacity} bytes cannot hold")
        return np.array(shm.get_contents_as_numpy(handle, dtype, shape))

    def _name(self, role: str) -> str:
        """The name of the role's region, or of the next one made for it."""
        region = self._regions.get(role)
        return region.name if region else f"{self._prefix}-{self._made.get(role, 0)}-{role}"

    def _region(self, role: str, size: int) -> Any:
        """A registered shared-memory region of at least `size` bytes (grown when needed)."""
        current = self._regions.get(role)
        if current and current.size >= size:
            return current.handle
        if current:
            self._unregister(role)
            del self._regions[role]
            current.free()
        name = self._name(role)
        self._made[role] = self._made.get(role, 0) + 1
        key = f"/{name}"
        handle = shm.create_shared_memory_region(name, key, size)
        try:  # (held before it is registered: a registered region of ours is never judged abandoned)
            region = self._regions[role] = _Region(name, handle, size, _hold(name))
        except BaseException:
            shm.destroy_shared_memory_region(handle)
            raise
        try:
            self._ctl.register_system_shared_memory(name, key, size, **self._control)
        except Exception as exc:
            # A registration that timed out (or lost its connection) may still be done on the
            # server: the next attempt uses the region as it is, and a server that does not know it
            # says so (_REGION_UNKNOWN: made anew), where registering the name a second time would
            # be refused for good.
            if _is_transient(exc):
                raise
            # Refused: the server does not map this region, and never may under this name.
            del self._regions[role]
            region.free()
            if _NAME_TAKEN not in str(exc):
                raise
            # The name is taken (not by this backend, which never registers a name twice): the next
            # attempt makes the region under a name of its own.
            raise BackendUnavailable(f"Triton at {self.url} already has a shared-memory region named {name}:"
                                     " a new region on the next attempt") from None
        if not self._swept:  # (the server has mapped an object of ours: it sees the /dev/shm this process sees)
            self._swept = True
            self._free_abandoned_regions()
        return handle

    def _unregister(self, role: str) -> None:
        """Unregister one of our regions once the server no longer holds it for a request."""
        deadline = time.monotonic() + _REGION_BUSY_WAIT
        while True:
            try:
                self._ctl.unregister_system_shared_memory(self._name(role), **self._control)
                return
            except InferenceServerException as exc:
                if _REGION_BUSY not in str(exc.message()):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"shared-memory region {self._name(role)} still held by a request after"
                                       f" {_REGION_BUSY_WAIT:g} s: {exc.message()}") from None
            time.sleep(0.01)

    def _retry(self, call: Callable[[], T], what: str) -> T:
        """Retry transient failures with exponential backoff and jitter; then a clear error."""
        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except BackendError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise BackendError(f"Triton at {self.url}, {what}: {exc}") from None
                if attempt == self.retries:
                    raise BackendUnavailable(
                        f"Triton at {self.url} unavailable for {what} after {self.retries} attempts: {exc}"
                    ) from None
                logs.event(log, "triton_retry", logging.WARNING, what=what, attempt=attempt, error=str(exc)[:200])
                time.sleep(backoff_delay(attempt, self.backoff, float("inf")))
        raise AssertionError("unreachable")

    def _forget_regions(self) -> None:
        """Unregister (where the server still knows them) and free our shared-memory regions; those
        the server keeps are unregistered later (`_unregister_later`)."""
        left: list[str] = []
        for role, region in list(self._regions.items()):
            try:
                if left:  # (a server that did not answer for one region is not asked for the next now)
                    raise TimeoutError
                self._unregister(role)
            except Exception as exc:  # the server may be gone; the local region is still ours to free
                if _timed_out(exc):  # (held by a request the client gave up on, or no answer): it keeps it
                    left.append(region.name)
                    logs.event(log, "triton_region_left", logging.WARNING, region=left[-1])
            del self._regions[role]  # (before it is freed: a failure there leaves no freed handle behind)
            try:
                region.free()
            except Exception as exc:  # (a view of its memory still held: BufferError) the others are freed all the same
                logs.event(log, "triton_region_unfreed", logging.WARNING, region=region.name, error=str(exc)[:200])
        if left:
            threading.Thread(target=self._unregister_later, args=(left,), name="triton-regions-left",
                             daemon=True).start()

    def _unregister_later(self, names: list[str]) -> None:
        """Unregister regions the server kept, once it lets them go, every `_LEFT_RETRY_S` for
        `_LEFT_FOR_S`, on a client of this thread's own (the backend may be closed meanwhile)."""
        client = self._connect(min(self.timeout, CONTROL_TIMEOUT_S))
        deadline = time.monotonic() + _LEFT_FOR_S
        try:
            while names and time.monotonic() < deadline:
                time.sleep(_LEFT_RETRY_S)
                for name in list(names):
                    try:
                        client.unregister_system_shared_memory(name, **self._control)
                    except Exception as exc:
                        if _REGION_BUSY in str(exc) or _is_transient(exc):
                            continue  # still held, no answer, unreachable: the next round
                        names.remove(name)  # (a name the server does not know is unregistered without error)
                        logs.event(log, "triton_region_abandoned", logging.WARNING, region=name,
                                   error=str(exc)[:200])
                        continue
                    names.remove(name)
                    logs.event(log, "triton_region_freed", region=name)
        finally:
            client.close()
        for name in names:
            logs.event(log, "triton_region_abandoned", logging.WARNING, region=name,
                       error=f"held past {_LEFT_FOR_S:g} s")

    def _free_abandoned_regions(self) -> None:
        """Unregister the regions of nodes gone (`_abandoned`), and remove objects their nodes left:
        once, after the backend's first registration. Only then: a node whose /dev/shm is not the
        server's (Triton in a container of its own) would find every other node's objects gone.
        What fails is logged, never raised: the backend works without. A region a request still
        holds is left to the next backend."""
        self._remove_orphan_objects()
        try:
            if self.protocol == "grpc":
                status = self._ctl.get_system_shared_memory_status(as_json=True, **self._control)
                regions = list(status.get("regions", {}).values())
            else:
                regions = self._ctl.get_system_shared_memory_status()
        except Exception as exc:
            logs.event(log, "triton_regions_unread", logging.WARNING, error=str(exc)[:200])
            return
        for region in regions:
            name, key = str(region.get("name", "")), str(region.get("key", ""))
            try:
                if not _abandoned(name, key):
                    continue
                self._ctl.unregister_system_shared_memory(name, **self._control)
                (_SHM_DIR / name).unlink(missing_ok=True)  # (a node killed with its resource tracker left it)
            except Exception as exc:
                logs.event(log, "triton_abandoned_region_kept", logging.WARNING, region=name, error=str(exc)[:200])
                if _timed_out(exc):  # (a server that did not answer for one is not asked for the next)
                    return
                continue
            logs.event(log, "triton_abandoned_region_freed", region=name)

    def _remove_orphan_objects(self) -> None:
        """Remove the objects of this release's nodes gone that no server lists (`_ORPHAN_AGE_S`):
        a node killed with its resource tracker, its server restarted since."""
        for path in _SHM_DIR.glob(f"{_HELD}*"):
            try:
                if time.time() - path.lstat().st_ctime < _ORPHAN_AGE_S or not _abandoned(path.name, f"/{path.name}"):
                    continue
                path.unlink(missing_ok=True)
            except OSError as exc:  # (not ours to remove)
                logs.event(log, "triton_abandoned_object_kept", logging.WARNING, object=path.name,
                           error=str(exc)[:200])
                continue
            logs.event(log, "triton_abandoned_object_removed", object=path.name)

    def close(self) -> None:
        self._forget_regions()
        self.client.close()
        if self._ctl is not self.client:
            self._ctl.close()
