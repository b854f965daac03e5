"""Anchored audit: the database's own record of the signed checkpoints taken of the audit log.

Revision ID: 0013_anchored_audit
Revises: 0012_running_controls
Create Date: 2026-12-03

``pgoutbox audit checkpoint`` (and a worker's checkpoint service) signs a Merkle root over every
operation's audit chain head as one snapshot saw them, and writes the signed document to a file
the user keeps where the database's owner cannot write (docs/audit.md). A copy of each document
is recorded here, for convenience only (listing checkpoints, finding the latest): the owner can
rewrite this table like any other, so nothing trusts it; verification trusts the file and the
public key alone.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0013_anchored_audit"
down_revision = "0012_running_controls"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE {s}.audit_checkpoints (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    taken_at     timestamptz NOT NULL,
    size         bigint NOT NULL CHECK (size >= 0),
    covered_rows bigint NOT NULL CHECK (covered_rows >= 0),
    root         bytea NOT NULL,
    key_id       text NOT NULL,
    document     jsonb NOT NULL,
    recorded_by  text NOT NULL DEFAULT current_user,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_checkpoints_taken_at ON {s}.audit_checkpoints (taken_at);
COMMENT ON TABLE {s}.audit_checkpoints IS
    'Copies of the signed audit checkpoints, for convenience: never the source of '
    'trust (the signed files are).';
"""

DOWNGRADE = """
DROP TABLE {s}.audit_checkpoints;
"""


def upgrade() -> None:
    s = schema_for_migration()
    execute_script(UPGRADE.replace("{s}", s))
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    execute_script(DOWNGRADE.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
