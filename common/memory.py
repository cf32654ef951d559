"""How much memory this process can still take before the kernel kills it: the machine's, or less
where a cgroup limits it (Docker's `--memory`, a Kubernetes memory limit, systemd's `MemoryMax=`).

Why: a job whose output does not fit is killed by the OOM killer (the machine's or its cgroup's),
and the service with it, and all it was doing; asked first, the job says what it needs instead
(inference.pipeline.segment).

Written by hand: Python has no call for it, and psutil's `virtual_memory()` is the machine's, not
a cgroup's. Read here: /proc/meminfo's `MemAvailable` (the kernel's estimate of what can be
allocated without swapping, page cache it can drop included: the kernel's
Documentation/filesystems/proc.rst) and `MemTotal` less the `Hugetlb` pool; for the process's
cgroup and each ancestor (common.cgroups), v2 `memory.max` less `memory.current`, v1
`memory.limit_in_bytes` less `memory.usage_in_bytes`, each plus the cgroup's file pages that are
neither dirty nor under writeback (`memory.stat`), which the kernel drops before it kills (a node
reads back every study it wrote: its page cache is mostly on the active list, and a cgroup that
has received more than its limit is at its limit; Documentation/admin-guide/cgroup-v2.rst,
"Memory"; cgroup-v1/memory.rst). Swap is not counted: a refused job might have run, swapping.
Where a v2 cgroup namespace hides the ancestors, their limits are not seen (nor by the process's
own view of /sys/fs/cgroup).
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
    """Bytes this process may still allocate now (`available`); the most its machine or cgroups
    allow (`limit`), of which this process holds `own` that it cannot give back (its anonymous
    memory: the loaded libraries' and models' heaps, a job's arrays)."""

    available: int
    limit: int
    own: int = 0


def memory_room(proc: Path = PROC_SELF, meminfo: Path = MEMINFO) -> MemoryRoom | None:
    """The least room of the machine and of each cgroup limit on this process; None where the
    machine's cannot be read (not Linux)."""
    machine = _machine(meminfo)
    if machine is None:
        return None
    rooms = [machine, *(room for cgroup in own_cgroups(proc, "memory") for folder in cgroup.folders_up()
                        if (room := _cgroup_room(folder, cgroup.version)) is not None)]
    return MemoryRoom(available=max(min(r.available for r in rooms), 0), limit=min(r.limit for r in rooms),
                      own=_kib_field(proc / "status", "RssAnon") or 0)


def _machine(meminfo: Path) -> MemoryRoom | None:
    available, total = _kib_field(meminfo, "MemAvailable"), _kib_field(meminfo, "MemTotal")
    if available is None or total is None:
        return None
    return MemoryRoom(available=available, limit=total - (_kib_field(meminfo, "Hugetlb") or 0))


def _kib_field(path: Path, name: str) -> int | None:
    """A "Name:   23188848 kB" line of /proc/meminfo or /proc/PID/status, in bytes; None where
    the file or the line cannot be read."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return _kib(value)
    except (OSError, ValueError):
        pass
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
        else:
            limit = int((folder / "memory.limit_in_bytes").read_text())
            if limit >= _NO_V1_LIMIT:
                return None
            used = int((folder / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):  # no memory controller there, or not a limit's format
        return None
    return MemoryRoom(available=limit - used + _droppable(folder, version), limit=limit)


# memory.stat's file pages, and those of them the kernel cannot drop at once, per version
_FILE_PAGES = {2: ("active_file", "inactive_file"), 1: ("total_active_file", "total_inactive_file")}
_NOT_DROPPABLE = {2: ("file_dirty", "file_writeback"), 1: ("total_dirty", "total_writeback")}


def _droppable(folder: Path, version: int) -> int:
    """The cgroup's clean file pages (0 where memory.stat cannot be read: the limit still holds)."""
    try:
        stat = {key: int(value) for key, _, value in (line.partition(" ") for line in
                                                      (folder / "memory.stat").read_text().splitlines())
                if value.strip().isdigit()}
    except OSError:
        return 0
    pages = sum(stat.get(key, 0) for key in _FILE_PAGES[version])
    return max(pages - sum(stat.get(key, 0) for key in _NOT_DROPPABLE[version]), 0)
