"""Leases: which node process holds a running job or a delivery being sent, and until when.

A replica that dies stops renewing its leases; another takes the work over when they expire.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("work_items", "outbox"):
        op.add_column(table, sa.Column("lease_owner", sa.Text))
        op.add_column(table, sa.Column("lease_until", sa.Float))
