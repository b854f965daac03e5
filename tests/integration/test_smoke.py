from __future__ import annotations

import asyncpg

from pgoutbox import DatabaseSessionManager, publish_operation, verify
from pgoutbox.settings import DatabaseSettings


async def test_published_operation_is_pending_with_one_audit_row(
    sm: DatabaseSessionManager, db_settings: DatabaseSettings, conn: asyncpg.Connection
) -> None:
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type="demo.hello", payload={"msg": "hi"}, channel="workflow"
        )
        await session.commit()
    s = db_settings.schema_name
    assert await conn.fetchval(f'SELECT state FROM "{s}".operations WHERE id = $1', op_id) == (
        "pending"
    )
    rows = await conn.fetch(
        f'SELECT seq, to_state FROM "{s}".audit_log WHERE operation_id = $1', op_id
    )
    assert [tuple(r) for r in rows] == [(1, "pending")]
    assert (await verify(db_settings)).ok
