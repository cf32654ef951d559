"""A real OpenID Connect provider for the tests: oidc-provider-mock (PyPI), run as its own process
on 127.0.0.1 with predefined users and their claims, started and stopped by its PID. The node's
code never imports it: it talks to it over HTTP, as to Keycloak."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import requests

from tests.peers import VENV_BIN, free_port, port_open, wait_for
from tests.processes import stop_process_group

CLIENT_ID = "dicom-node"
CLIENT_SECRET = "client-secret-for-tests"


class OidcProvider:
    def __init__(self, workdir: Path, users: list[dict[str, Any]], token_max_age_s: int = 3600):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.token_max_age_s = token_max_age_s
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OidcProvider":
        args = [str(VENV_BIN / "oidc-provider-mock"), "--host", "127.0.0.1", "--port", str(self.port),
                "--token-max-age", str(self.token_max_age_s)]
        for user in self.users:
            args += ["--user-claims", json.dumps(user)]
        log = open(self.workdir / "provider.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: port_open(self.port) or self.process.poll() is not None, timeout=60)
        assert self.process.poll() is None, (self.workdir / "provider.log").read_text()
        return self

    def stop(self) -> None:
        stop_process_group(self.process, 10)

    def id_token(self, sub: str, client_id: str = CLIENT_ID, redirect_uri: str = "http://127.0.0.1/callback") -> str:
        """An ID token for `sub` through the authorization code flow, the user's consent given
        on the provider's own form (what a script with a user's login would get)."""
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                  "scope": "openid profile email", "state": "s", "nonce": "n"}
        authorize = f"{self.issuer}/oauth2/authorize?{urlencode(params)}"
        with requests.Session() as http:
            assert http.get(authorize, timeout=30).status_code == 200
            answer = http.post(authorize, data={"sub": sub}, allow_redirects=False, timeout=30)
            assert answer.status_code in (302, 303), answer.text[:500]
            code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
            token = http.post(f"{self.issuer}/oauth2/token", auth=(client_id, CLIENT_SECRET), timeout=30, data={
                "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})
            assert token.status_code == 200, token.text[:500]
            return token.json()["id_token"]
