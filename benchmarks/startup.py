"""A node's start and stop, side by side: this working tree's against another revision's, interleaved.

A start is timed from the command (`dicom-node serve`) until every receiver process takes
connections and the service has said `node_started` (what tests/peers.py's NodeProcess.start
waits for, and what an operator's restart or a container's readiness waits for); a stop until
the service has ended. Each arm runs from its own source tree (`git archive` of REV), in turns
(A B, B A, ...), on an empty spool; the CPU seconds every process of the node spent on its start
are read from /proc. The tests start a node about a hundred times, so a second here is minutes
of `make test` on two cores.

    python -m benchmarks.startup REV [--runs 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import benchmark_run
from benchmarks.receive_against import export_revision, group_cpu_s
from tests.peers import REPO_ROOT, NodeProcess


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("against", help="the revision to compare with (a commit, branch or tag)")
    parser.add_argument("--runs", type=int, default=5, help="starts of each arm")
    parser.add_argument("--workers", type=int, default=2,
                        help="receiver processes (scp.workers; 0: two per core, the shipped default)")


def run_arm(workdir: Path, source: Path, workers: int) -> tuple[float, float, float]:
    """(seconds to start, CPU seconds the start took, seconds to stop) of one node in a new `workdir`."""
    node = NodeProcess(workdir, source=source, scp={"workers": workers})
    began = time.perf_counter()
    node.start()
    started = time.perf_counter() - began
    assert node.process is not None
    cpu = group_cpu_s(node.process.pid)  # the service's and the receivers' (one process group)
    began = time.perf_counter()
    node.stop()
    return started, cpu, time.perf_counter() - began


def main() -> None:
    with benchmark_run(__doc__, arguments=_arguments) as (args, work):
        sources = {"A": export_revision(args.against, work / "against"), "B": REPO_ROOT}
        print(f"node start and stop side by side, scp.workers {args.workers}; A = {args.against},"
              f" B = this working tree")
        runs: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
        for run in range(args.runs):
            for arm in ("AB" if run % 2 == 0 else "BA"):
                started, cpu, stopped = run_arm(work / f"node-{run + 1}{arm}", sources[arm], args.workers)
                runs[arm].append((started, cpu, stopped))
                print(f"run {run + 1} {arm}: start {started:.2f} s ({cpu:.2f} s CPU), stop {stopped:.2f} s", flush=True)
        for arm in "AB":
            started, cpu, stopped = (statistics.median(r[i] for r in runs[arm]) for i in range(3))
            print(f"{arm}: median start {started:.2f} s ({cpu:.2f} s CPU), stop {stopped:.2f} s")
        ratios = [b[0] / a[0] for a, b in zip(runs["A"], runs["B"])]
        print(f"B/A start time per pair: {' '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
