# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""Operations, the audit log the database enforces, and the default lifecycle.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-26

This file is history: it states the schema as it was created and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0001_initial"
down_revision = None
branch_labels = ("pgoutbox",)
depends_on = None

# The default lifecycle as compiled at this revision: (from_state, trigger, to_state).
# tests/migrations checks it still equals pgoutbox.lifecycle.DEFAULT_LIFECYCLE.
DEFAULT_TRANSITIONS = [
    ("pending", "claim", "claimed"),
    ("failed", "claim", "claimed"),
    ("claimed", "succeed", "succeeded"),
    ("claimed", "fail", "failed"),
    ("claimed", "give_up", "dead"),
    ("claimed", "lose", "failed"),
    ("claimed", "lose", "dead"),
    ("claimed", "release", "pending"),
    ("pending", "cancel", "cancelled"),
    ("failed", "cancel", "cancelled"),
    ("dead", "replay", "pending"),
    ("cancelled", "replay", "pending"),
]

UPGRADE = r"""
CREATE SCHEMA IF NOT EXISTS {s};

-- The revision this schema is at, kept by every revision's upgrade and downgrade. Alembic's own
-- version table is the host's when pgoutbox runs inside a host project's history; this row is
-- where workers and `pgoutbox db check` look in both cases.
CREATE TABLE {s}.schema_revision (
    revision  text NOT NULL,
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton)
);
INSERT INTO {s}.schema_revision (revision) VALUES ('0001_initial');

CREATE TABLE {s}.lifecycle_transitions (
    lifecycle   text NOT NULL,
    from_state  text NOT NULL,
    trigger     text NOT NULL,
    to_state    text NOT NULL,
    PRIMARY KEY (lifecycle, from_state, trigger, to_state)
);
COMMENT ON TABLE {s}.lifecycle_transitions IS
    'Allowed state changes per lifecycle; the audit trigger refuses any other.';

CREATE TABLE {s}.operations (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation_type     text NOT NULL,
    channel            text NOT NULL,
    lifecycle          text NOT NULL DEFAULT 'default',
    payload            jsonb NOT NULL,
    state              text NOT NULL DEFAULT 'pending',
    attempts           integer NOT NULL DEFAULT 0,
    max_attempts       integer CHECK (max_attempts >= 1),
    priority           integer NOT NULL DEFAULT 0,
    run_at             timestamptz NOT NULL DEFAULT now(),
    idempotency_key    text UNIQUE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    created_by         text NOT NULL DEFAULT current_user,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_error         text,
    lease_owner        text,
    lease_expires_at   timestamptz,
    version            bigint NOT NULL DEFAULT 0,
    audit_seq          integer NOT NULL DEFAULT 0,
    audit_hash         bytea,
    transition         text,
    transition_actor   text,
    transition_detail  text
);
COMMENT ON COLUMN {s}.operations.version IS
    'Fencing token: bumped by every transition; a worker records only against the version it claimed.';
COMMENT ON COLUMN {s}.operations.audit_seq IS 'seq of the newest audit_log row of this operation.';
COMMENT ON COLUMN {s}.operations.audit_hash IS 'hash of the newest audit_log row: anchors the chain.';
COMMENT ON COLUMN {s}.operations.transition IS
    'Write-only: the trigger name of the state change in this UPDATE; consumed by the audit '
    'trigger and always NULL at rest.';

-- Claiming scans only claimable rows in claim order, so finished history costs nothing.
CREATE INDEX operations_claimable ON {s}.operations (channel, priority DESC, run_at, id)
    WHERE state IN ('pending', 'failed');
-- The rescuer looks for expired leases among claimed rows only.
CREATE INDEX operations_claimed_lease ON {s}.operations (lease_expires_at)
    WHERE state = 'claimed';

CREATE TABLE {s}.audit_log (
    operation_id    bigint NOT NULL,
    seq             integer NOT NULL,
    operation_type  text NOT NULL,
    from_state      text,
    to_state        text NOT NULL,
    trigger         text NOT NULL,
    attempt         integer NOT NULL,
    actor           text NOT NULL,
    detail          text,
    recorded_at     timestamptz NOT NULL,
    prev_hash       bytea,
    hash            bytea NOT NULL,
    PRIMARY KEY (operation_id, seq)
);
CREATE INDEX audit_log_recorded_at ON {s}.audit_log (recorded_at);
COMMENT ON TABLE {s}.audit_log IS
    'Append-only: one row per state change, written by trigger, sha256-chained per operation.';

CREATE TABLE {s}.workers (
    id            text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    channel       text NOT NULL,
    operation_types text[] NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- The canonical encoding hashed into the chain: see hash_expression() below. pgoutbox.audit
-- re-implements it in Python so verification does not trust the database's own function.
CREATE FUNCTION {s}.audit_hash(
    prev_hash bytea, operation_id bigint, seq integer, operation_type text, from_state text,
    to_state text, trigger text, attempt integer, actor text, detail text, recorded_at timestamptz
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT {hash_of_arguments}
$$;

-- Creation: seq 1 of the chain. The hash is computed BEFORE the insert (so it is stored on the
-- row) but the audit row is written AFTER it: with ON CONFLICT DO NOTHING (idempotent publish) a
-- BEFORE trigger fires even for a row that is then not inserted, and would leave an orphan.
CREATE FUNCTION {s}.operations_before_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> 'pending' THEN
        RAISE EXCEPTION 'pgoutbox: a new operation starts in state pending, not %', NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.created_at := clock_timestamp();
    NEW.updated_at := NEW.created_at;
    NEW.audit_seq := 1;
    NEW.audit_hash := {hash_of_new_row};
    NEW.transition := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;

CREATE FUNCTION {s}.operations_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash)
    VALUES (NEW.id, 1, NEW.operation_type, NULL, 'pending', 'publish', 0, NEW.created_by, NULL,
            NEW.created_at, NULL, NEW.audit_hash);
    RETURN NULL;
END $$;

-- Every state change: checked against the lifecycle, appended to the chain, and the write-only
-- transition columns cleared. A BEFORE trigger sees the row version it will replace after any
-- concurrent update has committed (the row is locked first), so two writers cannot fork a chain.
CREATE FUNCTION {s}.operations_before_update() RETURNS trigger LANGUAGE plpgsql AS $$
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
        -- An audit-only event: a late result from a worker that lost its lease.
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
    NEW.audit_hash := {hash_of_change};
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

CREATE FUNCTION {s}.operations_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE FUNCTION {s}.operations_before_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state NOT IN ('succeeded', 'cancelled', 'dead') THEN
        RAISE EXCEPTION 'pgoutbox: operation % is %, not finished; only finished operations can be deleted',
            OLD.id, OLD.state USING ERRCODE = 'check_violation';
    END IF;
    RETURN OLD;
END $$;

CREATE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: %.% is append-only; % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

-- Trigger names sort in firing order: "a_" (immutability) runs before "b_" (audit).
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, created_at, created_by, audit_seq, audit_hash
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
CREATE TRIGGER b_operations_before_insert BEFORE INSERT ON {s}.operations
    FOR EACH ROW EXECUTE FUNCTION {s}.operations_before_insert();
CREATE TRIGGER b_operations_after_insert AFTER INSERT ON {s}.operations
    FOR EACH ROW EXECUTE FUNCTION {s}.operations_after_insert();
-- The WHEN clause keeps lease heartbeats (no state change, no transition) out of plpgsql.
CREATE TRIGGER b_operations_before_update BEFORE UPDATE ON {s}.operations
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR NEW.transition IS NOT NULL)
    EXECUTE FUNCTION {s}.operations_before_update();
CREATE TRIGGER c_operations_before_delete BEFORE DELETE ON {s}.operations
    FOR EACH ROW EXECUTE FUNCTION {s}.operations_before_delete();
CREATE TRIGGER c_operations_no_truncate BEFORE TRUNCATE ON {s}.operations
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON {s}.audit_log
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON {s}.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();

-- ALWAYS: the triggers fire even under session_replication_role = replica, so that setting is
-- no way around the audit.
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_before_insert;
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_after_insert;
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER b_operations_before_update;
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER c_operations_before_delete;
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER c_operations_no_truncate;
ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;
ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
REVOKE UPDATE, DELETE, TRUNCATE ON {s}.audit_log FROM PUBLIC;
"""

DOWNGRADE = """
DROP TABLE {s}.workers;
DROP TABLE {s}.audit_log;
DROP TABLE {s}.operations;
DROP TABLE {s}.lifecycle_transitions;
DROP TABLE {s}.schema_revision;
DROP FUNCTION {s}.refuse_change();
DROP FUNCTION {s}.operations_before_delete();
DROP FUNCTION {s}.operations_immutable();
DROP FUNCTION {s}.operations_before_update();
DROP FUNCTION {s}.operations_after_insert();
DROP FUNCTION {s}.operations_before_insert();
DROP FUNCTION {s}.audit_hash(bytea, bigint, integer, text, text, text, text, integer, text, text,
                             timestamptz);
"""


def hash_expression(prev_hash: str, *fields: str, recorded_at: str) -> str:
    """SQL computing an audit row's hash from SQL expressions for its fields.

    The encoding: every field as ``<length>:<value>|`` (NULL as ``~|``), in the order
    operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, detail,
    then ``recorded_at`` as integer microseconds since the Unix epoch and ``|``; all UTF-8,
    hashed with sha256 after the previous row's hash. The triggers inline the expression:
    PL/pgSQL calling a SQL function costs more than the hash itself.
    """
    parts = [f"coalesce(length({f}) || ':' || {f} || '|', '~|')" for f in fields]
    parts.append(f"(extract(epoch FROM {recorded_at}) * 1000000)::bigint::text || '|'")
    encoding = "\n            || ".join(parts)
    return f"sha256(coalesce({prev_hash}, '\\x'::bytea) || convert_to(\n            {encoding}, 'UTF8'))"


HASHES = {
    "{hash_of_arguments}": hash_expression(
        "prev_hash",
        "operation_id::text",
        "seq::text",
        "operation_type",
        "from_state",
        "to_state",
        "trigger",
        "attempt::text",
        "actor",
        "detail",
        recorded_at="recorded_at",
    ),
    "{hash_of_new_row}": hash_expression(
        "NULL::bytea",
        "NEW.id::text",
        "'1'",
        "NEW.operation_type",
        "NULL",
        "'pending'",
        "'publish'",
        "'0'",
        "NEW.created_by",
        "NULL",
        recorded_at="NEW.created_at",
    ),
    "{hash_of_change}": hash_expression(
        "OLD.audit_hash",
        "OLD.id::text",
        "next_seq::text",
        "OLD.operation_type",
        "OLD.state",
        "NEW.state",
        "NEW.transition",
        "NEW.attempts::text",
        "actor",
        "NEW.transition_detail",
        recorded_at="at",
    ),
}


def upgrade() -> None:
    s = schema_for_migration()
    script = UPGRADE
    for placeholder, expression in HASHES.items():
        script = script.replace(placeholder, expression)
    execute_script(script.replace("{s}", s))
    values = ", ".join(f"('default', '{f}', '{t}', '{to}')" for f, t, to in DEFAULT_TRANSITIONS)
    op.execute(f"INSERT INTO {s}.lifecycle_transitions VALUES {values}")


def downgrade() -> None:
    execute_script(DOWNGRADE.replace("{s}", schema_for_migration()))
