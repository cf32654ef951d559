"""Console sessions (tables `console_sessions` and `oidc_logins`), kept in the index.

In the index rather than in a signed cookie: every replica behind the balancer knows a session,
logging out or disabling an account ends its sessions at once, and the idle timeout is the
server's to enforce. The cookie carries a random value; the table keeps its SHA-256 only.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from node.store.accounts import Principal, Role
from node.store.index import Index

SEEN_EVERY_S = 30.0  # a session's last activity is written at most this often
LOGIN_TTL_S = 600.0  # an OIDC login not back from the provider by then is forgotten
SHARED_TOKEN_SESSION = "http.token"  # the deprecated shared token's sessions: no account row


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str


@dataclass(frozen=True)
class PendingLogin:
    nonce: str
    code_verifier: str
    next_path: str


class Sessions:
    """The one module that writes `console_sessions` and `oidc_logins`."""

    def __init__(self, index: Index):
        self.index = index

    def start(self, name: str, role: Role) -> tuple[str, Session]:
        """A new session: (the cookie's value, the session)."""
        cookie, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        with self.index.transaction() as db:
            db.execute("INSERT INTO console_sessions (id_hash, account, role, csrf, created_at, seen_at)"
                       " VALUES (?,?,?,?,?,?)", (_hash(cookie), name, role.value, csrf, now, now))
        return cookie, Session(Principal(name, role, "session"), csrf)

    def find(self, cookie: str, idle_s: float, max_s: float, activity: bool = True) -> Session | None:
        """The live session of a cookie: not idle past `idle_s`, not older than `max_s`, its
        account still there and enabled (a disabled account's sessions end at its next request).
        `activity`: False for a page's own reload (the dashboard's): it keeps no one signed in."""
        now = time.time()
        rows = self.index.query(
            "SELECT s.account, s.role, s.csrf, s.created_at, s.seen_at, a.name AS known, a.disabled_at"
            " FROM console_sessions s LEFT JOIN accounts a ON a.name = s.account WHERE s.id_hash=?", (_hash(cookie),))
        if not rows:
            return None
        row = rows[0]
        if row["disabled_at"] is not None or (row["known"] is None and row["account"] != SHARED_TOKEN_SESSION):
            return None
        if now - row["seen_at"] > idle_s or now - row["created_at"] > max_s:
            self.end(cookie)
            return None
        if activity and now - row["seen_at"] > SEEN_EVERY_S:
            with self.index.transaction() as db:
                db.execute("UPDATE console_sessions SET seen_at=? WHERE id_hash=?", (now, _hash(cookie)))
        return Session(Principal(row["account"], Role(row["role"]), "session"), row["csrf"])

    def end(self, cookie: str) -> None:
        with self.index.transaction() as db:
            db.execute("DELETE FROM console_sessions WHERE id_hash=?", (_hash(cookie),))

    def end_all(self, name: str) -> int:
        """An account disabled or its role changed: its sessions end now."""
        with self.index.transaction() as db:
            return db.execute("DELETE FROM console_sessions WHERE account=?", (name,)).rowcount

    def prune(self, idle_s: float, max_s: float) -> int:
        now = time.time()
        with self.index.transaction() as db:
            gone = db.execute("DELETE FROM console_sessions WHERE seen_at < ? OR created_at < ?",
                              (now - idle_s, now - max_s)).rowcount
            gone += db.execute("DELETE FROM oidc_logins WHERE created_at < ?", (now - LOGIN_TTL_S,)).rowcount
        return gone

    # -- OpenID Connect logins on their way to the provider and back ----------------------------

    def begin_login(self, browser: str, state: str, nonce: str, code_verifier: str, next_path: str) -> None:
        with self.index.transaction() as db:
            db.execute("INSERT INTO oidc_logins (state, browser_hash, nonce, code_verifier, next_path, created_at)"
                       " VALUES (?,?,?,?,?,?)", (state, _hash(browser), nonce, code_verifier, next_path, time.time()))

    def finish_login(self, browser: str, state: str) -> PendingLogin | None:
        """The login this browser began with `state`, taken once (a replayed callback finds none)."""
        with self.index.transaction() as db:
            row = db.execute("SELECT * FROM oidc_logins WHERE state=?", (state,)).fetchone()
            db.execute("DELETE FROM oidc_logins WHERE state=?", (state,))
        if row is None or row["browser_hash"] != _hash(browser) or time.time() - row["created_at"] > LOGIN_TTL_S:
            return None
        return PendingLogin(row["nonce"], row["code_verifier"], row["next_path"])
