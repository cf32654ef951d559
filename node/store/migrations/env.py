"""Alembic runs the revisions on the connection (and inside the transaction) the index hands it."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
