"""Receive throughput: the node (default durable settings) against dcmtk storescp, same run.

Sender: dcmtk storescu. Loads: one 300-slice 512x512 CT over one association, and four such
studies over four concurrent associations. storescp runs with TCP_NODELAY=1 and +B (bit
preserving, no fsync), with --fork for the concurrent load. Prints instances/s and ratios.

    python -m benchmarks.receive [--slices 300] [--size 512]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from tests.peers import NodeProcess, free_port, port_open, wait_for
from training.phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from benchmarks.common import benchmark_run


def make_studies(root: Path, count: int, slices: int, size: int) -> list[list[Path]]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(slices, size, size)).astype(float)
    return [
        write_ct_series(hu, root / f"study{i}", SeriesGeometry(), SeriesIdentity())
        for i in range(count)
    ]


def send_all(port: int, studies: list[list[Path]]) -> float:
    """storescu per study, all at once; returns wall seconds until the last one finished."""
    env = dict(os.environ, TCP_NODELAY="1")
    errors: list[str] = []

    def one(files: list[Path]) -> None:
        result = subprocess.run(
            ["storescu", "-aec", "TESTNODE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        if result.returncode != 0:
            errors.append(result.stderr[-500:])

    threads = [threading.Thread(target=one, args=(s,)) for s in studies]
    # Flush what earlier runs left in the page cache: on ext4 (data=ordered) an fsync also
    # waits for other files' dirty data, which would charge the reference's writes to us.
    os.sync()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - started


def run_storescp(workdir: Path, studies: list[list[Path]], fork: bool) -> float:
    out = workdir / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    args = ["storescp", "+B", "-aet", "TESTNODE", "-od", str(out)] + (["--fork"] if fork else []) + [str(port)]
    proc = subprocess.Popen(args, env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=10)
        return send_all(port, studies)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def run_node(workdir: Path, studies: list[list[Path]]) -> float:
    shutil.rmtree(workdir / "node", ignore_errors=True)
    node = NodeProcess(workdir / "node", completion={"quiet_period_s": 60}, scp={"workers": 0})
    node.start()
    try:
        return send_all(node.port, studies)
    finally:
        node.stop()


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        studies = make_studies(work / "data", 4, args.slices, args.size)
        mb = sum(p.stat().st_size for p in studies[0]) / 1e6
        print(f"receive benchmark: {args.slices} slices of {args.size}x{args.size} ({mb:.0f} MB per study), sender dcmtk storescu")
        rows = []
        for label, load, fork in (("1 association", studies[:1], False), ("4 concurrent associations", studies, True)):
            n = sum(len(s) for s in load)
            ref = n / run_storescp(work, load, fork)
            ours = n / run_node(work, load)
            rows.append((label, ours, ref))
        print(f"{'load':28} {'node inst/s':>12} {'storescp inst/s':>16} {'ratio':>7}")
        for label, ours, ref in rows:
            print(f"{label:28} {ours:12.0f} {ref:16.0f} {ours / ref:7.2f}")


if __name__ == "__main__":
    main()
