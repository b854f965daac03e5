# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""Attempts, limits, schedule and fencing token change only with an audited transition.

Revision ID: 0005_audited_bookkeeping
Revises: 0004_least_privilege
Create Date: 2026-11-27

Before this revision a role allowed to UPDATE operations (a worker role, say) could reset
``attempts``, lift ``max_attempts``, move ``run_at`` or bump ``version`` without any audit row,
as long as ``state`` stayed the same. pgoutbox itself always changes these columns in the same
UPDATE as a named transition; now the database insists on it.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0005_audited_bookkeeping"
down_revision = "0004_least_privilege"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE FUNCTION {s}.operations_refuse_unaudited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: operation %: attempts, max_attempts, run_at, priority, version and last_error change only in the same UPDATE as a named transition, which the audit log records', OLD.id
        USING ERRCODE = 'check_violation',
              HINT = 'Use pgoutbox''s API (e.g. pgoutbox ops retry / replay).';
END $$;

-- The WHEN clause keeps pgoutbox's own statements (which always name a transition) and lease
-- heartbeats (which touch none of these columns) out of PL/pgSQL entirely.
CREATE TRIGGER a_operations_unaudited
    BEFORE UPDATE OF attempts, max_attempts, run_at, priority, version, last_error
    ON {s}.operations FOR EACH ROW
    WHEN (NEW.transition IS NULL
          AND (OLD.attempts, OLD.max_attempts, OLD.run_at, OLD.priority, OLD.version,
               OLD.last_error)
              IS DISTINCT FROM (NEW.attempts, NEW.max_attempts, NEW.run_at, NEW.priority,
                                NEW.version, NEW.last_error))
    EXECUTE FUNCTION {s}.operations_refuse_unaudited();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_unaudited;
"""

DOWNGRADE = """
DROP TRIGGER a_operations_unaudited ON {s}.operations;
DROP FUNCTION {s}.operations_refuse_unaudited();
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
