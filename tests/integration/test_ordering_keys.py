"""Ordering keys where publishers and operators meet them: concurrent publishers of one key
take turns (so id order is commit order), a blocked operation is not "due" to the idle timer,
and cancelling a dead operation releases the ones after it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from opkit import audit, operation, publish, wait_for_state

from pgoutbox import (
    Admin,
    DatabaseSessionManager,
    DoNotRetry,
    HandlerContext,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_many,
    publish_operation,
)
from pgoutbox.sql import queries


async def test_a_second_publisher_of_a_key_waits_for_the_first_so_ids_follow_commit_order(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    channel = settings.workflow_system.channel
    async with sm.session() as first, sm.session() as second:
        a = await publish_operation(first, "work", {"n": 1}, channel, ordering_key="order-42")
        blocked = asyncio.create_task(
            publish_operation(second, "work", {"n": 2}, channel, ordering_key="order-42")
        )
        # The second publisher waits for the first one's transaction, however long it takes.
        done, _ = await asyncio.wait([blocked], timeout=0.5)
        assert not done
        await first.commit()
        b = await asyncio.wait_for(blocked, 10)
        await second.commit()
    assert a < b
    # Another key, or no key at all, never waits for order-42.
    async with sm.session() as holder, sm.session() as other:
        await publish_operation(holder, "work", {}, channel, ordering_key="order-42")
        await asyncio.wait_for(
            publish_many(
                other,
                [
                    {"operation_type": "work", "payload": {}, "channel": channel},
                    {
                        "operation_type": "work",
                        "payload": {},
                        "channel": channel,
                        "ordering_key": "order-43",
                    },
                ],
            ),
            5,
        )
        await other.commit()
        await holder.rollback()


async def test_an_operation_held_back_by_its_key_does_not_wake_the_idle_worker(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    schema = settings.database.schema_name
    first = await publish(sm, settings, "work", ordering_key="k")
    await publish(sm, settings, "work", ordering_key="k")
    # Make the first one dead, as a worker giving up would.
    await conn.execute(
        f"UPDATE \"{schema}\".operations SET state = 'claimed', transition = 'claim', "
        "attempts = 1, step_attempts = 1, lease_owner = 'w' WHERE id = $1",
        first,
    )
    await conn.execute(
        f"UPDATE \"{schema}\".operations SET state = 'dead', transition = 'give_up', "
        "lease_owner = NULL WHERE id = $1",
        first,
    )
    q = queries(schema)["operations_next_run_at"]
    wait = await conn.fetchval(
        q.asyncpg_sql,
        *q.args(
            channel=settings.workflow_system.channel,
            operation_types=["work"],
            has_steps=False,
            step_types=[],
            step_states=[],
        ),
    )
    # Nothing is due: the second operation waits for an operator, not for a clock.
    assert wait is None


async def test_cancelling_a_dead_operation_releases_the_operations_after_it(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    schema = settings.database.schema_name
    router = WorkflowRouter()
    ran: list[int] = []

    @router.on("work")
    async def work(ctx: HandlerContext, payload: Any) -> None:
        if payload.get("fail"):
            raise DoNotRetry("declined")
        ran.append(ctx.operation_id)

    head = await publish(sm, settings, "work", {"fail": True}, ordering_key="order-7")
    after = await publish(sm, settings, "work", {}, ordering_key="order-7")
    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_state(conn, schema, head, "dead")
        await asyncio.sleep(0.5)  # the worker polls meanwhile; `after` must stay put
        assert (await operation(conn, schema, after))["state"] == "pending"
        async with Admin(settings.database) as admin:
            (result,) = await admin.cancel([head], actor="alice", reason="refunded by hand")
        assert result.ok, result.message
        await wait_for_state(conn, schema, after, "succeeded")
    assert ran == [after]
    last = (await audit(conn, schema, head))[-1]
    assert (last["trigger"], last["from_state"], last["to_state"], last["actor"]) == (
        "cancel",
        "dead",
        "cancelled",
        "alice",
    )
