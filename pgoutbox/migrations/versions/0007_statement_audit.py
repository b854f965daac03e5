# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""Audit rows written once per statement instead of once per row.

Revision ID: 0007_statement_audit
Revises: 0006_custom_lifecycles
Create Date: 2026-11-27

Until now every state change ran a SECURITY DEFINER row trigger that looked the transition up in
``lifecycle_transitions`` and inserted its audit row, each through its own executor start, and
each with the owner's rights. That was about two thirds of the server time of a claimed and
recorded operation. Now the work is split by what it needs:

- The row trigger ``b_operations_before_update`` (now SECURITY INVOKER, with no table access)
  still refuses a state change without a named transition, extends the hash chain on the row,
  and stages the audit entry on the row itself: ``audit_from_state``, ``audit_trigger``,
  ``audit_actor``, ``audit_detail`` and ``audit_prev_hash``. It also fills in the actor, which
  the separate ``b_operations_actor`` trigger did (``current_user`` is the caller's again).
- One SECURITY DEFINER statement trigger, ``b_operations_after_update``, reads the rows the
  statement changed (a transition table), checks all their transitions against the lifecycle
  in one query and appends all their audit rows in one INSERT. A refused transition still
  aborts the whole statement, so nothing is written.
- Any UPDATE that makes no transition (a lease heartbeat) clears the staged entry
  (``a_operations_settled``), so a staged entry is always the current statement's; it also
  drops a ``transition_actor`` or ``transition_detail`` set without a transition, which until
  now stayed on the row and was recorded with the next transition.
- Creation: the audit rows of an INSERT are appended by one statement trigger too.
- Every trigger function that compares or computes now has a fixed search_path (before, the
  insert, immutability and deletion checks resolved operators in the caller's).

The audit rows, their hashes and the chain are exactly as before; only who writes them changed.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0007_statement_audit"
down_revision = "0006_custom_lifecycles"
branch_labels = None
depends_on = None

# The chain's encoding is 0001's, unchanged: use its own expressions rather than restate them.
_INITIAL = runpy.run_path(str(Path(__file__).with_name("0001_initial.py")))
_HASH_OF_CHANGE = _INITIAL["hash_expression"](
    "OLD.audit_hash",
    "OLD.id::text",
    "NEW.audit_seq::text",
    "OLD.operation_type",
    "OLD.state",
    "NEW.state",
    "NEW.transition",
    "NEW.attempts::text",
    "actor",
    "NEW.transition_detail",
    recorded_at="at",
)

UPGRADE = """
ALTER TABLE {s}.operations
    ADD COLUMN audit_from_state text,
    ADD COLUMN audit_trigger text,
    ADD COLUMN audit_actor text,
    ADD COLUMN audit_detail text,
    ADD COLUMN audit_prev_hash bytea;
COMMENT ON COLUMN {s}.operations.audit_trigger IS
    'Staged audit entry (with audit_from_state, audit_actor, audit_detail, audit_prev_hash): set by the audit trigger when an UPDATE makes a transition, appended to audit_log at the end of that statement, cleared by the next UPDATE that makes none.';

DROP TRIGGER b_operations_actor ON {s}.operations;
DROP FUNCTION {s}.operations_transition_actor();

-- SECURITY INVOKER (current_user is the caller) and no table access: the lifecycle check and
-- the audit row are the statement trigger's, below. Its search_path is fixed all the same, so
-- that a caller's own functions or operators cannot stand in for clock_timestamp(), + or ||.
CREATE OR REPLACE FUNCTION {s}.operations_before_update() RETURNS trigger LANGUAGE plpgsql
    SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    at timestamptz := clock_timestamp();
    actor text := coalesce(NEW.transition_actor, current_user);
BEGIN
    IF NEW.transition IS NULL THEN
        RAISE EXCEPTION 'pgoutbox: operation % cannot change state from % to % without a named transition',
            OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation',
                  HINT = 'Use pgoutbox''s API (or set operations.transition in the same UPDATE).';
    END IF;
    NEW.audit_seq := OLD.audit_seq + 1;
    NEW.audit_hash := {hash_of_change};
    NEW.updated_at := at;
    NEW.audit_from_state := OLD.state;
    NEW.audit_trigger := NEW.transition;
    NEW.audit_actor := actor;
    NEW.audit_detail := NEW.transition_detail;
    NEW.audit_prev_hash := OLD.audit_hash;
    NEW.transition := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;

-- An UPDATE that makes no transition leaves no staged entry behind, so the statement trigger
-- finds staged entries on exactly the rows that changed state in its own statement. Nor does
-- it leave an actor or detail that names no transition: the next transition would have been
-- audited under them. "a_": a row trigger's WHEN sees the NEW that earlier triggers returned,
-- and the audit trigger clears NEW.transition, so this one must run first.
CREATE FUNCTION {s}.operations_settled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.audit_from_state := NULL;
    NEW.audit_trigger := NULL;
    NEW.audit_actor := NULL;
    NEW.audit_detail := NULL;
    NEW.audit_prev_hash := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER a_operations_settled BEFORE UPDATE ON {s}.operations
    FOR EACH ROW WHEN (NOT (OLD.state IS DISTINCT FROM NEW.state OR NEW.transition IS NOT NULL)
                       AND (OLD.audit_trigger IS NOT NULL OR NEW.transition_actor IS NOT NULL
                            OR NEW.transition_detail IS NOT NULL))
    EXECUTE FUNCTION {s}.operations_settled();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_settled;

-- Once per statement, with the owner's rights: one query checks every transition the statement
-- made, one INSERT appends their audit rows. Raising here aborts the statement, so a refused
-- transition still writes nothing.
CREATE FUNCTION {s}.operations_after_update() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    refused record;
BEGIN
    SELECT c.id, c.operation_type, c.lifecycle, c.audit_from_state AS from_state,
           c.state AS to_state, c.audit_trigger AS trigger
    INTO refused
    FROM changed c
    WHERE c.audit_trigger IS NOT NULL
      AND CASE WHEN c.audit_trigger = 'reject'
               -- An audit-only event: a late result from a worker that lost its lease.
               THEN c.state IS DISTINCT FROM c.audit_from_state
               ELSE NOT EXISTS (
                   SELECT 1 FROM {s}.lifecycle_transitions t
                   WHERE t.lifecycle = c.lifecycle AND t.from_state = c.audit_from_state
                     AND t.trigger = c.audit_trigger AND t.to_state = c.state)
          END
    ORDER BY c.id
    LIMIT 1;
    IF FOUND THEN
        IF refused.trigger = 'reject' THEN
            RAISE EXCEPTION 'pgoutbox: "reject" records a refused result and cannot change state'
                USING ERRCODE = 'check_violation';
        END IF;
        RAISE EXCEPTION 'pgoutbox: operation % (%): transition "%" from % to % is not allowed by lifecycle "%"',
            refused.id, refused.operation_type, refused.trigger, refused.from_state,
            refused.to_state, refused.lifecycle
            USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash)
    SELECT c.id, c.audit_seq, c.operation_type, c.audit_from_state, c.state, c.audit_trigger,
           c.attempts, c.audit_actor, c.audit_detail, c.updated_at, c.audit_prev_hash,
           c.audit_hash
    FROM changed c
    WHERE c.audit_trigger IS NOT NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER b_operations_after_update AFTER UPDATE ON {s}.operations
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.operations_after_update();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_after_update;

-- Creation: the rows an INSERT created (not those ON CONFLICT skipped), in one INSERT.
CREATE OR REPLACE FUNCTION {s}.operations_after_insert() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash)
    SELECT c.id, 1, c.operation_type, NULL, 'pending', 'publish', 0, c.created_by, NULL,
           c.created_at, NULL, c.audit_hash
    FROM created c;
    RETURN NULL;
END $$;
DROP TRIGGER b_operations_after_insert ON {s}.operations;
CREATE TRIGGER b_operations_after_insert AFTER INSERT ON {s}.operations
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.operations_after_insert();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_after_insert;

-- The other trigger functions that compare or compute (creation's hash and clock, the
-- immutability and deletion checks) get a fixed search_path too: until now a role allowed to
-- insert, update or delete could have put its own "=" or clock_timestamp() ahead of
-- pg_catalog's. (Their WHEN clauses were always safe: they are resolved at CREATE TRIGGER.)
ALTER FUNCTION {s}.operations_before_insert() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION {s}.operations_before_delete() SET search_path = pg_catalog, pg_temp;

-- The staged entry is the audit trigger's to write, like the rest of the audit head.
CREATE OR REPLACE FUNCTION {s}.operations_immutable() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
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
       OR (NEW.audit_from_state, NEW.audit_trigger, NEW.audit_actor, NEW.audit_detail,
           NEW.audit_prev_hash)
          IS DISTINCT FROM (OLD.audit_from_state, OLD.audit_trigger, OLD.audit_actor,
                            OLD.audit_detail, OLD.audit_prev_hash)
    THEN
        RAISE EXCEPTION 'pgoutbox: operation % is recorded intent: its type, channel, lifecycle, payload, idempotency key, ordering key, creation and audit head cannot be changed',
            OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER a_operations_immutable ON {s}.operations;
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, ordering_key, created_at, created_by, audit_seq, audit_hash,
    audit_from_state, audit_trigger, audit_actor, audit_detail, audit_prev_hash
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;
"""

# Back to 0006: 0001's row triggers as 0004 left them, 0004's actor trigger, 0006's immutability.
DOWNGRADE = """
ALTER FUNCTION {s}.operations_before_insert() RESET search_path;
ALTER FUNCTION {s}.operations_before_delete() RESET search_path;
DROP TRIGGER b_operations_after_update ON {s}.operations;
DROP FUNCTION {s}.operations_after_update();
DROP TRIGGER a_operations_settled ON {s}.operations;
DROP FUNCTION {s}.operations_settled();

CREATE OR REPLACE FUNCTION {s}.operations_after_insert() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash)
    VALUES (NEW.id, 1, NEW.operation_type, NULL, 'pending', 'publish', 0, NEW.created_by, NULL,
            NEW.created_at, NULL, NEW.audit_hash);
    RETURN NULL;
END $$;
DROP TRIGGER b_operations_after_insert ON {s}.operations;
CREATE TRIGGER b_operations_after_insert AFTER INSERT ON {s}.operations
    FOR EACH ROW EXECUTE FUNCTION {s}.operations_after_insert();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_after_insert;

CREATE OR REPLACE FUNCTION {s}.operations_before_update() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    at timestamptz := clock_timestamp();
    next_seq integer := OLD.audit_seq + 1;
    actor text := coalesce(NEW.transition_actor, current_user);
BEGIN
    IF NEW.transition IS NULL THEN
        RAISE EXCEPTION 'pgoutbox: operation % cannot change state from % to % without a named transition',
            OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation',
                  HINT = 'Use pgoutbox''s API (or set operations.transition in the same UPDATE).';
    END IF;
    IF NEW.transition = 'reject' THEN
        IF NEW.state IS DISTINCT FROM OLD.state THEN
            RAISE EXCEPTION 'pgoutbox: "reject" records a refused result and cannot change state'
                USING ERRCODE = 'check_violation';
        END IF;
    ELSIF NOT EXISTS (
        SELECT 1 FROM {s}.lifecycle_transitions t
        WHERE t.lifecycle = NEW.lifecycle AND t.from_state = OLD.state
          AND t.trigger = NEW.transition AND t.to_state = NEW.state
    ) THEN
        RAISE EXCEPTION 'pgoutbox: operation % (%): transition "%" from % to % is not allowed by lifecycle "%"',
            OLD.id, OLD.operation_type, NEW.transition, OLD.state, NEW.state, NEW.lifecycle
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.audit_seq := next_seq;
    NEW.audit_hash := {hash_of_change_0001};
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash)
    VALUES (OLD.id, next_seq, OLD.operation_type, OLD.state, NEW.state, NEW.transition,
            NEW.attempts, actor, NEW.transition_detail, at, OLD.audit_hash, NEW.audit_hash);
    NEW.updated_at := at;
    NEW.transition := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;

CREATE FUNCTION {s}.operations_transition_actor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.transition_actor := coalesce(NEW.transition_actor, current_user);
    RETURN NEW;
END $$;
CREATE TRIGGER b_operations_actor BEFORE UPDATE ON {s}.operations
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR NEW.transition IS NOT NULL)
    EXECUTE FUNCTION {s}.operations_transition_actor();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_actor;

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

ALTER TABLE {s}.operations
    DROP COLUMN audit_from_state,
    DROP COLUMN audit_trigger,
    DROP COLUMN audit_actor,
    DROP COLUMN audit_detail,
    DROP COLUMN audit_prev_hash;
"""


def upgrade() -> None:
    s = schema_for_migration()
    script = UPGRADE.replace("{hash_of_change}", _HASH_OF_CHANGE)
    execute_script(script.replace("{s}", s))
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    script = DOWNGRADE.replace("{hash_of_change_0001}", _INITIAL["HASHES"]["{hash_of_change}"])
    execute_script(script.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
