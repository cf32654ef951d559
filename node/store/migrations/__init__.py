"""The index's schema, versioned with Alembic.

Every process that opens the index upgrades it to HEAD under the index's write lock, so the
first one migrates and the others find it done. An index written before the schema had versions
(no alembic_version table) is taken over by the first revision, which creates only what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect

from common import logs

if TYPE_CHECKING:
    from node.store.index import Index

log = logging.getLogger("node.store")

HEAD = "0012"  # revision ids are zero-padded numbers: a newer one sorts after


def current_version(connection: object) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    row = connection.exec_driver_sql("SELECT version_num FROM alembic_version").first()  # type: ignore[attr-defined]
    return row[0] if row else None


def schema_version(index: "Index") -> str | None:
    """The index's schema version, read without the write lock (`dicom-node index version` on a
    node that is receiving)."""
    with index.engine.connect() as connection:
        connection.execution_options(index_write_lock=False)
        return current_version(connection)


def upgrade(index: "Index") -> None:
    with index.schema_transaction() as connection:
        current = current_version(connection)
        if current == HEAD:
            return  # the common case: no Alembic import, no script scan
        if current is not None and current > HEAD:
            # A newer release (a rolling upgrade) migrated it; migrations only add, so this one
            # works on it: do not stop a replica of the previous release from starting.
            logs.event(log, "index_schema_newer", schema=current, release=HEAD)
            return
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
