"""Sending throughput: the node's requestor (`send_cstore`, what result delivery, forwarding and
`dicom-node send` use) against dcmtk storescu, to the same PACS in the same run.

The PACS is dcmtk storescp (`+B`) twice: as Debian ships it (Nagle on: no TCP_NODELAY=1 in its
environment, like Debian's Orthanc) and with TCP_NODELAY=1. A peer with Nagle on holds the second
piece of each response until the first is ACKed; a sender that delays that ACK waits ~40 ms per
instance. Load: one study of small instances (default 300 of 180x180, 65 KB) over one
association, each sender BENCH_REPEAT times (default 3, interleaved, best run counts).

    python -m benchmarks.send [--slices 300] [--size 180]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import benchmark_run
from benchmarks.receive import make_studies
from node.config import DestinationConfig
from node.send.cstore import send_cstore
from tests.peers import free_port, port_open, wait_for


def with_pacs(workdir: Path, nagle: bool, send: Callable[[int], None]) -> float:
    """Seconds `send(port)` takes into a fresh storescp."""
    out = workdir / "pacs"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    if not nagle:
        env["TCP_NODELAY"] = "1"
    proc = subprocess.Popen(["storescp", "+B", "-aet", "PACS", "-od", str(out), str(port)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=10)
        started = time.perf_counter()
        send(port)
        seconds = time.perf_counter() - started
        arrived = sum(1 for _ in out.iterdir())
        return seconds if arrived else float("inf")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def node_sender(files: list[Path]) -> Callable[[int], None]:
    def send(port: int) -> None:
        peer = DestinationConfig.model_validate({"ae_title": "PACS", "host": "127.0.0.1", "port": port})
        send_cstore("TESTNODE", peer, files, timeout=60)
    return send


def storescu_sender(files: list[Path]) -> Callable[[int], None]:
    def send(port: int) -> None:
        subprocess.run(["storescu", "-aec", "PACS", "127.0.0.1", str(port), *map(str, files)], check=True,
                       capture_output=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=600)
    return send


def main() -> None:
    with benchmark_run(__doc__, slices=300, size=180) as (args, work):
        files = make_studies(work / "study", 1, args.slices, args.size)[0]
        repeat = int(os.environ.get("BENCH_REPEAT", "3"))
        print(f"{len(files)} instances of {args.size}x{args.size} ({files[0].stat().st_size / 1024:.0f} KB each)"
              " over one association", flush=True)
        senders = {"node": node_sender(files), "storescu": storescu_sender(files)}
        best: dict[tuple[str, bool], float] = {}
        for _ in range(repeat):
            for nagle in (True, False):
                for name, send in senders.items():
                    seconds = with_pacs(work, nagle, send)
                    best[name, nagle] = min(best.get((name, nagle), float("inf")), seconds)
        print("\n| PACS | node (inst/s) | storescu (inst/s) | node/storescu |")
        print("|---|---|---|---|")
        for nagle in (True, False):
            node, reference = (len(files) / best[name, nagle] for name in ("node", "storescu"))
            label = "storescp, Nagle on (Debian's default)" if nagle else "storescp, TCP_NODELAY=1"
            print(f"| {label} | {node:.0f} | {reference:.0f} | {node / reference:.2f} |")


if __name__ == "__main__":
    main()
