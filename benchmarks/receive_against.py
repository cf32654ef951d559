"""Receive, side by side: this working tree's node against another revision's, interleaved.

`benchmarks.receive` compares the node with storescp and Orthanc, best of a few runs; between
hours its figures move more than a 10-20% change of the node does (this machine's disk, the
file system's state after mass deletions). A change is judged here instead: the two revisions'
nodes run in turns (A B, B A, A B, ...) on the same load, each run from its own source tree
(`git archive` of REV, first on PYTHONPATH, and not started in a source tree: `python -m`, as
the receivers are started, puts the current folder first on the path). Each run prints its
rate, the CPU its node (service and receivers) spent per instance, read from /proc (the
steadier of the two), and the CPU time the hypervisor gave to other machines meanwhile. The
summary gives each arm's medians and the median of the pairs' ratios (this tree / REV). With
REV the working tree's own commit it measures the noise itself.

Every run writes into a folder of its own and nothing is deleted until the end: on this
machine's file system (ext4 without a journal) files created within minutes of a deletion
cost the kernel a scan of the recently deleted inodes, and removing each run's 2,000 files
before the next run drove both arms' CPU per instance from 1.5 to 2.2 ms over ten runs
(README, Performance). Leave a few minutes after deleting much before starting.

    python -m benchmarks.receive_against REV [--load small-4] [--pairs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
from pathlib import Path

from benchmarks.common import benchmark_run
from benchmarks.receive import make_studies, send_all, warm
from tests.peers import REPO_ROOT, NodeProcess

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# instances of NxN in a study (None: --slices of --size), over how many associations; mid: files of
# 257 KB, just over the intake journal's record limit (node/store/journal.py, RECORD_MAX_BYTES)
LOADS = {"small-1": (2000, 180, 1), "small-4": (2000, 180, 4), "mid-1": (1000, 362, 1), "mid-4": (1000, 362, 4),
         "ct-1": (None, None, 1), "ct-4": (None, None, 4)}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("against", help="the revision to compare with (a commit, branch or tag)")
    parser.add_argument("--load", choices=sorted(LOADS), default="small-4",
                        help="2,000 small instances, 1,000 of 257 KB, or a CT of --slices x --size (ct-4: four), "
                        "over 1 or 4 associations")
    parser.add_argument("--pairs", type=int, default=5)


def group_stats(group: int) -> dict[str, list[str]]:
    """/proc/PID/stat's fields after "pid (comm) " of each live process in this process group."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == group:  # pgrp
            found[pid] = fields
    return found


def group_cpu_s(group: int) -> float:
    """User and system CPU seconds of the live processes in this process group."""
    ticks = sum(int(fields[11]) + int(fields[12]) for fields in group_stats(group).values())  # utime, stime
    return ticks / CLOCK_TICKS


def stolen_s() -> float:
    """CPU seconds the hypervisor gave to others, all cores together (/proc/stat "steal"): a
    run that lost some ran on a busier machine, whichever arm it was."""
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[8]) / CLOCK_TICKS


def export_revision(revision: str, folder: Path) -> Path:
    """The revision's tree, as committed, in `folder`."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision],
                             capture_output=True, check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, timeout=120)
    return folder


def run_arm(workdir: Path, source: Path, associations: list[list[Path]]) -> tuple[float, float, float]:
    """(instances per second, node CPU milliseconds per instance, seconds stolen) of one run, in
    a new `workdir`."""
    node = NodeProcess(workdir, source=source, completion={"quiet_period_s": 60}, scp={"workers": 0}).start()
    try:
        warm(node)
        assert node.process is not None
        before, stolen = group_cpu_s(node.process.pid), stolen_s()
        seconds = send_all(node.port, associations)
        spent, stolen = group_cpu_s(node.process.pid) - before, stolen_s() - stolen
    finally:
        node.stop()
    n = sum(len(a) for a in associations)
    return n / seconds, spent / n * 1e3, stolen


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        count, size, split = LOADS[args.load]
        count, size = count or args.slices, size or args.size
        studies = make_studies(work / "data", 4 if args.load == "ct-4" else 1, count, size)
        associations = studies if args.load == "ct-4" else [studies[0][i::split] for i in range(split)]
        sources = {"A": export_revision(args.against, work / "against"), "B": REPO_ROOT}
        print(f"receive side by side, {args.load}: {sum(map(len, associations))} instances of {size}x{size} over"
              f" {len(associations)} association(s); A = {args.against}, B = this working tree")
        runs: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for arm in ("AB" if pair % 2 == 0 else "BA"):
                rate, cpu, stolen = run_arm(work / f"node-{pair + 1}{arm}", sources[arm], associations)
                runs[arm].append((rate, cpu))
                print(f"pair {pair + 1} {arm}: {rate:7.0f} instances/s, node CPU {cpu:.3f} ms per instance,"
                      f" {stolen:.2f} s stolen", flush=True)
        for arm in "AB":
            print(f"{arm}: median {statistics.median(r for r, _ in runs[arm]):.0f} instances/s,"
                  f" {statistics.median(c for _, c in runs[arm]):.3f} ms CPU per instance")
        rates = [b[0] / a[0] for a, b in zip(runs["A"], runs["B"])]
        cpus = [b[1] / a[1] for a, b in zip(runs["A"], runs["B"])]
        print(f"B/A per pair: rate {' '.join(f'{r:.2f}' for r in rates)} (median {statistics.median(rates):.2f});"
              f" CPU per instance {' '.join(f'{c:.2f}' for c in cpus)} (median {statistics.median(cpus):.2f})")


if __name__ == "__main__":
    main()
