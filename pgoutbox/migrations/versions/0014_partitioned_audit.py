# ruff: noqa: E501  (SQL error messages are kept on one line so they grep well)
"""The audit log is partitioned by month, and archives of old months are recorded.

Revision ID: 0014_partitioned_audit
Revises: 0013_anchored_audit
Create Date: 2026-12-03

``audit_log`` grew for ever. It is now a table partitioned by ``recorded_at`` (native range
partitioning, one partition per calendar month in UTC, ``audit_log_y2026m12``), so that
``pgoutbox audit archive --before MONTH`` can export whole months, verify the export against a
signed checkpoint, and detach and drop them (docs/audit.md). The upgrade copies the existing
rows in place into their months' partitions (8.9 s per million rows measured, docs/audit.md;
``audit_log`` is locked meanwhile); the append-only triggers are created on the partitioned
table, which gives every partition its own copy of them. The primary key becomes (operation_id, seq, recorded_at), because a partitioned
table's keys must hold its partition key; one row per (operation_id, seq) is still what the
triggers write, holding the operation's row lock, and what ``audit verify`` checks.

- ``audit_log_add_partition(month)`` creates the partition of the month holding ``month`` if
  there is none; ``audit_log_add_partitions(months_ahead)`` does so for this month and the
  next ``months_ahead`` (at most 24). Both run with the owner's rights and wait at most 2 s for
  the lock a new partition takes. The upgrade makes the partitions from the oldest row's month
  to three months ahead; each worker's maintenance makes them three months ahead every hour,
  and ``pgoutbox db upgrade`` too. ``audit_log_default`` takes any row no month exists for, so
  a transition never fails for want of a partition.
- ``audit_archives`` records each archive: the instant before which every row was archived,
  the partitions, counts, and a copy of the signed checkpoint that covers them (the signed
  file the user keeps is what is trusted). ``audit_archive_heads`` keeps, per archived
  operation, its last archived row (seq, hash, state, trigger, attempt, time) and what its publication
  recorded (type, creator, time, intent hash): the point from which ``audit verify`` checks
  the rows still in the table. Both are append-only, also for their owner's ordinary writes.

- **A deletion is recorded in the operation's own chain.** Deleting an operation (a purge, or
  any DELETE a role may make) appends a last audit row to its chain: trigger ``purge``, from
  and to its finished state, the actor and purge id the purge set (``pgoutbox.purge_actor``,
  ``pgoutbox.purge``) or the role, ``db_role`` the deleting role; hashed like every row, so
  checkpoints cover it. ``purges.chained`` says which purges were made so (true from this
  revision on): an operation gone without such a row is explained only by an older purge.

This file is history: it states the schema change as it was made and is never edited afterwards.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration, split_statements

revision = "0014_partitioned_audit"
down_revision = "0013_anchored_audit"
branch_labels = None
depends_on = None

# Copies the grants of {old} (a table) to {new}, leaving out its owner's.
_COPY_GRANTS = """
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.grantee, a.privilege_type
        FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
        WHERE c.oid = '{old}'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON {new} TO %s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END);
    END LOOP;
END $$;
"""


def _append_only(table: str) -> str:
    """``table``'s two append-only triggers (0001's for audit_log), ENABLE ALWAYS."""
    return f"""
CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {{s}}.{table}
    FOR EACH ROW EXECUTE FUNCTION {{s}}.refuse_change();
CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {{s}}.{table}
    FOR EACH STATEMENT EXECUTE FUNCTION {{s}}.refuse_change();
ALTER TABLE {{s}}.{table} ENABLE ALWAYS TRIGGER {table}_append_only;
ALTER TABLE {{s}}.{table} ENABLE ALWAYS TRIGGER {table}_no_truncate;
"""


_0001 = runpy.run_path(str(Path(__file__).with_name("0001_initial.py")))


def _purge_hash() -> str:
    """The hash of a deletion's audit row (``p``: the deleted row), db_role appended as 0010
    appends it."""
    expression: str = _0001["hash_expression"](
        "p.audit_hash",
        "p.id::text",
        "(p.audit_seq + 1)::text",
        "p.operation_type",
        "p.state",
        "p.state",
        "'purge'",
        "p.attempts::text",
        "purge_actor",
        "purge_detail",
        recorded_at="purged_at",
    )
    return expression.replace(
        ", 'UTF8'))",
        "\n            || coalesce(length(deleter) || ':' || deleter || '|', '~|'), 'UTF8'))",
    )


_BEFORE_DELETE_OF_0001 = next(
    statement.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    for statement in split_statements(_0001["UPGRADE"])
    if "FUNCTION {s}.operations_before_delete()" in statement
)

_DELETIONS = """
-- The deleting role, for the statement trigger below (which runs with the owner's rights).
CREATE OR REPLACE FUNCTION {s}.operations_before_delete() RETURNS trigger LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF OLD.state NOT IN ('succeeded', 'cancelled', 'dead') THEN
        RAISE EXCEPTION 'pgoutbox: operation % is %, not finished; only finished operations can be deleted',
            OLD.id, OLD.state USING ERRCODE = 'check_violation';
    END IF;
    PERFORM pg_catalog.set_config('pgoutbox.deleting_role', current_user::text, true);
    RETURN OLD;
END $$;

CREATE FUNCTION {s}.operations_after_delete() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    purged_at timestamptz := clock_timestamp();
    deleter text := current_setting('pgoutbox.deleting_role', true);
    purge_id text := nullif(current_setting('pgoutbox.purge', true), '');
    purge_actor text := coalesce(nullif(current_setting('pgoutbox.purge_actor', true), ''),
                                 deleter);
    purge_detail text := CASE WHEN purge_id IS NULL THEN 'deleted outside a purge'
                              ELSE 'purge ' || purge_id END;
BEGIN
    INSERT INTO {s}.audit_log (operation_id, seq, operation_type, from_state, to_state, trigger,
                               attempt, actor, detail, recorded_at, prev_hash, hash, db_role)
    SELECT p.id, p.audit_seq + 1, p.operation_type, p.state, p.state, 'purge', p.attempts,
           purge_actor, purge_detail, purged_at, p.audit_hash, {purge_hash}, deleter
    FROM purged p;
    RETURN NULL;
END $$;
CREATE TRIGGER c_operations_after_delete AFTER DELETE ON {s}.operations
    REFERENCING OLD TABLE AS purged
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.operations_after_delete();
ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER c_operations_after_delete;

ALTER TABLE {s}.purges ADD COLUMN chained boolean NOT NULL DEFAULT false;
ALTER TABLE {s}.purges ALTER COLUMN chained SET DEFAULT true;
COMMENT ON COLUMN {s}.purges.chained IS
    'Whether each operation this purge deleted got a purge row in its audit chain (from revision 0014).';
"""

_DELETIONS_DOWN = """
DROP TRIGGER c_operations_after_delete ON {s}.operations;
DROP FUNCTION {s}.operations_after_delete();
{before_delete_of_0001};
ALTER FUNCTION {s}.operations_before_delete() SET search_path = pg_catalog, pg_temp;
ALTER TABLE {s}.purges DROP COLUMN chained;
"""

# What the append-only triggers say: a partition's copy names the partitioned table, not the
# month (pg_partition_root is NULL for a table outside any partition tree).
_REFUSE_CHANGE = """
CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: %.% is append-only; % is not allowed', TG_TABLE_SCHEMA,
        (SELECT c.relname FROM pg_catalog.pg_class c
         WHERE c.oid OPERATOR(pg_catalog.=)
               coalesce(pg_catalog.pg_partition_root(TG_RELID), TG_RELID)), TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
"""

_REFUSE_CHANGE_OF_0001 = """
CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgoutbox: %.% is append-only; % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
"""

UPGRADE = (
    _REFUSE_CHANGE
    + """
ALTER TABLE {s}.audit_log RENAME TO audit_log_unpartitioned;
ALTER INDEX {s}.audit_log_pkey RENAME TO audit_log_unpartitioned_pkey;
ALTER INDEX {s}.audit_log_recorded_at RENAME TO audit_log_unpartitioned_recorded_at;

CREATE TABLE {s}.audit_log (LIKE {s}.audit_log_unpartitioned INCLUDING COMMENTS)
    PARTITION BY RANGE (recorded_at);
ALTER TABLE {s}.audit_log ADD CONSTRAINT audit_log_pkey
    PRIMARY KEY (operation_id, seq, recorded_at);
CREATE INDEX audit_log_recorded_at ON {s}.audit_log (recorded_at);
COMMENT ON TABLE {s}.audit_log IS
    'Append-only: one row per state change, written by trigger, sha256-chained per operation; partitioned by month of recorded_at (UTC).';
CREATE TABLE {s}.audit_log_default PARTITION OF {s}.audit_log DEFAULT;

CREATE FUNCTION {s}.audit_log_add_partition(month timestamptz) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s' AS $$
DECLARE
    month_start timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    part text := 'audit_log_y' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY"m"MM');
BEGIN
    IF month IS NULL THEN
        RAISE EXCEPTION 'pgoutbox: audit_log_add_partition needs a month, not NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass('{s}.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE {s}.%I PARTITION OF {s}.audit_log FOR VALUES FROM (%L) TO (%L)',
                   part, month_start, month_start + interval '1 month');
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION {s}.audit_log_add_partition(timestamptz) FROM PUBLIC;

CREATE FUNCTION {s}.audit_log_add_partitions(months_ahead integer) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    made integer := 0;
BEGIN
    IF months_ahead IS NULL OR months_ahead < 0 OR months_ahead > 24 THEN
        RAISE EXCEPTION 'pgoutbox: months_ahead must be 0 to 24, not %', months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR m IN 0..months_ahead LOOP
        IF {s}.audit_log_add_partition(now() + make_interval(months => m)) THEN
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;
REVOKE ALL ON FUNCTION {s}.audit_log_add_partitions(integer) FROM PUBLIC;

-- Every month that has rows, up to three ahead; then the rows, in place.
DO $$
DECLARE
    month timestamptz := date_trunc('month', coalesce(
        (SELECT min(recorded_at) FROM {s}.audit_log_unpartitioned), now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
    WHILE month < now() + interval '4 months' LOOP
        PERFORM {s}.audit_log_add_partition(month);
        month := month + interval '1 month';
    END LOOP;
END $$;
INSERT INTO {s}.audit_log SELECT * FROM {s}.audit_log_unpartitioned;
"""
    + _COPY_GRANTS.replace("{old}", "{s}.audit_log_unpartitioned").replace("{new}", "{s}.audit_log")
    + """
DROP TABLE {s}.audit_log_unpartitioned;
"""
    + _append_only("audit_log")
    + """
CREATE TABLE {s}.audit_archives (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    before      timestamptz NOT NULL,
    partitions  text[] NOT NULL,
    rows        bigint NOT NULL CHECK (rows >= 0),
    operations  bigint NOT NULL CHECK (operations >= 0),
    checkpoint  jsonb NOT NULL,
    archived_by text NOT NULL DEFAULT current_user,
    archived_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE {s}.audit_archives IS
    'One row per `pgoutbox audit archive`: every audit row recorded before `before` was exported, verified and dropped.';

CREATE TABLE {s}.audit_archive_heads (
    operation_id   bigint NOT NULL,
    archive_id     bigint NOT NULL REFERENCES {s}.audit_archives (id),
    seq            integer NOT NULL CHECK (seq >= 1),
    hash           bytea NOT NULL,
    to_state       text NOT NULL,
    trigger        text NOT NULL,
    attempt        integer NOT NULL,
    recorded_at    timestamptz NOT NULL,
    operation_type text NOT NULL,
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL,
    intent_hash    bytea,
    PRIMARY KEY (operation_id, archive_id)
);
COMMENT ON TABLE {s}.audit_archive_heads IS
    'Per archived operation: its last archived audit row, and what its publication recorded; where verification of the rows left starts.';
"""
    + _append_only("audit_archives")
    + _append_only("audit_archive_heads")
    + _DELETIONS
)

DOWNGRADE = (
    _REFUSE_CHANGE_OF_0001
    + _DELETIONS_DOWN
    + """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM {s}.audit_archives) THEN
        RAISE EXCEPTION 'pgoutbox: audit rows were archived (audit_archives); revision 0013 cannot verify a log that starts mid-chain, so this schema cannot go below 0014_partitioned_audit'
            USING ERRCODE = 'object_in_use';
    END IF;
END $$;
DROP TABLE {s}.audit_archive_heads;
DROP TABLE {s}.audit_archives;
DROP FUNCTION {s}.audit_log_add_partitions(integer);
DROP FUNCTION {s}.audit_log_add_partition(timestamptz);

ALTER TABLE {s}.audit_log RENAME TO audit_log_partitioned;
ALTER INDEX {s}.audit_log_pkey RENAME TO audit_log_partitioned_pkey;
ALTER INDEX {s}.audit_log_recorded_at RENAME TO audit_log_partitioned_recorded_at;
CREATE TABLE {s}.audit_log (LIKE {s}.audit_log_partitioned INCLUDING COMMENTS);
ALTER TABLE {s}.audit_log ADD CONSTRAINT audit_log_pkey PRIMARY KEY (operation_id, seq);
CREATE INDEX audit_log_recorded_at ON {s}.audit_log (recorded_at);
COMMENT ON TABLE {s}.audit_log IS
    'Append-only: one row per state change, written by trigger, sha256-chained per operation.';
INSERT INTO {s}.audit_log SELECT * FROM {s}.audit_log_partitioned;
"""
    + _COPY_GRANTS.replace("{old}", "{s}.audit_log_partitioned").replace("{new}", "{s}.audit_log")
    + """
DROP TABLE {s}.audit_log_partitioned;
"""
    + _append_only("audit_log")
)


def upgrade() -> None:
    s = schema_for_migration()
    execute_script(UPGRADE.replace("{purge_hash}", _purge_hash()).replace("{s}", s))
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    script = DOWNGRADE.replace("{before_delete_of_0001}", _BEFORE_DELETE_OF_0001)
    execute_script(script.replace("{s}", s))
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
