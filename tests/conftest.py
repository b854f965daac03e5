"""Shared fixtures: a real PostgreSQL (PGOUTBOX_TEST_DSN, or an embedded server), a private test
database per run, and a freshly migrated schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import pytest

from pgoutbox import migrations
from pgoutbox.db import DatabaseSessionManager
from pgoutbox.settings import DatabaseSettings, Settings, parse_dsn


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A PostgreSQL server to test against: PGOUTBOX_TEST_DSN, else an embedded one."""
    dsn = os.environ.get("PGOUTBOX_TEST_DSN")
    if dsn:
        yield dsn
        return
    from pgoutbox.embedded import EmbeddedUnavailableError, start_embedded

    try:
        server = start_embedded()
    except EmbeddedUnavailableError as exc:
        pytest.exit(f"no PostgreSQL to test against: set PGOUTBOX_TEST_DSN. {exc}", returncode=3)
    with server:
        yield server.dsn


@pytest.fixture(scope="session")
async def database_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A database of our own on that server, dropped after the run."""
    name = _unique("pgoutbox_test")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(server_dsn, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _with_database(dsn: str, database: str) -> str:
    fields = parse_dsn(dsn)
    settings = DatabaseSettings(**{**fields, "database": database})
    user = settings.user + (f":{settings.password}" if settings.password else "")
    return f"postgresql://{user}@/{database}?host={settings.host}&port={settings.port}"


@pytest.fixture
async def db_settings(database_dsn: str) -> AsyncIterator[DatabaseSettings]:
    """Settings pointing at a fresh schema migrated to head; dropped after the test."""
    settings = DatabaseSettings(dsn=database_dsn, schema=_unique("t"))
    await migrations.upgrade(settings)
    yield settings
    conn = await asyncpg.connect(database_dsn)
    try:
        await conn.execute(f'DROP SCHEMA "{settings.schema_name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def settings(db_settings: DatabaseSettings) -> Settings:
    """Full settings on the test schema with a private channel and short timings."""
    return Settings(
        database=db_settings,
        workflow_system={
            "channel": _unique("c"),
            "lease_seconds": 5,
            "poll_interval_seconds": 0.5,
            "shutdown_timeout_seconds": 5,
        },
    )


@pytest.fixture
async def conn(database_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test database (for assertions and tampering)."""
    connection = await asyncpg.connect(database_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def sm(db_settings: DatabaseSettings) -> AsyncIterator[DatabaseSessionManager]:
    """A session manager on the test schema."""
    manager = DatabaseSessionManager(db_settings)
    yield manager
    await manager.close()


@pytest.fixture
async def auditor(db_settings: DatabaseSettings, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A LOGIN role (no password: the test servers trust local connections) granted only what
    ``pgoutbox db grant --auditor`` grants; dropped with its grants at teardown."""
    from pgoutbox.roles import grant_roles

    name = _unique("auditor")
    await conn.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        await grant_roles(db_settings, auditor=name)
        yield name
    finally:
        await conn.execute(f'DROP OWNED BY "{name}"')
        await conn.execute(f'DROP ROLE "{name}"')


UnauditedUpdate = Callable[..., Awaitable[None]]


@pytest.fixture
def unaudited(conn: asyncpg.Connection) -> UnauditedUpdate:
    """Test set-up only: run an UPDATE of operations' bookkeeping columns (``run_at``,
    ``attempts``...) that the database would refuse without a named transition -- as the owner,
    with that one trigger off for the length of one transaction."""

    async def update(schema: str, sql: str, *args: object) -> None:
        table = f'"{schema.strip(chr(34))}".operations'
        async with conn.transaction():
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER a_operations_unaudited")
            await conn.execute(sql, *args)
            await conn.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER a_operations_unaudited")

    return update
