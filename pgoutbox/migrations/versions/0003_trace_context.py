"""Tracing: the publisher's trace context, kept on the operation for the worker to continue.

Revision ID: 0003_trace_context
Revises: 0002_operator_tools
Create Date: 2026-11-27

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0003_trace_context"
down_revision = "0002_operator_tools"
branch_labels = None
depends_on = None

UPGRADE = """
-- NULL unless the publisher ran inside an OpenTelemetry span (pgoutbox[otel] installed). A new
-- nullable column without a default is a catalog-only change: no table rewrite, no long lock.
ALTER TABLE {s}.operations ADD COLUMN trace_context jsonb;
COMMENT ON COLUMN {s}.operations.trace_context IS
    'W3C trace context of the publisher (traceparent, ...); each attempt''s span continues it.';
"""

DOWNGRADE = """
ALTER TABLE {s}.operations DROP COLUMN trace_context;
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
