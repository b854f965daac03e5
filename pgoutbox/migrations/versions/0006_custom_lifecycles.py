# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""Custom lifecycles per operation type, multi-step workflows, and ordering keys.

Revision ID: 0006_custom_lifecycles
Revises: 0005_audited_bookkeeping
Create Date: 2026-11-27

- ``lifecycles`` keeps every registered version of every custom lifecycle (its definition and
  digest); ``lifecycle_types`` says which lifecycle each operation type runs. The lifecycle of a
  new operation is taken from ``lifecycle_types`` by trigger, whatever the publisher sends, so
  the lifecycle the database enforces is the one registered for the type.
- A later step of a workflow rests in its own state and is claimed in place: "running" is now
  "holds a lease" (``lease_owner`` set), not "is in state claimed". The lease index follows.
- ``step_attempts`` counts the attempts of the current step (``max_attempts`` applies per
  step); ``attempts`` keeps counting every attempt, so audit rows keep unique attempt numbers.
  Like ``attempts`` it changes only with an audited transition.
- ``ordering_key``: operations sharing one run one at a time, in publish order. It is part of
  the recorded intent, so it cannot be changed.
- The default lifecycle gains ``dead --cancel--> cancelled``: an operator who decides a dead
  operation will not be pursued says so, audited, and releases the operations ordered after it.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0006_custom_lifecycles"
down_revision = "0005_audited_bookkeeping"
branch_labels = None
depends_on = None

# Added to the default lifecycle at this revision: (from_state, trigger, to_state).
# tests/migrations checks 0001's and 0002's rows plus these equal DEFAULT_LIFECYCLE.
ADDED_DEFAULT_TRANSITIONS = [
    ("dead", "cancel", "cancelled"),
]

UPGRADE = """
CREATE TABLE {s}.lifecycles (
    name           text NOT NULL,
    version        integer NOT NULL CHECK (version >= 1),
    digest         text NOT NULL,
    definition     jsonb NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    registered_by  text NOT NULL DEFAULT current_user,
    PRIMARY KEY (name, version)
);
COMMENT ON TABLE {s}.lifecycles IS
    'Every registered version of every custom lifecycle; the newest is in lifecycle_transitions.';

CREATE TABLE {s}.lifecycle_types (
    operation_type  text PRIMARY KEY,
    lifecycle       text NOT NULL
);
COMMENT ON TABLE {s}.lifecycle_types IS
    'The lifecycle each operation type runs; types not listed run the default lifecycle.';

ALTER TABLE {s}.operations ADD COLUMN ordering_key text;
ALTER TABLE {s}.operations ADD COLUMN step_attempts integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN {s}.operations.step_attempts IS
    'Attempts of the current step; max_attempts applies to it. attempts counts them all.';
COMMENT ON COLUMN {s}.operations.ordering_key IS
    'Operations sharing a key run one at a time in publish order; an unfinished one (dead included) holds back the rest.';
-- Until now every operation ran a one-step lifecycle: its step's attempts are all its attempts.
UPDATE {s}.operations SET step_attempts = attempts WHERE attempts > 0;

-- The lifecycle is the type's, not the publisher's choice. SECURITY DEFINER: publishers need no
-- privilege on lifecycle_types.
CREATE FUNCTION {s}.operations_lifecycle() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.lifecycle := coalesce(
        (SELECT t.lifecycle FROM {s}.lifecycle_types t WHERE t.operation_type = NEW.operation_type),
        'default');
    RETURN NEW;
END $$;
-- "a_" sorts before "b_operations_before_insert": the lifecycle is set before the audit row.
CREATE TRIGGER a_operations_lifecycle BEFORE INSERT ON {s}.operations
    FOR EACH ROW EXECUTE FUNCTION {s}.operations_lifecycle();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_lifecycle;

-- The ordering key joins the recorded intent.
CREATE OR REPLACE FUNCTION {s}.operations_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.operation_type IS DISTINCT FROM OLD.operation_type
       OR NEW.channel IS DISTINCT FROM OLD.channel
       OR NEW.lifecycle IS DISTINCT FROM OLD.lifecycle
       OR NEW.payload IS DISTINCT FROM OLD.payload
       OR NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key
       OR NEW.ordering_key IS DISTINCT FROM OLD.ordering_key
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.created_by IS DISTINCT FROM OLD.created_by
       OR NEW.audit_seq IS DISTINCT FROM OLD.audit_seq
       OR NEW.audit_hash IS DISTINCT FROM OLD.audit_hash
    THEN
        RAISE EXCEPTION 'pgoutbox: operation % is recorded intent: its type, channel, lifecycle, payload, idempotency key, ordering key, creation and audit head cannot be changed',
            OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER a_operations_immutable ON {s}.operations;
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, ordering_key, created_at, created_by, audit_seq, audit_hash
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;

-- step_attempts joins the bookkeeping that changes only with an audited transition.
CREATE OR REPLACE FUNCTION {s}.operations_refuse_unaudited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: operation %: attempts, step_attempts, max_attempts, run_at, priority, version and last_error change only in the same UPDATE as a named transition, which the audit log records', OLD.id
        USING ERRCODE = 'check_violation',
              HINT = 'Use pgoutbox''s API (e.g. pgoutbox ops retry / replay).';
END $$;
DROP TRIGGER a_operations_unaudited ON {s}.operations;
CREATE TRIGGER a_operations_unaudited
    BEFORE UPDATE OF attempts, step_attempts, max_attempts, run_at, priority, version, last_error
    ON {s}.operations FOR EACH ROW
    WHEN (NEW.transition IS NULL
          AND (OLD.attempts, OLD.step_attempts, OLD.max_attempts, OLD.run_at, OLD.priority,
               OLD.version, OLD.last_error)
              IS DISTINCT FROM (NEW.attempts, NEW.step_attempts, NEW.max_attempts, NEW.run_at,
                                NEW.priority, NEW.version, NEW.last_error))
    EXECUTE FUNCTION {s}.operations_refuse_unaudited();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_unaudited;

-- A running step holds a lease in whatever state it runs in: the rescuer looks among leases.
DROP INDEX {s}.operations_claimed_lease;
CREATE INDEX operations_leased ON {s}.operations (lease_expires_at)
    WHERE lease_owner IS NOT NULL;
-- Operations resting in a custom lifecycle's own states (between steps, or parked), in claim
-- order. Default-lifecycle operations never rest there, so their claims never look at it.
CREATE INDEX operations_resting ON {s}.operations (channel, priority DESC, run_at, id)
    WHERE lease_owner IS NULL
      AND state NOT IN ('pending', 'claimed', 'failed', 'succeeded', 'dead', 'cancelled');
-- The unfinished operations of each ordering key, oldest first: the claim's "is anything
-- before me unfinished?" is one probe of this small index.
CREATE INDEX operations_ordering ON {s}.operations (ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state NOT IN ('succeeded', 'cancelled');
"""

DOWNGRADE = """
DROP INDEX {s}.operations_ordering;
DROP INDEX {s}.operations_resting;
DROP INDEX {s}.operations_leased;
CREATE INDEX operations_claimed_lease ON {s}.operations (lease_expires_at)
    WHERE state = 'claimed';

CREATE OR REPLACE FUNCTION {s}.operations_refuse_unaudited() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: operation %: attempts, max_attempts, run_at, priority, version and last_error change only in the same UPDATE as a named transition, which the audit log records', OLD.id
        USING ERRCODE = 'check_violation',
              HINT = 'Use pgoutbox''s API (e.g. pgoutbox ops retry / replay).';
END $$;
DROP TRIGGER a_operations_unaudited ON {s}.operations;
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

CREATE OR REPLACE FUNCTION {s}.operations_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.operation_type IS DISTINCT FROM OLD.operation_type
       OR NEW.channel IS DISTINCT FROM OLD.channel
       OR NEW.lifecycle IS DISTINCT FROM OLD.lifecycle
       OR NEW.payload IS DISTINCT FROM OLD.payload
       OR NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key
       OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.created_by IS DISTINCT FROM OLD.created_by
       OR NEW.audit_seq IS DISTINCT FROM OLD.audit_seq
       OR NEW.audit_hash IS DISTINCT FROM OLD.audit_hash
    THEN
        RAISE EXCEPTION 'pgoutbox: operation % is recorded intent: its type, channel, lifecycle, payload, idempotency key, creation and audit head cannot be changed',
            OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER a_operations_immutable ON {s}.operations;
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, created_at, created_by, audit_seq, audit_hash
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;

DROP TRIGGER a_operations_lifecycle ON {s}.operations;
DROP FUNCTION {s}.operations_lifecycle();
ALTER TABLE {s}.operations DROP COLUMN step_attempts;
ALTER TABLE {s}.operations DROP COLUMN ordering_key;
DROP TABLE {s}.lifecycle_types;
DROP TABLE {s}.lifecycles;
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
    # Operations of custom lifecycles cannot be expressed at the previous revision.
    op.execute(
        f"DO $$ BEGIN IF EXISTS (SELECT 1 FROM {s}.operations WHERE lifecycle <> 'default') "
        "THEN RAISE EXCEPTION 'pgoutbox: operations of custom lifecycles exist; finish and "
        "purge them before downgrading below 0006'; END IF; END $$"
    )
    op.execute(f"DELETE FROM {s}.lifecycle_transitions WHERE lifecycle <> 'default'")
    for f, t, to in ADDED_DEFAULT_TRANSITIONS:
        op.execute(
            f"DELETE FROM {s}.lifecycle_transitions WHERE lifecycle = 'default' "
            f"AND from_state = '{f}' AND trigger = '{t}' AND to_state = '{to}'"
        )
    execute_script(DOWNGRADE.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
