"""Operator tools: the ``retry`` transition and the record of retention purges.

Revision ID: 0002_operator_tools
Revises: 0001_initial
Create Date: 2026-11-27

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0002_operator_tools"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

# Added to the default lifecycle at this revision: (from_state, trigger, to_state).
# `pgoutbox ops retry` runs a failed operation now instead of at its scheduled retry time.
# tests/migrations checks 0001's rows plus these equal pgoutbox.lifecycle.DEFAULT_LIFECYCLE.
ADDED_DEFAULT_TRANSITIONS = [
    ("failed", "retry", "pending"),
]

UPGRADE = """
-- One row per `pgoutbox ops purge` (retention): who deleted which finished operations, and how
-- many. Each batch adds its count in the transaction that deletes it, so the row always matches
-- what is gone, even when a purge is interrupted (finished_at stays NULL). The audit rows of
-- purged operations are never deleted.
CREATE TABLE {s}.purges (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor            text NOT NULL,
    finished_before  timestamptz NOT NULL,
    include_dead     boolean NOT NULL,
    batch_size       integer NOT NULL CHECK (batch_size >= 1),
    deleted          bigint NOT NULL DEFAULT 0,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
COMMENT ON TABLE {s}.purges IS
    'Retention purges of finished operations; their audit rows are kept.';
"""

DOWNGRADE = """
DROP TABLE {s}.purges;
"""


def upgrade() -> None:
    s = schema_for_migration()
    execute_script(UPGRADE.replace("{s}", s))
    values = ", ".join(
        f"('default', '{f}', '{t}', '{to}')" for f, t, to in ADDED_DEFAULT_TRANSITIONS
    )
    op.execute(f"INSERT INTO {s}.lifecycle_transitions VALUES {values}")
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    for f, t, to in ADDED_DEFAULT_TRANSITIONS:
        op.execute(
            f"DELETE FROM {s}.lifecycle_transitions WHERE lifecycle = 'default' "
            f"AND from_state = '{f}' AND trigger = '{t}' AND to_state = '{to}'"
        )
    execute_script(DOWNGRADE.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
