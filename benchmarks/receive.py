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

STOW-RS (issue 24): the CT loads as one `multipart/related` request per study sent by curl
(one HTTP connection per study, all at once) to the node's /dicomweb/studies and to Orthanc's
DICOMweb plugin (1.7, Debian), against C-STORE to the node in the same run. Target: STOW-RS into
the node at least as fast as C-STORE into it.

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
from typing import Callable, TypeVar

import numpy as np

from tests.peers import NodeProcess, free_port, port_open, wait_for
from phantom.dicom import SeriesGeometry, SeriesIdentity, write_ct_series
from benchmarks.common import benchmark_run

T = TypeVar("T")
EACH = 200  # instances sent one association each (no target in issue 28: a measure of association set-up)


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
    if result.returncode != 0:
        errors.append(result.stderr[-500:])


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
    out = workdir / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = free_port()
    args = ["storescp", "+B", "-aet", "TESTNODE", "-od", str(out)] + (["--fork"] if fork else []) + [str(port)]
    proc = subprocess.Popen(args, env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=10)
        return send(port, studies)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def run_node(workdir: Path, studies: list[list[Path]], send: Sender = send_all) -> float:
    shutil.rmtree(workdir / "node", ignore_errors=True)
    node = NodeProcess(workdir / "node", completion={"quiet_period_s": 60}, scp={"workers": 0}).start()
    try:
        warm(node)
        return send(node.port, studies)
    finally:
        node.stop()


def run_orthanc(workdir: Path, studies: list[list[Path]], send: Sender = send_all) -> float:
    from tests.orthanc import Orthanc

    shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    pacs = Orthanc(workdir / "orthanc", aet="TESTNODE").start()
    try:
        return send(pacs.dicom_port, studies)
    finally:
        pacs.stop()


def warm(node: NodeProcess) -> None:
    """Until the node has imported its pipeline (torch, MONAI: a core busy for seconds after the
    start), so C-STORE and STOW-RS are both timed on a node in its steady state."""
    wait_for(lambda: node.events("pipeline_ready"), timeout=300)


def main() -> None:
    with benchmark_run(__doc__) as (args, work):
        studies = make_studies(work / "data", 4, args.slices, args.size)
        small = make_studies(work / "small", 1, 2000, 180)[0]
        mb = sum(p.stat().st_size for p in studies[0]) / 1e6
        print(f"receive benchmark: {args.slices} slices of {args.size}x{args.size} ({mb:.0f} MB per study) and"
              f" 2,000 instances of 180x180 ({small[0].stat().st_size / 1024:.0f} KB each), sender dcmtk storescu")
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
    shutil.rmtree(workdir / "node", ignore_errors=True)
    node = NodeProcess(workdir / "node", completion={"quiet_period_s": 60}, scp={"workers": 0}).start()
    try:
        warm(node)
        return stow_all(f"{node.url}/dicomweb/studies", bodies, node.api_token("bench", "operator"))
    finally:
        node.stop()


def run_orthanc_stow(workdir: Path, bodies: list[Path]) -> float:
    from tests.orthanc import Orthanc

    shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    pacs = Orthanc(workdir / "orthanc").start()
    try:
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
