"""Real cgroups with a CPU quota or a memory limit, for tests of how the node sizes itself under
one (common.cpus) and what it refuses to allocate (common.memory); fake /proc trees for the
formats of Docker, Kubernetes and systemd."""

from __future__ import annotations

import os
import signal
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import pytest

from common.cgroups import PROC_SELF, own_cgroups
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
    with _limited_cgroup("cpu", lambda folder, version: _set_quota(folder, version, cpus), nested,
                         unavailable) as prefix:
        yield prefix


@contextmanager
def memory_limit_cgroup(limit_bytes: int, unavailable: Callable[[str], NoReturn] = pytest.skip
                        ) -> Iterator[list[str]]:
    """A new cgroup below this process's own that may hold `limit_bytes` of memory (swap
    included, on v1 where the kernel accounts it); yields the command prefix, as
    `cpu_quota_cgroup` does."""
    with _limited_cgroup("memory", lambda folder, version: _set_memory_limit(folder, version, limit_bytes), False,
                         unavailable) as prefix:
        yield prefix


@contextmanager
def _limited_cgroup(controller: str, limit: Callable[[Path, int], None], nested: bool,
                    unavailable: Callable[[str], NoReturn]) -> Iterator[list[str]]:
    made: list[Path] = []
    try:
        inner = _made_cgroup(controller, limit, nested, made, unavailable)
        yield ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(inner / "cgroup.procs")]
    finally:
        for folder in reversed(made):
            try:
                wait_for(lambda: _removed(folder), timeout=30, interval=0.1)
            except Exception as exc:  # a leftover folder is no reason to hide the test's own outcome
                warnings.warn(f"test cgroup {folder} not removed: {exc}")


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """A fake /proc/self: its cgroup file, and a mountinfo with (root, mount point, type, super
    options) per mount, mount points under tmp_path, each on tmp_path's device (as a mount's
    folder is on its own)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [f"{30 + k} 23 {device_of(tmp_path)} {root} {tmp_path / point} rw,relatime - {kind} {kind} {options}"
             for k, (root, point, kind, options) in enumerate(mounts)]
    (proc / "mountinfo").write_text("\n".join(["22 1 8:1 / / rw - ext4 /dev/sda1 rw", *lines]) + "\n")
    return proc


def device_of(folder: Path) -> str:
    device = os.stat(folder).st_dev
    return f"{os.major(device)}:{os.minor(device)}"


def write_files(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


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


def _made_cgroup(controller: str, limit: Callable[[Path, int], None], nested: bool, made: list[Path],
                 unavailable: Callable[[str], NoReturn]) -> Path:
    reasons = []
    for cgroup in own_cgroups(PROC_SELF, controller):
        try:
            outer = cgroup.folder / f"test-{controller}-{uuid.uuid4().hex[:12]}"
            if cgroup.version == 2:  # the controller must be delegated to the new cgroup
                (cgroup.folder / "cgroup.subtree_control").write_text(f"+{controller}")
            outer.mkdir()
            made.append(outer)
            limit(outer, cgroup.version)
            if not nested:
                return outer
            if cgroup.version == 2:
                (outer / "cgroup.subtree_control").write_text(f"+{controller}")
            inner = outer / "service"
            inner.mkdir()
            made.append(inner)
            return inner
        except OSError as exc:
            reasons.append(f"cgroup v{cgroup.version} at {cgroup.folder}: {exc.strerror}")
            for folder in reversed(made):
                folder.rmdir()
            made.clear()
    unavailable(f"no cgroup with a {controller} limit can be made here: "
                + ("; ".join(reasons) or f"no {controller} controller"))


def _set_quota(folder: Path, version: int, cpus: float) -> None:
    if version == 2:
        period = int((folder / "cpu.max").read_text().split()[1])
        (folder / "cpu.max").write_text(f"{int(cpus * period)} {period}")
    else:
        period = int((folder / "cpu.cfs_period_us").read_text())
        (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))


def _set_memory_limit(folder: Path, version: int, limit_bytes: int) -> None:
    (folder / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))
    try:  # no swap beyond it (only where the kernel accounts swap)
        if version == 2:
            (folder / "memory.swap.max").write_text("0")
        else:
            (folder / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        pass
