"""A real OAuth 2.0 authorization server for the tests: panva's oidc-provider (npm, OpenID
certified) issuing JWT access tokens by the client credentials grant, which oidc-provider-mock
(tests/oidc.py) does not offer. Fetched once with `npm ci` from tests/authserver's lock file into
build/authserver (ignored by git), run on 127.0.0.1 as its own process, stopped by its PID."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.peers import REPO_ROOT, log_events, wait_for
from tests.processes import stop_process_group

SOURCE = Path(__file__).resolve().parent / "authserver"
CACHE = REPO_ROOT / "build" / "authserver"


NODE_MINIMUM = (20, 18)  # oidc-provider 9 uses URL.parse and crypto.hash


def ensure_installed(cache: Path = CACHE) -> Path:
    """build/authserver with oidc-provider installed as locked (a file lock: two test workers)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock_file = (SOURCE / "package-lock.json").read_bytes()
        done = cache / ".installed"
        if not done.is_file() or done.read_bytes() != lock_file:
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("npm is needed for the OAuth 2.0 server of the tests: run `make test`")
            for name in ("package.json", "package-lock.json"):
                shutil.copy(SOURCE / name, cache / name)
            subprocess.run([npm, "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=cache,
                           check=True, stdout=subprocess.DEVNULL, timeout=600)
            done.write_bytes(lock_file)
        script = (SOURCE / "server.mjs").read_bytes()
        if not (cache / "server.mjs").is_file() or (cache / "server.mjs").read_bytes() != script:
            (cache / "server.mjs.new").write_bytes(script)
            os.replace(cache / "server.mjs.new", cache / "server.mjs")  # ESM resolves next to the script
    return cache


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("Node.js is needed for the OAuth 2.0 server of the tests: run `make test`")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if tuple(int(p) for p in version.lstrip("v").split(".")[:2]) < NODE_MINIMUM:
        raise RuntimeError(f"the OAuth 2.0 server of the tests needs Node.js {'.'.join(map(str, NODE_MINIMUM))}"
                           f" or later, not {version}")
    return node


class AuthServer:
    """Clients `{client_id: secret}` may get tokens for `audience` (scope `scope`) carrying
    `roles` in `roles_claim`."""

    def __init__(self, workdir: Path, clients: dict[str, str], audience: str, scope: str = "stow",
                 roles_claim: str = "groups", roles: tuple[str, ...] = ("dicom-senders",)):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.settings: dict[str, Any] = {
            "audience": audience, "scope": scope, "roles_claim": roles_claim, "roles": list(roles),
            "clients": [{"client_id": c, "client_secret": s} for c, s in clients.items()]}
        self.process: subprocess.Popen[bytes] | None = None
        self.issuer = ""

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    def start(self) -> "AuthServer":
        """Listening (on a port it chose itself, so no other process can take it first)."""
        home = ensure_installed()
        settings = self.workdir / "settings.json"
        settings.write_text(json.dumps(self.settings))
        log = open(self.workdir / "authserver.log", "ab")
        self.process = subprocess.Popen([node_binary(), str(home / "server.mjs"), str(settings)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_for(lambda: self.events("listening") or self.process.poll() is not None, timeout=60)
            assert self.process.poll() is None, self.log()
        except BaseException:
            self.stop()
            raise
        self.issuer = self.events("listening")[-1]["issuer"]
        return self

    def stop(self) -> None:
        stop_process_group(self.process, 10)

    def log(self) -> str:
        return (self.workdir / "authserver.log").read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log(), name)


if __name__ == "__main__":  # `make test`: fetched before the tests run (npm ci, a few seconds)
    ensure_installed()
