"""This installation's identity: a random UID made on its first start and kept in its index.

Result UIDs are derived from it (see node.encode.uids), so two nodes, or one node whose data
folder was recreated, never give two results the same UID.
"""

from __future__ import annotations

import secrets

from pydicom.uid import generate_uid

from node.store.index import Index

def installation_uid(index: Index) -> str:
    """The installation's UID, made (once, whichever process comes first) if it has none yet."""
    with index.transaction() as db:
        db.execute("INSERT INTO installation (key, value) VALUES ('uid', ?) ON CONFLICT DO NOTHING",
                   (str(generate_uid(prefix=None)),))
        return str(db.execute("SELECT value FROM installation WHERE key='uid'").fetchone()["value"])


def console_secret(index: Index) -> bytes:
    """A random key of this installation's console (message cookies), shared by its replicas
    through the index and never logged: unlike the installation UID, which results and logs carry."""
    with index.transaction() as db:
        db.execute("INSERT INTO installation (key, value) VALUES ('console_secret', ?) ON CONFLICT DO NOTHING",
                   (secrets.token_hex(32),))
        return bytes.fromhex(str(db.execute("SELECT value FROM installation WHERE key='console_secret'")
                                 .fetchone()["value"]))
