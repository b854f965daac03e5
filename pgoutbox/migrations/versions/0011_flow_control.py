# ruff: noqa: E501  (SQL error messages and comments are kept on one line so they grep well)
"""Flow control: concurrency and rate limits, and pauses, kept in the database.

Revision ID: 0011_flow_control
Revises: 0010_roles_enforced
Create Date: 2026-12-03

Workers coordinate through these tables, so a limit or a pause holds across every process and
host (docs/flow-control.md):

- ``flow_limits``: the limits the workers' routers declare (a worker upserts its own at start);
- ``flow_overrides``: an operator's run-time changes to a limit, newest first wins; kept for ever;
- ``flow_pauses``: pauses of a channel, an operation type, or a limit's types (all of them, or one
  partition); a resume closes the row instead of deleting it, so the table is its own history;
- ``flow_buckets``: each rate limit's state (GCRA's theoretical arrival time) per partition.

Who changed an override or a pause is recorded twice, as in the audit log: the declared actor
(free text) and the database role that made the change (``current_user``, set by trigger). The
triggers keep both tables' history: no row is deleted, an override is never changed, a pause is
only closed, once, and the times are the database's.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0011_flow_control"
down_revision = "0010_roles_enforced"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE {s}.flow_limits (
    name                 text PRIMARY KEY,
    operation_types      text[] NOT NULL,
    partition_by         text,
    concurrency          integer CHECK (concurrency >= 1),
    rate_count           integer CHECK (rate_count >= 1),
    rate_period_seconds  double precision CHECK (rate_period_seconds > 0),
    burst                integer NOT NULL DEFAULT 1 CHECK (burst >= 1),
    declared_at          timestamptz NOT NULL DEFAULT now(),
    declared_by          text NOT NULL DEFAULT CURRENT_USER,
    CHECK (concurrency IS NOT NULL OR rate_count IS NOT NULL),
    CHECK ((rate_count IS NULL) = (rate_period_seconds IS NULL))
);
COMMENT ON TABLE {s}.flow_limits IS
    'Concurrency and rate limits as the workers'' routers declare them (upserted at start).';

CREATE TABLE {s}.flow_overrides (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    limit_name           text NOT NULL,
    concurrency          integer CHECK (concurrency >= 1),
    rate_count           integer CHECK (rate_count >= 1),
    rate_period_seconds  double precision CHECK (rate_period_seconds > 0),
    burst                integer CHECK (burst >= 1),
    actor                text NOT NULL,
    reason               text NOT NULL,
    db_role              text NOT NULL DEFAULT CURRENT_USER,
    set_at               timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_count IS NULL) = (rate_period_seconds IS NULL))
);
CREATE INDEX flow_overrides_latest ON {s}.flow_overrides (limit_name, id DESC);
COMMENT ON TABLE {s}.flow_overrides IS
    'Operators'' run-time overrides of declared limits; the newest per limit is in force (all NULL: back to the declaration).';

CREATE TABLE {s}.flow_pauses (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope          text NOT NULL CHECK (scope IN ('channel', 'type', 'limit')),
    target         text NOT NULL,
    partition      text CHECK (partition IS NULL OR scope = 'limit'),
    paused_by      text NOT NULL,
    pause_reason   text NOT NULL,
    paused_role    text NOT NULL DEFAULT CURRENT_USER,
    paused_at      timestamptz NOT NULL DEFAULT now(),
    resumed_by     text,
    resume_reason  text,
    resumed_role   text,
    resumed_at     timestamptz
);
-- At most one open pause per target.
CREATE UNIQUE INDEX flow_pauses_open ON {s}.flow_pauses (scope, target, coalesce(partition, ''))
    WHERE resumed_at IS NULL;
COMMENT ON TABLE {s}.flow_pauses IS
    'Pauses of a channel, a type or a limit (or one of its partitions); open while resumed_at is NULL.';

CREATE TABLE {s}.flow_buckets (
    limit_name  text NOT NULL,
    partition   text NOT NULL DEFAULT '',
    tat         timestamptz NOT NULL,
    PRIMARY KEY (limit_name, partition)
);
COMMENT ON TABLE {s}.flow_buckets IS
    'Rate limits'' state: when each partition''s next start conforms (GCRA''s theoretical arrival time).';

CREATE FUNCTION {s}.flow_history_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION '%.% keeps its history: rows cannot be deleted', TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_TABLE_NAME = 'flow_overrides' THEN
        IF TG_OP = 'UPDATE' THEN
            RAISE EXCEPTION '%.flow_overrides keeps its history: an override cannot be changed; insert a new one', TG_TABLE_SCHEMA
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        NEW.db_role := current_user;
        NEW.set_at := now();
        RETURN NEW;
    END IF;
    -- flow_pauses
    IF TG_OP = 'INSERT' THEN
        IF NEW.resumed_by IS NOT NULL OR NEW.resume_reason IS NOT NULL OR NEW.resumed_at IS NOT NULL
           OR NEW.resumed_role IS NOT NULL THEN
            RAISE EXCEPTION 'a pause starts open: resumed_* must be NULL' USING ERRCODE = 'check_violation';
        END IF;
        NEW.paused_role := current_user;
        NEW.paused_at := now();
        RETURN NEW;
    END IF;
    IF OLD.resumed_at IS NOT NULL THEN
        RAISE EXCEPTION 'pause % was resumed already; it cannot be changed', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.id, NEW.scope, NEW.target, NEW.partition, NEW.paused_by, NEW.pause_reason,
        NEW.paused_role, NEW.paused_at)
       IS DISTINCT FROM (OLD.id, OLD.scope, OLD.target, OLD.partition, OLD.paused_by,
        OLD.pause_reason, OLD.paused_role, OLD.paused_at) THEN
        RAISE EXCEPTION 'a pause can only be resumed: set resumed_by and resume_reason'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.resumed_by IS NULL OR NEW.resume_reason IS NULL THEN
        RAISE EXCEPTION 'a resume names who resumed and why (resumed_by, resume_reason)'
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.resumed_role := current_user;
    NEW.resumed_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER flow_overrides_history BEFORE INSERT OR UPDATE OR DELETE ON {s}.flow_overrides
    FOR EACH ROW EXECUTE FUNCTION {s}.flow_history_guard();
CREATE TRIGGER flow_pauses_history BEFORE INSERT OR UPDATE OR DELETE ON {s}.flow_pauses
    FOR EACH ROW EXECUTE FUNCTION {s}.flow_history_guard();
-- Like the audit triggers: not skipped under session_replication_role = replica.
ALTER TABLE {s}.flow_overrides ENABLE ALWAYS TRIGGER flow_overrides_history;
ALTER TABLE {s}.flow_pauses ENABLE ALWAYS TRIGGER flow_pauses_history;
"""

DOWNGRADE = """
DROP TABLE {s}.flow_buckets;
DROP TABLE {s}.flow_pauses;
DROP TABLE {s}.flow_overrides;
DROP TABLE {s}.flow_limits;
DROP FUNCTION {s}.flow_history_guard();
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
