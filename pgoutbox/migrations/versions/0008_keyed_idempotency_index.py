"""The idempotency key index holds only operations that have a key.

Revision ID: 0008_keyed_idempotency_index
Revises: 0007_statement_audit
Create Date: 2026-11-27

``idempotency_key`` was a UNIQUE constraint, whose index has an entry for every operation, keyless
ones (NULL) included. Every transition of an operation writes a new row version and so a new
entry in every index of the table that holds the row: for an operation without a key that
entry was never looked up. A partial unique index over the operations that have a key enforces
the same rule (NULLs never conflicted) and costs keyless operations nothing. Publishing now says
``ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL``, which this index answers.

The index is built before the constraint is dropped, in the migration's transaction: on a large
table the build holds a lock that blocks writes to ``operations`` meanwhile.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0008_keyed_idempotency_index"
down_revision = "0007_statement_audit"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE UNIQUE INDEX operations_idempotency_key ON {s}.operations (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE {s}.operations DROP CONSTRAINT operations_idempotency_key_key;
"""

DOWNGRADE = """
ALTER TABLE {s}.operations ADD CONSTRAINT operations_idempotency_key_key UNIQUE (idempotency_key);
DROP INDEX {s}.operations_idempotency_key;
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
