"""The de-identification mapping: each pseudonymous UID a project was sent, with its source UID
sealed under the project's key (node/store/pseudonyms.py). A new table only (rolling upgrade: a
replica of the previous release never reads it).

Revision ID: 0008
Revises: 0007
"""

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pseudonyms",
        sa.Column("project", sa.Text, primary_key=True),
        sa.Column("pseudonym", sa.Text, primary_key=True),  # the UID the project knows
        sa.Column("study_pseudonym", sa.Text, nullable=False),  # the pseudonymous study it came with
        sa.Column("sealed", sa.Text, nullable=False),  # hex: nonce + AES-256-GCM(source UID)
        sa.Column("job_id", sa.Integer, nullable=False),  # the job that sent it first
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_pseudonyms_expires_at", "pseudonyms", ["expires_at"])
    op.create_index("ix_pseudonyms_study", "pseudonyms", ["project", "study_pseudonym"])

