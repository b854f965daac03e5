"""Hostile identifiers and payloads: refused with a clear error, or safely quoted; nothing runs.

Schema and channel names end up in DDL, in every query and in LISTEN. A name that could change
the meaning of SQL (quotes, semicolons, NUL, non-ASCII, upper case, more than PostgreSQL's 63
bytes, the reserved ``pg_`` prefix) is refused before any SQL is sent; a name that is merely a
reserved word (``select``, ``user``) is quoted everywhere and works.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    migrations,
    publish_operation,
)
from pgoutbox.audit import verify_chains
from pgoutbox.publish import PublishError
from pgoutbox.settings import DatabaseSettings, WorkflowSystemSettings
from pgoutbox.sql import queries

HOSTILE_NAMES = [
    'x"; DROP SCHEMA public CASCADE; --',
    "a;b",
    "robert'); DROP TABLE operations; --",
    "nul\x00byte",
    "with space",
    "Upper",
    "dash-ed",
    "ünïcode",
    "",
    "1starts_with_digit",
    "pg_catalog",
    "a" * 64,
    "é" * 32,  # 32 characters, 64 bytes
]
RESERVED_WORDS = ["select", "user", "table", "order"]


async def _schemas(conn: asyncpg.Connection) -> set[str]:
    return {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace")}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_schema_name_is_refused_by_settings_queries_and_migrations(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid schema name"):
        DatabaseSettings(schema=name)
    with pytest.raises(ValueError, match="invalid schema name"):
        queries(name)
    with pytest.raises(ValueError, match="invalid schema name"):
        migrations.quote_schema(name)
    with pytest.raises(ValueError, match="invalid schema name"):
        migrations.alembic_config(name)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_channel_name_is_refused_by_settings(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid channel name"):
        WorkflowSystemSettings(channel=name)


def test_63_byte_names_are_accepted_and_64_refused_not_truncated() -> None:
    assert DatabaseSettings(schema="s" * 63).schema_name == "s" * 63
    with pytest.raises(ValidationError, match="64 bytes is longer than PostgreSQL's limit of 63"):
        DatabaseSettings(schema="s" * 64)


# A NUL cannot be passed in argv at all (the settings tests cover it).
@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES[:4] if "\x00" not in n])
async def test_cli_refuses_hostile_schema_and_creates_nothing(
    name: str, database_dsn: str, conn: asyncpg.Connection
) -> None:
    before = await _schemas(conn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOUTBOX_")}
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            "from pgoutbox.cli import main; main()",
            "--dsn",
            database_dsn,
            "--schema",
            name,
            "db",
            "upgrade",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "invalid schema name" in proc.stderr
    assert await _schemas(conn) == before


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_publish_refuses_hostile_channel_and_writes_nothing(
    name: str, sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    async with sm.session() as session:
        with pytest.raises(PublishError, match="invalid channel "):
            await publish_operation(session, "t.hostile", {}, channel=name)
        await session.commit()
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".operations') == 0
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".audit_log') == 0


@pytest.fixture
async def reserved_schema(database_dsn: str, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A pgoutbox schema named after a reserved word, dropped afterwards."""
    name = RESERVED_WORDS[int(os.getpid()) % len(RESERVED_WORDS)]
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    yield name
    await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def _run_one(settings: Settings, payload: Any) -> tuple[int, Any]:
    """Publish ``payload`` on the settings' channel, run it through a worker, return the id and
    what the handler received."""
    received: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    router = WorkflowRouter()

    @router.on("fault.echo")
    async def echo(ctx: HandlerContext, p: Any) -> None:
        if not received.done():
            received.set_result(p)

    sm = DatabaseSessionManager(settings.database)
    try:
        async with WorkflowSystem(router=router, settings=settings):
            async with sm.session() as session:
                op_id = await publish_operation(
                    session, "fault.echo", payload, channel=settings.workflow_system.channel
                )
                await session.commit()
            got = await asyncio.wait_for(received, 20)
            # wait for the outcome to be recorded
            for _ in range(200):
                conn = await asyncpg.connect(**settings.database.connect_kwargs())
                try:
                    state = await conn.fetchval(
                        f'SELECT state FROM "{settings.database.schema_name}".operations '
                        "WHERE id = $1",
                        op_id,
                    )
                finally:
                    await conn.close()
                if state == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert state == "succeeded"
    finally:
        await sm.close()
    return op_id, got


async def test_reserved_words_as_schema_and_channel_are_quoted_and_work_end_to_end(
    database_dsn: str, reserved_schema: str, conn: asyncpg.Connection
) -> None:
    channel = "select" if reserved_schema != "select" else "order"
    settings = Settings(
        database=DatabaseSettings(dsn=database_dsn, schema=reserved_schema),
        workflow_system={"channel": channel, "poll_interval_seconds": 30, "lease_seconds": 5},
    )
    await migrations.upgrade(settings.database)
    # poll_interval 30 s: finishing within the 20 s wait means LISTEN "select" woke the worker.
    op_id, got = await _run_one(settings, {"hello": "world"})
    assert got == {"hello": "world"}
    verification = await verify_chains(conn, reserved_schema)
    assert verification.ok, str(verification.problem)
    triggers = await conn.fetch(
        f'SELECT trigger FROM "{reserved_schema}".audit_log WHERE operation_id = $1 ORDER BY seq',
        op_id,
    )
    assert [r["trigger"] for r in triggers] == ["publish", "claim", "succeed"]


async def test_payload_over_8kb_works_and_the_notification_carries_only_the_id(
    settings: Settings, conn: asyncpg.Connection, database_dsn: str
) -> None:
    # NOTIFY payloads are limited to 8000 bytes; this one is 200 KB, nested and non-ASCII.
    payload = {"blob": "é" * 50_000, "items": [{"n": n, "s": "x" * 50} for n in range(1000)]}
    assert len(json.dumps(payload).encode()) > 150_000
    notes: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_dsn)
    await listener.add_listener(
        settings.workflow_system.channel, lambda *args: notes.put_nowait(args[3])
    )
    try:
        op_id, got = await _run_one(settings, payload)
        note = await asyncio.wait_for(notes.get(), 5)
    finally:
        await listener.close()
    assert got == payload
    assert note == str(op_id)
    stored = await conn.fetchval(
        f'SELECT payload FROM "{settings.database.schema_name}".operations WHERE id = $1', op_id
    )
    assert json.loads(stored) == payload


async def test_oversized_payload_is_refused_with_its_size_and_the_limit_and_nothing_written(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    limit = db_settings.max_payload_bytes  # the default, 1 MiB
    payload = {"blob": "x" * limit}
    async with sm.session() as session:
        with pytest.raises(PublishError) as excinfo:
            await publish_operation(session, "fault.big", payload, channel="c_big")
        await session.commit()
    message = str(excinfo.value)
    assert (
        f"is {len(json.dumps(payload).encode())} bytes as JSON, over the limit of {limit}"
        in message
    )
    assert "database.max_payload_bytes" in message
    s = db_settings.schema_name
    assert await conn.fetchval(f'SELECT count(*) FROM "{s}".operations') == 0
