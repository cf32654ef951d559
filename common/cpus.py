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
affinity; for loky's `cpu_count`, see common.cgroups). Read here, in the process's own cgroup and
each of its ancestors (common.cgroups): cgroup v2 `cpu.max` and v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us` (the kernel's Documentation/admin-guide/cgroup-v2.rst, "cpu.max", and
Documentation/scheduler/sched-bwc.rst).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from common.cgroups import PROC_SELF, own_cgroups


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
    limits = [limit for cgroup in own_cgroups(proc, "cpu") for folder in cgroup.folders_up()
              if (limit := _limit(folder, cgroup.version)) is not None]
    return math.ceil(min(limits)) if limits else None  # each limit is above 0


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
