# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""The database enforces the worker protocol and records which database role acted.

Revision ID: 0010_roles_enforced
Revises: 0009_qualified_row_trigger
Create Date: 2026-12-03

Until now the triggers checked that a state change was named and allowed by the lifecycle, and
pgoutbox's own SQL did the rest (a lease fence in a WHERE clause). A role with raw SQL and only
its own grants could still make the log say false things. Now the database checks the protocol
itself, whatever the statement:

- **Who acted is authenticated.** Every audit row records ``db_role``, the database role that
  made the change (``current_user``), and the hash covers it (appended to the encoding when
  present, so rows written before this revision verify as they were). The declared ``actor``
  stays free text.
- **Roles have kinds.** ``role_grants`` (written by ``pgoutbox db grant``, readable by all)
  says which roles act as publisher, worker, operator or auditor. Worker transitions (claim,
  step results, release, lose, reject, a parking state's due timeout) need the worker kind;
  operator transitions (retry, cancel, replay, firing a parking trigger) the operator kind; the
  owner of ``operations`` may do both. Checked once per statement by the audit statement
  trigger, from each row's staged ``audit_db_role`` and ``audit_kind``.
- **Workers are authenticated by a key.** A worker process holds a random key and sends it as
  the setting ``pgoutbox.worker_key`` when it connects; its id ends with the first 16 hex digits
  of the key's sha256. A claim stores the key's hash on the lease (``lease_key_hash``); only a
  session holding that key records the lease's outcome, releases or extends it. A worker
  transition's actor must carry the session's key in its id: no role can attribute a claim,
  a rescue or a rejection to a worker whose key it does not hold. The owner is exempt (it can
  switch triggers off anyway; ``audit verify`` against a checkpoint is what catches it).
- **The protocol's arithmetic is checked per row:** a claim adds exactly one to ``attempts``,
  ``step_attempts`` and ``version`` and sets a lease of at most a day in database time, leaving
  the schedule, limits and last error alone; a step's result needs the unexpired lease and ends
  it; ``release`` needs the lease, ``lose`` an expired one (or the lease: on_lost=dead); each
  of these bumps ``version`` by one; ``reject`` changes nothing but the audit head; operator
  transitions and fired triggers leave attempts and leases alone and ``version`` as it was or
  one up. Without a transition, only the
  lease holder may extend its lease (heartbeat), and nothing else may change.
- **Inserts start at the beginning:** ``created_by`` is the inserting role; ``attempts``,
  ``step_attempts``, ``version``, ``last_error``, the lease, transition and staged audit columns
  must be at their defaults (refused, naming the column). An explicit ``id`` is refused by the
  publisher's column privileges (``pgoutbox db grant``).
- ``updated_at``, ``trace_context`` and ``created_by`` cannot be set by an UPDATE.

The row trigger runs for every transition and has no fixed search_path (0009 says why): every
function, operator and type in it is written with its schema, and no construct that looks up
``=`` by search_path (``IS DISTINCT FROM``, ``IN``, ``CASE x WHEN``) is used in it.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration, split_statements

revision = "0010_roles_enforced"
down_revision = "0009_qualified_row_trigger"
branch_labels = None
depends_on = None

_0009 = runpy.run_path(str(Path(__file__).with_name("0009_qualified_row_trigger.py")))
_field = _0009["_field"]
_CAT = "OPERATOR(pg_catalog.||)"
# 0009's encoding of a change, with the acting role appended.
_HASH_OF_CHANGE = _0009["_HASH_OF_CHANGE"].replace(
    ", 'UTF8'))",
    f"\n            {_CAT} " + _field("role") + ", 'UTF8'))",
)
assert _HASH_OF_CHANGE.count(_field("role")) == 1


def _eq(a: str, b: str) -> str:
    """``a = b`` with pg_catalog's operator. Parenthesised: OPERATOR(...) has the precedence of
    any other operator, not that of ``=``."""
    return f"({a}) OPERATOR(pg_catalog.=) ({b})"


def _same(a: str, b: str) -> str:
    """``a IS NOT DISTINCT FROM b`` without looking ``=`` up by search_path."""
    return f"(({a} IS NULL AND {b} IS NULL) OR coalesce({_eq(a, b)}, false))"


def _plus_one(column: str) -> str:
    """NEW.column is OLD.column + 1."""
    return _eq(f"NEW.{column}", f"OLD.{column} OPERATOR(pg_catalog.+) 1")


def _unchanged(*columns: str) -> str:
    return " AND ".join(_same(f"NEW.{c}", f"OLD.{c}") for c in columns)


_NOW = "pg_catalog.now()"
_KEYED_ACTOR = _eq(
    "pg_catalog.right(actor, 17)",
    "':' OPERATOR(pg_catalog.||) pg_catalog.left(pg_catalog.encode(key_hash, 'hex'), 16)",
)
_TIMEOUT_TRIGGER = """(
                SELECT l.definition OPERATOR(pg_catalog.#>>)
                       ARRAY['timeouts', OLD.state, 'trigger']::pg_catalog.text[]
                FROM {s}.lifecycles l
                WHERE l.name OPERATOR(pg_catalog.=) OLD.lifecycle
                ORDER BY l.version DESC LIMIT 1)"""

# Fragments of the row trigger below, each a condition on OLD, NEW and its variables.
_CONDITIONS = {
    "is_claim": _eq("NEW.transition", "'claim'"),
    "is_reject": _eq("NEW.transition", "'reject'"),
    "is_lose": _eq("NEW.transition", "'lose'"),
    "is_protocol": "("
    + " OR ".join(_eq("NEW.transition", f"'{t}'") for t in ("claim", "reject", "release", "lose"))
    + ")",
    "is_release_or_lose": "("
    + " OR ".join(_eq("NEW.transition", f"'{t}'") for t in ("release", "lose"))
    + ")",
    "is_operator_decision": " OR ".join(
        _eq("NEW.transition", f"'{t}'") for t in ("retry", "cancel", "replay")
    ),
    "claim_counts": " AND ".join(_plus_one(c) for c in ("attempts", "step_attempts", "version")),
    "claim_lease": (
        f"{_same('NEW.lease_owner', 'actor')} AND coalesce("
        f"NEW.lease_expires_at OPERATOR(pg_catalog.>) {_NOW} AND NEW.lease_expires_at "
        f"OPERATOR(pg_catalog.<=) ({_NOW} OPERATOR(pg_catalog.+) '1 day'::pg_catalog.interval), false)"
    ),
    "claim_keeps": _unchanged("run_at", "max_attempts", "last_error", "priority"),
    "reject_keeps": _unchanged(
        "state",
        "attempts",
        "step_attempts",
        "version",
        "max_attempts",
        "last_error",
        "run_at",
        "priority",
        "lease_owner",
        "lease_expires_at",
    ),
    "holder": (
        f"(key_hash IS NOT NULL AND {_same('OLD.lease_key_hash', 'key_hash')} "
        f"AND {_same('actor', 'OLD.lease_owner')})"
    ),
    "expired": f"OLD.lease_expires_at OPERATOR(pg_catalog.<) {_NOW}",
    "ends_lease": (
        "NEW.lease_owner IS NULL AND NEW.lease_expires_at IS NULL AND " + _plus_one("version")
    ),
    "keeps_attempts": _unchanged("attempts", "step_attempts", "priority"),
    "keeps_attempts_only": _unchanged("attempts", "priority"),
    "keyed_actor": f"(key_hash IS NOT NULL AND {_KEYED_ACTOR})",
    "due_timeout": (
        f"coalesce(OLD.run_at OPERATOR(pg_catalog.<=) {_NOW} AND "
        f"{_eq('NEW.transition', _TIMEOUT_TRIGGER)}, false)"
    ),
    # pgoutbox's own decisions bump version; one that leaves it may stand (no lease is fenced by
    # it), one that moves it elsewhere may not.
    "decision_keeps": (
        f"({_plus_one('version')} OR {_unchanged('version')}) AND "
        + _unchanged("attempts", "lease_owner", "lease_expires_at")
    ),
}


def _row_trigger() -> str:
    body = ROW_TRIGGER
    for name, condition in _CONDITIONS.items():
        body = body.replace(f"<{name}>", condition)
    assert not re.search(r"<[a-z_]+>", body), body
    return body.replace("{hash_of_change}", _HASH_OF_CHANGE)


# Each check is one CASE expression, not a chain of IFs: PL/pgSQL evaluates every expression
# separately, and this function runs for every transition (revision 0009 measured what that
# costs).
ROW_TRIGGER = """
CREATE OR REPLACE FUNCTION {s}.operations_before_update() RETURNS trigger LANGUAGE plpgsql
    SECURITY INVOKER AS $$
DECLARE
    at pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    actor pg_catalog.text := coalesce(NEW.transition_actor, current_user);
    role pg_catalog.text := current_user;
    -- NULL when the session has no key (the owner's tools, an operator).
    key_hash pg_catalog.bytea := pg_catalog.sha256(pg_catalog.convert_to(
        pg_catalog.current_setting('pgoutbox.worker_key', true), 'UTF8'));
    kind pg_catalog.text;
    bad pg_catalog.text;
BEGIN
    IF NEW.transition IS NULL THEN
        RAISE EXCEPTION 'pgoutbox: operation % cannot change state from % to % without a named transition',
            OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation',
                  HINT = 'Use pgoutbox''s API (or set operations.transition in the same UPDATE).';
    END IF;
    -- Whose transition this is: a worker's (the protocol's own, a step's result, a parking
    -- state's timeout fired by a keyed worker) or an operator's (a decision, a fired trigger).
    kind := CASE
        WHEN <is_operator_decision> THEN 'operator'
        WHEN <is_protocol> OR OLD.lease_owner IS NOT NULL OR <keyed_actor> THEN 'worker'
        ELSE 'operator' END;
    bad := CASE
        WHEN <is_claim> THEN CASE
            WHEN OLD.lease_owner IS NOT NULL THEN 'it is leased to ' OPERATOR(pg_catalog.||) OLD.lease_owner
            WHEN NOT (<claim_counts>) THEN 'a claim adds exactly one to attempts, step_attempts and version'
            WHEN NOT (<claim_lease>) THEN 'a claim leases to the claiming worker (transition_actor) until a time after now() and at most a day away'
            WHEN NOT (<claim_keeps>) THEN 'a claim leaves run_at, max_attempts, last_error and priority as they are'
            END
        WHEN <is_reject> THEN CASE
            WHEN NOT (<reject_keeps>) THEN 'a reject records a refused result and changes nothing else'
            END
        WHEN <is_release_or_lose> THEN CASE
            WHEN OLD.lease_owner IS NULL THEN 'it is not leased'
            WHEN NOT (<holder> OR (<is_lose> AND <expired>)) THEN
                'only the lease holder releases a lease, and a lease is lost only once it has expired (at '
                OPERATOR(pg_catalog.||) OLD.lease_expires_at::pg_catalog.text OPERATOR(pg_catalog.||) ')'
            WHEN NOT (<ends_lease> AND <keeps_attempts>) THEN
                'a release or loss ends the lease, adds one to version and leaves attempts alone'
            END
        WHEN OLD.lease_owner IS NOT NULL THEN CASE  -- a step's result
            WHEN NOT <holder> THEN 'only the worker holding its lease (' OPERATOR(pg_catalog.||)
                OLD.lease_owner OPERATOR(pg_catalog.||) ', with its key) records its result'
            WHEN <expired> THEN
                'its lease expired at ' OPERATOR(pg_catalog.||) OLD.lease_expires_at::pg_catalog.text
            WHEN NOT (<ends_lease> AND <keeps_attempts_only>) THEN
                'a result ends the lease, adds one to version and leaves attempts alone'
            END
        WHEN NOT (<decision_keeps>) THEN
            'this transition adds at most one to version and leaves attempts and the lease alone'
        END;
    -- An expression that reads a table (the timeout's lifecycle, the table's owner) is run by
    -- the full executor, some ten times the cost of the others: each stands alone in an IF
    -- reached only when it must be asked.
    IF bad IS NULL AND kind OPERATOR(pg_catalog.=) 'worker' THEN
        IF NOT <keyed_actor> THEN
            bad := 'a worker transition''s actor is the worker whose key the session holds (setting pgoutbox.worker_key); '
                OPERATOR(pg_catalog.||) pg_catalog.quote_literal(actor) OPERATOR(pg_catalog.||) ' is not';
        ELSIF OLD.lease_owner IS NULL AND NOT <is_protocol> THEN
            IF NOT <due_timeout> THEN
                bad := 'a worker moves a parked operation on only by its state''s timeout trigger, once due';
            END IF;
        END IF;
    END IF;
    IF bad IS NOT NULL THEN
        IF NOT pg_catalog.pg_has_role(
                (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) TG_RELID),
                'USAGE') THEN
            RAISE EXCEPTION 'pgoutbox: operation %: transition "%" by % refused: %', OLD.id, NEW.transition, role, bad
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;

    NEW.lease_key_hash := CASE WHEN <is_claim> THEN key_hash
                               WHEN NEW.lease_owner IS NULL THEN NULL
                               ELSE OLD.lease_key_hash END;
    NEW.audit_seq := OLD.audit_seq OPERATOR(pg_catalog.+) 1;
    NEW.audit_hash := {hash_of_change};
    NEW.updated_at := at;
    NEW.audit_from_state := OLD.state;
    NEW.audit_trigger := NEW.transition;
    NEW.audit_actor := actor;
    NEW.audit_detail := NEW.transition_detail;
    NEW.audit_prev_hash := OLD.audit_hash;
    NEW.audit_db_role := role;
    NEW.audit_kind := kind;
    NEW.transition := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;
"""

UPGRADE = """
ALTER TABLE {s}.audit_log ADD COLUMN db_role text;
COMMENT ON COLUMN {s}.audit_log.db_role IS
    'The database role that made the change (authenticated; part of the hash). NULL only on rows written before revision 0010.';
ALTER TABLE {s}.operations
    ADD COLUMN lease_key_hash bytea,
    ADD COLUMN audit_db_role text,
    ADD COLUMN audit_kind text;
COMMENT ON COLUMN {s}.operations.lease_key_hash IS
    'sha256 of the key (setting pgoutbox.worker_key) of the session that claimed the lease: only a session holding it records, releases or extends the lease.';

CREATE TABLE {s}.role_grants (
    role        text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('publisher', 'worker', 'operator', 'auditor')),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    granted_by  text NOT NULL DEFAULT current_user,
    PRIMARY KEY (role, kind)
);
COMMENT ON TABLE {s}.role_grants IS
    'Which database roles act as which kind (pgoutbox db grant); the audit trigger checks worker and operator transitions against it.';
GRANT SELECT ON {s}.role_grants TO PUBLIC;

-- Creation: created_by is the inserting role, and everything the protocol counts starts at zero.
CREATE OR REPLACE FUNCTION {s}.operations_before_insert() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text;
BEGIN
    IF NEW.state <> 'pending' THEN
        RAISE EXCEPTION 'pgoutbox: a new operation starts in state pending, not %', NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    bad := CASE
        WHEN NEW.attempts <> 0 THEN 'attempts'
        WHEN NEW.step_attempts <> 0 THEN 'step_attempts'
        WHEN NEW.version <> 0 THEN 'version'
        WHEN NEW.audit_seq <> 0 THEN 'audit_seq'
        WHEN NEW.audit_hash IS NOT NULL THEN 'audit_hash'
        WHEN NEW.last_error IS NOT NULL THEN 'last_error'
        WHEN NEW.lease_owner IS NOT NULL THEN 'lease_owner'
        WHEN NEW.lease_expires_at IS NOT NULL THEN 'lease_expires_at'
        WHEN NEW.lease_key_hash IS NOT NULL THEN 'lease_key_hash'
        WHEN NEW.transition IS NOT NULL THEN 'transition'
        WHEN NEW.transition_actor IS NOT NULL THEN 'transition_actor'
        WHEN NEW.transition_detail IS NOT NULL THEN 'transition_detail'
        WHEN num_nonnulls(NEW.audit_from_state, NEW.audit_trigger, NEW.audit_actor,
                          NEW.audit_detail, NEW.audit_prev_hash, NEW.audit_db_role,
                          NEW.audit_kind) > 0 THEN 'audit_* (staged audit entry)'
    END;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgoutbox: a new operation cannot set %: it starts at its default and changes only with audited transitions', bad
            USING ERRCODE = 'check_violation',
                  HINT = 'Leave the column out of the INSERT (pgoutbox.publish_operation does).';
    END IF;
    NEW.created_by := current_user;
    NEW.created_at := clock_timestamp();
    NEW.updated_at := NEW.created_at;
    NEW.audit_seq := 1;
    NEW.audit_hash := {hash_of_new_row};
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION {s}.operations_after_insert() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash, db_role)
    SELECT c.id, 1, c.operation_type, NULL, 'pending', 'publish', 0, c.created_by, NULL,
           c.created_at, NULL, c.audit_hash, c.created_by
    FROM created c;
    RETURN NULL;
END $$;

{row_trigger}

-- Once per statement, with the owner's rights: every transition is one its lifecycle allows,
-- and every transition's role may act as its kind; then all audit rows in one INSERT.
CREATE OR REPLACE FUNCTION {s}.operations_after_update() RETURNS trigger LANGUAGE plpgsql
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
    SELECT acted.db_role, acted.kind, acted.trigger
    INTO refused
    FROM (SELECT DISTINCT ON (c.audit_db_role, c.audit_kind) c.audit_db_role AS db_role,
                 c.audit_kind AS kind, c.audit_trigger AS trigger
          FROM changed c WHERE c.audit_trigger IS NOT NULL) acted
    WHERE NOT pg_has_role(acted.db_role, (SELECT relowner FROM pg_class WHERE oid = TG_RELID),
                          'USAGE')
      AND NOT EXISTS (
          SELECT 1 FROM {s}.role_grants g JOIN pg_roles r ON r.rolname = g.role
          WHERE g.kind = acted.kind AND pg_has_role(acted.db_role, r.oid, 'USAGE'))
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgoutbox: role % may not make % transitions ("%") in schema %',
            refused.db_role, refused.kind, refused.trigger, TG_TABLE_SCHEMA
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('The owner grants it: pgoutbox db grant --%s %s', refused.kind,
                                quote_ident(refused.db_role));
    END IF;
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash, db_role)
    SELECT c.id, c.audit_seq, c.operation_type, c.audit_from_state, c.state, c.audit_trigger,
           c.attempts, c.audit_actor, c.audit_detail, c.updated_at, c.audit_prev_hash,
           c.audit_hash, c.audit_db_role
    FROM changed c
    WHERE c.audit_trigger IS NOT NULL;
    RETURN NULL;
END $$;

-- An UPDATE without a transition leaves no staged entry (0007), now including its role and kind.
CREATE OR REPLACE FUNCTION {s}.operations_settled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.audit_from_state := NULL;
    NEW.audit_trigger := NULL;
    NEW.audit_actor := NULL;
    NEW.audit_detail := NULL;
    NEW.audit_prev_hash := NULL;
    NEW.audit_db_role := NULL;
    NEW.audit_kind := NULL;
    NEW.transition_actor := NULL;
    NEW.transition_detail := NULL;
    RETURN NEW;
END $$;

-- Without a transition the lease changes only by its holder extending it (a heartbeat), and
-- updated_at never: it is the time of the last transition, which retention purges go by.
CREATE FUNCTION {s}.operations_heartbeat() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key text := current_setting('pgoutbox.worker_key', true);
    bad text;
BEGIN
    IF NEW.updated_at IS DISTINCT FROM OLD.updated_at THEN
        bad := 'updated_at is the time of the last transition and is set by the audit trigger alone';
    ELSIF NEW.lease_owner IS DISTINCT FROM OLD.lease_owner OR OLD.lease_owner IS NULL THEN
        bad := 'a lease is taken and ended only by transitions (claim, a result, release, lose)';
    ELSIF coalesce(key, '') = ''
          OR sha256(convert_to(key, 'UTF8')) IS DISTINCT FROM OLD.lease_key_hash THEN
        bad := format('only the lease holder (%s, with its key) extends its lease', OLD.lease_owner);
    ELSIF NOT coalesce(NEW.lease_expires_at > OLD.lease_expires_at
                       AND NEW.lease_expires_at <= now() + interval '1 day', false) THEN
        bad := 'a heartbeat only extends a lease, to at most a day from now';
    END IF;
    IF bad IS NOT NULL AND NOT pg_has_role(
            (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'USAGE') THEN
        RAISE EXCEPTION 'pgoutbox: operation %: % (role %)', OLD.id, bad, current_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER a_operations_heartbeat BEFORE UPDATE OF lease_owner, lease_expires_at, updated_at
    ON {s}.operations FOR EACH ROW
    WHEN (NEW.transition IS NULL AND NOT (OLD.state IS DISTINCT FROM NEW.state)
          AND (OLD.lease_owner, OLD.lease_expires_at, OLD.updated_at)
              IS DISTINCT FROM (NEW.lease_owner, NEW.lease_expires_at, NEW.updated_at))
    EXECUTE FUNCTION {s}.operations_heartbeat();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_heartbeat;

-- The recorded intent and the audit head, now with the lease key, the staged role and kind, and
-- the publisher's trace context.
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
       OR NEW.trace_context IS DISTINCT FROM OLD.trace_context
       OR NEW.audit_seq IS DISTINCT FROM OLD.audit_seq
       OR NEW.audit_hash IS DISTINCT FROM OLD.audit_hash
       OR NEW.lease_key_hash IS DISTINCT FROM OLD.lease_key_hash
       OR (NEW.audit_from_state, NEW.audit_trigger, NEW.audit_actor, NEW.audit_detail,
           NEW.audit_prev_hash, NEW.audit_db_role, NEW.audit_kind)
          IS DISTINCT FROM (OLD.audit_from_state, OLD.audit_trigger, OLD.audit_actor,
                            OLD.audit_detail, OLD.audit_prev_hash, OLD.audit_db_role,
                            OLD.audit_kind)
    THEN
        RAISE EXCEPTION 'pgoutbox: operation % is recorded intent: its type, channel, lifecycle, payload, idempotency key, ordering key, creation, trace context, lease key and audit head cannot be changed',
            OLD.id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER a_operations_immutable ON {s}.operations;
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, ordering_key, created_at, created_by, trace_context, audit_seq,
    audit_hash, lease_key_hash, audit_from_state, audit_trigger, audit_actor, audit_detail,
    audit_prev_hash, audit_db_role, audit_kind
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;
"""

DOWNGRADE = """
DROP TRIGGER a_operations_heartbeat ON {s}.operations;
DROP FUNCTION {s}.operations_heartbeat();
DROP TRIGGER a_operations_immutable ON {s}.operations;
{functions_of_0009}
CREATE TRIGGER a_operations_immutable BEFORE UPDATE OF operation_type, channel, lifecycle,
    payload, idempotency_key, ordering_key, created_at, created_by, audit_seq, audit_hash,
    audit_from_state, audit_trigger, audit_actor, audit_detail, audit_prev_hash
    ON {s}.operations FOR EACH ROW EXECUTE FUNCTION {s}.operations_immutable();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER a_operations_immutable;
DROP TABLE {s}.role_grants;
ALTER TABLE {s}.operations
    DROP COLUMN lease_key_hash,
    DROP COLUMN audit_db_role,
    DROP COLUMN audit_kind;
ALTER TABLE {s}.audit_log DROP COLUMN db_role;
"""


def _functions_of_0009() -> str:
    """The trigger functions this revision replaces, as 0009 left them: taken from the
    revisions that wrote them (0001's insert trigger, 0007's statement triggers, settled and
    immutability checks, 0009's row trigger), each as CREATE OR REPLACE."""
    here = Path(__file__).parent
    initial = runpy.run_path(str(here / "0001_initial.py"))
    statement_audit = runpy.run_path(str(here / "0007_statement_audit.py"))
    wanted = {
        "operations_after_update",
        "operations_after_insert",
        "operations_settled",
        "operations_immutable",
    }

    def created(statement: str) -> str | None:
        found = re.search(r"CREATE (?:OR REPLACE )?FUNCTION \{s\}\.(\w+)\(\)", statement)
        return found.group(1) if found else None

    def or_replace(statement: str) -> str:
        return re.sub(r"CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", statement, count=1)

    taken = [
        or_replace(statement)
        for statement in split_statements(statement_audit["UPGRADE"])
        if created(statement) in wanted
    ]
    assert len(taken) == len(wanted), taken
    insert = next(
        or_replace(statement)
        for statement in split_statements(initial["UPGRADE"])
        if created(statement) == "operations_before_insert"
    )
    for placeholder, expression in initial["HASHES"].items():
        insert = insert.replace(placeholder, expression)
    row_trigger = _0009["UPGRADE"].replace("{hash_of_change}", _0009["_HASH_OF_CHANGE"])
    return (
        ";\n".join(
            [
                *taken,
                insert,
                "ALTER FUNCTION {s}.operations_before_insert() SET search_path = pg_catalog, pg_temp",
                row_trigger,
            ]
        )
        + ";"
    )


def _hash_of_new_row() -> str:
    """0001's hash of a creation, with the creating role (created_by) appended as db_role."""
    initial = runpy.run_path(str(Path(__file__).with_name("0001_initial.py")))
    expression: str = initial["HASHES"]["{hash_of_new_row}"]
    return expression.replace(
        ", 'UTF8'))",
        "\n            || coalesce(length(NEW.created_by) || ':' || NEW.created_by || '|', '~|'), 'UTF8'))",
    )


def upgrade() -> None:
    s = schema_for_migration()
    script = (
        UPGRADE.replace("{row_trigger}", _row_trigger())
        .replace("{hash_of_new_row}", _hash_of_new_row())
        .replace("{s}", s)
    )
    execute_script(script)
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    execute_script(DOWNGRADE.replace("{functions_of_0009}", _functions_of_0009()).replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
