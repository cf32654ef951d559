"""The de-identification mapping (owner of the `pseudonym_map` table): which source UID each
pseudonymous UID sent to a project stands for, so results that come back can be re-identified.

A row is found by a keyed digest of the pseudonym (node/deid/pseudonyms.py `Pseudonyms.lookup`),
never the pseudonym itself, and its source UID is sealed with AES-256-GCM (the `cryptography`
package) under a key derived from the project's key, bound to its project and digest
(associated data). So the index alone (a backup, a replica's database) tells neither which
pseudonyms were sent nor what they stand for. Rows expire after the project's `mapping_days`
(renewed when the same UID is sent again) and are then deleted.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.store.index import Db, Index

NONCE_BYTES = 12


class MappingError(Exception):
    """A row that does not open with this key (another key, or altered)."""


def _associated(*context: str) -> bytes:
    return b"\x00".join(part.encode() for part in context)


def seal(key: bytes, context: tuple[str, ...], plain: str) -> str:
    """`plain` encrypted under `key`, bound to `context` (it opens only with the same context)."""
    nonce = os.urandom(NONCE_BYTES)
    return (nonce + AESGCM(key).encrypt(nonce, plain.encode(), _associated(*context))).hex()


def unseal(key: bytes, context: tuple[str, ...], sealed: str) -> str:
    data = bytes.fromhex(sealed)
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _associated(*context)).decode()
    except InvalidTag:
        raise MappingError(f"a sealed row of project {context[0]} does not open with its key") from None


class PseudonymMap:
    def __init__(self, index: Index):
        self.index = index

    @staticmethod
    def record(db: Db, project: str, key: bytes, sources: dict[str, str], now: float, keep_s: float) -> None:
        """Every digest -> source UID pair of a de-identified series (in the caller's transaction)."""
        for digest, source in sources.items():
            updated = db.execute("UPDATE pseudonym_map SET expires_at=? WHERE project=? AND digest=?",
                                 (now + keep_s, project, digest)).rowcount
            if not updated:
                db.execute("INSERT INTO pseudonym_map (project, digest, sealed, created_at, expires_at)"
                           " VALUES (?,?,?,?,?)",
                           (project, digest, seal(key, (project, digest), source), now, now + keep_s))

    def source_of(self, project: str, key: bytes, digest: str) -> str | None:
        """The source UID of the pseudonym with this digest (None: never sent, or expired)."""
        rows = self.index.query("SELECT sealed FROM pseudonym_map WHERE project=? AND digest=?", (project, digest))
        return unseal(key, (project, digest), rows[0]["sealed"]) if rows else None

    def prune(self, now: float) -> int:
        with self.index.transaction() as db:
            return db.execute("DELETE FROM pseudonym_map WHERE expires_at < ?", (now,)).rowcount
