"""Launching a receiver process, apart from running one (node/receive/workers.py), so that the
service can launch its receivers as soon as its configuration is read.

Why: a receiver spends ~1.3 s of CPU importing pydicom, pynetdicom and SQLAlchemy before it can
take a connection, and the service ~2 s importing its own modules. Launched one after the
other, a node took 3.5-3.8 s to start on two cores, one of them idle while the service
imported. A receiver launched first imports meanwhile, then waits for its settings; the service
writes them once the journal is replayed and the spool reconciled (NodeService.start), so no
receiver touches the spool or the index before that. Only as many are launched first as there
are cores besides the service's (`launched_ahead`). This module imports nothing heavy: the
command line imports it before the service's modules.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from common import logs
from common.cpus import usable_cpus
from node.config import API_TOKEN_ENV, HTTP_TOKEN_ENV, INDEX_URL_ENV, OIDC_SECRET_ENV

log = logging.getLogger("node.receive")

# Not passed on to receiver processes: the values they need reach them inside the settings (a
# pipe); the OIDC client's secret and the command line's API token are for others.
_SECRET_ENV = (HTTP_TOKEN_ENV, INDEX_URL_ENV, OIDC_SECRET_ENV, API_TOKEN_ENV)
# Each received PDU is a 16 KiB-1 MiB buffer. With glibc's defaults these go through mmap and
# munmap and fault in fresh pages every time (measured: a third of receive system time).
# Keeping them on the heap makes reuse cheap.
_MALLOC_TUNING = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "MALLOC_TOP_PAD_": str(64 << 20),
}


@dataclass
class LaunchedReceiver:
    """A receiver process, importing or waiting for its settings; `channel` is the service's end
    of its control channel (SOCK_SEQPACKET), `settings` the write end of its settings pipe."""

    process: subprocess.Popen[bytes]
    channel: socket.socket
    settings: int

    def hand_settings(self, settings: dict[str, Any]) -> None:
        """Write its settings, once: the receiver reads them whole, then builds its index, spool
        and SCP. A receiver that died meanwhile is left to the pool's supervision."""
        try:
            with os.fdopen(self.settings, "wb") as pipe:  # closing flushes: it may raise too
                pipe.write(json.dumps(settings).encode())
        except BrokenPipeError:
            pass

    def discard(self) -> None:
        """Never used (the service did not start): its settings pipe closes, which ends it, and
        it is stopped and reaped here (one that does not end, in uninterruptible sleep, is left
        to end by itself: a stop goes on)."""
        os.close(self.settings)
        self.channel.close()
        self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            logs.event(log, "receiver_not_ended", logging.WARNING, pid=self.process.pid)


class LaunchFailed(OSError):
    """A receiver process could not be started (the kernel refused the fork or the exec: a pids
    limit, memory); its `strerror` says so for the operator."""


def launched_ahead(receivers: int, cores: int | None = None) -> int:
    """How many of the `receivers` to launch before the service imports its modules: one per
    core the service leaves to them (`cores`: the usable CPUs, common.cpus), at least one. The
    pool launches the others as it starts (ReceiverPool.start), once those have their settings.
    Launched all at once, they took the cores from the service's own start: on two cores the
    first C-ECHO came 2.91 -> 2.03 s after a first start with two receivers and 4.16 -> 2.16 s
    with the default four (medians of four starts in turns). Launched as soon as the service's
    modules were imported, the others slowed the rest of its start (a first start creates the
    schema): 2.42 and 2.93 s against 2.12 and 2.13 s, in turns."""
    return max(1, min(receivers, (usable_cpus() if cores is None else cores) - 1))


def launch_receiver() -> LaunchedReceiver:
    """A receiver process started with no settings yet: the settings hold secrets (the index
    URL's password, the console token), so they go through a pipe only the receiver reads, never
    its command line or environment (readable in /proc/PID/environ)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    settings_in, settings_out = os.pipe()
    env = {**_MALLOC_TUNING, **{k: v for k, v in os.environ.items() if k not in _SECRET_ENV}}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "node.receive", str(theirs.fileno()), str(settings_in)],
            pass_fds=[theirs.fileno(), settings_in],
            env=env,
        )
    except BaseException as exc:
        ours.close()
        os.close(settings_out)
        if isinstance(exc, OSError):
            why = exc.strerror or exc
            raise LaunchFailed(exc.errno, f"a receiver process cannot be launched ({why})") from exc
        raise
    finally:
        theirs.close()
        os.close(settings_in)
    return LaunchedReceiver(process, ours, settings_out)
