"""The de-identification mapping (owner of the `pseudonyms` table): which source UID each
pseudonymous UID sent to a project stands for, so results that come back can be re-identified.

Each source UID is sealed with AES-256-GCM (the `cryptography` package) under a key derived from
the project's key (node/deid/pseudonyms.py), bound to its project and pseudonym (associated
data): the index alone (a backup, a replica's database) says which pseudonyms exist, not what
they stand for. Rows expire after the project's `mapping_days` (renewed when the same UID is
sent again) and are then deleted.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.store.index import Db, Index

NONCE_BYTES = 12


class MappingError(Exception):
    """A row that does not open with this key (another key, or altered)."""


def _associated(project: str, pseudonym: str) -> bytes:
    return project.encode() + b"\x00" + pseudonym.encode()


def seal(key: bytes, project: str, pseudonym: str, source: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return (nonce + AESGCM(key).encrypt(nonce, source.encode(), _associated(project, pseudonym))).hex()


def unseal(key: bytes, project: str, pseudonym: str, sealed: str) -> str:
    data = bytes.fromhex(sealed)
    try:
        return AESGCM(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _associated(project, pseudonym)).decode()
    except InvalidTag:
        raise MappingError(f"the mapping of {pseudonym} does not open with project {project}'s key") from None


class PseudonymMap:
    def __init__(self, index: Index):
        self.index = index

    @staticmethod
    def record(db: Db, project: str, key: bytes, uids: dict[str, str], study_pseudonym: str, job_id: int,
               now: float, keep_s: float) -> None:
        """Every source -> pseudonym pair of a de-identified series (in the caller's transaction)."""
        for source, pseudonym in uids.items():
            updated = db.execute("UPDATE pseudonyms SET expires_at=? WHERE project=? AND pseudonym=?",
                                 (now + keep_s, project, pseudonym)).rowcount
            if not updated:
                db.execute("INSERT INTO pseudonyms (project, pseudonym, study_pseudonym, sealed, job_id, created_at,"
                           " expires_at) VALUES (?,?,?,?,?,?,?)",
                           (project, pseudonym, study_pseudonym, seal(key, project, pseudonym, source), job_id, now,
                            now + keep_s))

    def source_of(self, project: str, key: bytes, pseudonym: str) -> str | None:
        """The source UID a pseudonym stands for (None: never sent, or expired)."""
        rows = self.index.query("SELECT sealed FROM pseudonyms WHERE project=? AND pseudonym=?", (project, pseudonym))
        return unseal(key, project, pseudonym, rows[0]["sealed"]) if rows else None

    def prune(self, now: float) -> int:
        with self.index.transaction() as db:
            return db.execute("DELETE FROM pseudonyms WHERE expires_at < ?", (now,)).rowcount
