"""pgoutbox's migration history: one head, a clean round trip, and DDL that matches schema.py."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from pgoutbox import migrations
from pgoutbox.db import create_engine
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE
from pgoutbox.schema import build_metadata, metadata
from pgoutbox.settings import DatabaseSettings

T = TypeVar("T")

CHECKOUT = Path(__file__).resolve().parents[2]

PGOUTBOX_TABLES = {
    "operations",
    "audit_log",
    "lifecycle_transitions",
    "lifecycles",
    "lifecycle_types",
    "workers",
    "schema_revision",
    "purges",
    "role_grants",
    "flow_limits",
    "flow_overrides",
    "flow_pauses",
    "flow_buckets",
    "audit_checkpoints",
    "audit_archives",
    "audit_archive_heads",
}
# audit_log's partitions (one per month, made ahead, and the default one) are not listed: how
# many there are depends on the day the tests run.
AUDIT_PARTITION = re.compile(r"^audit_log_(y\d{4}m\d{2}|default)$")
# The triggers that make the audit log the database's, not the application's. Every one is
# ENABLE ALWAYS (tgenabled 'A'), so session_replication_role = replica does not switch it off.
PGOUTBOX_TRIGGERS = {
    ("operations", "a_operations_immutable"),
    ("operations", "a_operations_lifecycle"),
    ("operations", "a_operations_unaudited"),
    ("operations", "b_operations_before_insert"),
    ("operations", "b_operations_after_insert"),
    ("operations", "b_operations_before_update"),
    ("operations", "a_operations_settled"),
    ("operations", "a_operations_heartbeat"),
    ("operations", "a_operations_cancel_request"),
    ("operations", "b_operations_after_update"),
    ("operations", "c_operations_before_delete"),
    ("operations", "c_operations_no_truncate"),
    ("operations", "c_operations_after_delete"),
    ("audit_log", "audit_log_append_only"),
    ("audit_log", "audit_log_no_truncate"),
    ("flow_overrides", "flow_overrides_history"),
    ("flow_pauses", "flow_pauses_history"),
    ("audit_archives", "audit_archives_append_only"),
    ("audit_archives", "audit_archives_no_truncate"),
    ("audit_archive_heads", "audit_archive_heads_append_only"),
    ("audit_archive_heads", "audit_archive_heads_no_truncate"),
}


async def run_sync(settings: DatabaseSettings, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(connection, *args)`` on a sync connection, in one committed transaction.

    Alembic and SQLAlchemy's inspector are synchronous; pgoutbox only has an async engine.
    """
    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(fn, *args)
    finally:
        await engine.dispose()


def table_names(connection: Connection, schema: str) -> set[str]:
    """The schema's tables, audit_log's partitions left out."""
    partitions = connection.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relispartition"
        ),
        {"schema": schema},
    ).scalars()
    return set(inspect(connection).get_table_names(schema=schema)) - set(partitions)


async def triggers(
    conn: asyncpg.Connection, schema: str, *, partitions: bool = False
) -> dict[tuple[str, str], str]:
    """``(table, trigger) -> tgenabled`` for the user triggers in ``schema``: of its tables, or
    with ``partitions`` of audit_log's partitions only."""
    rows = await conn.fetch(
        """
        SELECT c.relname, t.tgname, t.tgenabled::text
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND NOT t.tgisinternal AND c.relispartition = $2
        """,
        schema,
        partitions,
    )
    return {(r["relname"], r["tgname"]): r["tgenabled"] for r in rows}


async def function_names(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = $1",
        schema,
    )
    return {r["proname"] for r in rows}


# --- history ------------------------------------------------------------------------------


def test_history_has_one_head_and_a_base_labelled_pgoutbox() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config("pgoutbox"))

    assert len(script.get_heads()) == 1
    assert script.get_heads() == [migrations.head_revision()]
    (base,) = script.get_bases()
    base_revision = script.get_revision(base)
    assert base_revision is not None
    assert base_revision.branch_labels == {"pgoutbox"}
    # A host resolves the label to our head: `alembic upgrade pgoutbox@head` works.
    (labelled_head,) = script.get_revisions("pgoutbox@head")
    assert labelled_head is not None
    assert labelled_head.revision == migrations.head_revision()


def test_versions_path_holds_the_revision_files() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config("pgoutbox"))
    for revision in script.walk_revisions():
        assert revision.path.startswith(migrations.versions_path())


def test_invalid_schema_name_is_refused_before_any_sql() -> None:
    with pytest.raises(ValueError, match=r"bad;name"):
        migrations.alembic_config("bad;name")


def test_default_lifecycle_in_the_migrations_equals_the_lifecycle_module() -> None:
    # 0001 installs the default lifecycle; 0002 adds "retry", 0006 "cancel" from dead. Together
    # they are the module's, with 0012's snooze and abort.
    script = ScriptDirectory.from_config(migrations.alembic_config("pgoutbox"))
    initial = script.get_revision("0001_initial")
    operator_tools = script.get_revision("0002_operator_tools")
    custom_lifecycles = script.get_revision("0006_custom_lifecycles")
    running_controls = script.get_revision("0012_running_controls")
    assert running_controls is not None
    assert initial is not None
    assert operator_tools is not None
    assert custom_lifecycles is not None
    rows = [
        *initial.module.DEFAULT_TRANSITIONS,
        *operator_tools.module.ADDED_DEFAULT_TRANSITIONS,
        *custom_lifecycles.module.ADDED_DEFAULT_TRANSITIONS,
        *running_controls.module.ADDED_DEFAULT_TRANSITIONS,
    ]
    assert len(rows) == len(set(rows))
    assert sorted(("default", *row) for row in rows) == DEFAULT_LIFECYCLE.rows()


# --- upgrade / downgrade ------------------------------------------------------------------


async def test_upgrade_downgrade_upgrade_leaves_nothing_behind_and_rebuilds_everything(
    fresh_schema: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = fresh_schema.schema_name
    head = migrations.head_revision()

    await migrations.upgrade(fresh_schema)
    assert await run_sync(fresh_schema, table_names, schema) == {
        *PGOUTBOX_TABLES,
        migrations.VERSION_TABLE,
    }
    assert await migrations.current(fresh_schema) == head

    await run_sync(fresh_schema, migrations.downgrade_sync, schema, "base")
    # The version table stays (it is where "not installed" is recorded); nothing else does.
    assert await run_sync(fresh_schema, table_names, schema) == {migrations.VERSION_TABLE}
    assert await function_names(conn, schema) == set()
    assert await migrations.current(fresh_schema) is None

    await migrations.upgrade(fresh_schema)
    assert await run_sync(fresh_schema, table_names, schema) >= PGOUTBOX_TABLES
    assert set(await triggers(conn, schema)) == PGOUTBOX_TRIGGERS
    assert await migrations.current(fresh_schema) == head


async def test_upgrade_at_head_is_a_no_op(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    await migrations.upgrade(db_settings)
    assert await migrations.current(db_settings) == migrations.head_revision()
    rows = await conn.fetchval(
        f'SELECT count(*) FROM "{db_settings.schema_name}".{migrations.VERSION_TABLE}'
    )
    assert rows == 1


async def test_concurrent_upgrades_of_one_schema_both_succeed(
    fresh_schema: DatabaseSettings,
) -> None:
    # What auto_migrate does when many workers start at once: the advisory lock makes one
    # migrate while the other waits, then finds the schema at head.
    await asyncio.gather(migrations.upgrade(fresh_schema), migrations.upgrade(fresh_schema))
    assert await migrations.current(fresh_schema) == migrations.head_revision()


async def test_concurrent_upgrades_of_two_schemas_in_one_process_each_get_their_tables(
    new_schema: Callable[[], DatabaseSettings],
) -> None:
    # Alembic's context is process-global: interleaved runs used to cross schemas.
    first, second = new_schema(), new_schema()
    await asyncio.gather(migrations.upgrade(first), migrations.upgrade(second))
    for settings in (first, second):
        assert await run_sync(settings, table_names, settings.schema_name) == {
            *PGOUTBOX_TABLES,
            migrations.VERSION_TABLE,
        }
        assert await migrations.current(settings) == migrations.head_revision()


async def test_check_semantics_none_before_upgrade_head_after(
    fresh_schema: DatabaseSettings,
) -> None:
    # `pgoutbox db check` exits 0 exactly when current == head_revision().
    assert await migrations.current(fresh_schema) is None
    await migrations.upgrade(fresh_schema)
    assert await migrations.current(fresh_schema) == migrations.head_revision()
    await run_sync(fresh_schema, migrations.downgrade_sync, fresh_schema.schema_name, "base")
    assert await migrations.current(fresh_schema) is None


def _alembic_in_checkout(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    env["PGOUTBOX_DATABASE__DSN"] = dsn
    return subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), *args],
        cwd=CHECKOUT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_plain_alembic_in_the_checkout_upgrades_a_standalone_schema(
    fresh_schema: DatabaseSettings, database_dsn: str
) -> None:
    schema_arg = f"pgoutbox_schema={fresh_schema.schema_name}"
    result = await asyncio.to_thread(
        _alembic_in_checkout, "-x", schema_arg, "upgrade", "head", dsn=database_dsn
    )
    assert result.returncode == 0, result.stderr
    assert await migrations.current(fresh_schema) == migrations.head_revision()


# --- the migrated DDL matches schema.py ---------------------------------------------------


def _compare_with_schema_py(connection: Connection, schema: str) -> list[Any]:
    def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
        if type_ == "schema":
            return name == schema  # the default schema arrives as None and is skipped
        if type_ == "table":  # audit_log's monthly partitions are not schema.py's tables
            return name != migrations.VERSION_TABLE and not AUDIT_PARTITION.match(name or "")
        return True

    context = MigrationContext.configure(
        connection,
        opts={
            "include_schemas": True,
            "include_name": include_name,
            "compare_type": True,
            "compare_server_default": True,
        },
    )
    diffs: list[Any] = compare_metadata(context, build_metadata(schema))
    return diffs


async def test_migrated_schema_matches_schema_py(db_settings: DatabaseSettings) -> None:
    # Alembic compares tables, columns, types, nullability, server defaults (identity included),
    # comments, unique constraints and index columns. It does not compare CHECK constraints or
    # partial-index predicates: the catalog test below covers those.
    diffs = await run_sync(db_settings, _compare_with_schema_py, db_settings.schema_name)
    assert diffs == []


_CATALOG_QUERIES = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type,
               a.attnotnull, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid) AS default,
               col_description(c.oid, a.attnum) AS comment
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relname <> 'alembic_version'
        ORDER BY 1, 2
    """,
    "tables": """
        SELECT c.relname, obj_description(c.oid, 'pg_class') AS comment
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname <> 'alembic_version'
        ORDER BY 1
    """,
    "constraints": """
        SELECT c.relname, con.conname, con.contype::text, pg_get_constraintdef(con.oid) AS def
        FROM pg_constraint con
        JOIN pg_class c ON c.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname <> 'alembic_version' AND NOT c.relispartition
        ORDER BY 1, 2
    """,
    # indexdef names the schema; it is replaced by a placeholder before comparing.
    "indexes": """
        SELECT c.relname AS tablename, i.relname AS indexname, pg_get_indexdef(i.oid) AS indexdef
        FROM pg_index x
        JOIN pg_class c ON c.oid = x.indrelid
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname <> 'alembic_version' AND NOT c.relispartition
        ORDER BY 1, 2
    """,
}


async def _catalog(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    catalog = {}
    for name, query in _CATALOG_QUERIES.items():
        rows = await conn.fetch(query, schema)
        catalog[name] = [
            tuple(v.replace(f"{schema}.", "<schema>.") if isinstance(v, str) else v for v in r)
            for r in rows
        ]
    return catalog


def _create_all(connection: Connection, schema: str) -> None:
    connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    build_metadata(schema).create_all(connection)


async def test_migrated_catalog_equals_the_catalog_schema_py_creates(
    db_settings: DatabaseSettings, fresh_schema: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    # The stricter half of "models match the migrated DDL": build the tables from schema.py
    # with create_all and compare what PostgreSQL itself reports for both, column order,
    # identity, defaults, comments, CHECK constraints and index predicates included.
    await run_sync(fresh_schema, _create_all, fresh_schema.schema_name)

    migrated = await _catalog(conn, db_settings.schema_name)
    described = await _catalog(conn, fresh_schema.schema_name)

    for part in _CATALOG_QUERIES:
        assert migrated[part] == described[part], part
    partial = {row[1]: row[2] for row in migrated["indexes"] if " WHERE " in row[2]}
    assert set(partial) == {
        "operations_claimable",
        "operations_leased",
        "operations_resting",
        "operations_ordering",
        "operations_idempotency_key",
        "flow_pauses_open",
    }
    # Unique among keyed operations only: a keyless one's transitions add no entry to it.
    assert partial["operations_idempotency_key"].startswith("CREATE UNIQUE INDEX")
    assert partial["operations_idempotency_key"].endswith("WHERE (idempotency_key IS NOT NULL)")


async def test_migration_creates_the_audit_triggers_enabled_always(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    found = await triggers(conn, db_settings.schema_name)
    assert set(found) == PGOUTBOX_TRIGGERS
    assert set(found.values()) == {"A"}
    # Every partition of audit_log has the table's row trigger, enabled always too (the
    # statement trigger refusing TRUNCATE is the table's alone: PostgreSQL copies row triggers).
    on_partitions = await triggers(conn, db_settings.schema_name, partitions=True)
    names = {table for table, _ in on_partitions}
    assert "audit_log_default" in names
    assert len(names) >= 4
    assert set(on_partitions) == {(table, "audit_log_append_only") for table in names}
    assert set(on_partitions.values()) == {"A"}


async def test_migration_seeds_the_default_lifecycle(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    rows = await conn.fetch(
        f'SELECT lifecycle, from_state, trigger, to_state FROM "{db_settings.schema_name}"'
        ".lifecycle_transitions ORDER BY 1, 2, 3, 4"
    )
    assert [tuple(r) for r in rows] == DEFAULT_LIFECYCLE.rows()


def test_module_metadata_describes_the_default_schema() -> None:
    assert set(metadata.tables) == {f"pgoutbox.{name}" for name in PGOUTBOX_TABLES}
    with pytest.raises(ValueError, match=r"Bad"):
        build_metadata("Bad")
