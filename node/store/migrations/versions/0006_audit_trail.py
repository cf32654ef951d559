"""The audit trail: one record per security-relevant event (IHE ATNA's model: the DICOM audit
message of PS3.15 A.5, from which its syslog form is rendered), append-only, kept by its own
retention (audit.keep_days), not the data's.

Revision ID: 0006
Revises: 0005
"""

from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),  # DCM code: 110100, 110104, 110113...
        sa.Column("event_type", sa.Text),  # DCM code: 110120 Application Start, 110126 Node Authentication...
        sa.Column("action", sa.Text, nullable=False),  # C, R, U, D, E (PS3.15 A.5.1 EventActionCode)
        sa.Column("outcome", sa.Integer, nullable=False),  # 0, 4, 8, 12 (EventOutcomeIndicator)
        sa.Column("actor", sa.Text),  # who: a calling AE title (later: a user)
        sa.Column("peer", sa.Text),  # from where: an address
        sa.Column("detail", sa.Text, nullable=False),  # JSON: studies {uid: instances}, patients, destination, reason
        sqlite_autoincrement=True,  # ids never reused after a prune: a repository's cursor only moves forward
    )
    op.create_index("ix_audit_events_recorded_at", "audit_events", ["recorded_at"])
    op.create_table(  # how far each audit repository (ATNA syslog) has been sent the trail
        "audit_cursor",
        sa.Column("repository", sa.Text, primary_key=True),  # protocol://host:port
        sa.Column("last_id", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.Text),  # the replica sending to it now (one at a time)
        sa.Column("lease_until", sa.Float),
    )
