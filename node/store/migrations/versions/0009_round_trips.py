"""The return path of de-identification: round trips, and a mapping keyed by digests.

`pseudonyms` (0008) kept each pseudonymous UID in clear with the job that sent it, so the index
alone linked a pseudonymous study to its source study (jobs.study_uid). `pseudonym_map` keeps a
keyed digest of the pseudonym instead (node/deid/pseudonyms.py `Pseudonyms.lookup`): without
the project's key no one can tell which row a pseudonymous UID is. 0008 was never released
(it came with the same unfinished issue), so its table is dropped, not converted (a digest
needs the key, which a migration does not have).

`round_trips`: one row per de-identified copy that awaits results (node/store/roundtrips.py).

Revision ID: 0009
Revises: 0008
"""

from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("pseudonyms")
    op.create_table(
        "pseudonym_map",
        sa.Column("project", sa.Text, primary_key=True),
        sa.Column("digest", sa.Text, primary_key=True),  # HMAC of the pseudonymous UID under the project key
        sa.Column("sealed", sa.Text, nullable=False),  # hex: nonce + AES-256-GCM(source UID)
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_pseudonym_map_expires_at", "pseudonym_map", ["expires_at"])
    op.create_table(
        "round_trips",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.Text, nullable=False),
        sa.Column("study_digest", sa.Text, nullable=False),  # HMAC of the pseudonymous study UID
        sa.Column("job_id", sa.Integer, nullable=False),  # the job that sent the copy
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("study_uid", sa.Text, nullable=False),  # the source study (the job's)
        sa.Column("results_to", sa.Text, nullable=False),  # JSON: destinations of the re-identified results
        sa.Column("sealed_study", sa.Text, nullable=False),  # hex: AES-256-GCM(the source's patient and study)
        sa.Column("state", sa.Text, nullable=False),  # waiting, returned, delivered, failed, timed_out
        sa.Column("sent_at", sa.Float, nullable=False),
        sa.Column("deadline", sa.Float, nullable=False),
        sa.Column("returned_at", sa.Float),
        sa.Column("finished_at", sa.Float),  # delivered, failed or timed out
        sa.Column("return_job", sa.Integer),  # the job that re-identified what came back
        sa.Column("reason", sa.Text),  # why it failed or timed out; what was quarantined
        sa.Column("expires_at", sa.Float, nullable=False),  # with the mapping
        sa.UniqueConstraint("job_id", "rule", name="uq_round_trips_job_rule"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_round_trips_lookup", "round_trips", ["project", "study_digest"])
    op.create_index("ix_round_trips_study", "round_trips", ["study_uid"])
    op.create_index("ix_round_trips_deadline", "round_trips", ["state", "deadline"])
