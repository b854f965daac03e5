"""Publishing through an AsyncSession: what it stores, concurrent publishers of one key, wake-ups
per channel. What every path shares (the caller's transaction, idempotency) is in
test_publish_everywhere.py, bad input in test_bad_input.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from publishkit import Listener
from sqlalchemy import text

from pgoutbox import (
    DatabaseSessionManager,
    Settings,
    publish_many,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings


@pytest.fixture
async def channel(settings: Settings) -> str:
    """The test's private channel."""
    return settings.workflow_system.channel


@pytest.fixture
async def listener(conn: asyncpg.Connection, channel: str) -> AsyncIterator[Listener]:
    listening = Listener(conn, channel)
    await conn.add_listener(channel, listening._received)
    yield listening
    await conn.remove_listener(channel, listening._received)


async def _operations(conn: asyncpg.Connection, schema: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT id, operation_type, channel, payload, state, idempotency_key, run_at, priority, "
        f'max_attempts FROM "{schema}".operations ORDER BY id'
    )
    return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


async def _audit_count(conn: asyncpg.Connection, schema: str) -> int:
    count: int = await conn.fetchval(f'SELECT count(*) FROM "{schema}".audit_log')
    return count


def _item(n: int, channel: str, key: str | None = None) -> dict[str, Any]:
    return {
        "operation_type": "email.send",
        "payload": {"n": n},
        "channel": channel,
        "idempotency_key": key,
    }


async def test_publish_returns_the_new_operations_id(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        first = await publish_operation(session, "demo.hello", {"n": 1}, "workflow")
        second = await publish_operation(session, "demo.hello", {"n": 2}, "workflow")
        await session.commit()

    assert isinstance(first, int)
    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["payload"]) for r in rows] == [(first, {"n": 1}), (second, {"n": 2})]


async def test_publish_writes_audit_row_one_publish_to_pending(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        op_id = await publish_operation(session, "demo.hello", {"msg": "hi"}, "workflow")
        await session.commit()

    rows = await conn.fetch(
        f"SELECT operation_id, seq, operation_type, from_state, to_state, trigger, attempt, actor, "
        f'prev_hash FROM "{db_settings.schema_name}".audit_log'
    )
    assert [dict(r) for r in rows] == [
        {
            "operation_id": op_id,
            "seq": 1,
            "operation_type": "demo.hello",
            "from_state": None,
            "to_state": "pending",
            "trigger": "publish",
            "attempt": 0,
            "actor": await conn.fetchval("SELECT current_user"),
            "prev_hash": None,
        }
    ]


async def test_concurrent_publishers_of_one_key_create_exactly_one_operation(
    db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    publishers = 20
    manager = DatabaseSessionManager(db_settings.model_copy(update={"pool_size": publishers}))
    all_connected = asyncio.Barrier(publishers)

    async def publish() -> int:
        async with manager.session() as session:
            await session.execute(text("SELECT 1"))  # hold a connection and a transaction
            await all_connected.wait()
            op_id = await publish_operation(
                session, "billing.charge", {"order": 7}, "workflow", None, "charge-7"
            )
            await session.commit()
            return op_id

    try:
        ids = await asyncio.gather(*(publish() for _ in range(publishers)))
    finally:
        await manager.close()

    rows = await _operations(conn, db_settings.schema_name)
    assert len(rows) == 1
    assert set(ids) == {rows[0]["id"]}
    assert await _audit_count(conn, db_settings.schema_name) == 1


async def test_publish_many_wakes_each_channel_once_after_commit(
    sm: DatabaseSessionManager, listener: Listener, channel: str
) -> None:
    async with sm.session() as session:
        ids = await publish_many(
            session, [_item(0, channel), _item(1, "elsewhere"), _item(2, channel, key="k")]
        )
        assert await listener.drain() == []
        await session.commit()

    assert await listener.drain() == [str(ids[0])]


async def test_future_run_at_is_stored_as_given(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    later = datetime(
        2031, 5, 17, 8, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    async with sm.session() as session:
        op_id = await publish_operation(session, "demo.hello", {}, "workflow", run_at=later)
        many = await publish_many(
            session,
            [{"operation_type": "demo.hello", "payload": {}, "channel": "w", "run_at": later}],
        )
        await session.commit()

    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["run_at"]) for r in rows] == [(op_id, later), (many[0], later)]
    assert rows[0]["run_at"].astimezone(UTC) == datetime(2031, 5, 17, 3, 0, 15, 123456, UTC)


async def test_run_at_defaults_to_database_now(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        op_id = await publish_operation(session, "demo.hello", {}, "workflow")
        now = await session.scalar(text("SELECT now()"))
        await session.commit()

    stored = await conn.fetchval(
        f'SELECT run_at FROM "{db_settings.schema_name}".operations WHERE id = $1', op_id
    )
    assert stored == now


async def test_priority_and_max_attempts_are_stored(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        await publish_operation(session, "t", {}, "workflow", priority=-5, max_attempts=3)
        await publish_many(
            session,
            [{"operation_type": "t", "payload": {}, "channel": "w", "priority": 9}],
        )
        await session.commit()

    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["priority"], r["max_attempts"]) for r in rows] == [(-5, 3), (9, None)]


async def test_payload_over_8_kb_is_stored_and_notify_still_carries_only_the_id(
    sm: DatabaseSessionManager,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    listener: Listener,
    channel: str,
) -> None:
    # pg_notify refuses payloads of 8000 bytes or more, so this also proves the payload is not
    # what is sent.
    payload = {"blob": "é" * 6000, "items": list(range(500))}
    assert len(json.dumps(payload, ensure_ascii=False).encode()) > 12_000
    async with sm.session() as session:
        op_id = await publish_operation(session, "big.one", payload, channel)
        [many_id] = await publish_many(
            session, [{"operation_type": "big.one", "payload": payload, "channel": channel}]
        )
        await session.commit()

    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["payload"]) for r in rows] == [(op_id, payload), (many_id, payload)]
    assert await listener.drain() == [str(op_id), str(many_id)]
