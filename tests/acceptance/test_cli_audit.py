"""`pgoutbox audit verify`, run as a user runs it: the installed console script, configured by
environment variables."""

from __future__ import annotations

import asyncpg
import pytest
from clikit import PGOUTBOX, run_pgoutbox

from pgoutbox import DatabaseSessionManager, publish_operation
from pgoutbox.settings import DatabaseSettings


@pytest.fixture
async def operations(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> list[int]:
    """Three operations; the middle one claimed and failed (three audit rows)."""
    async with sm.session() as session:
        ids = [await publish_operation(session, "demo.hello", {"n": n}, "c") for n in range(3)]
        await session.commit()
    for trigger, state in [("claim", "claimed"), ("fail", "failed")]:
        await conn.execute(
            f'UPDATE "{db_settings.schema_name}".operations '
            "SET state = $2, transition = $3, transition_actor = 'worker-1' WHERE id = $1",
            ids[1],
            state,
            trigger,
        )
    return ids


def test_console_script_is_installed() -> None:
    assert PGOUTBOX.is_file(), f"{PGOUTBOX} missing: install the package (pip install -e .)"


async def test_audit_verify_exits_0_and_says_ok_on_a_clean_log(
    database_dsn: str, db_settings: DatabaseSettings, operations: list[int]
) -> None:
    result = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=db_settings.schema_name)

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "OK: 5 audit rows of 3 operations verified\n"


async def test_audit_verify_exits_0_on_an_empty_log(
    database_dsn: str, db_settings: DatabaseSettings
) -> None:
    result = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=db_settings.schema_name)

    assert result.returncode == 0
    assert result.stdout.startswith("OK: 0 audit rows")


async def test_audit_verify_exits_1_naming_the_tampered_operation_and_seq(
    database_dsn: str,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    operations: list[int],
) -> None:
    s, middle = db_settings.schema_name, operations[1]
    async with conn.transaction():
        await conn.execute(f'ALTER TABLE "{s}".audit_log DISABLE TRIGGER ALL')
        await conn.execute(
            f"UPDATE \"{s}\".audit_log SET actor = 'nobody' WHERE operation_id = $1 AND seq = 2",
            middle,
        )

    result = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema=db_settings.schema_name)

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"operation {middle} seq 2" in result.stderr
    assert result.stderr.startswith("FAILED: ")


async def test_schema_option_overrides_the_environment(
    database_dsn: str, db_settings: DatabaseSettings, operations: list[int]
) -> None:
    result = await run_pgoutbox(
        "--schema",
        db_settings.schema_name,
        "audit",
        "verify",
        dsn=database_dsn,
        schema="no_such_schema_here",
    )

    assert result.returncode == 0
    assert result.stdout.startswith("OK: 5 audit rows of 3 operations")


async def test_invalid_schema_setting_is_a_usage_error_naming_it(database_dsn: str) -> None:
    result = await run_pgoutbox("audit", "verify", dsn=database_dsn, schema="x;drop")

    assert result.returncode == 2
    assert "invalid schema name 'x;drop'" in result.stderr
