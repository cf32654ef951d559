"""Two node replicas on one PostgreSQL index and one spool, with real peers: dcmtk's storescu as
the modality, Orthanc as the PACS, a real PostgreSQL server (Debian's package) started by the tests.

What the replicas promise: any replica receives; each study completes once, its job runs once and
its results reach the PACS once; a replica that dies (SIGKILL) leaves nothing behind: its studies
in their quiet period, its running jobs and its sends are finished by the other, once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from node.store.index import Index
from tests.orthanc import Orthanc
from tests.processes import stop_process_group
from tests.peers import REPO_ROOT, NodeProcess, StallingLink, free_port, port_open, storescu, wait_for
from tests.test_jobs import ROUTING, sphere_study

SLOW_CALLER = "SLOWMODALITY"  # its studies wait 30 s before completing: still receiving at the kill


@pytest.fixture
def cluster(start_node, postgres, tmp_path, model_repository) -> Iterator[Callable[..., Any]]:
    """Start replicas sharing a new PostgreSQL database, a data folder and an Orthanc PACS."""
    pacs = Orthanc(tmp_path / "pacs").start()
    url = postgres.new_database()
    shared = tmp_path / "shared-data"

    def start(name: str, pacs_port: int | None = None) -> NodeProcess:
        """`pacs_port`: where the replica reaches the PACS (a StallingLink in front of it)."""
        return start_node(
            tmp_path / name, routing=ROUTING,
            storage={"data_dir": str(shared), "index_url": url, "lease_s": 3.0},
            # 3 s: a sender stalled for over a second on this busy machine must not split its study in two
            completion={"quiet_period_s": 3.0, "sweep_s": 1.0, "quiet_period_by_calling_ae": {SLOW_CALLER: 30.0}},
            destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs_port or pacs.dicom_port}},
            sending={"retry_initial_s": 0.5, "retry_max_s": 1.0, "sweep_s": 0.5, "timeout_s": 120},
            inference={"model_repository": str(model_repository)},
        )

    start.index = Index(url)  # type: ignore[attr-defined]
    start.pacs = pacs  # type: ignore[attr-defined]
    yield start
    pacs.discard()


def _send(node: NodeProcess, files: list[Path], aet: str = "MODALITY") -> None:
    out = storescu(node.port, files, aet)
    assert out.returncode == 0, out.stdout + out.stderr


def _processed_once(index: Index, pacs: Orthanc, studies: list[str], timeout: float = 240) -> list[dict[str, Any]]:
    """Wait until every study's job is done and its results delivered; check each happened once."""
    def finished() -> bool:
        jobs = index.query("SELECT study_uid FROM work_items WHERE state='done'")
        sent = index.query("SELECT study_uid FROM outbox WHERE state='delivered'")
        return {r["study_uid"] for r in jobs} >= set(studies) and {r["study_uid"] for r in sent} >= set(studies)

    wait_for(finished, timeout=timeout, interval=0.5)
    jobs = [dict(r) for r in index.query("SELECT id, study_uid, state, attempts, lease_owner FROM work_items")]
    for study in studies:
        assert [j["state"] for j in jobs if j["study_uid"] == study] == ["done"], study
        assert index.query("SELECT completions FROM studies WHERE study_uid=?", (study,))[0]["completions"] == 1
        found = pacs.instances_by_modality(study)
        assert (len(found.get("SEG", [])), len(found.get("SR", []))) == (1, 1), study
    assert len(index.query("SELECT id FROM outbox")) == len(studies)
    return jobs


def test_twenty_studies_sent_alternately_to_two_replicas_are_each_processed_once(cluster, tmp_path):
    replicas = [cluster("replica-a"), cluster("replica-b")]
    studies = []
    for n in range(20):
        files, study_uid = sphere_study(tmp_path / f"study{n}", patient_id=f"P{n}", slices=12, size=32,
                                        centre=(6, 16, 16))
        _send(replicas[n % 2], files)
        studies.append(study_uid)

    jobs = _processed_once(cluster.index, cluster.pacs, studies)

    # each replica's receivers indexed the ten studies sent to it into the one index
    assert [len(r.events("study_receiving")) for r in replicas] == [10, 10]
    assert len(cluster.index.query("SELECT sop_instance_uid FROM instances")) == 20 * 12
    owners = {j["lease_owner"].split(":")[1] for j in jobs}
    print(f"jobs run by {len(owners)} replica(s)")
    for replica in replicas:  # each console reads the shared index: the whole cluster's numbers
        with urllib.request.urlopen(replica.url + "/health/ready", timeout=30) as response:
            assert json.loads(response.read())["ready"] is True
        with urllib.request.urlopen(replica.url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert "dicom_node_instances_received_total 240.0" in metrics
        assert 'dicom_node_jobs{state="done"} 20.0' in metrics
        with urllib.request.urlopen(replica.url + "/api/studies", timeout=30) as response:
            assert sorted(s["study_uid"] for s in json.loads(response.read())) == sorted(studies)


def test_a_replica_killed_mid_work_leaves_everything_to_the_other_once(cluster, tmp_path):
    """Killed while it holds studies in their quiet period, a running job and a send (the PACS
    link stalled, so the send is caught mid-association): the other replica finishes each, once.
    The other replica starts once the doomed one is dead: before, it could claim every job itself
    (then the doomed one never held a running job and a send at once; a loaded machine made
    that likely)."""
    link = StallingLink(cluster.pacs.dicom_port)
    doomed = cluster("replica-a", link.port)
    link.stall()
    big = [sphere_study(tmp_path / f"big{n}", patient_id=f"B{n}", slices=160, size=128, centre=(80, 64, 64))
           for n in range(5)]  # enough work that the replica runs a job while its first send hangs
    slow = [sphere_study(tmp_path / f"slow{n}", patient_id=f"S{n}", slices=12, size=32, centre=(6, 16, 16))
            for n in range(2)]
    senders = [threading.Thread(target=_send, args=(doomed, files)) for files, _ in big]
    for sender in senders:  # at once: they complete together
        sender.start()
    for sender in senders:
        sender.join(120)
    studies = [uid for _, uid in big + slow]
    pid = str(doomed.process.pid)
    work = (("work_items", "running"), ("outbox", "sending"))
    pin = contextlib.ExitStack()

    def held(table: str, state: str, db: Any = None) -> list[dict[str, Any]]:
        """The doomed replica's rows of `table` in `state`; with `db`, the first one, row-locked in
        its transaction (one row a table: no lock order to clash with its multi-row lease renewals)."""
        sql = (f"SELECT id, lease_owner FROM {table} WHERE state=? AND split_part(lease_owner, ':', 2)=?"
               " ORDER BY id" + (" LIMIT 1 FOR UPDATE" if db is not None else ""))
        return db.execute(sql, (state, pid)).fetchall() if db is not None else cluster.index.query(sql, (state, pid))

    def pinned() -> dict[str, list[dict[str, Any]]]:
        """A running job and a send of the doomed replica once it holds both, their rows locked
        until the kill: neither can leave its state meanwhile (every transition is an UPDATE of its
        row), so the replica still holds both when it dies ({} and nothing locked until then)."""
        if not all(held(table, state) for table, state in work):
            return {}
        db = pin.enter_context(cluster.index.transaction(claim=True))  # no write lock: row locks only
        rows = {table: held(table, state, db) for table, state in work}
        if all(rows.values()):
            return rows
        pin.close()  # one finished before it was locked: look again
        return {}

    # the slow studies once the first send hangs: their quiet period (30 s) starts just before the
    # pin, not before the big studies' jobs, however slow the machine is
    wait_for(lambda: held("outbox", "sending"), timeout=180, interval=0.05)
    for files, _ in slow:
        _send(doomed, files, SLOW_CALLER)
    with pin:  # rolled back (the locks released) once the replica is dead
        killed_holding = wait_for(pinned, timeout=180, interval=0.02)
        receiving = cluster.index.query("SELECT study_uid FROM studies WHERE state='receiving'")
        doomed.kill_all()
    survivor = cluster("replica-b", link.port)  # finds the dead replica's leases to take over
    link.flow()
    owner = killed_holding["work_items"][0]["lease_owner"]
    assert len(receiving) >= 2, "the slow studies completed before the kill; the test needs a longer quiet period"

    try:
        jobs = _processed_once(cluster.index, cluster.pacs, studies)
    finally:
        link.close()

    taken_over = [j for j in jobs if j["attempts"] > 1]
    assert taken_over, f"no job of {owner} was taken over"
    assert all(j["lease_owner"] != owner for j in taken_over)
    assert {j["id"] for j in killed_holding["work_items"]} <= {j["id"] for j in taken_over}
    assert survivor.events("job_taken_over") and survivor.events("results_send_taken_over")
    resent = cluster.index.query("SELECT id, attempts, lease_owner FROM outbox WHERE attempts > 1")
    assert resent and all(r["lease_owner"] != owner for r in resent)
    assert {r["id"] for r in killed_holding["outbox"]} <= {r["id"] for r in resent}


def _balanced_servers(stats: Path) -> dict[str, int]:
    """Open sessions by status over the servers of HAProxy's backend, from its stats socket."""
    with socket.socket(socket.AF_UNIX) as link:
        link.settimeout(5)
        link.connect(str(stats))
        link.sendall(b"show stat\n")
        text = b"".join(iter(lambda: link.recv(65536), b"")).decode()
    rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
    servers = [r for r in rows if r["pxname"] == "node_replicas" and r["svname"] not in ("FRONTEND", "BACKEND")]
    assert len(servers) == 2, servers
    found: dict[str, int] = {}
    for server in servers:
        status = server["status"].split()[0]
        found[status] = found.get(status, 0) + int(server["scur"])
    return found


def _haproxy_config(port: int, replicas: list[NodeProcess]) -> str:
    """docker/haproxy.cfg as shipped, with the replicas of this test (addresses instead of compose
    service names, each with its own console port) and without Docker's DNS."""
    text = (REPO_ROOT / "docker" / "haproxy.cfg").read_text()
    text = re.sub(r"^resolvers docker\n(?:    .*\n)+\n", "", text, flags=re.M).replace(
        " resolvers docker init-addr last,libc,none", "").replace("bind :11112", f"bind 127.0.0.1:{port}")
    servers = "".join(f"    server node-{n} 127.0.0.1:{r.port} check port {r.http_port}\n" for n, r in enumerate(replicas))
    return re.sub(r"^    server .*\n(?:    server .*\n)*", servers, text, flags=re.M)


def test_associations_through_haproxy_reach_both_replicas_and_each_study_once(cluster, tmp_path):
    replicas = [cluster("replica-a"), cluster("replica-b")]
    port = free_port()
    config, stats = tmp_path / "haproxy.cfg", tmp_path / "haproxy.sock"
    config.write_text(_haproxy_config(port, replicas).replace("global\n", f"global\n    stats socket {stats}\n", 1))
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: port_open(port) or balancer.poll() is not None, timeout=30)
        assert balancer.poll() is None, "haproxy did not start"
        studies = []
        for n in range(4):
            files, study_uid = sphere_study(tmp_path / f"study{n}", patient_id=f"H{n}", slices=12, size=32,
                                            centre=(6, 16, 16))
            # both replicas up and idle as HAProxy sees them (a closed association is counted until
            # both of its sides have closed)
            wait_for(lambda: _balanced_servers(stats) == {"UP": 0}, timeout=30)
            out = storescu(port, files)
            assert out.returncode == 0, out.stdout + out.stderr
            studies.append(study_uid)
        _processed_once(cluster.index, cluster.pacs, studies)
        # leastconn: idle replicas take turns
        assert [len(r.events("study_receiving")) for r in replicas] == [2, 2]
    finally:
        stop_process_group(balancer, 10)
