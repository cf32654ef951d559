"""Receiver processes: one listening socket, N pynetdicom processes behind it.

pynetdicom spends 2-5 ms of CPU per instance under the GIL, so one process cannot keep up with
a C++ receiver. The service process owns the listening socket; it accepts each connection, sets
TCP_NODELAY, and passes the connected socket (SCM_RIGHTS over a Unix socket pair) to the
least-loaded receiver process, which runs the association with pynetdicom.

Control messages are JSON over SOCK_SEQPACKET, one message per packet:
  service -> receiver: {"peer": [host, port]} with the connection's descriptor attached,
                       {"drain": true}: take no more connections, exit once the open ones end
  receiver -> service: {"ready": true} once it takes connections,
                       {"closed": true} when a connection ends,
                       {"slots": n} when the receiver's count of associations changes,
                       {"opened": study_uid, "deadline": t} when a study starts receiving,
                       {"signal": study_uid} when a completion signal for it came (MPPS, IAN).

Slots: only associations whose A-ASSOCIATE-RQ arrived and passed the AE checks count against
`scp.max_associations` (each receiver takes its share, rounded up). A connection that never
completes its request holds no slot (and is dropped at the ACSE deadline), so stalled or
half-open sockets cannot lock honest callers out. A connection goes to the receiver with the
fewest associations, then the fewest connections.

Reconfiguring (a reload changed AE titles, allowed callers, limits, the disk watermark...):
a new receiver process starts in each slot with the new settings and, once all are ready, takes
every new connection; the old one drains, so a reload does not cut an association short (unless
it outlasts scp.timeouts.drain, or a second reload comes while the first generation still
drains: that one is stopped, so that at most two generations run). While both run, the old
associations count against the old receiver's share, not the new one's.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


from common.backoff import backoff_delay
from common import logs
from node.config import HttpConfig, NodeConfig
from node.receive.launch import LaunchedReceiver, LaunchFailed, launch_receiver
from node.receive.pynetdicom_internals import HandedServer, configure_receiver_process

log = logging.getLogger("node.receive")

SHUTDOWN_GRACE_S = 0.5  # on stop, associations still open after this are aborted
_MAX_MESSAGE = 4096
# How the service stops a receiver; receivers ignore SIGTERM and SIGINT (node/receive/__main__.py).
STOP_SIGNAL = signal.SIGUSR1


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: DIMSE request/response turns otherwise wait for delayed ACKs (~40 ms)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Worker:
    def __init__(self, slot: int, process: subprocess.Popen[bytes], channel: socket.socket):
        self.slot = slot
        self.process = process
        self.channel = channel
        self.started = time.monotonic()
        self.active = 0  # connections handed over and not yet closed
        self.slots = 0  # of which: associations (A-ASSOCIATE-RQ accepted)
        self.draining = False  # replaced by a reconfiguration: ends when its connections do
        self.ready = threading.Event()


class ReceiverPool:
    """Owns the listening socket and the receiver processes; supervises and load-balances them."""

    def __init__(self, config: NodeConfig, on_study_opened: Callable[[str, float], None],
                 on_signal: Callable[[str], None] = lambda study_uid: None,
                 launched: Sequence[LaunchedReceiver] = ()):
        """`launched`: receiver processes launched ahead (node/receive/launch.py), taken before
        any new one is started."""
        self.config = config
        self._launched = list(launched)
        self.on_study_opened = on_study_opened
        self.on_signal = on_signal
        self.count = config.scp.worker_count()
        # open connections at once, negotiating or associated, across all receivers
        self.max_connections = max(64, 4 * config.scp.max_associations)
        self._workers: list[_Worker | None] = [None] * self.count
        self._others: list[_Worker] = []  # draining, or started by a reconfiguration not yet in force
        self._failures = [0] * self.count  # quick exits in a row, per slot: the respawn backs off
        self._lock = threading.Lock()
        self._reconfiguring = threading.Lock()
        self._stopping = threading.Event()
        self._signalled = threading.Event()  # the service got SIGTERM/SIGINT: receivers may go first
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server(
            (config.scp.bind, config.scp.port), reuse_port=False, backlog=128
        )
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start a receiver in each slot (the ones launched ahead first). One that cannot be
        launched stops those started, at once (none has taken a connection yet), and is raised.
        A reconfiguration meanwhile waits: it finds the receivers started, and replaces them."""
        with self._reconfiguring:
            try:
                for slot in range(self.count):
                    self._start_process(slot, self.config)
            except LaunchFailed:
                self.stop()
                raise
            for target, name in ((self._accept_loop, "accept"), (self._message_loop, "receiver-messages")):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every receiver process takes connections (at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = [w for w in self._workers if w is not None]
        return all(w.ready.wait(max(0.0, deadline - time.monotonic())) for w in workers)

    def alive(self) -> bool:
        """At least one receiver process runs behind an open listening socket (for readiness)."""
        if self._listener.fileno() < 0:
            return False
        with self._lock:
            return any(w is not None and w.process.poll() is None for w in self._workers)

    def reconfigure(self, config: NodeConfig, ready_timeout: float = 60.0) -> bool:
        """Receiver processes with `config` take over once every one of them is ready; the old
        ones then drain (no new connections; they end with their associations, at the latest
        after `scp.timeouts.drain`). If the new ones do not all start, the old ones stay and
        False is returned. Receivers still draining from an earlier reconfiguration are stopped,
        so at most two generations run."""
        with self._reconfiguring:
            if self._stopping.is_set():
                return False
            if not self._threads:  # not started yet: start() uses these settings
                self.config = config
                self.max_connections = max(64, 4 * config.scp.max_associations)
                return True
            fresh: list[_Worker] = []
            try:
                for slot in range(self.count):
                    fresh.append(self._start_process(slot, config, install=False))
            except LaunchFailed:
                pass  # not all started: those that did are stopped below
            deadline = time.monotonic() + ready_timeout
            while len(fresh) == self.count and not all(w.ready.is_set() for w in fresh):
                if (time.monotonic() > deadline or self._stopping.is_set()
                        or any(w.process.poll() is not None for w in fresh)):
                    break
                time.sleep(0.1)
            with self._lock:
                started = len(fresh) == self.count and all(
                    w.ready.is_set() and w.process.poll() is None and w in self._others for w in fresh)
                if not started or self._stopping.is_set():
                    for worker in fresh:
                        worker.process.kill()
                    if not self._stopping.is_set():
                        logs.event(log, "receivers_reconfigure_failed", logging.ERROR,
                                   reason="new receiver processes did not start; the running ones stay")
                    return False
                self.config = config
                self.max_connections = max(64, 4 * config.scp.max_associations)
                earlier = [w for w in self._others if w.draining]
                old = [w for w in self._workers if w is not None]
                for worker in fresh:
                    self._others.remove(worker)
                    self._workers[worker.slot] = worker
                for worker in old:
                    worker.draining = True
                    self._others.append(worker)
            for worker in earlier:
                worker.process.send_signal(STOP_SIGNAL)
            for worker in old:
                try:
                    worker.channel.send(json.dumps({"drain": True}).encode())
                except OSError:
                    pass  # it is gone already; _on_worker_exit sees to it
            logs.event(log, "receivers_reconfigured", draining=[w.process.pid for w in old],
                       receivers=[w.process.pid for w in fresh], stopped=[w.process.pid for w in earlier])
            return True

    def signalled(self) -> None:
        """The service is stopping on a signal; a receiver that ends now (the same Ctrl-C reached
        it) is not respawned and not reported as a failure."""
        self._signalled.set()

    def stop(self, drain: float = 0.0, grace: float = 10.0, hurry: threading.Event | None = None) -> None:
        """Stop taking connections at once (the listening socket closes, so readiness fails and a
        load balancer moves on); with `drain`, the open associations may finish for up to that
        long (scp.timeouts.drain), then every receiver is told to stop: `grace` seconds, then killed.
        `hurry` (a second SIGTERM or Ctrl-C) cuts the drain short."""
        with self._lock:
            self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            workers = [w for w in self._workers if w] + self._others
        if drain > 0:
            for worker in workers:
                try:
                    worker.channel.send(json.dumps({"drain": True}).encode())
                except OSError:
                    pass  # it is gone already
            logs.event(log, "receivers_draining", receivers=len(workers), within_s=drain)
            deadline = time.monotonic() + drain + grace
            hurry = hurry or threading.Event()
            while any(w.process.poll() is None for w in workers) and time.monotonic() < deadline:
                if hurry.wait(0.1):
                    break
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(STOP_SIGNAL)
        deadline = time.monotonic() + grace
        for worker in workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(5)
            worker.channel.close()
        with self._lock:
            unused, self._launched = self._launched, []
        for launched in unused:  # stopped before it started
            launched.discard()
        for thread in self._threads:
            thread.join(2)

    # -- processes -------------------------------------------------------------------------

    def _start_process(self, slot: int, config: NodeConfig, install: bool = True) -> _Worker:
        """A receiver process with `config`; registered for its messages, and (install) in its slot.
        It ends when its channel closes, so it never outlives the service (whatever thread started it)."""
        with self._lock:
            launched = self._launched.pop(0) if self._launched else None
        ahead = launched is not None
        launched = launched or launch_receiver()
        launched.hand_settings(receiver_settings(config, self.port, self.count))
        process, ours = launched.process, launched.channel
        worker = _Worker(slot, process, ours)
        with self._lock:
            if install:
                self._workers[slot] = worker
            else:
                self._others.append(worker)
        self._selector.register(ours, selectors.EVENT_READ, worker)
        logs.event(log, "receiver_started", slot=slot, pid=process.pid, ahead=ahead)
        return worker

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            try:
                set_nodelay(conn)
                self._dispatch(conn, peer)
            finally:
                conn.close()  # the receiver holds its own duplicate now

    def _dispatch(self, conn: socket.socket, peer: Any) -> None:
        with self._lock:
            connections = sum(w.active for w in self._workers if w is not None) + sum(w.active for w in self._others)
        if connections >= self.max_connections:
            # Connections still negotiating hold no association slot, but each holds a thread and
            # a descriptor in a receiver until its ACSE deadline: beyond this many, close at once.
            logs.event(log, "connection_refused_too_many", logging.WARNING, peer=peer[0], open=connections,
                       limit=self.max_connections)
            return
        message = json.dumps({"peer": [peer[0], peer[1]]}).encode()
        for _ in range(self.count + 1):
            with self._lock:
                live = [w for w in self._workers if w is not None]
                if not live:
                    break
                worker = min(live, key=lambda w: (not w.ready.is_set(), w.slots, w.active))  # a starting one last
                worker.active += 1
            try:
                socket.send_fds(worker.channel, [message], [conn.fileno()])
                return
            except OSError:
                with self._lock:
                    worker.active -= 1
        logs.event(log, "connection_dropped_no_receiver", logging.ERROR, peer=peer[0])

    def _message_loop(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                worker: _Worker = key.data
                try:
                    packet = worker.channel.recv(_MAX_MESSAGE)
                except OSError:
                    packet = b""
                if not packet:
                    self._on_worker_exit(worker)
                    continue
                message = json.loads(packet)
                if "ready" in message:
                    worker.ready.set()
                elif "closed" in message:
                    with self._lock:
                        worker.active = max(0, worker.active - 1)
                elif "slots" in message:
                    with self._lock:
                        worker.slots = int(message["slots"])
                elif "opened" in message:
                    self.on_study_opened(message["opened"], float(message["deadline"]))
                elif "signal" in message:
                    self.on_signal(message["signal"])

    def _on_worker_exit(self, worker: _Worker) -> None:
        self._selector.unregister(worker.channel)
        worker.channel.close()
        with self._lock:
            current = self._workers[worker.slot] is worker
            if current:
                self._workers[worker.slot] = None
            elif worker in self._others:
                self._others.remove(worker)
            stopping = self._stopping.is_set()
        code = worker.process.wait(10)
        if not current:  # drained, replaced, or a reconfiguration's process that did not start
            logs.event(log, "receiver_drained" if worker.draining else "receiver_discarded", slot=worker.slot,
                       pid=worker.process.pid, exit_code=code)
            return
        if stopping:
            return
        if self._signalled.is_set() and code in (0, -signal.SIGINT, -signal.SIGTERM):
            # Ctrl-C reaches the whole process group: a normal stop, not a failure (a receiver
            # killed otherwise meanwhile, by the OOM killer say, is still reported)
            logs.event(log, "receiver_stopped_by_signal", slot=worker.slot, pid=worker.process.pid, exit_code=code)
            return
        logs.event(log, "receiver_exited", logging.ERROR, slot=worker.slot, pid=worker.process.pid, exit_code=code)
        self._respawn_later(worker.slot, quick=time.monotonic() - worker.started < 10)

    def _respawn_later(self, slot: int, quick: bool) -> None:
        """A new receiver for `slot`; after quick failures in a row, later and later (1, 2, 4 ..
        30 s): one that cannot start (a bad certificate, no memory, no process to spare) must not
        respawn in a busy loop."""
        self._failures[slot] = self._failures[slot] + 1 if quick else 0
        delay = backoff_delay(self._failures[slot], 1.0, 30.0, jitter=False) if quick else 0.0
        timer = threading.Timer(delay, self._respawn, [slot])
        timer.daemon = True
        timer.start()

    def _respawn(self, slot: int) -> None:
        with self._lock:
            if self._stopping.is_set() or self._workers[slot] is not None:
                return
            config = self.config
        try:
            worker = self._start_process(slot, config, install=False)
        except LaunchFailed as exc:
            logs.event(log, "receiver_launch_failed", logging.ERROR, slot=slot, error=exc.strerror)
            self._respawn_later(slot, quick=True)
            return
        with self._lock:
            if self._workers[slot] is None and not self._stopping.is_set():
                self._others.remove(worker)
                self._workers[slot] = worker
                return
        worker.process.send_signal(STOP_SIGNAL)  # a reconfiguration filled the slot meanwhile


# -- the receiver process ------------------------------------------------------------------


def receiver_settings(config: NodeConfig, port: int, receivers: int) -> dict[str, Any]:
    """What a receiver process starts with: the configuration (the index URL resolved, so that
    the environment variable that may carry it stays with the service; the console's section left
    at its defaults, since its token and its OIDC client's secret are no receiver's business), the
    listening port and its share of the association slots."""
    config = config.model_copy(update={
        "storage": config.storage.model_copy(update={"index_url": config.storage.effective_index_url()}),
        "http": HttpConfig(),
    })
    return {"config": config.model_dump(mode="json"), "port": port,
            "max_associations": -(-config.scp.max_associations // receivers)}


def receiver_main(channel_fd: int, settings_fd: int) -> None:
    """A receiver process's life, from its settings to its stop (node/receive/__main__.py has
    set SIGTERM and SIGINT aside before anything was imported)."""
    stopping = threading.Event()
    signal.signal(STOP_SIGNAL, lambda *_: stopping.set())
    from node.receive.scp import StorageSCP
    from node.receive.tls import server_ssl_context
    from node.store.index import Index
    from node.store.spool import Spool
    from pynetdicom import evt

    with os.fdopen(settings_fd, "rb") as pipe:
        handed = pipe.read()
    if not handed:  # launched ahead, and the service went away (or discarded it) before its settings
        return
    settings = json.loads(handed)
    config = NodeConfig.model_validate(settings["config"])
    logs.setup(config.logging.level)
    configure_receiver_process()
    channel = socket.socket(fileno=channel_fd)
    send_lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with send_lock:
            try:
                channel.send(json.dumps(message).encode())
            except OSError:
                pass  # the service is gone: its end of the channel is closed, and the loop below ends

    data_dir = Path(config.storage.data_dir)
    scp = StorageSCP(
        config,
        # The service migrated it before starting receivers. Few connections: writes wait for the
        # index's write lock anyway, and every receiver of every replica counts against the database's limit.
        Index.open(config.storage, migrate=False, connections=4),
        Spool(data_dir, config.storage.min_free_mb, config.storage.journal_mb),
        on_study_opened=lambda uid, deadline: send({"opened": uid, "deadline": deadline}),
        slot_limit=int(settings["max_associations"]),
        on_slots=lambda n: send({"slots": n}),
        on_signal=lambda uid: send({"signal": uid}),
    )
    ae = scp.make_ae()
    handlers = scp.handlers() + [(evt.EVT_CONN_CLOSE, lambda event: send({"closed": True}))]
    server = ae.make_server(
        (config.scp.bind, settings["port"]),
        ae_title=config.scp.ae_title,
        evt_handlers=handlers,
        server_class=HandedServer,
    )
    ssl_context = server_ssl_context(config)

    def take(conn: socket.socket, peer: tuple[str, int]) -> None:
        if ssl_context is not None:
            try:
                conn.settimeout(config.scp.timeouts.acse)
                conn = ssl_context.wrap_socket(conn, server_side=True)
            except (OSError, ValueError) as exc:
                logs.event(log, "tls_handshake_failed", logging.WARNING, peer=peer[0], error=str(exc))
                conn.close()
                send({"closed": True})
                return
        server.process_request(conn, peer)

    channel.settimeout(0.2)  # how soon STOP_SIGNAL is seen
    logs.event(log, "receiver_ready", pid=os.getpid())
    send({"ready": True})
    handing: list[threading.Thread] = []  # connections between hand-over and their association
    # Draining (replaced by a receiver with new settings): connections already handed over,
    # including one that crossed the drain message, go on; the process ends when they have, at
    # the latest at scp.timeouts.drain (then like a stop: A-ABORT after a short grace).
    drain_since: float | None = None
    nothing_pending = False  # the last read of the channel found no message (none crossed the drain)
    while not stopping.is_set():
        if drain_since is not None:
            # Connections still negotiating (or a port probe that connected and left) hold no
            # association: they end at their ACSE deadline and never hold a drain up.
            established = [a for a in server.active_associations if a.is_established]
            idle = not established and not any(t.is_alive() for t in handing)
            if (idle and nothing_pending) or time.monotonic() - drain_since > config.scp.timeouts.drain:
                break
        try:
            message, fds, _, _ = socket.recv_fds(channel, _MAX_MESSAGE, 1)
            nothing_pending = False
        except TimeoutError:
            nothing_pending = True
            continue
        except OSError:
            break
        if not message:
            break  # the service closed the channel (it stopped, or died)
        request = json.loads(message)
        if request.get("drain"):
            drain_since = time.monotonic()
            logs.event(log, "receiver_draining", pid=os.getpid(),
                       associations=sum(a.is_established for a in server.active_associations))
            continue
        peer = tuple(request["peer"])
        if not fds:  # the descriptor did not arrive (e.g. this process is out of descriptors)
            send({"closed": True})
            continue
        conn = socket.socket(fileno=fds[0])
        # Never blocking without a limit; PduSocket sets the per-phase timeouts from here on.
        conn.settimeout(config.scp.timeouts.acse)
        handing = [t for t in handing if t.is_alive()]
        handing.append(threading.Thread(target=take, args=(conn, peer), daemon=True))
        handing[-1].start()

    # A short grace for associations that are finishing, then A-ABORT the rest (idle ones would
    # otherwise hold the stop for as long as their peer likes). Nothing is lost: every acknowledged
    # instance is durable, and an instance cut off mid-transfer was never acknowledged, so its
    # sender sends it again.
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
        time.sleep(0.05)
    for assoc in server.active_associations:
        assoc.abort()
    scp.spool.close()  # its journal checkpointed: the next start has nothing to replay


def main() -> None:
    """The receiver process (`python -m node.receive CHANNEL_FD SETTINGS_FD`, node/receive/__main__.py)."""
    receiver_main(int(sys.argv[1]), int(sys.argv[2]))
    # As the interpreter's exit would, wait for the threads that are not daemons: pynetdicom's
    # DUL threads, on which an association that ended just now is still being recorded (its row
    # closed, its audit record, the service told). Then everything is closed and durable (the
    # journal checkpointed, the index written by committed transactions only): the interpreter's
    # teardown, garbage collection over every imported module (about 0.5 s of CPU measured),
    # would only delay the service's stop and each reconfiguration.
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.current_thread():
            thread.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
