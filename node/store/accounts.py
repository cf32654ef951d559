"""Who may use the console (tables `accounts`, `api_tokens`, `login_failures`).

Local accounts carry an argon2id password hash (argon2-cffi, its recommended parameters); OpenID
Connect users are recorded at their first login (source `oidc`, no password) so that an admin can
see and disable them. API tokens are random 256-bit strings: a SHA-256 of one is enough to store
(a password hash's slowness protects guessable secrets, and a token is not guessable), and it lets
a token be found by its hash in one indexed read.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher, Type
from argon2.low_level import ARGON2_VERSION
from argon2.exceptions import InvalidHashError, VerificationError

from sqlalchemy.exc import IntegrityError

from node.config import ACCOUNT_TOKEN_PREFIX
from node.store.index import Index

TOKEN_PREFIX = ACCOUNT_TOKEN_PREFIX  # tells a node token from a JWT or the shared token
LAST_USED_EVERY_S = 60.0  # a token's last use is written at most once a minute
RESERVED_NAMES = ("http.token",)  # the deprecated shared token's sessions and audit records
PEER_FAILURES_FACTOR = 4  # an address may fail this many times the per-name limit, over all names
HASHES_AT_ONCE = 4  # argon2 takes 64 MiB a hash: a burst of logins waits rather than takes memory
_HASHER = PasswordHasher()
_HASHING = threading.BoundedSemaphore(HASHES_AT_ONCE)


def _unmatchable_hash(hasher: PasswordHasher) -> str:
    """A hash in argon2's encoded form (the PHC string format, RFC 9106) with the hasher's own
    parameters and random salt and digest: verified for an unknown name, it costs what an
    account's costs (the parameters set the work) and matches no password. Built, not computed:
    `hasher.hash` here took 0.26 s of every node's start, at import."""
    def b64(size: int) -> str:  # argon2's encoding: base64 without padding
        return base64.b64encode(secrets.token_bytes(size)).decode().rstrip("=")
    kind = {Type.ID: "argon2id", Type.I: "argon2i", Type.D: "argon2d"}[hasher.type]
    return (f"${kind}$v={ARGON2_VERSION}$m={hasher.memory_cost},t={hasher.time_cost},p={hasher.parallelism}"
            f"${b64(hasher.salt_len)}${b64(hasher.hash_len)}")


_DUMMY_HASH = _unmatchable_hash(_HASHER)  # verified for unknown names: the same time either way


class Role(StrEnum):
    """What an account may do; each role may do everything of the ones before it."""

    VIEWER = "viewer"  # dashboards, queues and rules, no patient attributes
    OPERATOR = "operator"  # study details with patient attributes, retry, echo, explain
    ADMIN = "admin"  # configuration reload, retention, accounts, the audit trail

    def allows(self, needed: "Role") -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an account (local or OIDC), an API token's account, or the
    deprecated shared `http.token` (as admin)."""

    name: str
    role: Role
    via: str  # session, token, jwt, http.token

    def may(self, needed: Role) -> bool:
        return self.role.allows(needed)


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    source: str
    created_at: float
    disabled_at: float | None
    last_login: float | None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "source": self.source, "created_at": self.created_at,
                "disabled": self.disabled_at is not None, "last_login": self.last_login}


class AccountError(ValueError):
    """An account change that cannot be made (a clear message for the CLI and the console)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _account(row: Any) -> Account:
    return Account(row["name"], Role(row["role"]), row["source"], float(row["created_at"]),
                   row["disabled_at"], row["last_login"])


class Accounts:
    """The one module that writes `accounts`, `api_tokens` and `login_failures`."""

    def __init__(self, index: Index):
        self.index = index

    # -- accounts --------------------------------------------------------------------------------

    def add(self, name: str, role: Role, password: str) -> Account:
        name = name.strip()
        if not name or len(name) > 128 or any(ord(c) < 32 or c == "/" for c in name) or name in (".", ".."):
            raise AccountError("an account name is 1 to 128 printable characters, without /")
        if name in RESERVED_NAMES:
            raise AccountError(f"{name!r} is reserved")
        if len(password) < 12:
            raise AccountError("a password has at least 12 characters")
        hashed = _HASHER.hash(password)
        try:
            with self.index.transaction() as db:
                if db.execute("SELECT name FROM accounts WHERE name=?", (name,)).fetchone():
                    raise AccountError(f"there is already an account {name!r}")
                db.execute("INSERT INTO accounts (name, role, source, password_hash, created_at) VALUES (?,?,?,?,?)",
                           (name, role.value, "local", hashed, time.time()))
        except IntegrityError:  # another replica added it between the check and the insert
            raise AccountError(f"there is already an account {name!r}") from None
        return self.get(name)  # type: ignore[return-value]

    def get(self, name: str) -> Account | None:
        rows = self.index.query("SELECT * FROM accounts WHERE name=?", (name,))
        return _account(rows[0]) if rows else None

    def all(self) -> list[Account]:
        return [_account(r) for r in self.index.query("SELECT * FROM accounts ORDER BY name")]

    def exist(self) -> bool:
        """Whether any account was ever made: from then on every console read needs one."""
        return bool(self.index.query("SELECT name FROM accounts LIMIT 1"))

    def set_disabled(self, name: str, disabled: bool) -> Account:
        with self.index.transaction() as db:
            changed = db.execute("UPDATE accounts SET disabled_at=? WHERE name=?",
                                 (time.time() if disabled else None, name)).rowcount
        if not changed:
            raise AccountError(f"no account {name!r}")
        return self.get(name)  # type: ignore[return-value]

    def set_role(self, name: str, role: Role) -> Account:
        with self.index.transaction() as db:
            if not db.execute("UPDATE accounts SET role=? WHERE name=? AND source='local'", (role.value, name)).rowcount:
                raise AccountError(f"no local account {name!r} (an OIDC account's role comes from its claims)")
        return self.get(name)  # type: ignore[return-value]

    def check_password(self, name: str, password: str) -> Account | None:
        """The enabled local account with this password, or None (same work for an unknown name)."""
        rows = self.index.query("SELECT * FROM accounts WHERE name=? AND source='local'", (name,))
        stored = rows[0]["password_hash"] if rows and rows[0]["password_hash"] else _DUMMY_HASH
        try:
            with _HASHING:
                _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if not rows or rows[0]["disabled_at"] is not None:
            return None
        if _HASHER.check_needs_rehash(stored):  # parameters raised since it was set
            with self.index.transaction() as db:
                db.execute("UPDATE accounts SET password_hash=? WHERE name=?", (_HASHER.hash(password), name))
        return _account(rows[0])

    def oidc_login(self, subject: str, role: Role) -> Account | None:
        """Record an OIDC user's login with the role its claims give now; None if an admin disabled
        it, or the name is a local account's or reserved."""
        if subject in RESERVED_NAMES:
            return None
        now = time.time()
        with self.index.transaction() as db:
            db.execute("INSERT INTO accounts (name, role, source, created_at) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                       (subject, role.value, "oidc", now))
            db.execute("UPDATE accounts SET role=? WHERE name=? AND source='oidc'", (role.value, subject))
        account = self.get(subject)
        return account if account is not None and account.disabled_at is None and account.source == "oidc" else None

    def logged_in(self, name: str) -> None:
        with self.index.transaction() as db:
            db.execute("UPDATE accounts SET last_login=? WHERE name=?", (time.time(), name))

    def enabled(self, name: str) -> bool:
        rows = self.index.query("SELECT disabled_at FROM accounts WHERE name=?", (name,))
        return bool(rows) and rows[0]["disabled_at"] is None

    # -- API tokens ------------------------------------------------------------------------------

    def issue_token(self, name: str, label: str = "") -> tuple[int, str]:
        """A new token for the account: (its id, the token, shown once and never stored)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.index.transaction() as db:
            found = db.execute("SELECT source FROM accounts WHERE name=?", (name,)).fetchone()
            if found is None:
                raise AccountError(f"no account {name!r}")
            if found["source"] != "local":  # its role is the provider's to give, at each sign-in
                raise AccountError(f"{name!r} signs in with the identity provider: use the provider's tokens")
            db.execute("INSERT INTO api_tokens (account, label, token_hash, created_at) VALUES (?,?,?,?)",
                       (name, label or None, token_hash(token), time.time()))
            token_id = db.execute("SELECT id FROM api_tokens WHERE token_hash=?", (token_hash(token),)).fetchone()["id"]
        return int(token_id), token

    def revoke_token(self, token_id: int) -> str:
        """Revoke a token; returns its account's name."""
        with self.index.transaction() as db:
            row = db.execute("SELECT account FROM api_tokens WHERE id=?", (token_id,)).fetchone()
            if row is None:
                raise AccountError(f"no token {token_id}")
            db.execute("UPDATE api_tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL", (time.time(), token_id))
        return str(row["account"])

    def tokens(self, name: str | None = None) -> list[dict[str, Any]]:
        rows = self.index.query(
            "SELECT id, account, label, created_at, last_used, revoked_at FROM api_tokens"
            + (" WHERE account=?" if name else "") + " ORDER BY id", (name,) if name else ())
        return [dict(r) for r in rows]

    def token_principal(self, token: str) -> Principal | None:
        """The enabled account a live token belongs to."""
        rows = self.index.query(
            "SELECT t.id, t.last_used, a.name, a.role FROM api_tokens t JOIN accounts a ON a.name = t.account"
            " WHERE t.token_hash=? AND t.revoked_at IS NULL AND a.disabled_at IS NULL", (token_hash(token),))
        if not rows:
            return None
        row = rows[0]
        now = time.time()
        if row["last_used"] is None or now - row["last_used"] > LAST_USED_EVERY_S:
            with self.index.transaction() as db:
                db.execute("UPDATE api_tokens SET last_used=? WHERE id=?", (now, row["id"]))
        return Principal(row["name"], Role(row["role"]), "token")

    # -- failed logins ---------------------------------------------------------------------------

    def failed_login(self, name: str, peer: str) -> None:
        with self.index.transaction() as db:
            db.execute("INSERT INTO login_failures (account, peer, at) VALUES (?,?,?)",
                       (name.strip().lower()[:128], peer, time.time()))

    def throttled(self, name: str, peer: str, limit: int, window_s: float) -> bool:
        """Whether logins of `name` from `peer` wait: `limit` failures in the window for this name
        from this address, or PEER_FAILURES_FACTOR times as many from it for any names. Not per
        name alone: anyone could then lock an admin out from anywhere by failing on purpose."""
        rows = self.index.query(
            "SELECT SUM(CASE WHEN account=? THEN 1 ELSE 0 END) AS by_name, COUNT(*) AS by_peer"
            " FROM login_failures WHERE peer=? AND at >= ?", (name.strip().lower()[:128], peer, time.time() - window_s))
        return int(rows[0]["by_name"] or 0) >= limit or int(rows[0]["by_peer"] or 0) >= limit * PEER_FAILURES_FACTOR

    def prune_failures(self, before: float) -> int:
        with self.index.transaction() as db:
            return db.execute("DELETE FROM login_failures WHERE at < ?", (before,)).rowcount
