"""Outbox attempts are a history: a retry or a re-send no longer sets them back to 0. The backoff
restarts from `attempts_base`, the count when the item was last queued again by hand. A new
column with a default (rolling upgrade: a replica of the previous release ignores it).

And the indexes the console's study outcomes and its needs-attention list read by (a study's
latest job, its deliveries; studies newest first): without them each listed study scanned both
tables, seconds per refresh at ten thousand studies.

Revision ID: 0010
Revises: 0009
"""

from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("attempts_base", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_work_items_study", "work_items", ["study_uid", "id"])
    op.create_index("ix_outbox_study", "outbox", ["study_uid", "state"])
    op.create_index("ix_studies_last_received", "studies", ["last_received"])
