# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""The audit row trigger names every function, operator and type by its schema instead of
pinning its search_path.

Revision ID: 0009_qualified_row_trigger
Revises: 0008_keyed_idempotency_index
Create Date: 2026-11-27

``operations_before_update`` runs for every transition of every operation. Its ``SET
search_path = pg_catalog, pg_temp`` (0007) kept a caller's own functions and operators out of
the chain hash, but a function with a SET clause makes PostgreSQL save, set and restore the
setting on every call: about 1 µs per row, 3 µs of about 40 per claimed and recorded operation.
The same protection now comes from the text of the function itself: every function
(``pg_catalog.sha256``, ``pg_catalog.length``, ``pg_catalog.convert_to``,
``pg_catalog.clock_timestamp``), operator (``OPERATOR(pg_catalog.||)``, ``OPERATOR(pg_catalog.+)``,
``OPERATOR(pg_catalog.*)``) and type (``pg_catalog.text``, ``pg_catalog.bytea``,
``pg_catalog.int8``, ``pg_catalog.timestamptz``) is written with its schema, and what is left
unqualified is syntax, not a name looked up: ``coalesce``, ``current_user``, ``IS NULL``,
``EXTRACT`` (which the parser turns into ``pg_catalog.extract``), ``:=`` (whose casts are looked
up by type, not by name). The encoding and the hashes are unchanged. A caller whose own schema
comes before pg_catalog in its search_path, holding its own ``||``, ``length``, ``sha256``,
``convert_to``, ``clock_timestamp`` and ``text``, still gets the same hash
(tests/faults/test_least_privilege.py).

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = "0009_qualified_row_trigger"
down_revision = "0008_keyed_idempotency_index"
branch_labels = None
depends_on = None


def _field(value: str) -> str:
    """One field of the chain's encoding, ``<length>:<value>|`` or ``~|`` for NULL (see
    0001's hash_expression), every name qualified."""
    cat = "OPERATOR(pg_catalog.||)"
    return f"coalesce(pg_catalog.length({value}) {cat} ':' {cat} {value} {cat} '|', '~|')"


_CAT = "\n            OPERATOR(pg_catalog.||) "
_HASH_OF_CHANGE = (
    "pg_catalog.sha256(coalesce(OLD.audit_hash, '\\x'::pg_catalog.bytea) OPERATOR(pg_catalog.||) "
    "pg_catalog.convert_to(\n            "
    + _CAT.join(
        [
            _field("OLD.id::pg_catalog.text"),
            _field("NEW.audit_seq::pg_catalog.text"),
            _field("OLD.operation_type"),
            _field("OLD.state"),
            _field("NEW.state"),
            _field("NEW.transition"),
            _field("NEW.attempts::pg_catalog.text"),
            _field("actor"),
            _field("NEW.transition_detail"),
            "(EXTRACT(epoch FROM at) OPERATOR(pg_catalog.*) 1000000)"
            "::pg_catalog.int8::pg_catalog.text OPERATOR(pg_catalog.||) '|'",
        ]
    )
    + ", 'UTF8'))"
)

UPGRADE = """
CREATE OR REPLACE FUNCTION {s}.operations_before_update() RETURNS trigger LANGUAGE plpgsql
    SECURITY INVOKER AS $$
DECLARE
    at pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    actor pg_catalog.text := coalesce(NEW.transition_actor, current_user);
BEGIN
    IF NEW.transition IS NULL THEN
        RAISE EXCEPTION 'pgoutbox: operation % cannot change state from % to % without a named transition',
            OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation',
                  HINT = 'Use pgoutbox''s API (or set operations.transition in the same UPDATE).';
    END IF;
    NEW.audit_seq := OLD.audit_seq OPERATOR(pg_catalog.+) 1;
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
ALTER FUNCTION {s}.operations_before_update() RESET search_path;
"""

# 0007's function comes back with its pinned search_path: the body above computes the same.
DOWNGRADE = """
ALTER FUNCTION {s}.operations_before_update() SET search_path = pg_catalog, pg_temp;
"""


def upgrade() -> None:
    s = schema_for_migration()
    execute_script(UPGRADE.replace("{hash_of_change}", _HASH_OF_CHANGE).replace("{s}", s))
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    execute_script(DOWNGRADE.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
