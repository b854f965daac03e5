"""`pgoutbox db check` and `pgoutbox audit verify` fail, naming it, when a trigger or function
that enforces the audit log was weakened (pgoutbox/integrity.py); run as users run them: the
installed console script, configured by environment variables."""

from __future__ import annotations

import sys

import asyncpg
import pytest
from clikit import run_command, run_pgoutbox

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.settings import DatabaseSettings


async def test_db_check_fails_naming_an_origin_only_trigger_and_passes_once_fixed(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = db_settings.schema_name
    ok = await run_pgoutbox("db", "check", dsn=database_dsn, schema=schema)
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    assert ok.stdout.startswith(f"schema {schema} is at head ")

    await conn.execute(f'ALTER TABLE "{schema}".audit_log DISABLE TRIGGER USER')
    await conn.execute(f'ALTER TABLE "{schema}".audit_log ENABLE TRIGGER USER')
    failed = await run_pgoutbox("db", "check", dsn=database_dsn, schema=schema)

    assert failed.returncode == 1
    assert failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert lines[:2] == [
        f"FAILED: trigger {name} on {schema}.audit_log is ENABLE (origin only), not ENABLE "
        f"ALWAYS: run ALTER TABLE {schema}.audit_log ENABLE ALWAYS TRIGGER {name}"
        for name in ("audit_log_append_only", "audit_log_no_truncate")
    ]
    assert lines[2].startswith("2 integrity problem(s): pgoutbox's triggers and functions")
    assert len(lines) == 3

    for line in lines[:2]:
        await conn.execute(line.split(": run ", 1)[1])
    fixed = await run_pgoutbox("db", "check", dsn=database_dsn, schema=schema)
    assert (fixed.returncode, fixed.stderr) == (0, "")


async def test_db_check_names_a_weaker_function_body(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    schema = db_settings.schema_name
    await conn.execute(
        f'CREATE OR REPLACE FUNCTION "{schema}".refuse_change() RETURNS trigger '
        "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
    )

    failed = await run_pgoutbox("db", "check", dsn=database_dsn, schema=schema)

    assert failed.returncode == 1
    assert failed.stderr.startswith(
        f"FAILED: function {schema}.refuse_change() differs from the one revision "
    )
    assert "installed: its body is not the one installed: restore it as revision " in (
        failed.stderr
    )


@pytest.fixture
async def published(sm: DatabaseSessionManager) -> int:
    async with sm.session() as session:
        op_id = await publish_operation(session, "demo.hello", {"n": 1}, "c")
        await session.commit()
    return op_id


async def test_audit_verify_fails_naming_a_weakened_function_and_passes_once_restored(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, published: int
) -> None:
    schema = db_settings.schema_name
    await conn.execute(f'ALTER FUNCTION "{schema}".operations_after_insert() SECURITY INVOKER')

    failed = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=schema)

    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.startswith(
        f"FAILED: function {schema}.operations_after_insert() differs from the one revision "
    )
    assert "it is SECURITY INVOKER, not SECURITY DEFINER" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1

    await conn.execute(f'ALTER FUNCTION "{schema}".operations_after_insert() SECURITY DEFINER')
    ok = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=schema)
    assert (ok.returncode, ok.stdout) == (0, "OK: 1 audit rows of 1 operations verified\n")


async def test_audit_verify_names_a_broken_chain_first_then_the_dropped_trigger(
    database_dsn: str, db_settings: DatabaseSettings, conn: asyncpg.Connection, published: int
) -> None:
    schema = db_settings.schema_name
    await conn.execute(f'DROP TRIGGER audit_log_append_only ON "{schema}".audit_log')
    await conn.execute(f"UPDATE \"{schema}\".audit_log SET actor = 'nobody'")

    failed = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=schema)

    assert failed.returncode == 1
    assert failed.stderr.splitlines()[0].startswith(f"FAILED: operation {published} seq 1: ")
    assert failed.stderr.splitlines()[1].startswith(
        f"FAILED: trigger audit_log_append_only on {schema}.audit_log is missing (revision "
    )


async def test_the_auditor_role_sees_an_extra_trigger(
    database_dsn: str,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    published: int,
    auditor: str,
) -> None:
    schema = db_settings.schema_name
    await conn.execute(
        f'CREATE TRIGGER z_quiet BEFORE UPDATE ON "{schema}".operations FOR EACH ROW '
        f'WHEN (false) EXECUTE FUNCTION "{schema}".refuse_change()'
    )
    as_auditor = db_settings.model_copy(update={"user": auditor, "dsn": None})
    dsn = (
        f"postgresql://{auditor}@{as_auditor.host}:{as_auditor.port}/{as_auditor.database}"
        if not as_auditor.host.startswith("/")
        else f"postgresql://{auditor}@/{as_auditor.database}?host={as_auditor.host}"
        f"&port={as_auditor.port}"
    )

    for command in (("audit", "verify"), ("db", "check")):
        failed = await run_pgoutbox(*command, dsn=dsn, schema=schema)
        assert failed.returncode == 1, (command, failed.stdout, failed.stderr)
        assert failed.stderr.startswith(
            f"FAILED: unexpected trigger z_quiet on {schema}.operations (revision "
        ), (command, failed.stderr)


async def test_the_manifest_command_says_the_shipped_file_is_up_to_date(database_dsn: str) -> None:
    result = await run_command(
        sys.executable, "-m", "pgoutbox.integrity", "--check", database_dsn, dsn="", schema=""
    )

    assert result.returncode == 0, result.stderr
    assert "integrity.json is up to date: revisions 0001_initial, " in result.stdout
