"""Stopping the processes we start (servers in tests, Triton for development) by PID."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM the process, then SIGKILL its whole process group if it lingers past `grace`.

    The process must have been started with ``start_new_session=True``.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
