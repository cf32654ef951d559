"""Run the real Triton server shipped in the ``nvidia-pytriton`` wheel, on CPU (python backend).

For development, tests and benchmarks on machines without NVIDIA's container. The wheel's
binary is Triton 2.51 with only the python backend; models use their ``configs/cpu.pbtxt``
variant, which runs the same ``model.onnx`` with ONNX Runtime. Facts this relies on:
the backend stub links libpython 3.11 and must find this interpreter's libpython first;
numpy must be < 2 in this environment (numpy 2 gives empty output tensors).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable

import grpc

from tests.peers import free_port
from tests.processes import stop_process_group


class TritonCpuServer:
    """A tritonserver process on loopback ports; `stop()` ends it by PID."""

    def __init__(self, model_repository: Path, log_file: Path | None = None, config_name: str = "cpu"):
        import pytriton

        root = Path(pytriton.__file__).parent
        self.binary = root / "tritonserver" / "bin" / "tritonserver"
        self.libs = root.parent / "nvidia_pytriton.libs"
        self.repository = Path(model_repository)
        self.config_name = config_name
        self.log_file = log_file
        self.http_port, self.grpc_port = free_port(), free_port()
        self._backends = Path(tempfile.mkdtemp(prefix="triton-backends-"))
        python_dir = self._backends / "python"
        python_dir.mkdir()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for item in (root / "tritonserver" / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy(item, python_dir / item.name)
        shutil.copy(root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub", python_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends}",
            f"--model-config-name={self.config_name}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=false",
            "--exit-on-error=false",
            "--strict-readiness=true",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self, timeout: float = 60.0, ready_models: tuple[str, ...] = ()) -> "TritonCpuServer":
        self._log = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with code {self.process.returncode}")
                try:
                    if client.is_server_live() and all(client.is_model_ready(m) for m in ready_models):
                        return self
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        self.stop()
        raise TimeoutError(f"tritonserver not ready within {timeout} s")

    def stop(self) -> None:
        """SIGTERM (Triton ignores SIGINT in the background), then SIGKILL if it lingers."""
        stop_process_group(self.process, 30)
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._backends, ignore_errors=True)


def free_abandoned_regions(url: str) -> None:
    """Have the regions of nodes gone freed on the server at `url` (a backend's first registration
    does it): a test that counts the calls a proxy takes then starts without those that regions
    left by earlier tests would add."""
    import numpy as np

    from inference.backends.triton import TritonBackend
    from tests.models import threshold_spec

    backend = TritonBackend(url, threshold_spec(), shared_memory="system")
    try:
        backend.infer(np.zeros((1, 1, 8, 8, 8), np.float32))
    finally:
        backend.close()


class _Silent:
    """A peer that leaves calls unanswered until it closes."""

    silent: set[str]

    def run_and_close(self, call: Callable[[], None], limit: float = 120.0) -> None:
        """Run `call` on a thread of its own, then close the peer; fail if the call still waits
        after `limit` seconds (the close ends the calls left unanswered, so the test ends too)."""
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(limit)
        waiting = worker.is_alive()
        self.close()
        assert not waiting, f"still waiting for {', '.join(sorted(self.silent))} after {limit:g} s"

    def close(self) -> None:
        raise NotImplementedError


class SilentHttpPeer(_Silent):
    """A TCP server on 127.0.0.1 that takes every connection and reads what comes, answering
    nothing: an HTTP Triton whose connection is up while it answers no call. `taken`: the request
    lines read, in order. Stopped by `close()`."""

    def __init__(self) -> None:
        self.silent = {"every HTTP call"}
        self.taken: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="silent-http", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as stream:
            try:
                for line in stream:
                    if line.split(b" ", 1)[0] in (b"GET", b"POST"):
                        self.taken.append(line.decode("latin-1").strip())
            except OSError:  # closed
                return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class SilentGrpcProxy(_Silent):
    """A gRPC server in front of a real Triton that forwards every call but those named in `silent`,
    which it takes and never answers: a Triton whose connection is up (HTTP/2 handshake done) while
    a call hangs, which a real server does not do on demand. `done_first`: each silent call is
    forwarded first, so the server does what it asks and only the answer is lost; `times`: only the
    first so many silent calls go unanswered. Stopped by `close()`."""

    def __init__(self, upstream: str, silent: set[str], done_first: bool = False, times: int | None = None):
        self.silent = set(silent)
        self.done_first = done_first
        self.times = times
        self.taken: list[str] = []  # the methods of the calls left unanswered, in order
        self._lock = threading.Lock()
        self._released = threading.Event()
        unbounded = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.insecure_channel(upstream, options=unbounded)
        proxy = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                return grpc.unary_unary_rpc_method_handler(lambda request, context: proxy._call(details.method,
                                                                                                request, context))

        self._server = grpc.server(ThreadPoolExecutor(max_workers=16), handlers=[Handler()], options=unbounded)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"127.0.0.1:{port}"
        self._server.start()

    def _call(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        name = method.rsplit("/", 1)[-1]
        with self._lock:
            hold = name in self.silent and (self.times is None or len(self.taken) < self.times)
            if hold:
                self.taken.append(name)
        if not hold or self.done_first:
            try:
                answer = self._channel.unary_unary(method)(request, timeout=context.time_remaining(),
                                                           metadata=context.invocation_metadata())  # raw bytes
            except grpc.RpcError as exc:  # the server's refusal, passed on as it is
                context.abort(exc.code(), exc.details())
            if not hold:
                return answer
        while context.is_active() and not self._released.wait(0.05):
            pass  # until the client gives up on the call, or the proxy closes
        context.abort(grpc.StatusCode.UNAVAILABLE, "proxy closed")

    def close(self) -> None:
        self._released.set()
        self._server.stop(grace=None).wait(10)
        self._channel.close()
