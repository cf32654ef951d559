"""Scale-out: studies per hour with one node replica and with two on one PostgreSQL index, and
what the shared database costs per received instance.

1. Index write latency: the receiver's per-instance transaction (`Index.record_instance`), 2000
   times, on SQLite (the default) and on PostgreSQL (Debian's server, started here in a temp folder).
2. Throughput: STUDIES (default 100) CT studies of --slices x --size x --size (default
   100 x 128 x 128), routed to the small test model (threshold) with SEG+SR to Orthanc, sent by
   one storescu per replica at once; from the first send to the last delivery. Configurations:
   one replica on SQLite (the reference), one replica on PostgreSQL, two replicas on PostgreSQL
   sharing a data folder.

    python -m benchmarks.replicas [--slices 100] [--size 128]    (BENCH_STUDIES=100)
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import benchmark_run
from benchmarks.memory import relabel
from node.store.index import Index, InstanceRecord
from tests.models import build_test_repository
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, storescu, wait_for
from tests.postgres import PostgresServer
from phantom.study import make_dicom_study

ROUTING = {"rules": [{"name": "ct", "match": {"tag": "Modality", "equals": "CT"},
                      "actions": {"run": ["threshold"], "send_to": ["pacs"]}}]}
WRITES = 2000


def write_latency_ms(index: Index) -> list[float]:
    """Seconds per record_instance, 20 studies of 100 instances, as the receivers write them."""
    times = []
    for n in range(WRITES):
        study = f"1.2.826.0.1.3680043.8.498.{n // 100 + 1}"
        record = InstanceRecord(f"{study}.1.{n}", "1.2.840.10008.5.1.4.1.1.2", f"{study}.1", study, "",
                                "1.2.840.10008.1.2.1", f"studies/{study}/{n}.dcm", 32768, "MODALITY", "NODE",
                                "127.0.0.1", {"modality": "CT"})
        started = time.perf_counter()
        index.record_instance(record, time.time(), 60.0, True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def throughput(work: Path, name: str, replicas: int, index_url: str | None, pacs: Orthanc, models: Path,
               studies: list[list[Path]]) -> float:
    """Studies per hour through `replicas` nodes; every study's job done and results delivered."""
    shared = work / name / "data"
    storage: dict[str, Any] = {"data_dir": str(shared)} | ({"index_url": index_url} if index_url else {})
    nodes = [NodeProcess(work / name / f"replica{n}", routing=ROUTING, storage=storage,
                         completion={"quiet_period_s": 1.0, "sweep_s": 1.0},
                         destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                         sending={"retry_initial_s": 0.5, "sweep_s": 0.5}, inference={"model_repository": str(models)})
             for n in range(replicas)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            wait_for(lambda node=node: node.events("pipeline_ready"), timeout=120)
        index = Index(index_url or shared / "index.sqlite")

        def sender(mine: list[list[Path]], node: NodeProcess) -> None:
            for files in mine:
                out = storescu(node.port, files)
                assert out.returncode == 0, out.stderr

        started = time.time()
        threads = [threading.Thread(target=sender, args=(studies[n::replicas], node)) for n, node in enumerate(nodes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: index.query("SELECT COUNT(*) AS n FROM outbox WHERE state='delivered'")[0]["n"]
                 >= len(studies), timeout=3600, interval=0.5)
        elapsed = time.time() - started
        index.close()
    finally:
        for node in nodes:
            node.stop()
    return len(studies) / elapsed * 3600


def main() -> None:
    count = int(os.environ.get("BENCH_STUDIES", "100"))
    with benchmark_run(__doc__, slices=100, size=128) as (args, work):
        postgres = PostgresServer().start()
        pacs = Orthanc(work / "pacs").start()
        try:
            sqlite_ms = write_latency_ms(Index(work / "latency.sqlite"))
            pg_index = Index(postgres.new_database())
            postgres_ms = write_latency_ms(pg_index)
            pg_index.close()
            models = build_test_repository(work / "models")
            files, _ = make_dicom_study(work / "ct", slices=args.slices, size=args.size, pixel_spacing=384 / args.size,
                                        slice_spacing=2.0, seed=7)
            studies = [relabel(files, work / "studies" / f"s{n}", n) for n in range(count)]
            rates = {
                "1 replica, SQLite (reference)": throughput(work, "sqlite1", 1, None, pacs, models, studies),
                "1 replica, PostgreSQL": throughput(work, "pg1", 1, postgres.new_database(), pacs, models,
                                                    _fresh(studies, work / "pg1-studies")),
                "2 replicas, PostgreSQL": throughput(work, "pg2", 2, postgres.new_database(), pacs, models,
                                                     _fresh(studies, work / "pg2-studies")),
            }
        finally:
            pacs.stop()
            postgres.stop()
    print(f"index write per instance (record_instance, {WRITES} writes): "
          f"SQLite median {statistics.median(sqlite_ms):.2f} ms p95 {_p95(sqlite_ms):.2f} ms; "
          f"PostgreSQL median {statistics.median(postgres_ms):.2f} ms p95 {_p95(postgres_ms):.2f} ms "
          f"(ratio {statistics.median(postgres_ms) / statistics.median(sqlite_ms):.2f})")
    reference = next(iter(rates.values()))
    print(f"{count} studies of {args.slices}x{args.size}x{args.size}, os.cpu_count()={os.cpu_count()}")
    print(f"{'configuration':32} {'studies/hour':>13} {'vs reference':>13}")
    for name, rate in rates.items():
        print(f"{name:32} {rate:13.0f} {rate / reference:13.2f}")


def _fresh(studies: list[list[Path]], folder: Path) -> list[list[Path]]:
    """New UIDs for every study (each configuration processes new studies, not resends)."""
    return [relabel(files, folder / f"s{n}", n) for n, files in enumerate(studies)]


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


if __name__ == "__main__":
    main()
