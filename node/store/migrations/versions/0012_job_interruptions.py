"""How many times the node died while a job ran (`work_items.interruptions`): a job that kills
its node (killed for memory by the kernel or a container's limit) is failed after
`pipeline.interrupted_runs` such deaths instead of being run again at every start, a crash loop
that stops every other study's job. `work_items.stopping`: the node process running the job was
told to stop (SIGTERM), so that a SIGKILL before its stop ended does not count as its death. New
columns with defaults (rolling upgrade: a replica of the previous release ignores them).

Revision ID: 0012
Revises: 0011
"""

from alembic import op
import sqlalchemy as sa

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("work_items", sa.Column("interruptions", sa.Integer, nullable=False, server_default="0"))
    op.add_column("work_items", sa.Column("stopping", sa.Integer, nullable=False, server_default="0"))
