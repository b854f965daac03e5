"""DESIGN §7: bad input gets a clear error naming the bad value, and nothing is written --
on every way to publish (an AsyncSession, a sync Session, psycopg, Django: publishkit.py).

All the cases share one schema migrated for this module (conftest.py): nothing should be
written there, and each test checks that the counts did not move (or moved by exactly what it
published).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from publishkit import PublishPath

from pgoutbox import PublishError
from pgoutbox.settings import DatabaseSettings

VALID: dict[str, Any] = {
    "operation_type": "billing.charge",
    "payload": {"order": 1},
    "channel": "workflow",
}


def _nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for _ in range(depth):
        payload = {"a": payload}
    return payload


# (argument, bad value, what the error message must contain)
BAD_ARGUMENTS = [
    pytest.param("payload", {1, 2}, "type set is not JSON serializable", id="payload-set"),
    pytest.param(
        "payload",
        {"at": datetime(2030, 1, 1, tzinfo=UTC)},
        "type datetime is not JSON serializable",
        id="payload-datetime",
    ),
    pytest.param("payload", float("nan"), "not NaN or infinity", id="payload-nan"),
    pytest.param("payload", {"amount": float("inf")}, "not NaN or infinity", id="payload-inf"),
    pytest.param("payload", {"note": "a\x00b"}, "contains a NUL character", id="payload-nul"),
    pytest.param("payload", {"k\x00": 1}, "contains a NUL character", id="payload-nul-key"),
    pytest.param("payload", _nested(5000), "more than 500 levels", id="payload-too-deep"),
    pytest.param("payload", {"note": "\ud800"}, "lone surrogate", id="payload-surrogate"),
    pytest.param("idempotency_key", "k\x00", r"invalid idempotency_key 'k\x00'", id="key-nul"),
    pytest.param(
        "idempotency_key", "k\udc00", r"invalid idempotency_key 'k\udc00'", id="key-surrogate"
    ),
    pytest.param(
        "ordering_key", "o\ud83d", r"invalid ordering_key 'o\ud83d'", id="ordering-surrogate"
    ),
    pytest.param("channel", "bad;channel", "invalid channel 'bad;channel'", id="channel-semi"),
    pytest.param("channel", 'x"y', """invalid channel 'x"y'""", id="channel-quote"),
    pytest.param("channel", "nul\x00", r"invalid channel 'nul\x00'", id="channel-nul"),
    pytest.param("channel", "Workflow", "invalid channel 'Workflow'", id="channel-upper"),
    pytest.param("channel", "", "invalid channel ''", id="channel-empty"),
    pytest.param("channel", None, "invalid channel None", id="channel-none"),
    pytest.param("channel", "a" * 64, "64 bytes is longer", id="channel-64-bytes"),
    pytest.param(
        "operation_type", "bad type!", "invalid operation_type 'bad type!'", id="type-space"
    ),
    pytest.param("operation_type", "", "invalid operation_type ''", id="type-empty"),
    pytest.param("operation_type", ".hidden", "invalid operation_type '.hidden'", id="type-dot"),
    pytest.param("operation_type", "x" * 201, "at most 200 characters", id="type-too-long"),
    pytest.param("operation_type", None, "invalid operation_type None", id="type-none"),
    pytest.param("operation_type", 42, "invalid operation_type 42", id="type-int"),
    pytest.param(
        "run_at",
        datetime(2030, 1, 1, 12, 0),
        "invalid run_at datetime.datetime(2030, 1, 1, 12, 0): pass a timezone-aware datetime",
        id="run_at-naive",
    ),
    pytest.param(
        "run_at", "2030-01-01T00:00:00Z", "invalid run_at '2030-01-01T00:00:00Z'", id="run_at-str"
    ),
    pytest.param("priority", "1", "invalid priority '1'", id="priority-str"),
    pytest.param("priority", 1.5, "invalid priority 1.5", id="priority-float"),
    pytest.param("priority", True, "invalid priority True", id="priority-bool"),
    pytest.param("priority", 2**31, f"invalid priority {2**31}", id="priority-overflow"),
    pytest.param("priority", None, "invalid priority None", id="priority-none"),
    pytest.param("max_attempts", 0, "invalid max_attempts 0", id="max_attempts-zero"),
    pytest.param("max_attempts", "3", "invalid max_attempts '3'", id="max_attempts-str"),
    pytest.param("max_attempts", 2.0, "invalid max_attempts 2.0", id="max_attempts-float"),
    pytest.param("max_attempts", False, "invalid max_attempts False", id="max_attempts-bool"),
    pytest.param("idempotency_key", "", "invalid idempotency_key ''", id="key-empty"),
    pytest.param("idempotency_key", 42, "invalid idempotency_key 42", id="key-int"),
    pytest.param("idempotency_key", "k" * 501, "at most 500 characters", id="key-too-long"),
]


async def _counts(conn: asyncpg.Connection, schema: str) -> tuple[int, int]:
    """(operations, audit rows) as another connection sees them."""
    row = await conn.fetchrow(
        f'SELECT (SELECT count(*) FROM "{schema}".operations), '
        f'(SELECT count(*) FROM "{schema}".audit_log)'
    )
    assert row is not None
    return row[0], row[1]


@pytest.fixture
async def small(publisher: PublishPath) -> AsyncIterator[PublishPath]:
    """The test's way to publish, with a payload limit of 100 bytes."""
    path = PublishPath(
        publisher.name, publisher.settings.model_copy(update={"max_payload_bytes": 100})
    )
    yield path
    await path.close()


@pytest.mark.parametrize(("argument", "value", "message"), BAD_ARGUMENTS)
async def test_publish_operation_refuses_bad_argument_naming_it_and_writes_nothing(
    publisher: PublishPath,
    shared_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    argument: str,
    value: Any,
    message: str,
) -> None:
    before = await _counts(conn, shared_settings.schema_name)
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError) as excinfo:
            await tx.publish(**{**VALID, argument: value})

    assert message in str(excinfo.value)
    assert await _counts(conn, shared_settings.schema_name) == before


@pytest.mark.parametrize(("argument", "value", "message"), BAD_ARGUMENTS)
async def test_publish_many_refuses_bad_item_naming_its_index_and_writes_nothing_of_the_batch(
    publisher: PublishPath,
    shared_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    argument: str,
    value: Any,
    message: str,
) -> None:
    batch = [VALID, {**VALID, "idempotency_key": "fine"}, {**VALID, argument: value}, VALID]
    before = await _counts(conn, shared_settings.schema_name)
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError) as excinfo:
            await tx.publish_many(batch)

    assert str(excinfo.value).startswith("operations[2]: ")
    assert message in str(excinfo.value)
    assert await _counts(conn, shared_settings.schema_name) == before


async def test_payload_over_the_configured_limit_is_refused_with_its_size(
    small: PublishPath, shared_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    before = await _counts(conn, shared_settings.schema_name)
    too_big = {"b": "x" * 92}  # 101 bytes as JSON
    async with small.transaction() as tx:
        with pytest.raises(PublishError) as excinfo:
            await tx.publish("billing.charge", too_big, "workflow")
        with pytest.raises(PublishError, match=r"^operations\[1\]: payload .* is 101 bytes"):
            await tx.publish_many([VALID, {**VALID, "payload": too_big}])

    assert str(excinfo.value).startswith(
        "payload of 'billing.charge' is 101 bytes as JSON, over the limit of 100"
    )
    assert "database.max_payload_bytes" in str(excinfo.value)
    assert await _counts(conn, shared_settings.schema_name) == before


async def test_payload_size_limit_counts_utf8_bytes(
    small: PublishPath, shared_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    before = await _counts(conn, shared_settings.schema_name)
    async with small.transaction() as tx:
        with pytest.raises(PublishError, match="is 109 bytes as JSON"):
            await tx.publish("t", {"b": "é" * 50}, "workflow")  # 50 characters

    assert await _counts(conn, shared_settings.schema_name) == before


async def test_payload_exactly_at_the_limit_is_accepted(
    small: PublishPath, shared_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    operations, audit_rows = await _counts(conn, shared_settings.schema_name)
    async with small.transaction() as tx:
        await tx.publish("billing.charge", {"b": "x" * 91}, "workflow")

    assert await _counts(conn, shared_settings.schema_name) == (operations + 1, audit_rows + 1)


async def test_backslash_u0000_text_is_not_mistaken_for_a_nul(
    publisher: PublishPath, shared_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    path = "C:\\u0000\\dir"  # a backslash followed by "u0000": ordinary text
    async with publisher.transaction() as tx:
        op_id = await tx.publish("files.copy", {"path": path}, "workflow")

    stored = await conn.fetchval(
        f"SELECT payload->>'path' FROM \"{shared_settings.schema_name}\".operations WHERE id = $1",
        op_id,
    )
    assert stored == path


@pytest.mark.parametrize(
    ("item", "message"),
    [
        pytest.param({**VALID, "delay": 5}, "unknown argument(s) ['delay']", id="delay"),
        pytest.param(
            {**VALID, "idempotency-key": "k", "runat": None},
            "unknown argument(s) ['idempotency-key', 'runat']",
            id="typos",
        ),
        pytest.param({**VALID, "session": None}, "unknown argument(s) ['session']", id="session"),
    ],
)
async def test_publish_many_refuses_unknown_keys_naming_them_and_writes_nothing(
    publisher: PublishPath,
    shared_settings: DatabaseSettings,
    conn: asyncpg.Connection,
    item: dict[str, Any],
    message: str,
) -> None:
    before = await _counts(conn, shared_settings.schema_name)
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError) as excinfo:
            await tx.publish_many([VALID, item])

    assert str(excinfo.value).startswith(f"operations[1]: {message}; allowed: ")
    assert await _counts(conn, shared_settings.schema_name) == before


async def test_publish_many_item_without_payload_is_refused(
    publisher: PublishPath,
    shared_settings: DatabaseSettings,
    conn: asyncpg.Connection,
) -> None:
    item = {"operation_type": "billing.charge", "channel": "workflow"}
    before = await _counts(conn, shared_settings.schema_name)
    async with publisher.transaction() as tx:
        with pytest.raises(PublishError, match=r"^operations\[0\]: payload is required"):
            await tx.publish_many([item])

    assert await _counts(conn, shared_settings.schema_name) == before


async def test_refused_publish_leaves_the_callers_transaction_usable(
    publisher: PublishPath, shared_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with publisher.transaction() as tx:
        before = await tx.publish(**VALID)
        with pytest.raises(PublishError):
            await tx.publish(**{**VALID, "payload": {1, 2}})
        with pytest.raises(PublishError):
            await tx.publish_many([VALID, {**VALID, "channel": "bad;channel"}])
        after = await tx.publish(**VALID)

    # Nothing else was committed between the two (the module's tests run one at a time).
    rows = await conn.fetch(
        f'SELECT id FROM "{shared_settings.schema_name}".operations '
        "WHERE id BETWEEN $1 AND $2 ORDER BY id",
        before,
        after,
    )
    assert [r["id"] for r in rows] == [before, after]
