"""Completion signals: Modality Performed Procedure Steps (PS3.4 Annex F) and Instance
Availability Notifications (PS3.4 Annex R) the node received, so a study completes when its
step ended, or a notification listed its instances, and every listed instance has arrived; a
SIGKILL between the signal and the completion loses nothing.

Tables of their own (rolling upgrade: the previous release's statements stay valid), and on
each job what completed its study (`work_items.completed_by`: quiet_period, mpps or ian; every
release names the columns it inserts into work_items).

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completion_signals",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),  # the MPPS or IAN instance
        sa.Column("kind", sa.Text, nullable=False),  # mpps, ian
        sa.Column("state", sa.Text, nullable=False),  # IN PROGRESS, COMPLETED, DISCONTINUED (an IAN: COMPLETED)
        sa.Column("calling_ae", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("instances", sa.Text),  # JSON: the SOP Instance UIDs it lists
        sa.Column("used_at", sa.Float),  # when a completion of its study took it into account
    )
    op.create_table(
        "completion_signal_studies",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, primary_key=True),
    )
    op.create_index("ix_completion_signal_studies_study", "completion_signal_studies", ["study_uid"])
    op.add_column("work_items", sa.Column("completed_by", sa.Text))
