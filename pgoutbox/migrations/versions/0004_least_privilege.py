"""Least privilege: audit rows are written with the schema owner's rights, not the caller's.

Revision ID: 0004_least_privilege
Revises: 0003_trace_context
Create Date: 2026-11-27

Until this revision the audit triggers ran with the privileges of whoever changed
``operations``, so a role allowed to publish or to run workers needed INSERT on ``audit_log`` --
and could INSERT forged rows directly. Now the two trigger functions that append to the log are
SECURITY DEFINER (they already schema-qualify every name; search_path is pinned so nothing can
be slipped in ahead of pg_catalog), and roles that publish or run workers need no privilege on
``audit_log`` at all (``pgoutbox db grant``, pgoutbox/roles.py).

Inside a SECURITY DEFINER function ``current_user`` is the owner, so the fallback actor of a
state change (the role that made it, when the UPDATE names no ``transition_actor``) is now
filled in by a small SECURITY INVOKER trigger that fires first (``b_operations_actor`` sorts
before ``b_operations_before_update``).

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0004_least_privilege"
down_revision = "0003_trace_context"
branch_labels = None
depends_on = None

UPGRADE = """
-- Runs with the rights of the role changing the operation: records who that is.
CREATE FUNCTION {s}.operations_transition_actor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.transition_actor := coalesce(NEW.transition_actor, current_user);
    RETURN NEW;
END $$;
CREATE TRIGGER b_operations_actor BEFORE UPDATE ON {s}.operations
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR NEW.transition IS NOT NULL)
    EXECUTE FUNCTION {s}.operations_transition_actor();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_actor;

-- Append to the audit log with the owner's rights: callers need no privilege on it.
ALTER FUNCTION {s}.operations_after_insert()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {s}.operations_before_update()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Nobody but the owner writes the log; readers are granted SELECT explicitly.
REVOKE ALL ON {s}.audit_log FROM PUBLIC;
"""

DOWNGRADE = """
ALTER FUNCTION {s}.operations_before_update() SECURITY INVOKER RESET search_path;
ALTER FUNCTION {s}.operations_after_insert() SECURITY INVOKER RESET search_path;
DROP TRIGGER b_operations_actor ON {s}.operations;
DROP FUNCTION {s}.operations_transition_actor();
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
