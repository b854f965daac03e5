"""Publishing on every path (an AsyncSession, a sync Session, psycopg, Django's connection:
publishkit.py) records intent in the caller's transaction, wakes workers on commit only, and is
idempotent per key (DESIGN §4.1). One suite: each test runs once per path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from publishkit import Listener, PublishPath

from pgoutbox import IdempotencyConflict, PublishError, Settings
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


async def test_published_operation_is_invisible_to_others_until_the_caller_commits(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    s = db_settings.schema_name
    async with publisher.transaction() as tx:
        op_id = await tx.publish(
            operation_type="demo.hello", payload={"msg": "hi"}, channel="workflow"
        )
        assert await _operations(conn, s) == []
        assert await _audit_count(conn, s) == 0

    [row] = await _operations(conn, s)
    assert row["id"] == op_id
    assert (row["operation_type"], row["channel"], row["payload"], row["state"]) == (
        "demo.hello",
        "workflow",
        {"msg": "hi"},
        "pending",
    )


async def test_published_operation_is_gone_when_the_caller_rolls_back(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction(commit=False) as tx:
        await tx.publish("demo.hello", {"msg": "hi"}, "workflow")

    async def fails_after_publishing() -> None:
        async with publisher.transaction() as tx:
            await tx.publish("demo.hello", {"msg": "never committed"}, "workflow")
            raise RuntimeError("the caller's error")

    with pytest.raises(RuntimeError, match="the caller's error"):
        await fails_after_publishing()

    assert await _operations(conn, db_settings.schema_name) == []
    assert await _audit_count(conn, db_settings.schema_name) == 0


async def test_notify_carries_exactly_the_id_and_arrives_only_after_commit(
    publisher: PublishPath, listener: Listener, channel: str
) -> None:
    async with publisher.transaction() as tx:
        op_id = await tx.publish("demo.hello", {"msg": "hi"}, channel)
        assert await listener.drain() == []

    assert await listener.drain() == [str(op_id)]


async def test_rolled_back_publish_sends_no_notify(
    publisher: PublishPath, listener: Listener, channel: str
) -> None:
    async with publisher.transaction(commit=False) as tx:
        await tx.publish("demo.hello", {"msg": "hi"}, channel)

    assert await listener.drain() == []


async def test_same_idempotency_key_returns_the_same_operation(
    publisher: PublishPath,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    listener: Listener,
    channel: str,
) -> None:
    async with publisher.transaction() as tx:
        first = await tx.publish(
            "billing.charge", {"order": 42}, channel, idempotency_key="charge-42"
        )
    async with publisher.transaction() as tx:
        again = await tx.publish(
            "billing.charge", {"order": 42}, channel, idempotency_key="charge-42"
        )

    assert again == first
    assert [r["id"] for r in await _operations(conn, db_settings.schema_name)] == [first]
    assert await _audit_count(conn, db_settings.schema_name) == 1
    assert await listener.drain() == [str(first)]  # the repeat wakes nobody


async def test_same_key_in_the_same_transaction_returns_the_same_operation(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction() as tx:
        first = await tx.publish("t", {"a": 1, "b": [1, 2]}, "c", None, "k")
        # Same JSON value, different key order: the same intent.
        again = await tx.publish("t", {"b": [1, 2], "a": 1}, "c", None, "k")

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
    publisher: PublishPath,
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
    async with publisher.transaction() as tx:
        op_id = await tx.publish(**original)

    async with publisher.transaction() as tx:
        earlier = await tx.publish("audit.note", {"n": 1}, "workflow")
        with pytest.raises(IdempotencyConflict) as excinfo:
            await tx.publish(**{**original, **change})
        # The conflict leaves the caller's transaction usable: earlier work still commits.

    assert "'charge-42'" in str(excinfo.value)
    assert f"operation {op_id}" in str(excinfo.value)
    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["operation_type"], r["payload"]) for r in rows] == [
        (op_id, "billing.charge", {"order": 42}),
        (earlier, "audit.note", {"n": 1}),
    ]
    assert await _audit_count(conn, db_settings.schema_name) == 2


async def test_publish_many_returns_ids_in_input_order(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [_item(n, "workflow") for n in range(6)]
    async with publisher.transaction() as tx:
        ids = await tx.publish_many(items)

    by_id = {r["id"]: r["payload"] for r in await _operations(conn, db_settings.schema_name)}
    assert [by_id[op_id] for op_id in ids] == [{"n": n} for n in range(6)]
    assert await _audit_count(conn, db_settings.schema_name) == 6


async def test_publish_many_mixes_keyed_and_unkeyed_items_in_input_order(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [
        _item(0, "workflow"),
        _item(1, "workflow", key="k1"),
        _item(2, "workflow"),
        _item(3, "workflow", key="k3"),
        _item(4, "workflow"),
    ]
    async with publisher.transaction() as tx:
        ids = await tx.publish_many(items)

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
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction() as tx:
        k1 = await tx.publish("email.send", {"n": 1}, "workflow", None, "k1")
    batch = [_item(0, "workflow"), _item(1, "workflow", key="k1"), _item(2, "workflow", "k2")]

    async with publisher.transaction() as tx:
        first = await tx.publish_many(batch)
    async with publisher.transaction() as tx:
        again = await tx.publish_many(batch)

    assert first[1] == k1
    assert again[1:] == first[1:]
    assert again[0] != first[0]  # an unkeyed item is new intent every time
    rows = await _operations(conn, db_settings.schema_name)
    assert sorted(r["id"] for r in rows) == sorted({k1, *first, *again})
    assert len(rows) == 4


async def test_publish_many_repeating_a_key_within_the_batch_records_it_once(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction() as tx:
        ids = await tx.publish_many([_item(1, "workflow", "k"), _item(1, "workflow", "k")])

    assert ids[0] == ids[1]
    assert [r["id"] for r in await _operations(conn, db_settings.schema_name)] == [ids[0]]


async def test_publish_many_repeating_a_key_with_different_payloads_is_a_conflict(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction() as tx:
        with pytest.raises(IdempotencyConflict, match="'k'"):
            await tx.publish_many([_item(1, "workflow", "k"), _item(2, "workflow", "k")])

    assert await _operations(conn, db_settings.schema_name) == []
    assert await _audit_count(conn, db_settings.schema_name) == 0


async def test_publish_many_conflict_writes_nothing_of_the_batch_but_keeps_earlier_work(
    publisher: PublishPath,
    db_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    listener: Listener,
    channel: str,
) -> None:
    async with publisher.transaction() as tx:
        existing = await tx.publish("email.send", {"n": 1}, channel, None, "k1")
    assert await listener.drain() == [str(existing)]

    async with publisher.transaction() as tx:
        earlier = await tx.publish("audit.note", {"before": True}, channel)
        with pytest.raises(IdempotencyConflict, match="'k1'"):
            await tx.publish_many(
                [
                    _item(10, channel),
                    _item(11, channel, key="k_new"),
                    _item(99, channel, key="k1"),  # k1 exists with payload {"n": 1}
                ],
            )

    rows = await _operations(conn, db_settings.schema_name)
    assert [(r["id"], r["payload"]) for r in rows] == [
        (existing, {"n": 1}),
        (earlier, {"before": True}),
    ]
    assert await _audit_count(conn, db_settings.schema_name) == 2
    # The batch's wake-up was rolled back with its savepoint; the earlier publish's was not.
    assert await listener.drain() == [str(earlier)]


async def test_publish_many_invalid_item_names_its_index_and_writes_nothing(
    publisher: PublishPath, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    items = [_item(0, "workflow"), _item(1, "workflow", "k1"), _item(2, "bad;channel")]
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError, match=r"^operations\[2\]: invalid channel 'bad;channel'"):
            await tx.publish_many(items)

    assert await _operations(conn, db_settings.schema_name) == []


async def test_publish_many_of_nothing_returns_no_ids(publisher: PublishPath) -> None:
    async with publisher.transaction() as tx:
        assert await tx.publish_many([]) == []
