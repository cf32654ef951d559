"""How many CPUs this process may use: its affinity, or fewer when its cgroup has a CPU quota.

`os.cpu_count()` counts the machine's CPUs and `os.sched_getaffinity` those this process may run
on (taskset, a cpuset, Docker's `--cpuset-cpus`). Neither sees a CPU *quota*, which is how
Docker's `--cpus`, Kubernetes' CPU limits and systemd's `CPUQuota=` confine a process: every
thread may run, but the group gets so much CPU time per period and is throttled for the rest of
it. Sized by the machine instead, a node on a 2-CPU limit of a 64-core host would run 128
receivers (65-100 MiB each) and 64 model threads throttled in turns. Measured on this 2-core
machine under a 1-CPU quota (benchmarks.cpu_quota, 2026-11-27): the model's sliding window took
2.54 s sized by the machine and 1.16 s sized by the quota.

Read once where a count is fixed for the process's life (receivers, a model's session, torch's
threads), per call where it is cheap (resample): after a quota changes (Kubernetes' in-place
resize), a restart sizes the node anew.

Written by hand: Python has no call for the quota (3.13's `os.process_cpu_count()` is the
affinity) and loky's `cpu_count` reads only the files at the cgroup file system's root, which
misses a quota on a systemd unit or on a cgroup below the container's. Read here: the process's
own cgroup and each of its ancestors, cgroup v2 `cpu.max` and v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us` (the kernel's Documentation/admin-guide/cgroup-v2.rst, "cpu.max", and
Documentation/scheduler/sched-bwc.rst), found through /proc/self/cgroup and /proc/self/mountinfo.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PROC_SELF = Path("/proc/self")


def usable_cpus(proc: Path = PROC_SELF) -> int:
    """CPUs this process may keep busy at once: its affinity, or its CPU quota when smaller."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(proc)
    return min(cpus, quota) if quota is not None else cpus


def cpus_below_machine(proc: Path = PROC_SELF) -> int | None:
    """The usable CPUs when an affinity or a CPU quota allows fewer than the machine has, else
    None: how many threads a pool that sizes itself by the machine should use instead (ONNX
    Runtime's default is the host's physical cores, whatever the affinity or quota)."""
    usable = usable_cpus(proc)
    return usable if usable < (os.cpu_count() or 1) else None


def cpu_quota(proc: Path = PROC_SELF) -> int | None:
    """The tightest CPU quota on this process's cgroups and their ancestors, in whole CPUs
    rounded up (1.5 CPUs: 2; never 0); None when there is none or none can be read."""
    limits = [limit for cgroup in own_cgroups(proc) for folder in cgroup.folders_up()
              if (limit := _limit(folder, cgroup.version)) is not None]
    return math.ceil(min(limits)) if limits else None  # each limit is above 0


@dataclass(frozen=True)
class Cgroup:
    """This process's cgroup in a mounted hierarchy that can hold a CPU quota."""

    version: int  # 1 (the hierarchy with the cpu controller) or 2 (the unified one)
    folder: Path  # its folder
    top: Path  # the mount point: the topmost cgroup this process sees (a container's own)

    def folders_up(self) -> list[Path]:
        """Its folder and each ancestor's, up to the mount point."""
        folders = [self.folder]
        while folders[-1] != self.top and folders[-1].parent != folders[-1]:
            folders.append(folders[-1].parent)
        return folders


def own_cgroups(proc: Path = PROC_SELF) -> list[Cgroup]:
    """Where this process's cgroups are: /proc/self/cgroup names each within its hierarchy,
    /proc/self/mountinfo says which part of the hierarchy is mounted where (proc(5))."""
    own = _own_paths(proc / "cgroup")
    found = []
    for version, root, point in _cpu_mounts(proc / "mountinfo"):
        path = own.get(version)
        if path is None:
            continue
        try:
            relative = path.relative_to(root)
        except ValueError:  # this process's cgroup is outside what is mounted there
            continue
        if ".." in relative.parts:  # outside its cgroup namespace's root: no ancestor of it is visible
            continue
        found.append(Cgroup(version, point / relative, point))
    return found


def _own_paths(path: Path) -> dict[int, PurePosixPath]:
    """This process's cgroup in the v1 hierarchy with the cpu controller and in the v2 one."""
    own: dict[int, PurePosixPath] = {}
    for line in _lines(path):
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        hierarchy, controllers, cgroup = fields
        if hierarchy == "0" and controllers == "":
            own[2] = PurePosixPath(cgroup)
        elif "cpu" in controllers.split(","):
            own[1] = PurePosixPath(cgroup)
    return own


def _cpu_mounts(path: Path) -> list[tuple[int, PurePosixPath, Path]]:
    """(version, the cgroup mounted, the mount point) of each cgroup mount that can hold a CPU
    quota and is what its mount point shows now: the device there is the mount's (a mount
    hidden by a later one, on the same folder or on one above it, is not), and of mounts of one
    file system on one folder the one listed last."""
    mounts: dict[Path, tuple[int, PurePosixPath, Path]] = {}
    for line in _lines(path):
        mine, _, theirs = line.partition(" - ")
        fields, kind = mine.split(), theirs.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        root, point = PurePosixPath(_unescape(fields[3])), Path(_unescape(fields[4]))
        mounts.pop(point, None)
        if kind[0] == "cgroup2":
            version = 2
        elif kind[0] == "cgroup" and "cpu" in kind[2].split(","):
            version = 1
        else:
            continue  # (not stat'ed: a network mount may not answer)
        if _shows(point, fields[2]):
            mounts[point] = (version, root, point)
    return list(mounts.values())


def _shows(point: Path, device: str) -> bool:
    """Whether the folder `point` is on the device mountinfo names ("major:minor")."""
    try:
        major, minor = (int(number) for number in device.split(":"))
        return os.stat(point).st_dev == os.makedev(major, minor)
    except (OSError, ValueError):
        return False


def _limit(folder: Path, version: int) -> float | None:
    """The CPUs a cgroup folder's quota allows (quota / period); None for none or unreadable."""
    try:
        if version == 2:
            quota, period = (folder / "cpu.max").read_text().split()
            if quota == "max":
                return None
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        allowed, per = int(quota), int(period)
    except (OSError, ValueError):  # no cpu controller there, or not a quota's format
        return None
    return allowed / per if allowed > 0 and per > 0 else None


def _lines(path: Path) -> list[str]:
    """The file's lines; a path in it that is not UTF-8 (a Latin-1 folder mounted in) is kept as
    the file system's own bytes (os.fsdecode), not an error."""
    try:
        return os.fsdecode(path.read_bytes()).split("\n")  # (splitlines would split at \f, \x1c...)
    except OSError:
        return []


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
