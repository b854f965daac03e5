"""Publishing records intent in the caller's transaction, wakes workers on commit only, and is
idempotent per key (DESIGN §4.1)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from pgoutbox import (
    DatabaseSessionManager,
    IdempotencyConflict,
    PublishError,
    Settings,
    publish_many,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings

MARKER = "marker"


class Listener:
    """Collects NOTIFY payloads of one channel on a plain asyncpg connection.

    ``drain()`` sends a marker notification and returns everything that arrived before it:
    PostgreSQL delivers notifications in commit order, so a notification that was sent (that
    is, committed) before the marker is in the result, and one that was not is not. No sleeping.
    """

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.queue.put_nowait(payload)

    async def drain(self) -> list[str]:
        await self.conn.execute("SELECT pg_notify($1, $2)", self.channel, MARKER)
        payloads = []
        while (payload := await asyncio.wait_for(self.queue.get(), timeout=10)) != MARKER:
            payloads.append(payload)
        return payloads


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


async def test_published_operation_is_invisible_to_others_until_the_caller_commits(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type="demo.hello", payload={"msg": "hi"}, channel="workflow"
        )
        assert await _operations(conn, s) == []
        assert await _audit_count(conn, s) == 0

        await session.commit()

    [row] = await _operations(conn, s)
    assert row["id"] == op_id
    assert (row["operation_type"], row["channel"], row["payload"], row["state"]) == (
        "demo.hello",
        "workflow",
        {"msg": "hi"},
        "pending",
    )


async def test_published_operation_is_gone_when_the_caller_rolls_back(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        await publish_operation(session, "demo.hello", {"msg": "hi"}, "workflow")
        await session.rollback()
    async with sm.session() as session:
        await publish_operation(session, "demo.hello", {"msg": "never committed"}, "workflow")
        # leaving the block without commit rolls back too

    assert await _operations(conn, db_settings.schema_name) == []
    assert await _audit_count(conn, db_settings.schema_name) == 0


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


async def test_notify_carries_exactly_the_id_and_arrives_only_after_commit(
    sm: DatabaseSessionManager, listener: Listener, channel: str
) -> None:
    async with sm.session() as session:
        op_id = await publish_operation(session, "demo.hello", {"msg": "hi"}, channel)
        assert await listener.drain() == []

        await session.commit()

    assert await listener.drain() == [str(op_id)]


async def test_rolled_back_publish_sends_no_notify(
    sm: DatabaseSessionManager, listener: Listener, channel: str
) -> None:
    async with sm.session() as session:
        await publish_operation(session, "demo.hello", {"msg": "hi"}, channel)
        await session.rollback()

    assert await listener.drain() == []


async def test_same_idempotency_key_returns_the_same_operation(
    sm: DatabaseSessionManager,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    listener: Listener,
    channel: str,
) -> None:
    async with sm.session() as session:
        first = await publish_operation(
            session, "billing.charge", {"order": 42}, channel, idempotency_key="charge-42"
        )
        await session.commit()
    async with sm.session() as session:
        again = await publish_operation(
            session, "billing.charge", {"order": 42}, channel, idempotency_key="charge-42"
        )
        await session.commit()

    assert again == first
    assert [r["id"] for r in await _operations(conn, db_settings.schema_name)] == [first]
    assert await _audit_count(conn, db_settings.schema_name) == 1
    assert await listener.drain() == [str(first)]  # the repeat wakes nobody


async def test_same_key_in_the_same_transaction_returns_the_same_operation(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        first = await publish_operation(session, "t", {"a": 1, "b": [1, 2]}, "c", None, "k")
        # Same JSON value, different key order: the same intent.
        again = await publish_operation(session, "t", {"b": [1, 2], "a": 1}, "c", None, "k")
        await session.commit()

    assert again == first
    assert len(await _operations(conn, db_settings.schema_name)) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"payload": {"order": 43}}, id="payload"),
        pytest.param({"operation_type": "billing.refund"}, id="operation_type"),
        pytest.param({"channel": "other_channel"}, id="channel"),
    ],
)
async def test_same_key_with_a_different_intent_is_a_conflict_and_writes_nothing(
    sm: DatabaseSessionManager,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    change: dict[str, Any],
) -> None:
    original = {
        "operation_type": "billing.charge",
        "payload": {"order": 42},
        "channel": "workflow",
        "idempotency_key": "charge-42",
    }
    async with sm.session() as session:
        op_id = await publish_operation(session, **original)
        await session.commit()

    async with sm.session() as session:
        earlier = await publish_operation(session, "audit.note", {"n": 1}, "workflow")
        with pytest.raises(IdempotencyConflict) as excinfo:
            await publish_operation(session, **{**original, **change})
        # The conflict leaves the caller's transaction usable: earlier work still commits.
        await session.commit()

    assert "'charge-42'" in str(excinfo.value)
    assert f"operation {op_id}" in str(excinfo.value)
    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["operation_type"], r["payload"]) for r in rows] == [
        (op_id, "billing.charge", {"order": 42}),
        (earlier, "audit.note", {"n": 1}),
    ]
    assert await _audit_count(conn, db_settings.schema_name) == 2


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


async def test_publish_many_returns_ids_in_input_order(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [_item(n, "workflow") for n in range(6)]
    async with sm.session() as session:
        ids = await publish_many(session, items)
        await session.commit()

    by_id = {r["id"]: r["payload"] for r in await _operations(conn, db_settings.schema_name)}
    assert [by_id[op_id] for op_id in ids] == [{"n": n} for n in range(6)]
    assert await _audit_count(conn, db_settings.schema_name) == 6


async def test_publish_many_mixes_keyed_and_unkeyed_items_in_input_order(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [
        _item(0, "workflow"),
        _item(1, "workflow", key="k1"),
        _item(2, "workflow"),
        _item(3, "workflow", key="k3"),
        _item(4, "workflow"),
    ]
    async with sm.session() as session:
        ids = await publish_many(session, items)
        await session.commit()

    rows = {r["id"]: r for r in await _operations(conn, db_settings.schema_name)}
    assert len(set(ids)) == 5
    assert [(rows[i]["payload"], rows[i]["idempotency_key"]) for i in ids] == [
        ({"n": 0}, None),
        ({"n": 1}, "k1"),
        ({"n": 2}, None),
        ({"n": 3}, "k3"),
        ({"n": 4}, None),
    ]


async def test_publish_many_returns_existing_ids_for_keys_already_published(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        k1 = await publish_operation(session, "email.send", {"n": 1}, "workflow", None, "k1")
        await session.commit()
    batch = [_item(0, "workflow"), _item(1, "workflow", key="k1"), _item(2, "workflow", "k2")]

    async with sm.session() as session:
        first = await publish_many(session, batch)
        await session.commit()
    async with sm.session() as session:
        again = await publish_many(session, batch)
        await session.commit()

    assert first[1] == k1
    assert again[1:] == first[1:]
    assert again[0] != first[0]  # an unkeyed item is new intent every time
    rows = await _operations(conn, db_settings.schema_name)
    assert sorted(r["id"] for r in rows) == sorted({k1, *first, *again})
    assert len(rows) == 4


async def test_publish_many_repeating_a_key_within_the_batch_records_it_once(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        ids = await publish_many(session, [_item(1, "workflow", "k"), _item(1, "workflow", "k")])
        await session.commit()

    assert ids[0] == ids[1]
    assert [r["id"] for r in await _operations(conn, db_settings.schema_name)] == [ids[0]]


async def test_publish_many_repeating_a_key_with_different_payloads_is_a_conflict(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        with pytest.raises(IdempotencyConflict, match="'k'"):
            await publish_many(session, [_item(1, "workflow", "k"), _item(2, "workflow", "k")])
        await session.commit()

    assert await _operations(conn, db_settings.schema_name) == []
    assert await _audit_count(conn, db_settings.schema_name) == 0


async def test_publish_many_conflict_writes_nothing_of_the_batch_but_keeps_earlier_work(
    sm: DatabaseSessionManager,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    listener: Listener,
    channel: str,
) -> None:
    async with sm.session() as session:
        existing = await publish_operation(session, "email.send", {"n": 1}, channel, None, "k1")
        await session.commit()
    assert await listener.drain() == [str(existing)]

    async with sm.session() as session:
        earlier = await publish_operation(session, "audit.note", {"before": True}, channel)
        with pytest.raises(IdempotencyConflict, match="'k1'"):
            await publish_many(
                session,
                [
                    _item(10, channel),
                    _item(11, channel, key="k_new"),
                    _item(99, channel, key="k1"),  # k1 exists with payload {"n": 1}
                ],
            )
        await session.commit()

    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["payload"]) for r in rows] == [
        (existing, {"n": 1}),
        (earlier, {"before": True}),
    ]
    assert await _audit_count(conn, db_settings.schema_name) == 2
    # The batch's wake-up was rolled back with its savepoint; the earlier publish's was not.
    assert await listener.drain() == [str(earlier)]


async def test_publish_many_invalid_item_names_its_index_and_writes_nothing(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [_item(0, "workflow"), _item(1, "workflow", "k1"), _item(2, "bad;channel")]
    async with sm.session() as session:
        with pytest.raises(PublishError, match=r"^operations\[2\]: invalid channel 'bad;channel'"):
            await publish_many(session, items)
        await session.commit()

    assert await _operations(conn, db_settings.schema_name) == []


async def test_publish_many_of_nothing_returns_no_ids(sm: DatabaseSessionManager) -> None:
    async with sm.session() as session:
        assert await publish_many(session, []) == []


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
