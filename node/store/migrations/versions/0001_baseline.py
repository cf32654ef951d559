"""The schema as the node wrote it before it had versions; creates whatever an index lacks.

Column order matches the old CREATE TABLE statements (some INSERTs name no columns). Ids that
results are derived from (work_items.id) never repeat: AUTOINCREMENT on SQLite, a sequence on
PostgreSQL. Times are double precision (sa.Float), sizes 64-bit.

Revision ID: 0001
Revises:
"""

from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ZERO = sa.text("0")


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)


def _tables() -> list[tuple[str, list, dict, list[tuple[str, list[str]]]]]:
    """(table, columns and constraints, table options, indexes)."""
    t, f, i, big = sa.Text, sa.Float, sa.Integer, sa.BigInteger
    c = sa.Column
    auto = {"sqlite_autoincrement": True}
    return [
        ("studies", [c("study_uid", t, primary_key=True), c("patient_id", t), c("state", t, nullable=False),
                     c("calling_ae", t), c("first_received", f, nullable=False), c("last_received", f, nullable=False),
                     c("deadline", f, nullable=False), c("completed_at", f),
                     c("completions", i, nullable=False, server_default=ZERO)], {},
         [("studies_state", ["state", "deadline"])]),
        ("series", [c("series_uid", t, primary_key=True), c("study_uid", t, nullable=False), c("modality", t),
                    c("body_part", t), c("description", t), c("number", i), c("sop_class_uid", t), c("image_type", t),
                    c("orientation", t), c("rows", i), c("columns", i), c("slice_thickness", f)], {},
         [("series_study", ["study_uid"])]),
        ("instances", [c("sop_instance_uid", t, primary_key=True), c("series_uid", t, nullable=False),
                       c("study_uid", t, nullable=False), c("sop_class_uid", t, nullable=False),
                       c("transfer_syntax", t, nullable=False), c("path", t, nullable=False),
                       c("size", big, nullable=False), c("received_at", f, nullable=False), c("calling_ae", t),
                       c("called_ae", t), c("peer", t), c("association_id", i)], {},
         [("instances_study", ["study_uid"]), ("instances_series", ["series_uid"])]),
        ("associations", [_id(), c("calling_ae", t), c("called_ae", t), c("peer", t),
                          c("started_at", f, nullable=False), c("ended_at", f),
                          c("instances", i, nullable=False, server_default=ZERO),
                          c("failures", i, nullable=False, server_default=ZERO)], auto, []),
        ("work_items", [_id(), c("study_uid", t, nullable=False), c("state", t, nullable=False),
                        c("created_at", f, nullable=False), c("updated_at", f, nullable=False), c("reason", t),
                        c("priority", i, nullable=False, server_default=ZERO), c("rules_version", t),
                        c("decision", t), c("explanation", t), c("stages", t), *_work_item_additions()], auto,
         [("work_items_state", ["state", "priority", "id"])]),
        ("outbox", [_id(), c("job_key", t, nullable=False), c("study_uid", t, nullable=False),
                    c("destination", t, nullable=False), c("files", t, nullable=False), c("state", t, nullable=False),
                    c("attempts", i, nullable=False, server_default=ZERO), c("created_at", f, nullable=False),
                    c("updated_at", f, nullable=False), c("next_attempt", f, nullable=False),
                    c("deadline", f, nullable=False), c("last_error", t), c("warnings", t),
                    sa.UniqueConstraint("job_key", "destination")], auto,
         [("outbox_due", ["state", "next_attempt"])]),
        ("installation", [c("key", t, primary_key=True), c("value", t, nullable=False)], {}, []),
        ("receive_counts", [c("kind", t, primary_key=True), c("detail", t, primary_key=True),
                            c("n", big, nullable=False, server_default=ZERO)], {}, []),
        ("retention_log", [_id(), c("at", f, nullable=False), c("kind", t, nullable=False),
                           c("study_uid", t, nullable=False), c("job_id", i), c("reason", t, nullable=False),
                           c("instances", big, nullable=False, server_default=ZERO),
                           c("bytes", big, nullable=False, server_default=ZERO),
                           c("completions", i, nullable=False, server_default=ZERO),
                           c("files", i, nullable=False, server_default=ZERO)], auto, []),
        ("retention_runs", [_id(), c("at", f, nullable=False), c("studies", i, nullable=False),
                            c("instances", big, nullable=False), c("bytes", big, nullable=False),
                            c("result_files", i, nullable=False)], auto, []),
    ]


def _work_item_additions() -> list[sa.Column]:
    """work_items columns an early release lacked (it added them in place)."""
    return [sa.Column("stage", sa.Text), sa.Column("attempts", sa.Integer, nullable=False, server_default=ZERO),
            sa.Column("next_attempt", sa.Float), sa.Column("retry_deadline", sa.Float), sa.Column("outputs", sa.Text)]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, columns, options, indexes in _tables():
        if not inspector.has_table(name):
            op.create_table(name, *columns, **options)
            for index, on in indexes:
                op.create_index(index, name, on)
    present = {column["name"] for column in inspector.get_columns("work_items")}
    for column in _work_item_additions():
        if column.name not in present:
            op.add_column("work_items", column)
