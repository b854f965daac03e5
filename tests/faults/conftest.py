"""Fixtures of the fault suite: real login roles granted with ``pgoutbox db grant``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from faultkit import ROLE_PASSWORD, Roles, run_cli

from pgoutbox.settings import DatabaseSettings


@pytest.fixture
async def roles(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[Roles]:
    """Five fresh login roles; publisher, worker, auditor and operator granted through the CLI.
    Dropped (with everything granted to them) at teardown."""
    tag = uuid.uuid4().hex[:8]
    kinds = ("publisher", "worker", "auditor", "outsider", "operator")
    names = [f"fault_{kind}_{tag}" for kind in kinds]
    for name in names:
        await conn.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{ROLE_PASSWORD}'")
    made = Roles(*names, base=db_settings)
    try:
        proc = await run_cli(
            "--dsn", db_settings.dsn or "", "--schema", db_settings.schema_name, "db", "grant",
            "--publisher", made.publisher, "--worker", made.worker, "--auditor", made.auditor,
            "--operator", made.operator,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield made
    finally:
        for name in names:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
            )
            await conn.execute(f'DROP OWNED BY "{name}"')
            await conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
async def effects(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """The schema of the ``effects`` table fault_app.py's handlers write to."""
    schema = f"{db_settings.schema_name}_effects"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".effects (operation_id bigint NOT NULL, attempt int NOT NULL, '
        "worker_pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    yield schema
    await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
