"""Accounts, roles, sessions and single sign-on, end to end: `dicom-node users` makes the accounts,
HTTP clients and Chromium log in, a real OpenID Connect provider (oidc-provider-mock, its own
process) signs users in and issues the JWTs, and Debian's rsyslog takes the audit messages, each
validated against the DICOM audit message schema (PS3.15 A.5.1) with jing."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any, Iterator

import argon2
import pydicom
import pytest
import requests
from joserfc import jwt
from joserfc.jwk import RSAKey

from node.store import accounts
from tests.oidc import CLIENT_ID, CLIENT_SECRET, OidcProvider
from tests.peers import VENV_BIN, make_study, storescu, wait_for
from tests.syslog import Rsyslog
from tests.test_audit import _audit_messages, _event

PASSWORD = "correct horse battery"
PATIENT = {"patient_id": "PAT-ROLES-9", "patient_name": "Doe^Jane"}


def _cli(node: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "dicom-node"), *args, "--config", str(node.config_path)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def _add(node: Any, name: str, role: str) -> None:
    out = _cli(node, "users", "add", name, "--role", role, "--password-stdin", stdin=PASSWORD + "\n")
    assert out.returncode == 0, out.stderr


def _login(node: Any, name: str, password: str = PASSWORD) -> tuple[requests.Session, requests.Response]:
    """A browser-like client: the login form posted, its session cookie kept."""
    http = requests.Session()
    form = http.get(node.url + "/login", timeout=30).text
    token = re.search(r'name="login_csrf" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
    answer = http.post(node.url + "/login", timeout=30,
                       data={"username": name, "password": password, "next": "/", "login_csrf": token})
    return http, answer


def _csrf(http: requests.Session, node: Any) -> str:
    return http.get(node.url + "/api/me", timeout=30).json()["csrf"]


def _trail(node: Any) -> list[dict[str, Any]]:
    out = _cli(node, "audit", "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout)


def test_an_unknown_name_is_verified_against_a_hash_that_costs_what_an_accounts_costs():
    """The hash verified for a name with no account is built, not computed, at import: it must
    carry the parameters every account's hash gets (they set argon2's work) and be one argon2
    verifies in full and finds no match for, not one it refuses unread (InvalidHashError)."""
    assert argon2.extract_parameters(accounts._DUMMY_HASH) == argon2.extract_parameters(accounts._HASHER.hash(PASSWORD))
    for password in (PASSWORD, "not a password", ""):
        with pytest.raises(argon2.exceptions.VerifyMismatchError):
            accounts._HASHER.verify(accounts._DUMMY_HASH, password)


def test_roles_sessions_tokens_and_their_audit_trail(start_node, tmp_path):
    """Open on loopback until the first account; then a viewer sees no patient and cannot act,
    an operator sees the patient (audited) and retries but cannot reload, an admin reloads; CSRF,
    throttling, API tokens, disabling; each event a valid DICOM audit message at the repository."""
    repository = Rsyslog(tmp_path / "rsyslog").start()
    try:
        node = start_node(http={"login_failures": 5},
                          audit={"repository": {"host": "127.0.0.1", "port": repository.port, "protocol": "udp"},
                                 "sweep_s": 0.5})
        files = make_study(tmp_path / "ct", slices=2, size=16, **PATIENT)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: node.study(study_uid) is not None, timeout=30)

        # open mode: no account yet, the console on loopback answers reads as before
        assert requests.get(node.url + "/api/studies", timeout=30).status_code == 200
        assert requests.post(node.url + "/api/jobs/999/retry", timeout=30).status_code == 401
        for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
            _add(node, name, role)
        duplicate = _cli(node, "users", "add", "vera", "--password-stdin", stdin=PASSWORD + "\n")
        assert duplicate.returncode == 1 and "already an account" in duplicate.stderr
        short = _cli(node, "users", "add", "shorty", "--password-stdin", stdin="short\n")
        assert short.returncode == 1 and "12 characters" in short.stderr

        # from the first account on, every call needs a login, on loopback too (health stays open)
        for path in ("/api/studies", "/metrics", "/api/summary"):
            assert requests.get(node.url + path, timeout=30).status_code == 401, path
        assert requests.get(node.url + "/health/live", timeout=30).status_code == 200
        page = requests.get(node.url + "/studies", timeout=30)
        assert page.url.startswith(node.url + "/login")  # the pages send the browser to the login form

        viewer, answer = _login(node, "vera")
        assert answer.status_code == 200 and "vera (viewer)" in answer.text
        cookie = next(c for c in viewer.cookies if c.name == "dicom_node_session")
        assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "lax"
        study_page = viewer.get(f"{node.url}/studies/{study_uid}", timeout=30).text
        assert study_uid in study_page and "Doe^Jane" not in study_page and PATIENT["patient_id"] not in study_page
        assert "patient" not in viewer.get(f"{node.url}/api/studies/{study_uid}", timeout=30).json()
        refused = viewer.post(node.url + "/api/jobs/999/retry", headers={"X-CSRF-Token": _csrf(viewer, node)}, timeout=30)
        assert refused.status_code == 403 and "operator" in refused.json()["detail"]

        operator, _ = _login(node, "otto")
        study_page = operator.get(f"{node.url}/studies/{study_uid}", timeout=30).text
        assert "Doe^Jane" in study_page and PATIENT["patient_id"] in study_page
        assert operator.get(f"{node.url}/api/studies/{study_uid}", timeout=30).json()["patient"]["PatientName"] == "Doe^Jane"
        csrf = _csrf(operator, node)
        assert operator.post(node.url + "/api/jobs/999/retry", timeout=30).status_code == 403  # no CSRF token
        assert operator.post(node.url + "/api/jobs/999/retry", headers={"X-CSRF-Token": "forged"}, timeout=30).status_code == 403
        assert operator.post(node.url + "/api/jobs/999/retry", headers={"X-CSRF-Token": csrf}, timeout=30).status_code == 404
        form = operator.post(node.url + "/jobs/999/retry", data={"csrf": "forged"}, timeout=30)
        assert form.status_code == 403 and "not from this console" in form.text
        assert operator.post(node.url + "/api/config/reload", headers={"X-CSRF-Token": csrf}, timeout=30).status_code == 403

        admin, _ = _login(node, "ada")
        reload = admin.post(node.url + "/api/config/reload", headers={"X-CSRF-Token": _csrf(admin, node)}, timeout=30)
        assert reload.status_code == 200 and reload.json()["applied"] is True
        assert "Accounts" in admin.get(node.url + "/", timeout=30).text
        csrf = _csrf(admin, node)
        added = admin.post(node.url + "/admin/accounts", timeout=30,
                           data={"csrf": csrf, "name": "tess", "role": "viewer", "password": PASSWORD})
        assert added.status_code == 200 and "account tess added (viewer)" in added.text
        assert "tess" in admin.get(node.url + "/admin/accounts", timeout=30).text
        assert operator.get(node.url + "/admin/accounts", timeout=30).status_code == 403
        shown = admin.post(node.url + "/admin/accounts/tess/tokens", data={"csrf": csrf, "label": "x"}, timeout=30)
        page_token = re.search(r'<pre id="token">(dnt_[^<]+)</pre>', shown.text).group(1)  # type: ignore[union-attr]
        assert requests.get(node.url + "/api/me", headers={"Authorization": f"Bearer {page_token}"},
                            timeout=30).json()["name"] == "tess"
        audit_page = admin.get(node.url + "/admin/audit?since=1h", timeout=30).text
        assert "110114" in audit_page and PATIENT["patient_id"] in audit_page  # otto's view, with the patient

        # API tokens: per account, with its role, stored hashed, revocable
        issued = _cli(node, "users", "token", "otto", "--label", "pacs-script")
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip()
        bearer = {"Authorization": f"Bearer {token}"}
        assert requests.get(node.url + "/api/me", headers=bearer, timeout=30).json()["role"] == "operator"
        assert requests.post(node.url + "/api/jobs/999/retry", headers=bearer, timeout=30).status_code == 404
        stored = b"".join(f.read_bytes() for f in node.data_dir.glob("index.sqlite*"))  # with the WAL
        assert token.encode() not in stored and token[4:].encode() not in stored  # its SHA-256 only
        token_id = re.search(r"token (\d+) for otto", issued.stderr).group(1)  # type: ignore[union-attr]
        assert _cli(node, "users", "token", "otto", "--revoke", token_id).returncode == 0
        assert requests.get(node.url + "/api/me", headers=bearer, timeout=30).status_code == 401

        # disabling an account ends its sessions at once
        change = admin.patch(node.url + "/api/accounts/otto", json={"disabled": True},
                             headers={"X-CSRF-Token": _csrf(admin, node)}, timeout=30)
        assert change.status_code == 200 and change.json()["disabled"] is True
        assert operator.get(node.url + "/api/studies", timeout=30).status_code == 401
        assert _login(node, "otto")[1].status_code == 401

        # throttling: 5 failures (http.login_failures) for a name from one address, and even the
        # right password waits; another name from there still logs in (no lock-out by others)
        for _ in range(5):
            assert _login(node, "vera", "wrong password!")[1].status_code == 401
        throttled = _login(node, "vera")[1]
        assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
        assert _login(node, "ada")[1].status_code == 200
        forged = requests.post(node.url + "/login", data={"username": "ada", "password": PASSWORD}, timeout=30)
        assert forged.status_code == 403 and "not from this console" in forged.text  # login CSRF

        viewer.post(node.url + "/logout", data={"csrf": _csrf(viewer, node)}, timeout=30)
        assert viewer.get(node.url + "/api/studies", timeout=30).status_code == 401

        # the audit trail, in the index and at the repository
        trail = _trail(node)
        logins = [(r["actor"], r["outcome"]) for r in trail if (r["event_id"], r["event_type"]) == ("110114", "110122")]
        assert ("vera", 0) in logins and ("otto", 0) in logins and ("ada", 0) in logins
        assert logins.count(("vera", 4)) == 6 and ("otto", 4) in logins  # wrong passwords, throttled; disabled
        assert [r["actor"] for r in trail if r["event_type"] == "110123"] == ["vera"]  # logout
        viewed = [r for r in trail if r["event_id"] == "110110"]
        assert {r["actor"] for r in viewed} == {"otto"} and len(viewed) == 2  # the page and the API
        assert all(r["patients"] == {study_uid: PATIENT["patient_id"]} and r["action"] == "R" for r in viewed)
        actions = {(r["actor"], r["event_type"], r["outcome"], r["target"]) for r in trail if r["event_id"] == "110113"}
        assert ("otto", "110132", 4, "/api/jobs/999/retry") in actions  # a retry of an unknown job, by the operator
        assert ("ada", "110131", 0, "/api/config/reload") in actions
        assert ("ada", "110137", 0, "/api/accounts/otto") in actions
        assert sum(1 for r in trail if r["event_type"] == "110137" and r["actor"].endswith("@cli")) >= 6
        wait_for(lambda: len(repository.messages()) >= len(trail), timeout=60)
        kinds = {_event(m) for m in _audit_messages(repository, tmp_path)}
        assert {("110114", "110122"), ("110114", "110123"), ("110110", None), ("110113", "110132"),
                ("110113", "110131"), ("110113", "110137")} <= kinds
        log = node.log_path.read_text()
        assert "Doe^Jane" not in log and PATIENT["patient_id"] not in log and token not in log
    finally:
        repository.stop()


@pytest.fixture(scope="module")
def providers(tmp_path_factory) -> Iterator[tuple[OidcProvider, OidcProvider]]:
    """The site's provider (tokens live 20 s, so one can be seen to expire) and another one."""
    work = tmp_path_factory.mktemp("oidc")
    users = [{"sub": "alice", "preferred_username": "alice", "groups": ["radiology"]},
             {"sub": "bob", "preferred_username": "bob", "groups": ["pacs-admins", "radiology"]},
             {"sub": "carol", "preferred_username": "carol", "groups": ["cafeteria"]}]
    site = OidcProvider(work / "site", users, token_max_age_s=20).start()
    other = OidcProvider(work / "other", users).start()
    try:
        yield site, other
    finally:
        site.stop()
        other.stop()


def test_single_sign_on_in_chromium_and_jwts_on_the_api(start_node, providers, tmp_path):
    """The authorization code flow with PKCE through the provider's own form in Chromium; the
    role from the groups claim; a user with no mapped group refused; the provider's JWT taken
    on the API, an expired, forged or other issuer's one refused."""
    from playwright.sync_api import sync_playwright

    site, other = providers
    node = start_node(http={"oidc": {
        "issuer": site.issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "leeway_s": 0,
        "role_map": {"radiology": "operator", "pacs-admins": "admin"}}})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            for sub, shown in (("alice", "alice (operator)"), ("bob", "bob (admin)")):
                page = browser.new_context().new_page()
                page.set_default_timeout(60_000)
                page.goto(node.url + "/jobs")
                assert "/login" in page.url
                page.click("#sso")
                page.wait_for_url(re.compile(re.escape(site.issuer) + "/oauth2/authorize.*code_challenge_method=S256"))
                page.click(f"button[name=sub][value={sub}]")
                page.wait_for_url(node.url + "/jobs")
                assert page.locator("#who").inner_text() == shown
                page.context.close()
            page = browser.new_context().new_page()
            page.goto(node.url + "/login")
            page.click("#sso")
            page.click("button[name=sub][value=carol]")
            page.wait_for_url(re.compile(re.escape(node.url) + "/login/oidc/callback.*"))
            assert "no role on this node" in page.locator("#error").inner_text()
            page.context.close()
        finally:
            browser.close()
    # a replayed callback (the state is taken once) gets no session
    assert "not started in this browser" in requests.get(node.url + "/login/oidc/callback?state=x&code=y", timeout=30).text

    def me(token: str) -> requests.Response:
        return requests.get(node.url + "/api/me", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    answer = me(site.id_token("bob"))
    assert answer.status_code == 200 and (answer.json()["name"], answer.json()["role"]) == ("bob", "admin")
    token = site.id_token("alice")
    issued = time.time()
    assert me(token).json()["role"] == "operator"
    assert me(other.id_token("alice")).status_code == 401  # another issuer's keys
    forged = jwt.encode({"alg": "RS256", "kid": "forged"}, {
        "iss": site.issuer, "aud": CLIENT_ID, "sub": "alice", "preferred_username": "alice", "groups": ["pacs-admins"],
        "exp": int(time.time()) + 600, "iat": int(time.time())}, RSAKey.generate_key(2048))
    assert me(forged).status_code == 401
    attacker = RSAKey.generate_key(2048)
    for n in range(5):  # made-up key ids and junk cost the provider nothing: its keys were read once
        assert me(jwt.encode({"alg": "RS256", "kid": f"k{n}"}, {"sub": "x"}, attacker)).status_code == 401
        assert me("a.b.c").status_code == 401
    assert (site.workdir / "provider.log").read_text().count('"GET /jwks') == 1
    assert me(site.id_token("alice", client_id="another-client")).status_code == 401  # not for this node
    assert me(site.id_token("carol")).status_code == 403
    wait_for(lambda: time.time() > issued + 21, timeout=40, interval=0.5)
    expired = me(token)
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    trail = _trail(node)
    logins = {(r["actor"], r["outcome"]) for r in trail if r["event_type"] == "110122"}
    assert {("alice", 0), ("bob", 0), ("carol", 4)} <= logins
