"""How much memory this process can still take before the kernel kills it: the machine's, or less
where a cgroup limits it (Docker's `--memory`, a Kubernetes memory limit, systemd's `MemoryMax=`).

Why: a job whose output does not fit is killed by the OOM killer (the machine's or its cgroup's),
and the service with it, and all it was doing; asked first, the job says what it needs instead
(inference.pipeline.segment).

Written by hand: Python has no call for it, and psutil's `virtual_memory()` is the machine's, not
a cgroup's. Read here: /proc/meminfo's `MemTotal` and `MemAvailable` (the kernel's estimate of
what can be allocated without swapping, page cache it can drop included: the kernel's
Documentation/filesystems/proc.rst); for the process's cgroup and each ancestor
(common.cgroups), v2 `memory.max` less `memory.current`, v1 `memory.limit_in_bytes` less
`memory.usage_in_bytes`, each plus the cgroup's inactive file pages (`memory.stat`:
`inactive_file`, v1 `total_inactive_file`), which the kernel drops before it kills
(Documentation/admin-guide/cgroup-v2.rst, "Memory"; cgroup-v1/memory.rst).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.cgroups import PROC_SELF, own_cgroups

MEMINFO = Path("/proc/meminfo")
# cgroup v1 writes "no limit" as the largest page count the kernel keeps, in bytes (9223372036854771712
# with 4 KiB pages): any limit at or above 2^60 bytes is none
_NO_V1_LIMIT = 1 << 60


@dataclass(frozen=True)
class MemoryRoom:
    """Bytes this process may still allocate now (`available`), and at most, were everything
    else in its machine and cgroups gone (`limit`)."""

    available: int
    limit: int


def memory_room(proc: Path = PROC_SELF, meminfo: Path = MEMINFO) -> MemoryRoom | None:
    """The least room of the machine and of each cgroup limit on this process; None where the
    machine's cannot be read (not Linux)."""
    machine = _machine(meminfo)
    if machine is None:
        return None
    rooms = [machine, *(room for cgroup in own_cgroups(proc, "memory") for folder in cgroup.folders_up()
                        if (room := _cgroup_room(folder, cgroup.version)) is not None)]
    return MemoryRoom(available=max(min(r.available for r in rooms), 0), limit=min(r.limit for r in rooms))


def _machine(meminfo: Path) -> MemoryRoom | None:
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return MemoryRoom(available=_kib(fields["MemAvailable"]), limit=_kib(fields["MemTotal"]))
    except (OSError, KeyError, ValueError):
        return None


def _kib(field: str) -> int:
    """A /proc/meminfo value ("23188848 kB") in bytes."""
    number, unit = field.split()
    if unit != "kB":
        raise ValueError(unit)
    return int(number) * 1024


def _cgroup_room(folder: Path, version: int) -> MemoryRoom | None:
    """A cgroup folder's limit and what of it is left; None for no limit, or none readable."""
    try:
        if version == 2:
            limit_text = (folder / "memory.max").read_text().strip()
            if limit_text == "max":
                return None
            limit, used = int(limit_text), int((folder / "memory.current").read_text())
            droppable = "inactive_file"
        else:
            limit = int((folder / "memory.limit_in_bytes").read_text())
            if limit >= _NO_V1_LIMIT:
                return None
            used = int((folder / "memory.usage_in_bytes").read_text())
            droppable = "total_inactive_file"
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        return MemoryRoom(available=limit - used + int(stat.get(droppable, 0)), limit=limit)
    except (OSError, ValueError):  # no memory controller there, or not a limit's format
        return None
