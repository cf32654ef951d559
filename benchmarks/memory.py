"""Memory: many studies through the running node; resident memory of each of its processes.

Sends STUDIES (default 100) CT studies of --slices x --size x --size (default 300 x 512 x 512)
one after another with dcmtk storescu, each routed to the demo model with results to a dcmtk
storescp, and samples every node process's RSS (from /proc) while it runs. Prints, per process,
RSS at start, the peak and at the end, the target (peak <= 3x one study's pixel bytes + the
runtime's baseline) and whether memory stayed flat (end within 10% of the value after the
first study).

    python -m benchmarks.memory [--slices 300] [--size 512]    (BENCH_STUDIES=100)
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from benchmarks.common import benchmark_run, relabel
from tests.peers import NodeProcess, free_port, storescu, wait_for
from phantom.study import make_dicom_study

ROUTING = {"rules": [{"name": "ct", "match": {"tag": "Modality", "equals": "CT"},
                      "actions": {"run": ["lesion-seg"], "send_to": ["results"]}}]}


def processes(root: int) -> dict[int, str]:
    """The node's process and its descendants: pid -> a short name."""
    found = {root: "service"}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found[child] = f"receiver {len(found)}"
                    frontier.append(child)
    return found


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    studies = int(os.environ.get("BENCH_STUDIES", "100"))
    with benchmark_run(__doc__) as (args, work):
        files, _ = make_dicom_study(work / "ct", slices=args.slices, size=args.size, pixel_spacing=384 / args.size,
                                    slice_spacing=2.0, seed=7)
        pixel_mb = args.slices * args.size * args.size * 2 / 2**20
        results = work / "results"
        results.mkdir()
        port = free_port()
        pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "RESULTS", "-od", str(results), "+B", str(port)],
                                env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        node = NodeProcess(work / "node", routing=ROUTING, completion={"quiet_period_s": 1.0},
                           destinations={"results": {"ae_title": "RESULTS", "host": "127.0.0.1", "port": port}},
                           sending={"retry_initial_s": 0.5, "sweep_s": 0.5})
        samples: dict[int, list[float]] = {}
        names: dict[int, str] = {}
        stop = threading.Event()
        try:
            node.start()
            assert node.process is not None
            root = node.process.pid

            def sample() -> None:
                while not stop.is_set():
                    for pid, name in processes(root).items():
                        names.setdefault(pid, name)
                        samples.setdefault(pid, []).append(rss_mb(pid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            wait_for(lambda: len(processes(root)) > 1, timeout=60)
            wait_for(lambda: node.events("pipeline_ready"), timeout=120)  # the runtime's baseline: torch loaded
            sampler.start()
            time.sleep(1.0)
            after_first: dict[int, float] = {}
            after_each: list[float] = []  # the service's RSS after each study: a leak climbs, fragmentation levels off
            started = time.time()
            for n in range(studies):
                batch = relabel(files, work / f"s{n}", n)
                sent = storescu(node.port, batch)
                assert sent.returncode == 0, sent.stderr
                for path in batch:
                    path.unlink()
                wait_for(lambda: node.query("SELECT COUNT(*) AS n FROM outbox WHERE state='delivered'")[0]["n"] >= n + 1
                         and node.query("SELECT COUNT(*) AS n FROM work_items WHERE state='done'")[0]["n"] >= n + 1,
                         timeout=600, interval=0.2)  # and its job ended: the RSS after is what a job leaves, not its work
                if n == 0:
                    after_first = {pid: rss_mb(pid) for pid in samples}
                after_each.append(rss_mb(root))
            elapsed = time.time() - started
            time.sleep(1.0)
        finally:
            stop.set()
            node.stop()
            pacs.terminate()
            pacs.wait(10)
    print(f"{studies} studies of {args.slices}x{args.size}x{args.size} ({pixel_mb:.0f} MB of pixels each) in "
          f"{elapsed:.0f} s")
    print(f"{'process':14} {'start MB':>9} {'after 1st':>9} {'peak MB':>9} {'end MB':>9} {'end/after 1st':>14}")
    for pid, values in samples.items():
        first = after_first.get(pid, values[0]) or values[0]
        print(f"{names[pid]:14} {values[0]:9.0f} {first:9.0f} {max(values):9.0f} {values[-1]:9.0f} "
              f"{values[-1] / first if first else 0:14.2f}")
    service = samples[root]
    step = max(1, len(after_each) // 10)
    print("service RSS after study n (MB): " + ", ".join(f"{n + 1}: {after_each[n]:.0f}"
                                                       for n in range(0, len(after_each), step)))
    print(f"service peak - start (pipeline loaded) {max(service) - service[0]:.0f} MB vs target 3 x {pixel_mb:.0f} = "
          f"{3 * pixel_mb:.0f} MB (ratio {(max(service) - service[0]) / (3 * pixel_mb):.2f}); "
          f"end / after the first study {service[-1] / after_first.get(root, service[0]):.2f} (flat: <= 1.10)")


if __name__ == "__main__":
    main()
