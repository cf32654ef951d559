"""A real PostgreSQL server from Debian's `postgresql` package, for the replica tests.

Started once per test session in a temp folder, on 127.0.0.1 and a free port, as the unprivileged
`postgres` user when the tests run as root (PostgreSQL refuses to run as root); stopped by its PID.
Each test gets a database of its own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.peers import free_port, wait_for


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise FileNotFoundError("PostgreSQL server binaries (Debian package postgresql): run `make test`")
    return versions[-1].parent


class PostgresServer:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None  # run as ourselves when we are not root
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.folder / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def _owned(self) -> None:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)

    def start(self) -> "PostgresServer":
        self._owned()
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-instructions"], check=True, capture_output=True, user=self.user)
        log = open(self.folder / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.folder),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300"],
            stdout=log, stderr=subprocess.STDOUT, user=self.user, start_new_session=True)
        log.close()
        wait_for(lambda: self._accepts() or self.process.poll() is not None, timeout=60, interval=0.2)
        if self.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL did not start: {self.log()[-2000:]}")
        return self

    def _accepts(self) -> bool:
        try:
            psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        self._databases += 1
        name = f"node{self._databases}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def log(self) -> str:
        path = self.folder / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnects clients, no waiting
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        shutil.rmtree(self.folder, ignore_errors=True)
