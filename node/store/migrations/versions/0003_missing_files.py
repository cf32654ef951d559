"""Instances whose file is gone: when start-up reconciliation found an indexed instance's file
missing (deleted by hand, a disk restored from an older backup), it marks the row instead of
forgetting it, so the study's job and the console can say which instances are gone.

Revision ID: 0003
Revises: 0002
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("missing_at", sa.Float))
