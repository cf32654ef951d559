"""Debian's rsyslog as the site's audit record repository (IHE ATNA), for the tests: it listens on
127.0.0.1 (UDP, or TCP with TLS through its gtls driver) and writes every message it gets,
exactly as received, one a line, to a file. Started and stopped by its PID."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.peers import free_port, port_open, wait_for
from tests.processes import stop_process_group

MESSAGES = "messages.log"
PROBE = b"<13>1 - - probe - - - rsyslog-ready"


class Rsyslog:
    def __init__(self, workdir: Path, protocol: str = "udp", tls: dict[str, Path] | None = None):
        """`tls`: {ca, server, server-key} PEM files (protocol tls)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.protocol = protocol
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def messages_path(self) -> Path:
        return self.workdir / MESSAGES

    def _config(self) -> str:
        lines = [f'global(workDirectory="{self.workdir}" maxMessageSize="64k")',
                 '$template raw,"%rawmsg%\\n"']
        if self.protocol == "udp":
            lines += ['module(load="imudp")', f'input(type="imudp" address="127.0.0.1" port="{self.port}")']
        else:
            assert self.tls is not None
            lines += [f'global(DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{self.tls["ca"]}"'
                      f' DefaultNetstreamDriverCertFile="{self.tls["server"]}"'
                      f' DefaultNetstreamDriverKeyFile="{self.tls["server-key"]}")',
                      'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"'
                      ' StreamDriver.AuthMode="anon")',
                      f'input(type="imtcp" address="127.0.0.1" port="{self.port}")']
        lines.append(f'action(type="omfile" file="{self.messages_path}" template="raw")')
        return "\n".join(lines) + "\n"

    def start(self) -> "Rsyslog":
        config = self.workdir / "rsyslog.conf"
        config.write_text(self._config())
        log = open(self.workdir / "rsyslogd.log", "ab")
        self.process = subprocess.Popen(["rsyslogd", "-n", "-f", str(config), "-i", str(self.workdir / "pid")],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if self.protocol == "udp":  # no port to probe: a datagram until it is written
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                def written() -> bool:
                    probe.sendto(PROBE, ("127.0.0.1", self.port))
                    return self.process.poll() is not None or any(PROBE in m for m in self.received())
                wait_for(written, timeout=30, interval=0.2)
        else:
            wait_for(lambda: port_open(self.port) or self.process.poll() is not None, timeout=30)
        assert self.process.poll() is None, (self.workdir / "rsyslogd.log").read_text()
        return self

    def stop(self) -> None:
        stop_process_group(self.process, 10)
        self.process = None

    def received(self) -> list[bytes]:
        """Each message as received (one a line)."""
        if not self.messages_path.exists():
            return []
        return [line for line in self.messages_path.read_bytes().split(b"\n") if line]

    def messages(self) -> list[bytes]:
        """What the node sent (the start-up probes left out)."""
        return [m for m in self.received() if PROBE not in m]


def make_pki(folder: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A test CA and a server certificate for `host` (subjectAltName IP): the node checks the
    repository's name, as RFC 5425 asks."""
    folder.mkdir(parents=True)
    paths = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test audit CA",
        "-keyout", str(paths["ca-key"]), "-out", str(paths["ca"]))
    csr, extensions = folder / "server.csr", folder / "server.ext"
    extensions.write_text(f"subjectAltName=IP:{host}\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=audit-repository", "-keyout", str(paths["server-key"]),
        "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca-key"]), "-CAcreateserial",
        "-days", "2", "-extfile", str(extensions), "-out", str(paths["server"]))
    return paths
