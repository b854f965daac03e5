"""Anchored audit: seq 1 records a hash of the intent; the database keeps copies of checkpoints.

Revision ID: 0013_anchored_audit
Revises: 0012_running_controls
Create Date: 2026-12-03

``pgoutbox audit checkpoint`` (and a worker's checkpoint service) signs a Merkle root over every
operation's audit chain head as one snapshot saw them, and writes the signed document to a file
the user keeps where the database's owner cannot write (docs/audit.md). A copy of each document
is recorded here, for convenience only (listing checkpoints, finding the latest): the owner can
rewrite this table like any other, so nothing trusts it; verification trusts the file and the
public key alone.

Seq 1 of every chain now carries ``intent_hash``: the sha256 of the operation's recorded intent
(type, channel, lifecycle, payload as the database prints the ``jsonb``, idempotency key,
creator, creation time; encoded as ``pgoutbox_proof.intent_hash`` does), computed by the insert
trigger and covered by the row's hash (appended to its encoding after ``db_role``, so rows
written before this revision hash as they did). An operation row whose payload or idempotency
key was changed behind the triggers' back no longer matches its own publication, with or
without a checkpoint.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration, split_statements

revision = "0013_anchored_audit"
down_revision = "0012_running_controls"
branch_labels = None
depends_on = None

_HERE = Path(__file__).parent
_0010 = runpy.run_path(str(_HERE / "0010_roles_enforced.py"))
_0012 = runpy.run_path(str(_HERE / "0012_running_controls.py"))


def _field(expression: str) -> str:
    """The encoding's ``<length>:<value>|`` (NULL ``~|``) of a SQL text expression."""
    return f"coalesce(length({expression}) || ':' || {expression} || '|', '~|')"


def intent_expression(row: str) -> str:
    """SQL for the sha256 of ``row``'s recorded intent (``row`` is ``NEW`` or an alias)."""
    fields = [
        f"{row}.operation_type",
        f"{row}.channel",
        f"{row}.lifecycle",
        f"CAST({row}.payload AS text)",
        f"{row}.idempotency_key",
        f"{row}.created_by",
    ]
    encoding = "\n            || ".join(
        ["'pgoutbox intent v1|'"]
        + [_field(f) for f in fields]
        + [f"(extract(epoch FROM {row}.created_at) * 1000000)::bigint::text || '|'"]
    )
    return f"sha256(convert_to(\n            {encoding}, 'UTF8'))"


def _statement_of_0010(function: str) -> str:
    return next(
        s for s in split_statements(_0010["UPGRADE"]) if f"FUNCTION {{s}}.{function}()" in s
    )


def _insert_trigger() -> str:
    """0012's insert check, computing the intent's hash and covering it by seq 1's hash."""
    statement: str = _0012["_insert_trigger"]()
    declare = "DECLARE\n    bad text;\n"
    assign = "    NEW.audit_hash := "
    end_of_hash = ", 'UTF8'));\n    RETURN NEW;"
    for part in (declare, assign, end_of_hash):
        assert statement.count(part) == 1, part
    return (
        statement.replace(declare, declare + "    intent bytea;\n")
        .replace(assign, f"    intent := {intent_expression('NEW')};\n" + assign)
        .replace(
            end_of_hash, "\n            || '64:' || encode(intent, 'hex') || '|'" + end_of_hash
        )
    )


def _after_insert() -> str:
    """0010's creation row, with its intent hash."""
    statement = _statement_of_0010("operations_after_insert")
    columns = "recorded_at, prev_hash, hash, db_role)"
    values = "c.created_at, NULL, c.audit_hash, c.created_by\n"
    for part in (columns, values):
        assert statement.count(part) == 1, part
    return statement.replace(
        columns,
        "recorded_at, prev_hash, hash, db_role,\n                               intent_hash)",
    ).replace(
        values,
        f"c.created_at, NULL, c.audit_hash, c.created_by,\n           {intent_expression('c')}\n",
    )


UPGRADE = """
ALTER TABLE {s}.audit_log ADD COLUMN IF NOT EXISTS intent_hash bytea;
COMMENT ON COLUMN {s}.audit_log.intent_hash IS
    'seq 1 (from revision 0013): sha256 of the operation''s recorded intent; covered by the '
    'row''s hash.';

{insert_trigger};

{after_insert};

CREATE TABLE {s}.audit_checkpoints (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    taken_at     timestamptz NOT NULL,
    size         bigint NOT NULL CHECK (size >= 0),
    covered_rows bigint NOT NULL CHECK (covered_rows >= 0),
    root         bytea NOT NULL,
    key_id       text NOT NULL,
    document     jsonb NOT NULL,
    recorded_by  text NOT NULL DEFAULT current_user,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_checkpoints_taken_at ON {s}.audit_checkpoints (taken_at);
COMMENT ON TABLE {s}.audit_checkpoints IS
    'Copies of the signed audit checkpoints, for convenience: never the source of '
    'trust (the signed files are).';
"""

DOWNGRADE = """
DROP TABLE {s}.audit_checkpoints;
{insert_trigger_of_0012};
{after_insert_of_0010};
-- Rows written at this revision hash their intent_hash: it stays with them (an upgrade finds it
-- there again). Only a column no row uses is dropped.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.audit_log WHERE intent_hash IS NOT NULL) THEN
        ALTER TABLE {s}.audit_log DROP COLUMN intent_hash;
    END IF;
END $$;
"""


def upgrade() -> None:
    s = schema_for_migration()
    script = UPGRADE.replace("{insert_trigger}", _insert_trigger()).replace(
        "{after_insert}", _after_insert()
    )
    execute_script(script.replace("{s}", s))
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    script = DOWNGRADE.replace("{insert_trigger_of_0012}", _0012["_insert_trigger"]()).replace(
        "{after_insert_of_0010}", _statement_of_0010("operations_after_insert")
    )
    execute_script(script.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
