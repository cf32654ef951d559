"""More completion signals: HL7 v2 order/result messages matched by accession number, expected
counts carried by the images, and MPPS forwarded to another AE.

- `completion_accessions`: the accession numbers a study's instances carry (an HL7 message names
  the exam by accession number, not by Study Instance UID);
- `completion_signals.accession_number`: what an HL7 signal names (a message may come before
  the images: the signal waits for a study with that accession);
- `completion_signal_studies.used_at`: a signal is used once *per study* (an HL7 message for an
  accession shared by two studies completes both); what the previous release marked used is
  copied here, and `completion_signals.used_at` is still set (used by some study) for replicas
  of the previous release during a rolling upgrade;
- `completion_instance_counts`: per instance that carries one, the count of its group
  (ImagesInAcquisition per acquisition, InConcatenationTotalNumber per concatenation);
- `signal_forwards`: MPPS requests to pass on to other AEs (the RIS/PACS keeps getting them),
  queued in the transaction that stores the step.

New tables and columns on tables only this family of releases writes (naming their columns):
the previous release's statements stay valid during a rolling upgrade.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completion_accessions",
        sa.Column("study_uid", sa.Text, primary_key=True),
        sa.Column("accession_number", sa.Text, primary_key=True),
    )
    op.create_index("ix_completion_accessions_accession", "completion_accessions", ["accession_number"])
    op.add_column("completion_signals", sa.Column("accession_number", sa.Text))
    op.create_index("ix_completion_signals_accession", "completion_signals", ["accession_number"])
    op.add_column("completion_signal_studies", sa.Column("used_at", sa.Float))
    # what the previous release marked used (per signal) stays used for each of its studies
    op.execute("UPDATE completion_signal_studies SET used_at = (SELECT s.used_at FROM completion_signals s"
               " WHERE s.sop_instance_uid = completion_signal_studies.sop_instance_uid)")
    op.create_table(
        "completion_instance_counts",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("count_group", sa.Text, nullable=False),  # acquisition:<series>:<n> or concatenation:<uid>
        sa.Column("expected", sa.Integer, nullable=False),
    )
    op.create_index("ix_completion_instance_counts_study", "completion_instance_counts", ["study_uid"])
    op.create_table(
        "signal_forwards",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.Text, nullable=False),  # the step
        sa.Column("operation", sa.Text, nullable=False),  # n_create, n_set
        sa.Column("destination", sa.Text, nullable=False),  # a destinations: name
        sa.Column("dataset", sa.LargeBinary, nullable=False),  # the attribute list, Explicit VR Little Endian
        sa.Column("state", sa.Text, nullable=False),  # pending, sending, delivered, dead
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt", sa.Float),
        sa.Column("lease_owner", sa.Text),  # host:pid:random of the forwarder that claimed it
        sa.Column("lease_until", sa.Float),
        sa.Column("reason", sa.Text),
    )
    op.create_index("ix_signal_forwards_state", "signal_forwards", ["state", "destination", "sop_instance_uid"])
