"""Publishing on every path (an AsyncSession, a sync Session, psycopg, Django's connection:
publishkit.py) records intent in the caller's transaction, wakes workers on commit only, and is
idempotent per key (DESIGN §4.1). One suite: each test runs once per path.

The tests share one schema migrated for this module (conftest.py); each test keeps to its own
channels and keys (``Scope``), and looks only at those.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from publishkit import Listener, PublishPath

from pgoutbox import IdempotencyConflict, PublishError
from pgoutbox.settings import DatabaseSettings


class Scope:
    """One test's corner of the shared schema: its channels (``channel``, ``other``) and its
    keys (``key(name)``); ``operations()`` and ``audit_count()`` see only its channels."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn, self.schema = conn, schema
        self.ns = uuid.uuid4().hex[:10]
        self.channel, self.other = f"w_{self.ns}", f"o_{self.ns}"

    def key(self, name: str) -> str:
        return f"{name}-{self.ns}"

    async def operations(self) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            "SELECT id, operation_type, channel, payload, state, idempotency_key "
            f'FROM "{self.schema}".operations WHERE channel = ANY($1) ORDER BY id',
            [self.channel, self.other],
        )
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]

    async def audit_count(self) -> int:
        count: int = await self.conn.fetchval(
            f'SELECT count(*) FROM "{self.schema}".audit_log a '
            f'JOIN "{self.schema}".operations o ON o.id = a.operation_id '
            "WHERE o.channel = ANY($1)",
            [self.channel, self.other],
        )
        return count


@pytest.fixture
def scope(conn: asyncpg.Connection, shared_settings: DatabaseSettings) -> Scope:
    return Scope(conn, shared_settings.schema_name)


@pytest.fixture
async def listener(conn: asyncpg.Connection, scope: Scope) -> AsyncIterator[Listener]:
    listening = Listener(conn, scope.channel)
    await conn.add_listener(scope.channel, listening._received)
    yield listening
    await conn.remove_listener(scope.channel, listening._received)


def _item(n: int, channel: str, key: str | None = None) -> dict[str, Any]:
    return {
        "operation_type": "email.send",
        "payload": {"n": n},
        "channel": channel,
        "idempotency_key": key,
    }


async def test_published_operation_is_invisible_to_others_until_the_caller_commits(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction() as tx:
        op_id = await tx.publish(
            operation_type="demo.hello", payload={"msg": "hi"}, channel=scope.channel
        )
        assert await scope.operations() == []
        assert await scope.audit_count() == 0

    [row] = await scope.operations()
    assert row["id"] == op_id
    assert (row["operation_type"], row["channel"], row["payload"], row["state"]) == (
        "demo.hello",
        scope.channel,
        {"msg": "hi"},
        "pending",
    )


async def test_published_operation_is_gone_when_the_caller_rolls_back(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction(commit=False) as tx:
        await tx.publish("demo.hello", {"msg": "hi"}, scope.channel)

    async def fails_after_publishing() -> None:
        async with publisher.transaction() as tx:
            await tx.publish("demo.hello", {"msg": "never committed"}, scope.channel)
            raise RuntimeError("the caller's error")

    with pytest.raises(RuntimeError, match="the caller's error"):
        await fails_after_publishing()

    assert await scope.operations() == []
    assert await scope.audit_count() == 0


async def test_notify_carries_exactly_the_id_and_arrives_only_after_commit(
    publisher: PublishPath, scope: Scope, listener: Listener
) -> None:
    async with publisher.transaction() as tx:
        op_id = await tx.publish("demo.hello", {"msg": "hi"}, scope.channel)
        assert await listener.drain() == []

    assert await listener.drain() == [str(op_id)]


async def test_rolled_back_publish_sends_no_notify(
    publisher: PublishPath, scope: Scope, listener: Listener
) -> None:
    async with publisher.transaction(commit=False) as tx:
        await tx.publish("demo.hello", {"msg": "hi"}, scope.channel)

    assert await listener.drain() == []


async def test_same_idempotency_key_returns_the_same_operation(
    publisher: PublishPath, scope: Scope, listener: Listener
) -> None:
    async with publisher.transaction() as tx:
        first = await tx.publish(
            "billing.charge", {"order": 42}, scope.channel, idempotency_key=scope.key("charge-42")
        )
    async with publisher.transaction() as tx:
        again = await tx.publish(
            "billing.charge", {"order": 42}, scope.channel, idempotency_key=scope.key("charge-42")
        )

    assert again == first
    assert [r["id"] for r in await scope.operations()] == [first]
    assert await scope.audit_count() == 1
    assert await listener.drain() == [str(first)]  # the repeat wakes nobody


async def test_same_key_in_the_same_transaction_returns_the_same_operation(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction() as tx:
        first = await tx.publish("t", {"a": 1, "b": [1, 2]}, scope.channel, None, scope.key("k"))
        # Same JSON value, different key order: the same intent.
        again = await tx.publish("t", {"b": [1, 2], "a": 1}, scope.channel, None, scope.key("k"))

    assert again == first
    assert len(await scope.operations()) == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"payload": {"order": 43}}, id="payload"),
        pytest.param({"operation_type": "billing.refund"}, id="operation_type"),
        pytest.param({"channel": "OTHER"}, id="channel"),  # the scope's other channel
    ],
)
async def test_same_key_with_a_different_intent_is_a_conflict_and_writes_nothing(
    publisher: PublishPath, scope: Scope, change: dict[str, Any]
) -> None:
    change = {name: scope.other if value == "OTHER" else value for name, value in change.items()}
    original = {
        "operation_type": "billing.charge",
        "payload": {"order": 42},
        "channel": scope.channel,
        "idempotency_key": scope.key("charge-42"),
    }
    async with publisher.transaction() as tx:
        op_id = await tx.publish(**original)

    async with publisher.transaction() as tx:
        earlier = await tx.publish("audit.note", {"n": 1}, scope.channel)
        with pytest.raises(IdempotencyConflict) as excinfo:
            await tx.publish(**{**original, **change})
        # The conflict leaves the caller's transaction usable: earlier work still commits.

    assert f"'{scope.key('charge-42')}'" in str(excinfo.value)
    assert f"operation {op_id}" in str(excinfo.value)
    rows = await scope.operations()
    assert [(r["id"], r["operation_type"], r["payload"]) for r in rows] == [
        (op_id, "billing.charge", {"order": 42}),
        (earlier, "audit.note", {"n": 1}),
    ]
    assert await scope.audit_count() == 2


async def test_publish_many_returns_ids_in_input_order(
    publisher: PublishPath, scope: Scope
) -> None:
    items = [_item(n, scope.channel) for n in range(6)]
    async with publisher.transaction() as tx:
        ids = await tx.publish_many(items)

    by_id = {r["id"]: r["payload"] for r in await scope.operations()}
    assert [by_id[op_id] for op_id in ids] == [{"n": n} for n in range(6)]
    assert await scope.audit_count() == 6


async def test_publish_many_mixes_keyed_and_unkeyed_items_in_input_order(
    publisher: PublishPath, scope: Scope
) -> None:
    items = [
        _item(0, scope.channel),
        _item(1, scope.channel, key=scope.key("k1")),
        _item(2, scope.channel),
        _item(3, scope.channel, key=scope.key("k3")),
        _item(4, scope.channel),
    ]
    async with publisher.transaction() as tx:
        ids = await tx.publish_many(items)

    rows = {r["id"]: r for r in await scope.operations()}
    assert len(set(ids)) == 5
    assert [(rows[i]["payload"], rows[i]["idempotency_key"]) for i in ids] == [
        ({"n": 0}, None),
        ({"n": 1}, scope.key("k1")),
        ({"n": 2}, None),
        ({"n": 3}, scope.key("k3")),
        ({"n": 4}, None),
    ]


async def test_publish_many_returns_existing_ids_for_keys_already_published(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction() as tx:
        k1 = await tx.publish("email.send", {"n": 1}, scope.channel, None, scope.key("k1"))
    batch = [
        _item(0, scope.channel),
        _item(1, scope.channel, key=scope.key("k1")),
        _item(2, scope.channel, scope.key("k2")),
    ]

    async with publisher.transaction() as tx:
        first = await tx.publish_many(batch)
    async with publisher.transaction() as tx:
        again = await tx.publish_many(batch)

    assert first[1] == k1
    assert again[1:] == first[1:]
    assert again[0] != first[0]  # an unkeyed item is new intent every time
    rows = await scope.operations()
    assert sorted(r["id"] for r in rows) == sorted({k1, *first, *again})
    assert len(rows) == 4


async def test_publish_many_repeating_a_key_within_the_batch_records_it_once(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction() as tx:
        ids = await tx.publish_many(
            [_item(1, scope.channel, scope.key("k")), _item(1, scope.channel, scope.key("k"))]
        )

    assert ids[0] == ids[1]
    assert [r["id"] for r in await scope.operations()] == [ids[0]]


async def test_publish_many_repeating_a_key_with_different_payloads_is_a_conflict(
    publisher: PublishPath, scope: Scope
) -> None:
    async with publisher.transaction() as tx:
        with pytest.raises(IdempotencyConflict, match=f"'{scope.key('k')}'"):
            await tx.publish_many(
                [_item(1, scope.channel, scope.key("k")), _item(2, scope.channel, scope.key("k"))]
            )

    assert await scope.operations() == []
    assert await scope.audit_count() == 0


async def test_publish_many_conflict_writes_nothing_of_the_batch_but_keeps_earlier_work(
    publisher: PublishPath, scope: Scope, listener: Listener
) -> None:
    async with publisher.transaction() as tx:
        existing = await tx.publish("email.send", {"n": 1}, scope.channel, None, scope.key("k1"))
    assert await listener.drain() == [str(existing)]

    async with publisher.transaction() as tx:
        earlier = await tx.publish("audit.note", {"before": True}, scope.channel)
        with pytest.raises(IdempotencyConflict, match=f"'{scope.key('k1')}'"):
            await tx.publish_many(
                [
                    _item(10, scope.channel),
                    _item(11, scope.channel, key=scope.key("k_new")),
                    _item(
                        99, scope.channel, key=scope.key("k1")
                    ),  # k1 exists with payload {"n": 1}
                ],
            )

    rows = await scope.operations()
    assert [(r["id"], r["payload"]) for r in rows] == [
        (existing, {"n": 1}),
        (earlier, {"before": True}),
    ]
    assert await scope.audit_count() == 2
    # The batch's wake-up was rolled back with its savepoint; the earlier publish's was not.
    assert await listener.drain() == [str(earlier)]


async def test_publish_many_invalid_item_names_its_index_and_writes_nothing(
    publisher: PublishPath, scope: Scope
) -> None:
    items = [
        _item(0, scope.channel),
        _item(1, scope.channel, scope.key("k1")),
        _item(2, "bad;channel"),
    ]
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError, match=r"^operations\[2\]: invalid channel 'bad;channel'"):
            await tx.publish_many(items)

    assert await scope.operations() == []


async def test_publish_many_of_nothing_returns_no_ids(publisher: PublishPath) -> None:
    async with publisher.transaction() as tx:
        assert await tx.publish_many([]) == []
