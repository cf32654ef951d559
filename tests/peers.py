"""Real peers for the tests: the node as a process, dcmtk tools, synthetic studies.

Every process started here is stopped by PID; every server binds to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from node.config import ScpConfig
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from tests.processes import stop_process_group

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parent.parent


# tests/hooks/sitecustomize.py: fault and measurement hooks a test loads into the node's processes
HOOKS = Path(__file__).resolve().parent / "hooks"


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_ports(ports: range) -> range:
    """This pytest-xdist worker's own share of `ports`: a port one worker found free and gave to a
    node could otherwise be bound by another worker's Orthanc before the node listens on it
    (seen: a node's "Address already in use" on the port an Orthanc of the other worker took a
    second before). The whole range outside xdist."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0):
        return ports
    share = len(ports) // int(count)
    first = ports.start + int(worker[2:]) % int(count) * share
    return range(first, first + share)


# Ports below the kernel's ephemeral range: a port from inside it may be handed to some client
# connection's local end while a test node restarts, and the node then cannot listen on it again
# (seen: "the console cannot listen ...: Address already in use" on a restart under load).
_TEST_PORTS = _worker_ports(range(max(1024, _ephemeral_start() - 12000), _ephemeral_start()))
_PORTS_GIVEN: set[int] = set()
_PORT_PICKER = random.Random()


def free_port() -> int:
    """A port free now on 127.0.0.1, never given before in this process."""
    for _ in range(2000):
        port = _PORT_PICKER.choice(_TEST_PORTS)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port between {_TEST_PORTS.start} and {_TEST_PORTS.stop - 1}")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def log_events(log: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process whose `event` is `name`, in order (other lines skipped)."""
    out = []
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            out.append(entry)
    return out


def http_status(url: str, method: str = "GET", token: str | None = None) -> int:
    """The HTTP status of a request (0: no answer at all)."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_study(folder: Path, slices: int = 20, size: int = 32, **identity: Any) -> list[Path]:
    """A small synthetic CT series (the count matters to the receiver tests, not the size)."""
    rng = np.random.default_rng(len(str(folder)))
    hu = rng.integers(-1000, 1000, size=(slices, size, size)).astype(float)
    return write_ct_series(hu, folder, SeriesGeometry(spacing=(2.0, 0.8, 0.8)), SeriesIdentity(**identity))


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a part-10 file, without preamble and file meta group."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR
    return data[144 + group_length :]


def make_ca(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server and a client certificate it signed (PEM paths by name)."""
    folder.mkdir()
    paths = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key", "client", "client-key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
        "-keyout", str(paths["ca-key"]), "-out", str(paths["ca"]))
    for name in ("server", "client"):
        csr = folder / f"{name}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            str(paths[f"{name}-key"]), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca-key"]),
            "-CAcreateserial", "-days", "2", "-out", str(paths[name]))
    return paths


class NodeProcess:
    """`dicom-node serve` in its own process group, with a config written for the test."""

    def __init__(self, workdir: Path, routing: dict[str, Any] | None = None, source: Path | None = None,
                 launcher: tuple[str, ...] = (), **overrides: Any):
        """`source`: run the node from this source tree (another revision, for a side-by-side
        benchmark) instead of the installed one. `launcher`: a command prefix that runs the node
        (one that execs it, so that the process is the node's: tests.cgroups)."""
        self.workdir = Path(workdir)
        self.source = source
        self.launcher = launcher
        self.port = free_port()
        self.http_port = free_port()  # the console (node/console); every test node has its own
        self.data_dir = self.workdir / "data"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "node.yaml"
        self.log_path = self.workdir / "node.log"
        config: dict[str, Any] = {
            "scp": {"bind": "127.0.0.1", "port": self.port, "workers": 2, "ae_title": "TESTNODE"},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 1},
            "completion": {"quiet_period_s": 2.0},
            "inference": {"model_repository": str(REPO_ROOT / "models")},
            "pipeline": {"routing_file": str(self.workdir / "routing.yaml")},
            "http": {"port": self.http_port},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        self.port = int(config["scp"]["port"])  # a test may choose it (a peer that must know it first)
        self.config_path.write_text(yaml.safe_dump(config))
        self.receivers = ScpConfig(workers=int(config["scp"].get("workers") or 0)).worker_count()  # the node's count
        self.write_routing(routing if routing is not None else {"rules": []})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def api_token(self, name: str, role: str, password: str = "correct horse battery") -> str:
        """A new account with this role and an API token for it (`dicom-node users`)."""
        add = subprocess.run([str(VENV_BIN / "dicom-node"), "users", "add", name, "--role", role, "--password-stdin",
                              "--config", str(self.config_path)], input=password + "\n", capture_output=True,
                             text=True, timeout=120)
        assert add.returncode == 0, add.stderr
        out = subprocess.run([str(VENV_BIN / "dicom-node"), "users", "token", name, "--config", str(self.config_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def write_routing(self, rules: dict[str, Any] | str) -> None:
        text = rules if isinstance(rules, str) else yaml.safe_dump(rules, sort_keys=False)
        (self.workdir / "routing.yaml").write_text(text)

    def start(self) -> "NodeProcess":
        """Start the node; return once every receiver process serves (not just once the port is open)
        and the service has said `node_started` (logged after the receivers may be ready: what a
        test reads of this start, such as what the journal's replay did, is in that event)."""
        ready_before = len(self.events("receiver_ready"))
        started_before = len(self.events("node_started"))
        log = open(self.log_path, "ab")
        # from `source`: first on the path, and not run in a source tree (`python -m`, as the
        # receivers are started, puts the current folder first)
        path = os.pathsep.join(filter(None, (str(self.source), os.environ.get("PYTHONPATH"))))
        env, cwd = (dict(os.environ, PYTHONPATH=path), self.workdir) if self.source else (None, None)
        self.process = subprocess.Popen(
            [*self.launcher, str(VENV_BIN / "dicom-node"), "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        log.close()
        try:
            wait_for(lambda: port_open(self.port) or self.process.poll() is not None, timeout=30)
            assert self.process.poll() is None, self.log()
            wait_for(lambda: (len(self.events("receiver_ready")) >= ready_before + self.receivers
                              and len(self.events("node_started")) > started_before)
                     or self.process.poll() is not None, timeout=120)
            assert self.process.poll() is None, self.log()
        except BaseException:  # a node that never became ready is stopped, not left behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process_group(self.process, 20)
        self.process = None

    def kill_all(self) -> None:
        """SIGKILL the service and its receiver processes at once (a crash, not a shutdown)."""
        assert self.process is not None
        group = self.process.pid
        os.killpg(group, signal.SIGKILL)
        self.process.wait(10)
        self.process = None
        # the receivers die with it, but not at the same instant: a restart before the last one is
        # gone can find its ports still held
        wait_for(lambda: not _group_alive(group), timeout=10, interval=0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log(), name)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        db = sqlite3.connect(self.data_dir / "index.sqlite", timeout=30)
        db.row_factory = sqlite3.Row
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def study(self, study_uid: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def instance_count(self, study_uid: str) -> int:
        return self.query("SELECT COUNT(*) AS n FROM instances WHERE study_uid=?", (study_uid,))[0]["n"]

    def wait_complete(self, study_uid: str, completions: int = 1, timeout: float = 60) -> sqlite3.Row:
        def done() -> Any:
            row = self.study(study_uid)
            return row if row and row["state"] == "complete" and row["completions"] >= completions else None

        return wait_for(done, timeout=timeout)


def storescu(port: int, files: list[Path], aet: str = "MODALITY", *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu as the modality; -v so that each response is in the output."""
    return subprocess.run(
        ["storescu", "-v", "-aet", aet, "-aec", "TESTNODE", *extra, "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=timeout,
    )


class StallingLink:
    """A TCP relay to a real peer whose traffic can be held: a network path that stops moving
    (no local peer stalls on its own). Bytes read while held are forwarded when it flows again.
    `sent`: every byte the clients sent through it (captured sessions, tests/fuzz/seeds.py)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.sent = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self._cut: int | None = None  # the peer's next chunk: pass this many bytes, then hold
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.flowing.clear()

    def stall_mid_reply(self, passed: int = 3) -> None:
        """Let the first `passed` bytes of the peer's next chunk through, then hold: a peer
        that stops in the middle of a PDU."""
        self._cut = passed

    def flow(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the peer is gone (stopped at teardown): so is this connection
                client.close()
                continue
            for source, sink, record in ((client, upstream, self.sent), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(source, sink, record), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        try:
            while chunk := source.recv(65536):
                self.flowing.wait()
                if record is not None:
                    record += chunk
                elif self._cut is not None:  # from the peer
                    cut, self._cut = self._cut, None
                    sink.sendall(chunk[:cut])
                    self.stall()
                    self.flowing.wait()
                    chunk = chunk[cut:]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.flow()
        self.server.close()


def proc_stat(task: Path | str) -> list[str] | None:
    """The fields of a process's or thread's /proc stat (its /proc folder) after its name (stat(5)
    field 3 on: state, ppid, pgrp...); None once it has ended (ESRCH when it ends between the open
    and the read)."""
    try:
        return (Path(task) / "stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None


def _group_alive(group: int) -> bool:
    """Whether a process of `group` still runs. A zombie does not count: it has closed its sockets
    and files already, and this machine's init takes over a second to reap one."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = proc_stat(f"/proc/{pid}")
        if fields is not None and int(fields[2]) == group and fields[0] not in ("Z", "X"):
            return True
    return False
