"""Where this process's cgroups are, for the limits a container or a systemd unit puts on it
(common.cpus: a CPU quota; common.memory: a memory limit).

Written by hand: Python has no call for it, and the libraries that read limits (loky, psutil)
read only the files at the cgroup file system's root, which misses a limit on a systemd unit or
on a cgroup below the container's. Read here: the process's own cgroup in each mounted
hierarchy, cgroup v1 (the hierarchy with the controller) and v2 (the unified one), found through
/proc/self/cgroup and /proc/self/mountinfo (proc(5)); a limit is then read from that folder and
each of its ancestors up to the mount point (the kernel's Documentation/admin-guide/cgroup-v2.rst).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PROC_SELF = Path("/proc/self")


@dataclass(frozen=True)
class Cgroup:
    """This process's cgroup in a mounted hierarchy that has a controller (cpu, memory)."""

    version: int  # 1 (the hierarchy with the controller) or 2 (the unified one)
    folder: Path  # its folder
    top: Path  # the mount point: the topmost cgroup this process sees (a container's own)

    def folders_up(self) -> list[Path]:
        """Its folder and each ancestor's, up to the mount point."""
        folders = [self.folder]
        while folders[-1] != self.top and folders[-1].parent != folders[-1]:
            folders.append(folders[-1].parent)
        return folders


def own_cgroups(proc: Path, controller: str) -> list[Cgroup]:
    """Where this process's cgroups are, in the v1 hierarchy with `controller` and in the v2
    one: /proc/self/cgroup names each within its hierarchy, /proc/self/mountinfo says which part
    of the hierarchy is mounted where (proc(5))."""
    own = _own_paths(proc / "cgroup", controller)
    found = []
    for version, root, point in _mounts(proc / "mountinfo", controller):
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


def _own_paths(path: Path, controller: str) -> dict[int, PurePosixPath]:
    """This process's cgroup in the v1 hierarchy with `controller` and in the v2 one."""
    own: dict[int, PurePosixPath] = {}
    for line in _lines(path):
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        hierarchy, controllers, cgroup = fields
        if hierarchy == "0" and controllers == "":
            own[2] = PurePosixPath(cgroup)
        elif controller in controllers.split(","):
            own[1] = PurePosixPath(cgroup)
    return own


def _mounts(path: Path, controller: str) -> list[tuple[int, PurePosixPath, Path]]:
    """(version, the cgroup mounted, the mount point) of each cgroup mount with `controller` (v1)
    or unified (v2) that is what its mount point shows now: the device there is the mount's (a mount
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
        elif kind[0] == "cgroup" and controller in kind[2].split(","):
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
