"""Helpers shared by the worker tests: publish one operation, read it and its audit trail back,
wait for a state with a bounded deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from pgoutbox import DatabaseSessionManager, Settings, publish_operation


def worker_settings(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with some workflow_system fields changed."""
    return settings.model_copy(
        update={"workflow_system": settings.workflow_system.model_copy(update=changes)}
    )


async def publish(
    sm: DatabaseSessionManager,
    settings: Settings,
    operation_type: str,
    payload: Any = None,
    **kw: Any,
) -> int:
    """Publish one operation (payload ``{}`` unless given) on the test channel (unless
    ``channel`` is given) and commit."""
    kw.setdefault("channel", settings.workflow_system.channel)
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type, {} if payload is None else payload, **kw
        )
        await session.commit()
    return op_id


async def operation(conn: asyncpg.Connection, schema: str, op_id: int) -> asyncpg.Record:
    """The operation's row."""
    row = await conn.fetchrow(f'SELECT * FROM "{schema}".operations WHERE id = $1', op_id)
    assert row is not None, f"operation {op_id} does not exist"
    return row


async def audit(conn: asyncpg.Connection, schema: str, op_id: int) -> list[asyncpg.Record]:
    """The operation's audit rows in order, each with the id of the transaction that wrote it
    (``xid``)."""
    return list(
        await conn.fetch(
            f'SELECT *, xmin::text AS xid FROM "{schema}".audit_log WHERE operation_id = $1 '
            "ORDER BY seq",
            op_id,
        )
    )


async def wait_for_state(
    conn: asyncpg.Connection, schema: str, op_id: int, state: str, within: float = 10
) -> asyncpg.Record:
    """Poll the operation until it is in ``state``; fail with its audit trail after ``within``
    seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while (row := await operation(conn, schema, op_id))["state"] != state:
        if asyncio.get_running_loop().time() > deadline:
            trail = [
                (r["trigger"], r["to_state"], r["detail"]) for r in await audit(conn, schema, op_id)
            ]
            raise AssertionError(
                f"operation {op_id} is {row['state']!r}, not {state!r}, after {within}s: {trail}"
            )
        await asyncio.sleep(0.02)
    return row
