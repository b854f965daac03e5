"""pgoutbox/integrity.py against a real PostgreSQL: the shipped manifest matches the migrations,
a fresh schema passes, and each way the owner can quietly weaken a trigger or function is found,
named, and gone again once undone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from pgoutbox import migrations
from pgoutbox.audit import verify, verify_audit
from pgoutbox.integrity import (
    MANIFEST_PATH,
    REGENERATE_COMMAND,
    IntegrityProblem,
    build_manifest,
    check_schema_integrity,
    defining_revisions,
    load_manifest,
    manifest_differences,
    parse_manifest,
    read_schema_state,
)
from pgoutbox.settings import DatabaseSettings


async def test_the_shipped_manifest_is_what_the_migrations_install(database_dsn: str) -> None:
    built = await build_manifest(database_dsn)

    shipped = parse_manifest(MANIFEST_PATH.read_text(encoding="utf-8"))
    differences = manifest_differences(shipped, built)
    assert not differences, (
        f"{MANIFEST_PATH} is out of date with pgoutbox/migrations/versions:\n"
        + "\n".join(differences)
        + f"\nregenerate it: {REGENERATE_COMMAND} (any PostgreSQL 14+ DSN, e.g. "
        "postgresql://postgres@127.0.0.1:5432/postgres) and commit it with the migration"
    )
    assert list(built)[-1] == migrations.head_revision()


async def test_a_fresh_schema_passes(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    assert await check_schema_integrity(conn, db_settings.schema_name) == []


@pytest.fixture
async def schema_named(database_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[list[str]]:
    """Schemas the test migrates by name; dropped afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.mark.parametrize(
    "name",
    [
        "user",  # a keyword: PostgreSQL prints it quoted, "user"
        "pgoutbox",  # the default, which pgoutbox's bodies also spell in 'pgoutbox.worker_key'
        "select_",  # the name of a keyword in a longer one, unquoted
    ],
)
async def test_any_schema_name_gives_the_same_state(
    name: str, database_dsn: str, conn: asyncpg.Connection, schema_named: list[str]
) -> None:
    exists = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", name)
    if exists:
        pytest.skip(f"schema {name} already exists in the test database")
    schema_named.append(name)
    await migrations.upgrade(DatabaseSettings(dsn=database_dsn, schema_name=name))

    assert await check_schema_integrity(conn, name) == []


async def test_state_is_read_without_changing_the_callers_search_path(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    await conn.execute("SET search_path = public, pg_catalog")
    try:
        async with conn.transaction():
            await read_schema_state(conn, db_settings.schema_name)
            inside = await conn.fetchval("SHOW search_path")
        assert inside == "public, pg_catalog"
        assert await conn.fetchval("SHOW search_path") == "public, pg_catalog"
    finally:
        await conn.execute("RESET search_path")


@dataclass(frozen=True)
class Weakening:
    """Statements the owner runs ({s}: the quoted schema), what the check must then say."""

    statements: tuple[str, ...]
    expected: tuple[str, ...]  # each the start of a problem's text ({rev}: the revision)
    all_triggers_on: str | None = None  # one problem per trigger of this table, not per expected


HASH_ARGS = "bytea,bigint,integer,text,text,text,text,integer,text,text,timestamp with time zone"

WEAKENINGS = {
    "disable then enable user triggers": Weakening(
        (
            "ALTER TABLE {s}.operations DISABLE TRIGGER USER",
            "ALTER TABLE {s}.operations ENABLE TRIGGER USER",
        ),
        (
            "trigger a_operations_immutable on {s}.operations is ENABLE (origin only), not "
            "ENABLE ALWAYS: run ALTER TABLE {s}.operations ENABLE ALWAYS TRIGGER "
            "a_operations_immutable",
            "trigger b_operations_before_update on {s}.operations is ENABLE (origin only), not "
            "ENABLE ALWAYS",
        ),
        all_triggers_on="operations",
    ),
    "one trigger disabled": Weakening(
        ("ALTER TABLE {s}.audit_log DISABLE TRIGGER audit_log_append_only",),
        (
            "trigger audit_log_append_only on {s}.audit_log is DISABLED, not ENABLE ALWAYS: run "
            "ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only",
        ),
    ),
    "one trigger enabled for replicas only": Weakening(
        ("ALTER TABLE {s}.audit_log ENABLE REPLICA TRIGGER audit_log_no_truncate",),
        (
            "trigger audit_log_no_truncate on {s}.audit_log is ENABLE REPLICA (replica only), "
            "not ENABLE ALWAYS",
        ),
    ),
    "a trigger dropped": Weakening(
        ("DROP TRIGGER audit_log_append_only ON {s}.audit_log",),
        (
            "trigger audit_log_append_only on {s}.audit_log is missing (revision "
            "{rev} creates it): recreate it: SET search_path = pg_catalog, {s}; "
            "CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON "
            "audit_log FOR EACH ROW EXECUTE FUNCTION refuse_change(); ALTER TABLE "
            "{s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only; RESET search_path",
        ),
    ),
    "a trigger recreated narrower, under its own name": Weakening(
        (
            "DROP TRIGGER audit_log_append_only ON {s}.audit_log",
            "CREATE TRIGGER audit_log_append_only BEFORE DELETE ON {s}.audit_log "
            "FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change()",
            "ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only",
        ),
        (
            "trigger audit_log_append_only on {s}.audit_log differs from the one revision "
            "{rev} installed: it is now `CREATE TRIGGER "
            "audit_log_append_only BEFORE DELETE ON audit_log",
        ),
    ),
    "an extra trigger and its function": Weakening(
        (
            "CREATE FUNCTION {s}.forget() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RETURN NULL; END $$",
            "CREATE TRIGGER z_forget BEFORE UPDATE ON {s}.operations FOR EACH ROW "
            "WHEN (NEW.state = 'dead') EXECUTE FUNCTION {s}.forget()",
        ),
        (
            "unexpected function {s}.forget() (revision {rev} creates no such function in "
            "pgoutbox's schema): if nobody can say why it is there, DROP FUNCTION {s}.forget()",
            "unexpected trigger z_forget on {s}.operations (revision {rev} "
            "creates no such trigger; it runs on every matching write and can change what is "
            "recorded): if nobody can say why it is there, DROP TRIGGER z_forget ON "
            "{s}.operations",
        ),
    ),
    "a function replaced by a weaker body": Weakening(
        (
            "CREATE OR REPLACE FUNCTION {s}.operations_immutable() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        ),
        (
            "function {s}.operations_immutable() differs from the one revision "
            "{rev} installed: its body is not the one installed; it has "
            "no SET clause, not SET search_path=pg_catalog, pg_temp",
        ),
    ),
    "the same body, SECURITY DEFINER removed": Weakening(
        ("ALTER FUNCTION {s}.operations_after_insert() SECURITY INVOKER",),
        (
            "function {s}.operations_after_insert() differs from the one revision "
            "{rev} installed: it is SECURITY INVOKER, not SECURITY DEFINER: restore it as "
            "revision 0",
        ),
    ),
    "the search_path changed": Weakening(
        ("ALTER FUNCTION {s}.operations_after_update() SET search_path = public, pg_catalog",),
        (
            "function {s}.operations_after_update() differs from the one revision "
            "{rev} installed: it has SET search_path=public, pg_catalog, "
            "not SET search_path=pg_catalog, pg_temp",
        ),
    ),
    "the search_path dropped": Weakening(
        ("ALTER FUNCTION {s}.operations_lifecycle() RESET search_path",),
        (
            "function {s}.operations_lifecycle() differs from the one revision "
            "{rev} installed: it has no SET clause, not SET "
            "search_path=pg_catalog, pg_temp",
        ),
    ),
    "a function dropped": Weakening(
        (f"DROP FUNCTION {{s}}.audit_hash({HASH_ARGS})",),
        (f"function {{s}}.audit_hash({HASH_ARGS}) is missing (revision {{rev}} creates it)",),
    ),
    "a rule that swallows deletes": Weakening(
        ("CREATE RULE keep_quiet AS ON DELETE TO {s}.audit_log DO INSTEAD NOTHING",),
        ("unexpected rule keep_quiet on {s}.audit_log (CREATE RULE keep_quiet AS",),
    ),
    "row-level security hiding rows from the auditor": Weakening(
        (
            "ALTER TABLE {s}.audit_log ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY hide ON {s}.audit_log FOR SELECT USING (operation_id <> 1)",
        ),
        (
            "unexpected policy hide on {s}.audit_log (AS PERMISSIVE FOR SELECT TO public USING "
            "(operation_id <> 1); revision {rev} has none",
            "unexpected row-level security on {s}.audit_log (ENABLE;",
        ),
    ),
}


def test_a_function_is_traced_to_the_last_migration_that_changed_it() -> None:
    since = defining_revisions(load_manifest(), "0009_qualified_row_trigger")

    assert since["refuse_change()"] == "0001_initial"
    assert since["operations_after_insert()"] == "0007_statement_audit"
    assert since["operations_before_update()"] == "0009_qualified_row_trigger"
    assert defining_revisions(load_manifest(), "0099_unknown") == {}


def _restorations(problems: list[IntegrityProblem]) -> list[str]:
    """The statements the problems' own fixes name, in an order that works (a trigger before
    its function)."""
    statements = []
    for problem in problems:
        fix = problem.fix or ""
        for prefix in ("run ", "if nobody can say why it is there, ", "recreate it: "):
            if fix.startswith(prefix):
                statements.append(fix[len(prefix) :])
    return sorted(statements, key=lambda s: not s.startswith("DROP TRIGGER"))


@pytest.mark.parametrize("case", list(WEAKENINGS), ids=list(WEAKENINGS))
async def test_each_weakening_is_named_and_undoing_it_passes_again(
    case: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    weakening = WEAKENINGS[case]
    schema, head = db_settings.schema_name, migrations.head_revision()
    s = await conn.fetchval("SELECT quote_ident($1)", schema)
    # What the migrations made, to put back what the fixes cannot say in one line.
    saved = await conn.fetch(
        "SELECT pg_get_functiondef(p.oid) AS definition FROM pg_proc p "
        "WHERE p.pronamespace = $1::regnamespace",
        s,
    )
    for statement in weakening.statements:
        await conn.execute(statement.format(s=s))

    problems = await check_schema_integrity(conn, schema)

    texts = [str(p) for p in problems]
    for expected in weakening.expected:
        start = expected.format(s=s, rev=head)
        assert any(text.startswith(start) for text in texts), (start, texts)
    count = len(weakening.expected)
    if weakening.all_triggers_on:
        count = sum(t.table == weakening.all_triggers_on for t in load_manifest()[head].triggers)
    assert len(problems) == count, texts

    for statement in _restorations(problems):
        await conn.execute(statement)
    for row in saved:  # CREATE OR REPLACE, SECURITY and SET clauses included: as migrated
        await conn.execute(row["definition"])
    assert await check_schema_integrity(conn, schema) == []


async def test_an_operator_of_the_schemas_own_changes_nothing_the_check_reads(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    """The check's queries name pg_catalog's operators: an ``=`` of the owner's, first in the
    caller's search_path, cannot make a trigger or function disappear from what it reads."""
    s = await conn.fetchval("SELECT quote_ident($1)", db_settings.schema_name)
    await conn.execute(
        f"CREATE FUNCTION {s}.never(oid, oid) RETURNS boolean LANGUAGE sql AS 'SELECT false'"
    )
    await conn.execute(
        f"CREATE OPERATOR {s}.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = {s}.never)"
    )
    await conn.execute(f"SET search_path = {s}, pg_catalog")
    try:
        problems = await check_schema_integrity(conn, db_settings.schema_name)
    finally:
        await conn.execute("RESET search_path")

    assert [p.subject for p in problems] == [f"unexpected function {s}.never(oid,oid)"]


async def test_replica_mode_skips_triggers_the_check_reports(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    """Why ENABLE versus ENABLE ALWAYS matters: an origin-only trigger does not fire for a
    session in replica mode, which a superuser (or a role granted SET on the setting) can be."""
    s = await conn.fetchval("SELECT quote_ident($1)", db_settings.schema_name)
    await conn.execute(f"ALTER TABLE {s}.audit_log DISABLE TRIGGER USER")
    await conn.execute(f"ALTER TABLE {s}.audit_log ENABLE TRIGGER USER")
    await conn.execute(
        f"INSERT INTO {s}.operations (operation_type, channel, payload) VALUES ('t', 'c', '{{}}')"
    )
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        deleted = await conn.execute(f"DELETE FROM {s}.audit_log")
    assert deleted == "DELETE 1"  # the append-only trigger did not run

    problems = [str(p) for p in await check_schema_integrity(conn, db_settings.schema_name)]
    assert problems == [
        f"trigger {name} on {s}.audit_log is ENABLE (origin only), not ENABLE ALWAYS: run "
        f"ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER {name}"
        for name in ("audit_log_append_only", "audit_log_no_truncate")
    ]


async def test_audit_verification_fails_naming_each_problem(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = await conn.fetchval("SELECT quote_ident($1)", db_settings.schema_name)
    assert (await verify(db_settings)).ok
    await conn.execute(f"ALTER FUNCTION {s}.operations_after_update() SECURITY INVOKER")

    result = await verify_audit(conn, db_settings.schema_name)

    assert (result.ok, result.problem) == (False, None)
    assert len(result.integrity) == 1
    assert result.failures() == [str(result.integrity[0])]
    assert "operations_after_update() differs" in result.failures()[0]
    assert not (await verify(db_settings)).ok


async def test_the_auditor_role_can_run_the_check(
    db_settings: DatabaseSettings, conn: asyncpg.Connection, auditor: str
) -> None:
    as_auditor = db_settings.model_copy(update={"user": auditor, "dsn": None})
    s = await conn.fetchval("SELECT quote_ident($1)", db_settings.schema_name)
    assert (await verify(as_auditor)).ok

    await conn.execute(f"ALTER TABLE {s}.audit_log DISABLE TRIGGER audit_log_no_truncate")
    aud = await asyncpg.connect(**as_auditor.connect_kwargs())
    try:
        problems = await check_schema_integrity(aud, db_settings.schema_name)
    finally:
        await aud.close()

    assert [str(p) for p in problems] == [
        f"trigger audit_log_no_truncate on {s}.audit_log is DISABLED, not ENABLE ALWAYS: run "
        f"ALTER TABLE {s}.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate"
    ]
    assert not (await verify(as_auditor)).ok


async def test_a_role_without_usage_is_told_so(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    name = f"integrity_nobody_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        settings = db_settings.model_copy(update={"user": name, "dsn": None})
        other = await asyncpg.connect(**settings.connect_kwargs())
        try:
            problems = await check_schema_integrity(other, db_settings.schema_name)
        finally:
            await other.close()
    finally:
        await conn.execute(f'DROP ROLE "{name}"')

    assert [str(p) for p in problems] == [
        f"schema {db_settings.schema_name} cannot be checked by role {name}, which has no "
        f"USAGE on it: grant it what an auditor needs: pgoutbox db grant --auditor {name}"
    ]


async def test_an_older_revision_is_checked_against_its_own_entry(
    database_dsn: str, conn: asyncpg.Connection, schema_named: list[str]
) -> None:
    name = f"t_old_{uuid.uuid4().hex[:8]}"
    schema_named.append(name)
    await migrations.upgrade(
        DatabaseSettings(dsn=database_dsn, schema_name=name), "0008_keyed_idempotency_index"
    )

    assert await check_schema_integrity(conn, name) == []
    # 0009 took this function's search_path away; at 0008 it must still have it.
    await conn.execute(f'ALTER FUNCTION "{name}".operations_before_update() RESET search_path')
    [problem] = await check_schema_integrity(conn, name)
    assert str(problem).startswith(
        f"function {name}.operations_before_update() differs from the one revision "
        "0008_keyed_idempotency_index installed: it has no SET clause, not SET "
        "search_path=pg_catalog, pg_temp"
    )


async def test_a_revision_the_manifest_does_not_cover_cannot_pass(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = db_settings.schema_name
    head = migrations.head_revision()

    [stale] = await check_schema_integrity(conn, schema, manifest={})
    assert str(stale) == (
        f"schema {schema} is at revision {head}, which the integrity manifest shipped with this "
        "pgoutbox does not cover (it is empty): the manifest is older than the migrations: "
        f"regenerate it from a checkout: {REGENERATE_COMMAND}"
    )

    # A revision this pgoutbox never shipped (a newer pgoutbox's, or a forged one).
    await conn.execute(f"UPDATE \"{schema}\".schema_revision SET revision = '0099_future'")
    [unknown] = await check_schema_integrity(conn, schema)
    assert str(unknown) == (
        f"schema {schema} is at revision 0099_future, which this pgoutbox does not know (its "
        f"newest is {head}), so its triggers and functions cannot be checked: check it with the "
        "pgoutbox version that migrated it"
    )


async def test_no_schema_and_no_pgoutbox_are_reported(conn: asyncpg.Connection) -> None:
    name = f"t_empty_{uuid.uuid4().hex[:8]}"
    [missing] = await check_schema_integrity(conn, name)
    assert str(missing) == (
        f"schema {name} does not exist: name pgoutbox's schema (--schema or "
        "PGOUTBOX_DATABASE__SCHEMA)"
    )
    await conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        [empty] = await check_schema_integrity(conn, name)
    finally:
        await conn.execute(f'DROP SCHEMA "{name}"')
    assert str(empty) == (
        f"schema {name} has no schema_revision table: pgoutbox is not installed there: run "
        "pgoutbox db upgrade, or name the schema pgoutbox is in"
    )
