"""Who may use the console: local accounts and their roles, API tokens (stored hashed), failed
logins (throttling), console sessions and OpenID Connect logins in progress. New tables only
(rolling upgrade: a replica of the previous release never reads them).

Revision ID: 0007
Revises: 0006
"""

from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("name", sa.Text, primary_key=True),  # a local user name, or an OIDC subject (source 'oidc')
        sa.Column("role", sa.Text, nullable=False),  # viewer, operator, admin (an OIDC account: its last login's)
        sa.Column("source", sa.Text, nullable=False),  # local or oidc
        sa.Column("password_hash", sa.Text),  # argon2id (local accounts only)
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("disabled_at", sa.Float),
        sa.Column("last_login", sa.Float),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),  # SHA-256 of the random token
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_used", sa.Float),
        sa.Column("revoked_at", sa.Float),
        sqlite_autoincrement=True,  # a revoked token's id is never given to another
    )
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account", sa.Text, nullable=False),  # the name tried (lower case)
        sa.Column("peer", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_login_failures_at", "login_failures", ["at"])
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.Text, primary_key=True),  # SHA-256 of the cookie's random value
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("csrf", sa.Text, nullable=False),  # the forms' token (synchronizer pattern)
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
    )
    op.create_table(
        "oidc_logins",  # an authorization request on its way to the provider and back
        sa.Column("state", sa.Text, primary_key=True),
        sa.Column("browser_hash", sa.Text, nullable=False),  # SHA-256 of the login cookie: the same browser
        sa.Column("nonce", sa.Text, nullable=False),
        sa.Column("code_verifier", sa.Text, nullable=False),  # PKCE (RFC 7636)
        sa.Column("next_path", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
