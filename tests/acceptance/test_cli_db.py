"""`pgoutbox db ...` run as a user runs it: the installed console script, settings from env."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import click
import pytest

from pgoutbox.migrations import head_revision

PGOUTBOX = Path(sys.executable).parent / "pgoutbox"


@pytest.fixture
async def schemas(database_dsn: str) -> AsyncIterator[list[str]]:
    """Two unused schema names: [configured in the environment, given with --schema]."""
    names = [f"cli_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    yield names
    conn = await asyncpg.connect(database_dsn)
    try:
        for name in names:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def pgoutbox(*args: str, dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    env |= {"PGOUTBOX_DATABASE__DSN": dsn, "PGOUTBOX_DATABASE__SCHEMA": schema}
    return subprocess.run(
        [str(PGOUTBOX), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_db_check_fails_until_db_upgrade_creates_the_schema(
    database_dsn: str, schemas: list[str]
) -> None:
    schema, _ = schemas
    head = head_revision()

    current = pgoutbox("db", "current", dsn=database_dsn, schema=schema)
    assert (current.returncode, current.stdout.strip()) == (0, "none")

    check = pgoutbox("db", "check", dsn=database_dsn, schema=schema)
    assert check.returncode == 1
    assert "pgoutbox db upgrade" in check.stderr
    assert schema in check.stderr

    upgrade = pgoutbox("db", "upgrade", dsn=database_dsn, schema=schema)
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout.strip() == f"schema {schema} is at {head}"

    check = pgoutbox("db", "check", dsn=database_dsn, schema=schema)
    assert check.returncode == 0, check.stderr
    assert head in check.stdout

    current = pgoutbox("db", "current", dsn=database_dsn, schema=schema)
    assert (current.returncode, current.stdout.strip()) == (0, head)


def test_schema_option_overrides_the_environment(database_dsn: str, schemas: list[str]) -> None:
    from_env, from_option = schemas

    upgrade = pgoutbox("--schema", from_option, "db", "upgrade", dsn=database_dsn, schema=from_env)
    assert upgrade.returncode == 0, upgrade.stderr

    assert pgoutbox("db", "current", dsn=database_dsn, schema=from_env).stdout.strip() == "none"
    current = pgoutbox("--schema", from_option, "db", "current", dsn=database_dsn, schema=from_env)
    assert current.stdout.strip() == head_revision()


@pytest.mark.parametrize("how", ["option", "environment"])
async def test_invalid_schema_name_exits_2_naming_it_and_creates_nothing(
    database_dsn: str, schemas: list[str], conn: asyncpg.Connection, how: str
) -> None:
    bad = "bad;name"
    if how == "option":
        args, schema = ["--schema", bad, "db", "upgrade"], schemas[0]
    else:
        args, schema = ["db", "upgrade"], bad

    result = await asyncio.to_thread(pgoutbox, *args, dsn=database_dsn, schema=schema)

    assert result.returncode == 2
    assert f"invalid schema name {bad!r}" in result.stderr
    assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bad%'") == 0


def _without_settings(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script with no PGOUTBOX_* settings in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    return subprocess.run(
        [str(PGOUTBOX), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_dsn_and_schema_are_accepted_after_the_command_too(
    database_dsn: str, schemas: list[str]
) -> None:
    schema, other = schemas
    head = head_revision()

    upgrade = _without_settings("db", "upgrade", "--dsn", database_dsn, "--schema", schema)
    # Given before and after the command, the one after it counts.
    after = _without_settings(
        "--schema", other, "--dsn", "postgresql://x@127.0.0.1:1/x", "db", "current",
        "--schema", schema, "--dsn", database_dsn,
    )  # fmt: skip
    before = _without_settings("--schema", other, "--dsn", database_dsn, "db", "current")
    # The environment is only the default: it does not undo a --dsn given before the command.
    environment = pgoutbox(
        "--dsn", database_dsn, "db", "current", "--schema", schema,
        dsn="postgresql://x@127.0.0.1:1/x", schema=other,
    )  # fmt: skip

    assert (upgrade.returncode, upgrade.stdout) == (0, f"schema {schema} is at {head}\n"), (
        upgrade.stderr
    )
    assert (after.returncode, after.stdout) == (0, f"{head}\n"), after.stderr
    assert (before.returncode, before.stdout) == (0, "none\n"), before.stderr
    assert (environment.returncode, environment.stdout) == (0, f"{head}\n"), environment.stderr


def test_every_command_takes_dsn_and_schema_after_its_name() -> None:
    from pgoutbox.cli import cli

    def leaves(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found = []
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += leaves(command, f"{path} {name}")
            else:
                found.append((f"{path} {name}", command))
        return found

    commands = leaves(cli, "pgoutbox")
    assert len(commands) > 15  # every command, not an empty walk
    for path, command in commands:
        options = {option for param in command.params for option in param.opts}
        assert {"--dsn", "--schema"} <= options, path
