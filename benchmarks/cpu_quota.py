"""The node under a container's CPU limit, side by side: this working tree's against another
revision's, each node in a cgroup of its own with a CPU quota below the CPUs it may run on (how
Docker's --cpus and Kubernetes' CPU limits confine a container; Orthanc and this script stay
outside it). Per node, in turns (A B, B A, ...):

- with the shipped default receivers (scp.workers 0): how many it starts, the seconds until every
  one takes connections, and the memory of all its processes once its pipeline has loaded
  (proportional set size: shared pages counted once);
- the studies of benchmarks.end_to_end (LocalBackend) through it, on two receivers in both arms
  (the tests' NodeProcess default): the model's sliding window and the node's own time around
  it, first study and the median of the others.

Needs root and a cgroup with the cpu controller (tests.cgroups).

    python -m benchmarks.cpu_quota REV [--cpus 1] [--pairs 2] [--studies 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

import pydicom

from benchmarks import end_to_end
from benchmarks.common import benchmark_run, relabel
from benchmarks.receive_against import export_revision, group_stats
from phantom.study import make_dicom_study
from tests.cgroups import cpu_quota_cgroup
from tests.peers import REPO_ROOT, NodeProcess, wait_for


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("against", help="the revision to compare with (a commit, branch or tag)")
    parser.add_argument("--cpus", type=float, default=1.0, help="the quota, in CPUs")
    parser.add_argument("--pairs", type=int, default=2, help="runs of each arm")
    parser.add_argument("--studies", type=int, default=3, help="studies through each node (the first, then the rest)")


def _unavailable(why: str) -> NoReturn:
    sys.exit(f"cannot run: {why}")


def group_pss_mib(group: int) -> float:
    """Proportional set size of the live processes in this process group, MiB."""
    total = 0
    for pid in group_stats(group):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:  # ended meanwhile
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total / 1024


def start_arm(workdir: Path, source: Path, prefix: list[str]) -> tuple[int, float, float]:
    """(receivers, seconds until every one takes connections, MiB once the pipeline loaded)."""
    node = NodeProcess(workdir, routing=end_to_end.ROUTING, source=source, launcher=tuple(prefix), scp={"workers": 0})
    node.receivers = 1  # how many the node starts is what is measured: read from its node_started
    began = time.perf_counter()
    try:
        node.start()
        count = node.events("node_started")[-1]["receivers"]
        wait_for(lambda: len(node.events("receiver_ready")) >= count, timeout=120, interval=0.02)
        started = time.perf_counter() - began
        wait_for(lambda: node.events("pipeline_ready"), timeout=120)
        assert node.process is not None
        return count, started, group_pss_mib(node.process.pid)
    finally:
        node.stop()


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        sources = {"A": export_revision(args.against, work / "against"), "B": REPO_ROOT}
        files, _ = make_dicom_study(work / "ct", slices=args.slices, size=args.size, pixel_spacing=384 / args.size,
                                    slice_spacing=192 / args.slices, seed=5)
        copies = [relabel(files, work / f"again{n}", n) for n in range(1, args.studies)]
        studies = [(f, str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID)) for f in [files, *copies]]
        print(f"a node in a cgroup with a {args.cpus:g}-CPU quota, {len(os.sched_getaffinity(0))} CPUs to run on;"
              f" A = {args.against}, B = this working tree")
        results: dict[str, list[tuple[int, float, float, float, float, float]]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for arm in ("AB" if pair % 2 == 0 else "BA"):
                with cpu_quota_cgroup(args.cpus, unavailable=_unavailable) as prefix:
                    count, started, mib = start_arm(work / f"start-{pair}{arm}", sources[arm], prefix)
                    end_to_end.NodeProcess = functools.partial(NodeProcess, source=sources[arm], launcher=tuple(prefix))
                    rows = end_to_end.run(work / f"e2e-{pair}{arm}", studies, None)
                key = "total without the model's compute"
                model = "inference: sliding window (model)"
                later = end_to_end.steady(rows[1:]) if len(rows) > 1 else rows[0]
                results[arm].append((count, started, mib, rows[0][model], later[model], later[key]))
                print(f"pair {pair + 1} {arm}: {count} receivers, all taking connections {started:.2f} s after the"
                      f" command, {mib:.0f} MiB; model {rows[0][model]:.2f} s first, {later[model]:.2f} s next;"
                      f" own time {rows[0][key]:.2f} s first, {later[key]:.2f} s next", flush=True)
        labels = ("receivers", "start s", "MiB", "model first s", "model next s", "own time next s")
        print(f"{'median':8}" + "".join(f"{label:>17}" for label in labels))
        medians = {arm: [statistics.median(r[i] for r in results[arm]) for i in range(len(labels))] for arm in "AB"}
        for arm in "AB":
            print(f"{arm:8}" + "".join(f"{value:17.2f}" for value in medians[arm]))
        ratios = [f"{b / a:17.2f}" if a else f"{'-':>17}" for a, b in zip(medians["A"], medians["B"])]
        print(f"{'B/A':8}" + "".join(ratios))


if __name__ == "__main__":
    main()
