"""Model runs: one row per model version run on a series (live or shadow), with what went in
(modality, slices, spacing, intensity) and what came out (findings, volume, probability); a
shadow run's row holds its comparison with the live run of the same job. The console's model
page, the drift alarm and the shadow comparison read it (node/store/modelruns.py). A result a
radiologist rejected or accepted (a Key Object Selection from the PACS) marks its run's verdict.

Revision ID: 0011
Revises: 0010
"""

from alembic import op
import sqlalchemy as sa

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("role", sa.Text, nullable=False),  # live or shadow
        sa.Column("modality", sa.Text),
        sa.Column("slices", sa.Integer),
        sa.Column("spacing_slice", sa.Float),  # mm
        sa.Column("spacing_row", sa.Float),
        sa.Column("spacing_column", sa.Float),
        sa.Column("intensity_mean", sa.Float),
        sa.Column("intensity_std", sa.Float),
        sa.Column("findings", sa.Integer),
        sa.Column("volume_mm3", sa.Float),  # segmentation: every labelled voxel
        sa.Column("probability", sa.Float),  # classification: the predicted class's
        sa.Column("predicted", sa.Text),  # classification: the predicted class's name
        sa.Column("dice", sa.Float),  # shadow: against the live run's labels
        sa.Column("volume_difference", sa.Float),  # shadow: (shadow - live) / live volume
        sa.Column("agreement", sa.Integer),  # shadow classification: same predicted class (1/0)
        sa.Column("error", sa.Text),  # a shadow run that failed: why (the live results went out)
        sa.Column("verdict", sa.Text),  # rejected / accepted, from a radiologist's KOS
        sa.Column("verdict_at", sa.Float),
        sa.UniqueConstraint("job_id", "rule", "model", "version", "role", name="uq_model_runs_run"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_model_runs_model", "model_runs", ["model", "version", "id"])
    op.create_index("ix_model_runs_job", "model_runs", ["job_id"])
    op.create_table(  # the SOP Instance UIDs of each run's SEG/SR: a verdict (a KOS) finds its run by them
        "model_run_results",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Integer, nullable=False),
    )
