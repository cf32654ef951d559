"""Instances whose file is gone: when start-up reconciliation finds an indexed instance's file
missing (deleted by hand, a disk restored from an older backup), it records the instance here
instead of forgetting it, so the study's job and the console can say which instances are gone.

A table of its own, not a column on `instances`: a release that adds a column to a table the
previous release inserts into would break that release's statements during a rolling upgrade.

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
    op.create_table(
        "missing_files",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("marked_at", sa.Float, nullable=False),
    )
    op.create_index("ix_missing_files_study", "missing_files", ["study_uid"])
