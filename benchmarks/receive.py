"""Receive throughput: the node (default durable settings) against dcmtk storescp and Orthanc, same run.

Sender: dcmtk storescu (TCP_NODELAY=1). Loads (issue 28): a 300-slice 512x512 CT (0.5 MB per
instance) and 2,000 small instances (180x180, 64 KB), each over one association and over four
concurrent ones (four CT studies; the 2,000 split four ways); and 200 of the small instances sent
one after the other, an association each (a sender that opens one per image: what
setting up an association costs). References: storescp with
TCP_NODELAY=1 and +B (bit preserving, no fsync), --fork for the concurrent loads; Debian's
Orthanc (SQLite index, its default durability). Targets: four associations >= 1.0x storescp, one
association >= 0.6x storescp, >= 1.5x Orthanc everywhere. Each receiver runs BENCH_REPEAT times
(default 3), interleaved, and the best run counts: on a shared machine the best run is the one
least disturbed by others. The whole-data-set check's own cost (issue 10) is timed in-process.

This machine kind taxes every receiver in two ways of its own, both measured on 2026-11-26:
its ext4 has no journal, and a file created within minutes of many deletions costs the kernel a
scan of the recently deleted inodes (`recently_deleted`: 5-12x the CPU of a create on a quiet
file system); and the VM hands free memory back to its host (virtio-balloon page reporting,
about 2 s after it is freed), so a page cache growing into it faults on the host page by page
(touching 17 GB took 79 s). So every run writes into a folder of its own, and a receiver's
earlier runs' folders are deleted once it is up, just before it is sent anything: each receiver
writes into the page cache its own earlier run freed a moment before, and pays the same scan,
whether it starts in milliseconds (storescp) or in seconds (the node). The cost of creating a
64 KB file is printed at the start and at the end.

    python -m benchmarks.receive [--slices 300] [--size 512]
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from tests.peers import NodeProcess, free_port, port_open, wait_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from benchmarks.common import benchmark_run

T = TypeVar("T")
EACH = 200  # instances sent one association each (no target in issue 28: a measure of association set-up)
_RUNS = itertools.count(1)


def fresh(workdir: Path, name: str) -> Path:
    """A folder no run has used (`workdir/name-N`)."""
    return workdir / f"{name}-{next(_RUNS)}"


def clear_earlier(current: Path) -> None:
    """Delete the folders of the receiver's earlier runs (`name-N` beside `current`): once it is up,
    just before it is sent anything (see the module's docstring)."""
    kind = current.name.rsplit("-", 1)[0]
    for folder in current.parent.glob(f"{kind}-*"):
        if folder != current and folder.name.rsplit("-", 1)[1].isdigit():
            shutil.rmtree(folder, ignore_errors=True)


def create_cost(workdir: Path, count: int = 500) -> float:
    """Microseconds of CPU (this process's) to create, write (64 KB) and close a new file in a
    new folder: the file system's own cost per received instance, whoever receives it."""
    folder = fresh(workdir, "create-probe")
    folder.mkdir(parents=True)
    data = bytes(64 << 10)
    started = time.process_time()
    for number in range(count):
        fd = os.open(folder / f"{number}.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return (time.process_time() - started) / count * 1e6


def make_studies(root: Path, count: int, slices: int, size: int) -> list[list[Path]]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(slices, size, size)).astype(float)
    return [
        write_ct_series(hu, root / f"study{i}", SeriesGeometry(), SeriesIdentity())
        for i in range(count)
    ]


def send_all(port: int, studies: list[list[Path]]) -> float:
    """storescu per study, all at once; returns wall seconds until the last one finished."""
    errors: list[str] = []
    seconds = at_once(lambda files: _storescu(port, files, errors), studies)
    if errors:
        raise RuntimeError(errors[0])
    return seconds


def send_each(port: int, studies: list[list[Path]]) -> float:
    """storescu per instance, one after the other (a sender that opens an association for every
    image); returns wall seconds until the last one finished."""
    errors: list[str] = []

    def one_by_one(files: list[Path]) -> None:
        for f in files:
            _storescu(port, [f], errors)

    seconds = at_once(one_by_one, [[f for study in studies for f in study]])
    if errors:
        raise RuntimeError(errors[0])
    return seconds


def _storescu(port: int, files: list[Path], errors: list[str]) -> None:
    result = subprocess.run(
        ["storescu", "-aec", "TESTNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=600,
    )
    if result.returncode != 0:  # (killed by a signal: a negative code, and often nothing on stderr)
        errors.append(f"storescu to port {port} exited with {result.returncode}: {result.stderr[-500:]}")


def at_once(work: Callable[[T], None], items: list[T]) -> float:
    """`work` on every item at once, a thread each; wall seconds until the last one ended."""
    threads = [threading.Thread(target=work, args=(item,)) for item in items]
    # Flush what earlier runs left in the page cache: on ext4 (data=ordered) an fsync also
    # waits for other files' dirty data, which would charge the reference's writes to us.
    os.sync()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


Sender = Callable[[int, list[list[Path]]], float]


def run_storescp(workdir: Path, studies: list[list[Path]], fork: bool, send: Sender = send_all) -> float:
    out = fresh(workdir, "storescp")
    out.mkdir(parents=True)
    port = free_port()
    args = ["storescp", "+B", "-aet", "TESTNODE", "-od", str(out)] + (["--fork"] if fork else []) + [str(port)]
    proc = subprocess.Popen(args, env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=10)
        clear_earlier(out)
        return send(port, studies)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def run_node(workdir: Path, studies: list[list[Path]], send: Sender = send_all) -> float:
    folder = fresh(workdir, "node")
    node = NodeProcess(folder, completion={"quiet_period_s": 60}, scp={"workers": 0}).start()
    try:
        warm(node)
        clear_earlier(folder)
        return send(node.port, studies)
    finally:
        node.stop()


def run_orthanc(workdir: Path, studies: list[list[Path]], send: Sender = send_all) -> float:
    from tests.orthanc import Orthanc

    folder = fresh(workdir, "orthanc")
    pacs = Orthanc(folder, aet="TESTNODE").start()
    try:
        clear_earlier(folder)
        return send(pacs.dicom_port, studies)
    finally:
        pacs.stop()


def warm(node: NodeProcess) -> None:
    """Until the node has imported its pipeline (torch, MONAI: a core busy for seconds after the
    start) or said it will not (no routing rules), so C-STORE and STOW-RS are both timed on a node
    in its steady state."""
    wait_for(lambda: node.events("pipeline_ready") or node.events("pipeline_deferred"), timeout=300)


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        studies = make_studies(work / "data", 4, args.slices, args.size)
        small = make_studies(work / "small", 1, 2000, 180)[0]
        mb = sum(p.stat().st_size for p in studies[0]) / 1e6
        print(f"receive benchmark: {args.slices} slices of {args.size}x{args.size} ({mb:.0f} MB per study) and"
              f" 2,000 instances of 180x180 ({small[0].stat().st_size / 1024:.0f} KB each), sender dcmtk storescu")
        print(f"file system: a 64 KB file created, written and closed in {create_cost(work):.0f} us of CPU", flush=True)
        repeat = max(1, int(os.environ.get("BENCH_REPEAT", "3")))
        # (label, studies, concurrent, sender, targets against storescp and Orthanc: None, none set)
        loads: list[tuple[str, list[list[Path]], bool, Sender, float | None, float | None]] = [
            ("CT, 1 association", studies[:1], False, send_all, 0.6, 1.5),
            ("CT, 4 associations", studies, True, send_all, 1.0, 1.5),
            ("2,000 small, 1 association", [small], False, send_all, 0.6, 1.5),
            ("2,000 small, 4 associations", [small[i::4] for i in range(4)], True, send_all, 1.0, 1.5),
            (f"{EACH} small, an association each", [small[:EACH]], False, send_each, None, None)]
        rows = []
        for label, load, concurrent, send, *targets in loads:
            n = sum(len(s) for s in load)
            best = {"storescp": 0.0, "orthanc": 0.0, "node": 0.0}
            for _ in range(repeat):
                best["storescp"] = max(best["storescp"], n / run_storescp(work, load, concurrent, send))
                best["orthanc"] = max(best["orthanc"], n / run_orthanc(work, load, send))
                best["node"] = max(best["node"], n / run_node(work, load, send))
            rows.append((label, best, targets))
        print(f"{'load':34} {'node inst/s':>12} {'storescp':>9} {'Orthanc':>8} {'node/storescp':>14} {'target':>7}"
              f" {'node/Orthanc':>13} {'target':>7}")
        for label, best, (storescp_target, orthanc_target) in rows:
            print(f"{label:34} {best['node']:12.0f} {best['storescp']:9.0f} {best['orthanc']:8.0f}"
                  f" {best['node'] / best['storescp']:14.2f} {_target(storescp_target):>7}"
                  f" {best['node'] / best['orthanc']:13.2f} {_target(orthanc_target):>7}")
        stow_rows(work, studies, repeat, {"1 association": rows[0][1]["node"], "4 concurrent associations": rows[1][1]["node"]})
        per_instance = check_cost(studies[0])
        print(f"whole-data-set check, in-process: {per_instance * 1e6:.0f} us per instance"
              f" ({per_instance * rows[0][1]['node']:.1%} of the node's time per instance on one association)")
        print(f"file system at the end: a 64 KB file created, written and closed in {create_cost(work):.0f} us of CPU")


def _target(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def multipart_bodies(work: Path, studies: list[list[Path]]) -> list[Path]:
    """One STOW-RS body file per study (made once, outside the timed runs)."""
    bodies = []
    for number, files in enumerate(studies):
        body = work / f"stow-body-{number}"
        with body.open("wb") as out:
            for f in files:
                out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                out.write(f.read_bytes())
                out.write(b"\r\n")
            out.write(f"--{BOUNDARY}--\r\n".encode())
        bodies.append(body)
    return bodies


BOUNDARY = "benchmark-boundary-0123456789"


def stow_all(url: str, bodies: list[Path], token: str | None = None) -> float:
    """curl per body, all at once; wall seconds until the last answer (each must be 200)."""
    statuses: list[str] = []

    def one(body: Path) -> None:
        auth = ["-H", f"Authorization: Bearer {token}"] if token else []
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url, *auth,
                              "-H", "Accept: application/dicom+json", "-H",
                              f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                              "--data-binary", f"@{body}"], capture_output=True, text=True, timeout=900)
        statuses.append(out.stdout.strip() or out.stderr[-300:])

    seconds = at_once(one, bodies)
    if set(statuses) != {"200"}:
        raise RuntimeError(f"STOW-RS answers: {statuses}")
    return seconds


def run_node_stow(workdir: Path, bodies: list[Path]) -> float:
    folder = fresh(workdir, "node")
    node = NodeProcess(folder, completion={"quiet_period_s": 60}, scp={"workers": 0}).start()
    try:
        warm(node)
        clear_earlier(folder)
        return stow_all(f"{node.url}/dicomweb/studies", bodies, node.api_token("bench", "operator"))
    finally:
        node.stop()


def run_orthanc_stow(workdir: Path, bodies: list[Path]) -> float:
    from tests.orthanc import Orthanc

    folder = fresh(workdir, "orthanc")
    pacs = Orthanc(folder).start()
    try:
        clear_earlier(folder)
        return stow_all(f"http://127.0.0.1:{pacs.http_port}/dicom-web/studies", bodies)
    finally:
        pacs.stop()


def stow_rows(work: Path, studies: list[list[Path]], repeat: int, cstore: dict[str, float]) -> None:
    bodies = multipart_bodies(work, studies)
    print(f"\n{'STOW-RS load':28} {'node STOW inst/s':>17} {'node C-STORE':>13} {'Orthanc STOW':>13}"
          f" {'STOW/C-STORE':>13} {'node/Orthanc':>13}")
    for label, load in (("1 association", bodies[:1]), ("4 concurrent associations", bodies)):
        n = sum(len(studies[bodies.index(b)]) for b in load)
        best = {"node": 0.0, "orthanc": 0.0}
        for _ in range(repeat):
            best["node"] = max(best["node"], n / run_node_stow(work, load))
            best["orthanc"] = max(best["orthanc"], n / run_orthanc_stow(work, load))
        name = label.replace("association", "connection")
        print(f"{name:28} {best['node']:17.0f} {cstore[label]:13.0f} {best['orthanc']:13.0f}"
              f" {best['node'] / cstore[label]:13.2f} {best['node'] / best['orthanc']:13.2f}")


def check_cost(files: list[Path]) -> float:
    """Seconds per instance of the receiver's whole-data-set check on these files."""
    from node.receive.validate import check_dataset
    from tests.peers import dataset_bytes

    payloads = [dataset_bytes(p) for p in files]
    started = time.perf_counter()
    for payload in payloads:
        check_dataset(payload, "1.2.840.10008.1.2.1")  # write_ct_series: explicit VR little endian
    return (time.perf_counter() - started) / len(payloads)


if __name__ == "__main__":
    main()
