"""How many CPUs the node sizes itself by (common.cpus): the affinity, or a smaller cgroup CPU
quota, read from this process's own cgroup and its ancestors. Fake /proc trees for the formats
of Docker, Kubernetes and systemd; real cgroups with a quota for what the node then does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cpus import cpu_quota, usable_cpus
from node.config import NodeConfig
from node.receive.launch import launched_ahead
from tests.cgroups import cpu_quota_cgroup, device_of, fake_proc, skip_unless_two_cpus, write_files

REPO = Path(__file__).resolve().parents[1]


def test_a_v2_quota_on_an_ancestor_limits_the_cgroup_below_it(tmp_path):
    """systemd's CPUQuota= on a slice, the service in a cgroup below it without one: the tightest
    quota on the way up counts, rounded up to whole CPUs."""
    proc = fake_proc(tmp_path, "0::/system.slice/node.service\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified" / "system.slice", cpu_max="150000 100000")
    write_files(tmp_path / "unified" / "system.slice" / "node.service", cpu_max="max 100000")
    assert cpu_quota(proc) == 2
    write_files(tmp_path / "unified" / "system.slice" / "node.service", cpu_max="50000 100000")
    assert cpu_quota(proc) == 1


def test_a_v1_container_sees_its_own_cgroup_at_the_mount_point(tmp_path):
    """Docker on cgroup v1 mounts the container's own cgroup (root /docker/<id>) at
    /sys/fs/cgroup/cpu,cpuacct while /proc/self/cgroup names the full path; a hybrid host's
    unified hierarchy without the cpu controller says nothing."""
    proc = fake_proc(tmp_path, "5:cpuacct,cpu:/docker/abc\n4:memory:/docker/abc\n0::/\n", [
        ("/docker/abc", "cpu,cpuacct", "cgroup", "rw,cpuacct,cpu"),
        ("/docker/abc", "memory", "cgroup", "rw,memory"),
        ("/", "unified", "cgroup2", "rw"),
    ])
    write_files(tmp_path / "cpu,cpuacct", cpu_cfs_quota_us="250000", cpu_cfs_period_us="100000")
    write_files(tmp_path / "memory", cpu_cfs_quota_us="10000", cpu_cfs_period_us="100000")  # not the cpu hierarchy
    write_files(tmp_path / "unified")
    assert cpu_quota(proc) == 3


def test_v1_without_a_quota_says_minus_one_and_a_child_may_have_one(tmp_path):
    """v1 writes -1 for "no quota" (every hierarchy's root has it): no quota there, and the
    child's quota counts."""
    proc = fake_proc(tmp_path, "3:cpu,cpuacct:/node\n", [("/", "cpu", "cgroup", "rw,cpu,cpuacct")])
    write_files(tmp_path / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    write_files(tmp_path / "cpu" / "node", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert cpu_quota(proc) is None and usable_cpus(proc) == len(os.sched_getaffinity(0))
    write_files(tmp_path / "cpu" / "node", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    assert cpu_quota(proc) == 1 and usable_cpus(proc) == 1


def test_a_mount_whose_folder_shows_another_device_is_hidden(tmp_path):
    """A cgroup mount hidden by a later mount on its folder or on one above it: its folder is on
    another device than mountinfo says, and what is there counts for nothing."""
    proc = fake_proc(tmp_path, "3:cpu:/\n", [("/", "cpu", "cgroup", "rw,cpu")])
    write_files(tmp_path / "cpu", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    assert cpu_quota(proc) == 1
    text = (proc / "mountinfo").read_text()
    (proc / "mountinfo").write_text(text.replace(f" {device_of(tmp_path)} / {tmp_path}/cpu ", f" 0:999 / {tmp_path}/cpu "))
    assert cpu_quota(proc) is None


def test_a_mount_point_with_an_escaped_space_and_one_mounted_over_again(tmp_path):
    """mountinfo writes a space in a path as \\040; a mount point mounted over again (here by a
    tmpfs) hides the cgroup mounted there before."""
    proc = fake_proc(tmp_path, "3:cpu:/\n", [("/", "cpu\\040quota", "cgroup", "rw,cpu")])
    write_files(tmp_path / "cpu quota", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    assert cpu_quota(proc) == 1
    with open(proc / "mountinfo", "a") as mountinfo:
        mountinfo.write(f"40 23 0:40 / {tmp_path}/cpu\\040quota rw - tmpfs tmpfs rw\n")
    assert cpu_quota(proc) is None


def test_a_cgroup_outside_its_namespace_root_is_no_quota_and_a_path_not_in_utf8_is_read(tmp_path):
    """/proc/self/cgroup says /../sibling for a process outside its cgroup namespace's root:
    nothing above it is visible, and the root's quota is not an ancestor's. A mount point in
    Latin-1 is read as the file system's own bytes."""
    proc = fake_proc(tmp_path, "0::/../sibling\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified", cpu_max="50000 100000")
    write_files(tmp_path / "sibling", cpu_max="50000 100000")
    assert cpu_quota(proc) is None
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(latin1)
    with open(latin1 + b"/cpu.max", "wb") as quota:
        quota.write(b"50000 100000\n")
    (proc / "mountinfo").write_bytes(b"30 23 " + device_of(tmp_path).encode() + b" / " + latin1 + b" rw - cgroup2 cgroup2 rw\n")
    (proc / "cgroup").write_text("0::/\n")
    assert cpu_quota(proc) == 1


@pytest.mark.parametrize("quota", ["max 100000", "-1", "", "garbage", "0 100000", "100000 0"])
def test_no_quota_or_an_unreadable_one_is_none(tmp_path, quota):
    """`max`, v1's -1, an empty, malformed or zero file: no quota, and no exception."""
    proc = fake_proc(tmp_path, "0::/\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified", cpu_max=quota)
    assert cpu_quota(proc) is None
    assert usable_cpus(proc) == len(os.sched_getaffinity(0))


def test_a_cgroup_outside_the_mounted_part_or_no_proc_files_is_no_quota(tmp_path):
    proc = fake_proc(tmp_path, "3:cpu:/elsewhere\n", [("/docker/abc", "cpu", "cgroup", "rw,cpu")])
    write_files(tmp_path / "cpu", cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    assert cpu_quota(proc) is None
    assert cpu_quota(tmp_path / "no-such-proc") is None


def test_a_quota_below_the_affinity_sizes_the_receivers_and_those_launched_ahead(tmp_path, monkeypatch):
    """scp.workers 0: two receivers per usable CPU; launched ahead of the service's imports, one
    per usable CPU besides the service's (launch.launched_ahead)."""
    proc = fake_proc(tmp_path, "0::/\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified", cpu_max="100000 100000")
    assert usable_cpus(proc) == 1
    monkeypatch.setattr("node.config.usable_cpus", lambda: usable_cpus(proc))
    assert NodeConfig.model_validate({"scp": {"workers": 0}}).scp.worker_count() == 2
    assert NodeConfig.model_validate({"scp": {"workers": 5}}).scp.worker_count() == 5
    monkeypatch.setattr("node.receive.launch.usable_cpus", lambda: 16)  # a quota of 16 on a bigger host
    assert launched_ahead(32) == 15
    monkeypatch.setattr("node.receive.launch.usable_cpus", lambda: usable_cpus(proc))
    assert launched_ahead(32) == 1


SIZES = """
import json
from pathlib import Path
from common.cpus import cpu_quota, usable_cpus
from inference.backends.local import LocalBackend
from inference.pipeline import confine_threads
from inference.repository import ModelRepository
repo = ModelRepository(Path("models"))
spec = repo.spec("lesion-seg")
backend = LocalBackend(repo.verified_file(spec), spec)
print(json.dumps({"quota": cpu_quota(), "usable": usable_cpus(), "torch": confine_threads(),
                  "onnxruntime": backend.session.get_session_options().intra_op_num_threads}))
"""


def _sizes(prefix: list[str]) -> dict[str, int | None]:
    """What a process started through `prefix` finds, with torch's default at four threads (so
    that on any machine only the fitting brings it to the usable CPUs)."""
    run = subprocess.run([*prefix, sys.executable, "-c", SIZES], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="4", MKL_NUM_THREADS="4"))
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("nested", [False, True], ids=["own-cgroup", "parent-cgroup"])
def test_under_a_real_cpu_quota_the_model_runs_on_as_many_threads_as_the_quota_allows(nested):
    """A process in a real cgroup with a 1-CPU quota (on its own cgroup, or on the parent's as a
    systemd slice has it) on a machine where it may run on more: one usable CPU, torch and ONNX
    Runtime on one thread. Outside it, ONNX Runtime's own default stays."""
    skip_unless_two_cpus()
    with cpu_quota_cgroup(1.0, nested=nested) as prefix:
        assert _sizes(prefix) == {"quota": 1, "usable": 1, "torch": 1, "onnxruntime": 1}
    outside = _sizes([])  # (a quota on the test's own cgroup, as a CI container may have, applies there too)
    assert outside["usable"] == (len(os.sched_getaffinity(0)) if cpu_quota() is None else usable_cpus())
    assert outside["onnxruntime"] == (0 if usable_cpus() == os.cpu_count() else usable_cpus())


def test_on_fewer_cpus_than_the_machine_has_onnx_runtime_runs_on_as_many_threads():
    """ONNX Runtime's default is the host's physical cores whatever the affinity: a process
    confined to one CPU (taskset, a cpuset) runs it, and torch, on one thread."""
    skip_unless_two_cpus()
    sizes = _sizes(["taskset", "-c", str(min(os.sched_getaffinity(0)))])
    assert (sizes["usable"], sizes["torch"], sizes["onnxruntime"]) == (1, 1, 1)
