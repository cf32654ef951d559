"""A real cgroup with a CPU quota, for tests of how the node sizes itself under one (common.cpus)."""

from __future__ import annotations

import os
import signal
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import pytest

from common.cpus import own_cgroups
from tests.peers import wait_for


@contextmanager
def cpu_quota_cgroup(cpus: float, nested: bool = False,
                     unavailable: Callable[[str], NoReturn] = pytest.skip) -> Iterator[list[str]]:
    """A new cgroup below this process's own with a quota of `cpus` CPUs; yields the command
    prefix that runs a command in it (the shell moves itself in, then execs the command: the
    same process, so its PID and process group are the command's). `nested`: the quota is on
    the new cgroup and the command runs in a child of it without one, as a systemd slice holds
    a service. Removed afterwards: a process still in it then (a receiver whose service was
    killed) is killed. Where no such cgroup can be made (not root, or no cpu controller this
    process may delegate), `unavailable(why)`: the test is skipped."""
    made: list[Path] = []
    try:
        inner = _quota_cgroup(cpus, nested, made, unavailable)
        yield ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(inner / "cgroup.procs")]
    finally:
        for folder in reversed(made):
            try:
                wait_for(lambda: _removed(folder), timeout=30, interval=0.1)
            except Exception as exc:  # a leftover folder is no reason to hide the test's own outcome
                warnings.warn(f"test cgroup {folder} not removed: {exc}")


def skip_unless_two_cpus() -> None:
    """A quota below the affinity, or an affinity below the machine's, needs two CPUs to run on."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to run on")


def _removed(folder: Path) -> bool:
    """Kill what is still in the cgroup, then remove it; False while it is busy (a process
    still exiting)."""
    try:
        for pid in (folder / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _quota_cgroup(cpus: float, nested: bool, made: list[Path], unavailable: Callable[[str], NoReturn]) -> Path:
    reasons = []
    for cgroup in own_cgroups():
        try:
            outer = cgroup.folder / f"test-quota-{uuid.uuid4().hex[:12]}"
            if cgroup.version == 2:  # the cpu controller must be delegated to the new cgroup
                (cgroup.folder / "cgroup.subtree_control").write_text("+cpu")
            outer.mkdir()
            made.append(outer)
            if cgroup.version == 2:
                period = int((outer / "cpu.max").read_text().split()[1])
                (outer / "cpu.max").write_text(f"{int(cpus * period)} {period}")
            else:
                period = int((outer / "cpu.cfs_period_us").read_text())
                (outer / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
            if not nested:
                return outer
            if cgroup.version == 2:
                (outer / "cgroup.subtree_control").write_text("+cpu")
            inner = outer / "service"
            inner.mkdir()
            made.append(inner)
            return inner
        except OSError as exc:
            reasons.append(f"cgroup v{cgroup.version} at {cgroup.folder}: {exc.strerror}")
            for folder in reversed(made):
                folder.rmdir()
            made.clear()
    unavailable("no cgroup with a CPU quota can be made here: " + ("; ".join(reasons) or "no cpu controller"))
